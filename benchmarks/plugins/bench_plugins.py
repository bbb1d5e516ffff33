"""Latency and throughput of the plugin path against a bare forward of the same network.

The plugin path is what a worker runs per image once it is decoded: ``ModelHost.run_images``,
that is preprocess (letterbox, normalise) -> batched forward with the explanation -> postprocess
(the heatmap mapped back onto the source rows x columns, the Prediction).  The baseline is the
same network with the same weights, called on the same preprocessed batch under
``torch.inference_mode``.  DICOM decoding is timed on its own.  Inputs are synthetic full-field
mammograms from ``plugins.synthetic``.

Run: ``.venv/bin/python benchmarks/plugins/bench_plugins.py`` (``--help`` for options).  A model
is added by adding a row to ``BARE_BUILDERS``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import torch
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless
from torch import nn

from gateway.settings import ModelSettings, PluginSettings, Settings
from plugins.builtin.asg_mammonet import AsgMammoNet
from plugins.host import ModelHost
from plugins.preprocess import decode_frames, read_image_ref
from plugins.synthetic import make_mg_image
from plugins.types import Prediction

#: Plugin name -> builder of its bare network (same architecture; the plugin's weights are copied in).
BARE_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "asg_mammonet": AsgMammoNet,
}


def seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first-call allocations, oneDNN primitive creation
    return statistics.median(seconds(run) for _ in range(repeats))


def paired_medians(
    baseline: Callable[[], object], candidate: Callable[[], object], repeats: int
) -> tuple[float, float, float]:
    """Median seconds of each and the median of their per-pair ratios.

    The two run alternately, so load from other processes on a shared machine hits both alike.
    """
    baseline(), candidate()  # warm-up
    pairs = [(seconds(baseline), seconds(candidate)) for _ in range(repeats)]
    return (
        statistics.median(b for b, _ in pairs),
        statistics.median(c for _, c in pairs),
        statistics.median(c / b for b, c in pairs),
    )


def write_phantom(
    directory: Path, shape: tuple[int, int], transfer_syntax: UID = ExplicitVRLittleEndian
) -> Path:
    """A synthetic mammogram of *shape* (rows, cols) written in *transfer_syntax*."""
    dataset = make_mg_image(seed=7, label="malignant", size=shape).dataset
    if transfer_syntax != ExplicitVRLittleEndian:
        dataset.compress(transfer_syntax)
    path = directory / f"mg_{shape[0]}x{shape[1]}_{transfer_syntax.keyword}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def bench_model(
    name: str, path: Path, batches: list[int], repeats: int, device: str, amp: bool = False
) -> list[dict[str, float | int | str]]:
    """Time the bare forward and the plugin path of model *name* on the image at *path*."""
    settings = Settings(
        plugins=PluginSettings(
            allow_demo_weights=True,
            load_entrypoints=False,
            models={name: ModelSettings(batch_size=max(batches), options={"amp": amp})},
        )
    )
    host = ModelHost(settings, device=device)
    loaded = host.load(name)
    bare = BARE_BUILDERS[name]()
    bare.load_state_dict(loaded.model.state_dict())
    bare.to(loaded.device).eval().requires_grad_(False)
    ref = read_image_ref(path)
    [(_, image)] = decode_frames(path)
    plugin, options = loaded.plugin, loaded.options
    tensor, box = plugin.preprocess(image, ref, options)
    rows: list[dict[str, float | int | str]] = []
    for batch in batches:
        inputs = tensor.unsqueeze(0).repeat(batch, 1, 1, 1).to(loaded.device)

        def bare_forward(inputs: torch.Tensor = inputs) -> None:
            with (
                torch.inference_mode(),
                torch.autocast(loaded.device.type, enabled=amp and loaded.device.type == "cuda"),
            ):
                bare(inputs)
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()

        def plugin_path(batch: int = batch) -> None:
            results = host.run_images(name, [(ref, image)] * batch)
            if not all(isinstance(r, Prediction) and r.heatmap is not None for r in results):
                raise RuntimeError(f"the plugin path failed: {results}")

        bare_s, plugin_s, ratio = paired_medians(bare_forward, plugin_path, repeats)
        # Where the plugin path's time goes, stage by stage.
        outputs = plugin.forward(loaded.model, inputs, options).split()
        stages_s = [
            median_seconds(
                lambda n=batch: [plugin.preprocess(image, ref, options) for _ in range(n)], repeats
            ),
            median_seconds(lambda x=inputs: plugin.forward(loaded.model, x, options), repeats),
            median_seconds(
                lambda out=outputs: [plugin.postprocess(o, box, ref, options) for o in out], repeats
            ),
        ]
        rows.append(
            {
                "model": name,
                "source": f"{image.shape[0]}x{image.shape[1]}",
                "batch": batch,
                "bare_ms": 1000 * bare_s / batch,
                "plugin_ms": 1000 * plugin_s / batch,
                "bare_ips": batch / bare_s,
                "plugin_ips": batch / plugin_s,
                "ratio": ratio,
                "stages_ms": " / ".join(f"{1000 * s / batch:.1f}" for s in stages_s),
            }
        )
    return rows


def table_row(*cells: object) -> None:
    print("| " + " | ".join(str(cell) for cell in cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(BARE_BUILDERS), choices=list(BARE_BUILDERS))
    parser.add_argument("--sizes", nargs="+", default=["1024x832", "3328x2560"], help="source rows x cols")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only) for both")
    args = parser.parse_args(argv)
    # Warnings only, so the output is the tables.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sizes = [(int(rows), int(cols)) for rows, cols in (size.split("x") for size in args.sizes)]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.device}, median of {args.repeats}\n")
    with tempfile.TemporaryDirectory() as tmp:
        phantoms = {size: write_phantom(Path(tmp), size) for size in sizes}
        table_row(
            "model",
            "source",
            "batch",
            "bare ms/img",
            "plugin ms/img",
            "bare img/s",
            "plugin img/s",
            "ratio",
            "pre / forward+CAM / post ms/img",
        )
        table_row(*["---"] * 9)
        for name in args.models:
            for size in sizes:
                for row in bench_model(
                    name, phantoms[size], args.batches, args.repeats, args.device, args.amp
                ):
                    table_row(
                        row["model"],
                        row["source"],
                        row["batch"],
                        *(f"{row[key]:.1f}" for key in ("bare_ms", "plugin_ms", "bare_ips", "plugin_ips")),
                        f"{row['ratio']:.2f}",
                        row["stages_ms"],
                    )
        print()
        table_row("source", "transfer syntax", "file MB", "decode ms")
        table_row(*["---"] * 4)
        for size in sizes:
            for syntax in (ExplicitVRLittleEndian, JPEG2000Lossless):
                path = write_phantom(Path(tmp), size, syntax)
                decode_s = median_seconds(lambda path=path: decode_frames(path), args.repeats)
                megabytes = path.stat().st_size / 1e6
                table_row(f"{size[0]}x{size[1]}", syntax.name, f"{megabytes:.1f}", f"{1000 * decode_s:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
