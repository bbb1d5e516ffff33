"""Where one study's analysis time goes, in the worker's own study pipeline, beside the bare forward passes.

Runs :func:`workers.pipeline.analyse_study` (what the analysis task runs) on a synthetic 4-view
full-field mammogram through the mammography models, then :func:`workers.pipeline.write_study_report`
(what the last stage adds with ``outputs.report: study``: the heatmap series of the deciding model, the
study SR and whatever else it writes), then C-STOREs the outputs to a throw-away storage SCP on loopback
(DCMTK ``storescp --ignore``), and reports per study:

    header read   every source's header, once (read_sources)
    decode        every source decoded into its display image (and how many decodes there were)
    forward       each model's forward pass with its explanation (Grad-CAM, the model's own maps)
    bare forward  the same network on the same preprocessed batch under inference_mode, no explanation
    explanation   forward - bare forward
    pre / post    each model's preprocessing, and its maps resized back onto the source
    outputs       each model's kept predictions and maps (built while the next model runs)
    study report  the heatmap series, the study SR and the rest write_study_report builds
    delivery      the C-STORE of every output

and the share of the study's time spent outside the models' forward and explanation passes.

``--per-model`` runs the path the worker had before the study pipeline, for comparison on the same
machine and images: each model decodes its images itself (``ModelHost.run``), and each output is
built from its source read and decoded again, its digest taken again per model.

Usage: .venv/bin/python benchmarks/pipeline/bench_study.py [--size 3328x2560] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import structlog
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gateway import spool  # noqa: E402
from gateway.messages import InstanceRef, Priority, StudyJob  # noqa: E402
from gateway.settings import (  # noqa: E402
    DestinationSettings,
    ModelSettings,
    PluginSettings,
    Settings,
    TriageSettings,
    WorkerSettings,
)
from plugins.host import ModelHost, RunTimings  # noqa: E402
from plugins.synthetic import make_mg_study  # noqa: E402
from plugins.types import Prediction  # noqa: E402
from workers import pipeline  # noqa: E402
from workers.pacs import deliver  # noqa: E402

MG_MODELS = ["asg_mammonet", "clgb_net", "lem", "hybrid_birads"]


def write_study(directory: Path, size: tuple[int, int]) -> StudyJob:
    datasets = make_mg_study(seed=11, label="malignant", size=size)
    instances = []
    for number, ds in enumerate(datasets):
        path = directory / f"view{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        instances.append(
            InstanceRef(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                modality="MG",
                path=path.name,
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                study_version=1,
                # The gateway takes it while receiving (gateway.handlers); the worker never hashes again.
                content_digest=spool.file_digest(path),
            )
        )
    return StudyJob(
        job_id="bench-v1",
        study_instance_uid=str(datasets[0].StudyInstanceUID),
        study_version=1,
        calling_ae="BENCH",
        priority=Priority.ROUTINE,
        storage_root=str(directory),
        instances=tuple(instances),
    )


def start_storage_scp() -> tuple[Callable[[], None], int]:
    """A storage SCP on loopback that accepts the outputs and keeps nothing: DCMTK ``storescp --ignore`` (a
    separate process, as a PACS is) when installed, else pynetdicom in this process.  Returns (stop, port)."""
    import shutil
    import socket
    import subprocess

    if shutil.which("storescp"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        process = subprocess.Popen(
            ["storescp", "--ignore", "--aetitle", "BENCH_PACS", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)

        def stop() -> None:
            process.terminate()
            process.wait(timeout=10)

        return stop, port
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    ae = AE(ae_title="BENCH_PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)]
    )
    return server.shutdown, int(server.socket.getsockname()[1])


def bare_forward_seconds(host: ModelHost, model: str, sources: list[pipeline.Source]) -> float:
    """The loaded network alone on the study's preprocessed batch (same images, same batch size)."""
    loaded = host.load(model)
    images = pipeline.DecodedImages(pipeline.StudyTimings())
    tensors = []
    for source in sources:
        if source.ref is None or host.skip_reason(loaded.plugin, source.ref) is not None:
            continue
        decoded = images.frames(source.ref, str(loaded.options["frames"]))
        assert not isinstance(decoded, str), decoded
        tensors += [loaded.plugin.preprocess(image, ref, loaded.options)[0] for ref, image in decoded]
    total = 0.0
    for start in range(0, len(tensors), loaded.batch_size):
        batch = torch.stack(tensors[start : start + loaded.batch_size]).to(loaded.device)
        started = time.perf_counter()
        with torch.inference_mode():
            loaded.model(batch)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)
        total += time.perf_counter() - started
    return total


#: The parts of write_study_report timed apart (those this checkout has), by the name they are shown under.
REPORT_PARTS = {
    "read_kept_maps": "kept maps read back (an earlier stage's models only; this stage's are in memory)",
    "write_study_heatmaps": "heatmap series: SCs drawn, written and previewed on a pool",
    "build_study_sr": "study SR: content and data set",
    "write_cad_sr": "Mammography CAD SR: peaks, content, written (on a thread of its own, beside the SCs)",
}
#: Parts that run beside the others: they are not taken from the report's time to give "the rest".
BESIDE = {"write_cad_sr"}


class PartTimer:
    """Seconds spent in each of :data:`REPORT_PARTS` while timing is on (a wrapper on the module's name)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        for name in REPORT_PARTS:
            if hasattr(pipeline, name):
                setattr(pipeline, name, self._timed(name, getattr(pipeline, name)))

    def _timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

        return timed


PARTS = PartTimer()


def run_study(
    host: ModelHost,
    models: list[str],
    job: StudyJob,
    settings: Settings,
    out: Path,
    destination: DestinationSettings,
) -> dict[str, Any]:
    """One study as the worker runs it: the stages, then the study report (whatever
    :func:`workers.pipeline.write_study_report` writes: heatmap series, study SR, CAD SR), then delivery."""
    timings = pipeline.StudyTimings()
    started = time.perf_counter()
    sources = pipeline.read_sources(job, timings)
    decoded = out / pipeline.DECODED_DIR
    images = pipeline.DecodedImages(timings, saved=decoded, digests=pipeline.content_digests(sources))
    # The stages as the analysis task runs them: with triage.first_stage_model, that model first, its maps
    # and decoded images kept on disk for the second stage, and the rest in a second task (its own header
    # reads; it reads the decoded images back); the last stage's models take their maps to the report in
    # memory.
    first = settings.triage.first_stage_model
    stages = [[first], [m for m in models if m != first]] if first in models and len(models) > 1 else [models]
    runs = []
    for number, stage in enumerate(stages):
        last = number == len(stages) - 1
        if number:
            # A later stage reads back the display images the first one decoded (another task in the worker).
            sources = pipeline.read_sources(job, timings)
            images = pipeline.DecodedImages(timings, saved=decoded, digests=pipeline.content_digests(sources))
        runs += pipeline.analyse_study(
            host, stage, sources, settings, out, timings, images=images, maps_on_disk=not last
        )
        if not last:
            saving = time.perf_counter()
            images.save(decoded)
            timings.read_back += time.perf_counter() - saving
    analysed = time.perf_counter()
    PARTS.seconds.clear()
    report: list[Path] = []
    if settings.outputs.report == "study":  # what the last stage adds once every model is done
        report = pipeline.write_study_report(
            sources,
            out,
            None,
            settings,
            images=images,
            accepting=models,
            kept_maps={run.model: run.kept_maps for run in runs[-len(stages[-1]) :] if run.kept_maps},
        )
    delivery_started = time.perf_counter()
    paths = [p for run in runs for p in run.outputs] + report
    results = deliver([pydicom.dcmread(p) for p in paths], destination)
    delivery = time.perf_counter() - delivery_started
    total = time.perf_counter() - started
    if not all(r.ok for r in results) or any(r.failures for r in runs):
        raise RuntimeError(f"the study did not go through: {[r.failures for r in runs]}")
    return {
        "timings": timings,
        "delivery": delivery,
        "total": total,
        "outputs": len(paths),
        "sources": sources,
        "analyse": analysed - started,
        "study_report": delivery_started - analysed,
        "parts": dict(PARTS.seconds),
        "bytes": sum(p.stat().st_size for p in paths),
    }


def run_study_per_model(
    host: ModelHost,
    models: list[str],
    job: StudyJob,
    settings: Settings,
    out: Path,
    destination: DestinationSettings,
) -> dict[str, Any]:
    """The worker's path before the study pipeline: a decode per model and per output, a digest per model."""
    import plugins.host
    from workers.outputs import ReportedModel, build_heatmap_sc, build_sr

    timings = pipeline.StudyTimings()
    real_decode = plugins.host.decode_frames

    def counted(path: Any, policy: Any) -> Any:
        started = time.perf_counter()
        try:
            return real_decode(path, policy)
        finally:
            timings.decode += time.perf_counter() - started
            timings.decodes += 1

    plugins.host.decode_frames = counted  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        refs = [s.ref for s in pipeline.read_sources(job, timings) if s.ref is not None]
        paths: list[Path] = []
        for model in models:
            run_timings = timings.models.setdefault(model, RunTimings())
            predictions = [r for r in host.run(model, refs, run_timings) if isinstance(r, Prediction)]
            outputs_started = time.perf_counter()
            sources = {p.image.sop_instance_uid: pydicom.dcmread(p.image.path) for p in predictions}
            digests = {p.image.sop_instance_uid: pipeline.file_digest(p.image.path) for p in predictions}
            spec = host.load(model).plugin.spec
            directory = out / model
            directory.mkdir(parents=True, exist_ok=True)
            sr = build_sr(
                list(sources.values()),
                predictions,
                model=ReportedModel.from_spec(spec, predictions[0].parameters),
                source_digests=digests,
            )
            paths.append(pipeline._save(sr, directory))
            for index, prediction in enumerate(predictions):
                uid = prediction.image.sop_instance_uid
                sc = build_heatmap_sc(
                    sources[uid],
                    None,
                    prediction,
                    instance_number=index + 1,
                    display_name=spec.display_name,
                    source_digest=digests[uid],
                )
                paths.append(pipeline._save(sc, directory))
            timings.outputs[model] = time.perf_counter() - outputs_started
        delivery_started = time.perf_counter()
        results = deliver([pydicom.dcmread(p) for p in paths], destination)
        delivery = time.perf_counter() - delivery_started
        total = time.perf_counter() - started
    finally:
        plugins.host.decode_frames = real_decode  # type: ignore[assignment]
    if not all(r.ok for r in results):
        raise RuntimeError("the study did not go through")
    return {
        "timings": timings,
        "delivery": delivery,
        "total": total,
        "outputs": len(paths),
        "sources": pipeline.read_sources(job),
        "analyse": delivery_started - started,
        "study_report": 0.0,
        "bytes": sum(p.stat().st_size for p in paths),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="3328x2560", help="rows x columns of each view")
    parser.add_argument("--models", nargs="+", default=MG_MODELS)
    parser.add_argument("--repeats", type=int, default=2, help="timed studies after one warm-up study")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--per-model", action="store_true", help="the path before the study pipeline")
    parser.add_argument(
        "--read-ahead",
        choices=("auto", "on", "off"),
        default="auto",
        help="worker.read_ahead: decode and preprocess ahead on a thread of their own (auto: on CUDA only)",
    )
    parser.add_argument(
        "--first-stage",
        default="",
        help="triage.first_stage_model: that model runs first, in a stage of its own (default: none, every "
        "model in one stage; the shipped config says asg_mammonet)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, columns = (int(side) for side in args.size.split("x"))

    settings = Settings(
        plugins=PluginSettings(
            allow_demo_weights=True,
            load_entrypoints=False,
            disabled=tuple(m for m in [*MG_MODELS, "us_fusion"] if m not in args.models),
            models={m: ModelSettings(batch_size=4) for m in args.models},
        ),
        triage=TriageSettings(first_stage_model=args.first_stage or None),
        worker=WorkerSettings(read_ahead=args.read_ahead),
    )
    host = ModelHost(settings, device=args.device)
    stop_scp, port = start_storage_scp()
    destination = DestinationSettings(ae_title="BENCH_PACS", host="127.0.0.1", port=port)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            job = write_study(Path(tmp), (rows, columns))
            run = run_study_per_model if args.per_model else run_study
            run(host, args.models, job, settings, Path(tmp) / "warm-up", destination)
            studies = [
                run(host, args.models, job, settings, Path(tmp) / f"run{i}", destination)
                for i in range(args.repeats)
            ]
            bare = {
                m: statistics.median(bare_forward_seconds(host, m, studies[0]["sources"]) for _ in range(3))
                for m in args.models
            }
    finally:
        stop_scp()

    def median(get: Any) -> float:
        return statistics.median(get(s) for s in studies)

    report: dict[str, Any] = {
        "size": args.size,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "total_s": median(lambda s: s["total"]),
        "header_read_s": median(lambda s: s["timings"].header_read),
        "decode_s": median(lambda s: s["timings"].decode),
        "decodes": studies[0]["timings"].decodes,
        "read_back_s": median(lambda s: s["timings"].read_back),
        "read_backs": studies[0]["timings"].read_backs,
        "sources": len(studies[0]["sources"]),
        "digest_s": median(lambda s: s["timings"].digest),
        "delivery_s": median(lambda s: s["delivery"]),
        "outputs": studies[0]["outputs"],
        "models": {},
    }
    for model in args.models:
        forward = median(lambda s, m=model: s["timings"].models[m].forward)
        report["models"][model] = {
            "forward_with_explanation_s": forward,
            "bare_forward_s": bare[model],
            "explanation_s": forward - bare[model],
            "preprocess_s": median(lambda s, m=model: s["timings"].models[m].preprocess),
            "postprocess_s": median(lambda s, m=model: s["timings"].models[m].postprocess),
            "outputs_s": median(lambda s, m=model: s["timings"].outputs[m]),
        }
    in_models = sum(m["forward_with_explanation_s"] for m in report["models"].values())
    report["forward_with_explanation_s"] = in_models
    report["bare_forward_sum_s"] = sum(m["bare_forward_s"] for m in report["models"].values())
    report["preprocess_s"] = sum(m["preprocess_s"] for m in report["models"].values())
    report["postprocess_s"] = sum(m["postprocess_s"] for m in report["models"].values())
    report["analyse_s"] = median(lambda s: s["analyse"])
    report["study_report_s"] = median(lambda s: s["study_report"])
    report["study_report_parts_s"] = {
        name: median(lambda s, n=name: s.get("parts", {}).get(n, 0.0))
        for name in REPORT_PARTS
        if any(name in s.get("parts", {}) for s in studies)
    }
    report["output_bytes"] = studies[0]["bytes"]
    # What the stages spent besides header, decode, the models' own steps: the wait for the last model's
    # outputs (the others are built while the next model runs) and the loop's own work.
    report["stage_outputs_waited_s"] = report["analyse_s"] - (
        report["header_read_s"]
        + report["decode_s"]
        + report["read_back_s"]
        + report["preprocess_s"]
        + in_models
        + report["postprocess_s"]
    )
    report["outside_forward_and_explanation_s"] = report["total_s"] - in_models
    report["outside_share"] = report["outside_forward_and_explanation_s"] / report["total_s"]
    # The analysis task alone (the stages and the study report): the worker hands the delivery to the
    # delivery queue, and the issue's own figure (a third of the study in building outputs) left it out.
    analysis = report["total_s"] - report["delivery_s"]
    report["analysis_s"] = analysis
    report["analysis_outside_share"] = (analysis - in_models) / analysis
    # The same share with the bare forward passes, for the explanation's own weight.
    report["outside_bare_forward_share"] = 1 - report["bare_forward_sum_s"] / report["total_s"]

    path = "per-model path (before)" if args.per_model else "study pipeline"
    report["path"] = path
    report["load_average"] = os.getloadavg()
    print(
        f"{path}: 4 views {args.size}, {args.device}, {report['threads']} torch threads, median of {args.repeats}"
        f" studies; read-ahead {'on' if host.reads_ahead() else 'off'}; load average {report['load_average'][0]:.1f}"
    )
    print(
        "| model | forward + explanation s | bare forward s | explanation s | preprocess s | maps to source s "
        "| its outputs s (beside the next model) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model, m in report["models"].items():
        print(
            f"| {model} | {m['forward_with_explanation_s']:.2f} | {m['bare_forward_s']:.2f} | "
            f"{m['explanation_s']:.2f} | {m['preprocess_s']:.2f} | {m['postprocess_s']:.2f} | {m['outputs_s']:.2f} |"
        )
    total = report["total_s"]
    rows = [
        ("header read", report["header_read_s"]),
        (f"decode ({report['decodes']} decodes for {report['sources']} sources)", report["decode_s"]),
        *(
            [
                (
                    f"decoded images saved by the first stage, read back by the second ({report['read_backs']})",
                    report["read_back_s"],
                )
            ]
            if report["read_backs"]
            else []
        ),
        ("preprocess, all models", report["preprocess_s"]),
        ("**forward + explanation, all models**", in_models),
        ("maps to source, all models", report["postprocess_s"]),
        ("waiting for the last model's outputs, loop", report["stage_outputs_waited_s"]),
        ("study report (heatmap series, SR, CAD SR)", report["study_report_s"]),
        *((f"- {REPORT_PARTS[name]}", seconds) for name, seconds in report["study_report_parts_s"].items()),
        *(
            [
                (
                    "- the rest: kept predictions read, the shown model's maps shrunk, the study SR written",
                    report["study_report_s"] - sum(parts),
                )
            ]
            if (parts := [v for k, v in report["study_report_parts_s"].items() if k not in BESIDE])
            else []
        ),
        (
            f"delivery ({report['outputs']} objects, {report['output_bytes'] / 1e6:.0f} MB)",
            report["delivery_s"],
        ),
    ]
    print("| step | s | share of the study |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {100 * seconds / total:.1f} % |")
    print(f"| **study** | **{total:.2f}** | 100 % |")
    print(f"bare forward passes, sum over the models: {report['bare_forward_sum_s']:.2f} s")
    print(
        f"outside forward + explanation: {report['outside_forward_and_explanation_s']:.2f} s = "
        f"{100 * report['outside_share']:.1f} % of the study with its delivery; outside the bare forward "
        f"passes: {100 * report['outside_bare_forward_share']:.1f} %"
    )
    print(
        f"the analysis task (study without delivery, {analysis:.2f} s): outside forward + explanation "
        f"{analysis - in_models:.2f} s = {100 * report['analysis_outside_share']:.1f} % (goal <= 15 %)"
    )
    # One worker process analyses one study at a time: its rate is one study per study time.  Without the
    # delivery, which the worker hands to the delivery queue (another process may send while it analyses).
    report["studies_per_hour"] = 3600 / total
    report["studies_per_hour_without_delivery"] = 3600 / (total - report["delivery_s"])
    print(
        f"studies per hour, one worker: {report['studies_per_hour']:.0f} "
        f"({report['studies_per_hour_without_delivery']:.0f} with delivery in another process)"
    )
    if not args.per_model and report["decodes"] != report["sources"]:
        print(f"NOT decoded once: {report['decodes']} decodes for {report['sources']} sources")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
