"""The study pipeline end to end in one process: final states, routing, our own outputs, decode once.

Every study ends done, delivered, skipped (no model accepts it, each image's reason journalled) or
dead-lettered; the next study is analysed as usual after each case.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pydicom
import pytest

from gateway.messages import StudyJob
from gateway.spool import file_digest
from plugins.preprocess import BREAST_TOMOSYNTHESIS, read_image_ref
from tests.pipeline_cases import (  # noqa: F401
    Harness,
    _harness,
    bright_mammogram,
    harness,
    harness_settings,
    new_study_uid,
    ultrasound,
)
from tests.utils import write
from workers import pipeline
from workers.triage import TriageDecision


def _outputs(harness: Harness, job_id: str) -> list[Path]:
    return [Path(p) for a in harness.store.analyses(job_id) for p in json.loads(a["outputs"])]


def test_a_study_two_models_accept_is_done_with_one_decode_per_image(harness: Harness,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    study_uid = new_study_uid()
    views = [bright_mammogram(study_uid, seed=i, laterality=lat, view=view)
             for i, (lat, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")])]
    job = harness.job(views)
    decoded: list[str] = []
    reads: list[tuple[object, bool]] = []
    with monkeypatch.context() as patch:
        real_decode = pipeline.decode_frames
        patch.setattr(pipeline, "decode_frames", lambda path, policy: decoded.append(path) or real_decode(path, policy))
        real_read = pydicom.dcmread
        patch.setattr(pydicom, "dcmread",
                      lambda *a, **k: reads.append((a[0], k.get("stop_before_pixels", False))) or real_read(*a, **k))
        real_header = pipeline.read_header
        patch.setattr(pipeline, "read_header", lambda path: reads.append((path, True)) or real_header(path))

        host = pipeline.model_host(harness.settings, "cpu")
        timings = pipeline.StudyTimings()
        sources = pipeline.read_sources(job, timings)
        images = pipeline.DecodedImages(timings)
        output_root = harness.store_dir.parent / "outputs"
        runs = pipeline.analyse_study(host, ["triage_probe", "triage_probe_heavy"], sources, harness.settings,
                                      output_root, timings, images=images)
        assert [len(r.predictions) for r in runs] == [4, 4]
        assert sorted(map(str, decoded)) == sorted(str(Path(job.storage_root) / i.path) for i in job.instances)
        assert timings.decodes == 4
        # Each stage keeps its predictions and maps; the heatmap SCs and the study SR are built once every
        # stage is done (tasks), when the study's triage says which model's maps to show.
        assert [len(r.outputs) for r in runs] == [0, 0]
        decision = TriageDecision(category="routine", risk=0.5, model="triage_probe_heavy", operating_point=None,
                                  policy="test")
        written = pipeline.write_study_report(sources, output_root, decision, harness.settings, images=images)
        assert len(written) == 6  # 4 heatmap SCs, the study SR and the Mammography CAD SR
        # Each source read twice in all: its header (read_sources), then its pixels (the one decode).
        # Building the heatmap SCs and the SR from the kept display images reads none of them again.
        assert timings.decodes == 4
        sources_read = [r for r in reads if str(r[0]).startswith(job.storage_root)]
        assert sorted(header_only for _, header_only in sources_read) == [False] * 4 + [True] * 4

    row = harness.run(job)
    assert row["state"] == "done"
    assert len(json.loads(row["findings"])) == 8


def test_a_tomosynthesis_only_study_is_skipped_with_each_image_s_reason(harness: Harness) -> None:
    study_uid = new_study_uid()
    volumes = [bright_mammogram(study_uid, seed=i) for i in range(2)]
    for volume in volumes:
        volume.SOPClassUID = volume.file_meta.MediaStorageSOPClassUID = BREAST_TOMOSYNTHESIS
    job = harness.job(volumes)
    row = harness.run(job)
    assert row["state"] == "skipped"
    reasons = json.loads(harness.timeline(job)["skipped"])
    assert set(reasons) == {str(v.SOPInstanceUID) for v in volumes}
    for per_model in reasons.values():
        assert "tomosynthesis" in per_model["triage_probe"] and "tomosynthesis" in per_model["triage_probe_heavy"]
        assert "modality MG" in per_model["us_fusion"]
    assert harness.store.dead_letters() == []
    assert harness.run(harness.job([bright_mammogram(new_study_uid())]))["state"] == "done"


def test_an_obstetric_ultrasound_is_not_read_by_the_breast_ultrasound_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = harness_settings(tmp_path, plugins={
        "drop_in_dir": str(Path(__file__).parent / "triage_plugins"), "load_entrypoints": False,
        "disabled": ["asg_mammonet", "clgb_net", "lem", "hybrid_birads"], "allow_demo_weights": True})
    harness = next(_harness(tmp_path, monkeypatch, settings))
    study_uid = new_study_uid()
    job = harness.job([ultrasound(study_uid, body_part="ABDOMEN"),
                       ultrasound(study_uid, anatomic_region=("110547006", "Pregnant uterus"))])
    row = harness.run(job)
    assert row["state"] == "skipped"
    reasons = json.loads(harness.timeline(job)["skipped"])
    assert all("routing" in per_model["us_fusion"] for per_model in reasons.values())
    assert not any(a["model"] == "us_fusion" for a in harness.store.analyses(job.job_id))
    assert harness.run(harness.job([bright_mammogram(new_study_uid())]))["state"] == "done"


def test_breast_ultrasound_is_routed_by_body_part_anatomic_region_or_a_breast_unit(tmp_path: Path) -> None:
    from plugins.host import ModelHost

    settings = harness_settings(tmp_path, routing={"breast_unit_aes": ["BREAST_US1"]})
    host = ModelHost(settings)
    us_model = host.plugin("us_fusion")
    study_uid = new_study_uid()

    def reason(ds: pydicom.Dataset, calling_ae: str = "MODALITY") -> str | None:
        import dataclasses

        ref = dataclasses.replace(read_image_ref(write(ds, tmp_path / "refs")), calling_ae=calling_ae)
        return host.skip_reason(us_model, ref)

    assert reason(ultrasound(study_uid, body_part="BREAST")) is None
    assert reason(ultrasound(study_uid, anatomic_region=("76752008", "Breast"))) is None
    assert reason(ultrasound(study_uid), calling_ae="BREAST_US1") is None
    assert "routing" in (reason(ultrasound(study_uid)) or "")
    assert "routing" in (reason(ultrasound(study_uid, body_part="ABDOMEN"), calling_ae="OBSTETRICS") or "")
    # The mammography models are routed MG only, whatever else a site sends.
    from plugins.host import route_matches

    breast_us = read_image_ref(write(ultrasound(study_uid, body_part="BREAST"), tmp_path / "refs"))
    [mg_only] = settings.routing.rules_for("asg_mammonet")
    assert not route_matches(mg_only, breast_us, settings.routing.breast_unit_aes)


def test_a_site_rule_replaces_the_default_route(tmp_path: Path) -> None:
    from plugins.host import ModelHost

    settings = harness_settings(tmp_path, routing={"models": {"us_fusion": [{"calling_aes": ["ANY_US"]}]}})
    host = ModelHost(settings)
    ref = read_image_ref(write(ultrasound(new_study_uid(), body_part="ABDOMEN"), tmp_path / "refs"))
    import dataclasses

    assert host.skip_reason(host.plugin("us_fusion"), dataclasses.replace(ref, calling_ae="ANY_US")) is None
    assert host.skip_reason(host.plugin("us_fusion"), ref) is not None


def test_our_own_outputs_sent_back_start_no_analysis(harness: Harness) -> None:
    study_uid = new_study_uid()
    source = bright_mammogram(study_uid)
    first = harness.job([source])
    assert harness.run(first)["state"] == "done"
    outputs = [pydicom.dcmread(p) for p in _outputs(harness, first.job_id)]
    assert len(outputs) == 3  # the study SR over both models, the deciding model's heatmap SC and the CAD SR
    assert all(pipeline.is_own_output(ds) for ds in outputs)

    # The PACS forwards the whole study back: the source (version 1) and our outputs (version 2).
    second = harness.job([source, *outputs], version=2, versions={str(source.SOPInstanceUID): 1})
    row = harness.run(second)
    assert "not_analysed" in harness.timeline(second)
    assert harness.store.analyses(second.job_id) == []
    # The new version takes the earlier one's final state and findings: finished, nothing delivered again.
    assert (row["job_id"], row["version"], row["state"]) == (second.job_id, 2, "done")
    assert json.loads(row["findings"]) == json.loads(harness.store.study(study_uid)["findings"])
    assert len(json.loads(row["findings"])) == 2


def test_a_version_of_only_our_outputs_is_skipped_when_nothing_else_is_known(harness: Harness) -> None:
    study_uid = new_study_uid()
    first = harness.job([bright_mammogram(study_uid)])
    harness.run(first)
    outputs = [pydicom.dcmread(p) for p in _outputs(harness, first.job_id)]
    # A gateway that saw only the outputs (a fresh data directory) makes them version 1 of the study.
    fresh = Harness(settings=harness.settings, store_dir=harness.store_dir.parent / "fresh")
    fresh.queued = harness.queued
    job = fresh.job(outputs, job_id="fresh-v1")
    row = fresh.run(job)
    assert (row["job_id"], row["state"]) == ("fresh-v1", "skipped")
    reasons = json.loads(fresh.timeline(job)["skipped"])
    assert all(r == {"all": pipeline.OWN_OUTPUT_REASON} for r in reasons.values())


def test_a_version_with_a_replaced_source_is_analysed_again_and_one_without_is_not(harness: Harness) -> None:
    study_uid = new_study_uid()
    source = bright_mammogram(study_uid)
    first = harness.job([source])
    harness.run(first)
    unchanged = harness.job([source], version=2, versions={str(source.SOPInstanceUID): 1})
    assert harness.run(unchanged)["state"] == "done"
    assert "not_analysed" in harness.timeline(unchanged)
    assert harness.store.analyses(unchanged.job_id) == []
    source.PixelData = bright_mammogram(study_uid, seed=9).PixelData  # same UIDs, new bytes
    replaced = harness.job([source], version=3)
    row = harness.run(replaced)
    assert (row["job_id"], row["state"]) == (replaced.job_id, "done")
    assert {Path(p).name for p in _outputs(harness, replaced.job_id)}.isdisjoint(
        Path(p).name for p in _outputs(harness, first.job_id))


def test_a_version_without_new_sources_waits_for_the_earlier_version_to_finish(harness: Harness) -> None:
    import workers.tasks as tasks

    study_uid = new_study_uid()
    source = bright_mammogram(study_uid)
    first = harness.job([source])
    harness.store.upsert_study(study_uid=study_uid, job_id=first.job_id, version=1, priority=6, state="analysing")
    second = harness.job([source], version=2, versions={str(source.SOPInstanceUID): 1})
    tasks.analyse.apply(kwargs={"job": second.to_json_dict()}, throw=True)
    assert "waiting" in harness.timeline(second)
    assert [name for name, _ in harness.queued] == ["workers.tasks.analyse"]  # it looks again later
    assert harness.store.study(study_uid)["version"] == 1  # the earlier version's row is left to it

    harness.store.upsert_study(study_uid=study_uid, job_id=first.job_id, version=1, priority=6, state="delivered",
                               risk=0.4, findings=[{"model": "triage_probe", "risk": 0.4}])
    harness.queued.clear()  # run it again now instead of after the poll delay
    row = harness.run(second)
    assert (row["version"], row["state"], row["risk"]) == (2, "delivered", 0.4)


def test_the_last_stage_s_maps_in_memory_give_the_report_their_copy_on_disk_gives(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last stage hands its kept maps to the study report in memory and writes no archive; the heatmap SCs
    and the CAD SR are those drawn from the archive an earlier stage writes and the report reads back."""
    study_uid = new_study_uid()
    views = [bright_mammogram(study_uid, seed=i, laterality=lat, view="CC") for i, lat in enumerate("LR")]
    job = harness.job(views)
    host = pipeline.model_host(harness.settings, "cpu")
    decision = TriageDecision(category="high", risk=0.9, model="triage_probe", operating_point=None, policy="test")
    written: dict[bool, dict[str, pydicom.Dataset]] = {}
    shrunk: list[object] = []
    real_shrink = pipeline.map_for_display
    monkeypatch.setattr(pipeline, "map_for_display", lambda heat: shrunk.append(heat) or real_shrink(heat))
    for on_disk in (True, False):
        shrunk.clear()
        timings = pipeline.StudyTimings()
        sources = pipeline.read_sources(job, timings)
        images = pipeline.DecodedImages(timings)
        root = harness.store_dir.parent / f"outputs-{on_disk}"
        runs = pipeline.analyse_study(host, ["triage_probe", "triage_probe_heavy"], sources, harness.settings,
                                      root, timings, images=images, maps_on_disk=on_disk)
        archives = sorted(root.glob(f"*/{pipeline.HEATMAPS_FILE}"))
        assert len(archives) == (2 if on_disk else 0)
        # Maps written are shrunk for the archive; in memory, the last model's only when the report asks
        # for them (the others' were shrunk while the next model ran).
        assert len(shrunk) == (4 if on_disk else 2)
        in_memory = {} if on_disk else {r.model: r.kept_maps for r in runs if r.kept_maps is not None}
        paths = pipeline.write_study_report(sources, root, decision, harness.settings, images=images,
                                            kept_maps=in_memory)
        written[on_disk] = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, paths)}
        if not on_disk:  # the shown model's two maps (for its SCs), and the other's where the CAD SR wants peaks
            assert 2 <= len(shrunk) <= 4
    assert written[True].keys() == written[False].keys() and len(written[True]) == 4  # 2 SCs, SR, CAD SR
    for uid, from_disk in written[True].items():
        from_memory = written[False][uid]
        if "PixelData" in from_disk:
            assert from_memory.PixelData == from_disk.PixelData
        else:
            assert from_memory.ContentSequence == from_disk.ContentSequence


def test_a_study_read_ahead_is_decoded_once_and_gives_the_findings_read_in_turn_gives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``worker.read_ahead: on`` (a CUDA worker's default) each image is still decoded once for every
    model, and the study ends done with the findings of a worker that reads in turn."""
    findings = {}
    for mode in ("off", "on"):
        (tmp_path / mode).mkdir()
        settings = harness_settings(tmp_path / mode, worker={"read_ahead": mode})
        for runner in _harness(tmp_path / mode, monkeypatch, settings):
            study_uid = new_study_uid()
            views = [bright_mammogram(study_uid, seed=i, laterality=lat, view=view)
                     for i, (lat, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")])]
            job = runner.job(views, job_id="read-ahead")
            host = pipeline.model_host(runner.settings, "cpu")
            assert host.reads_ahead() is (mode == "on")
            timings = pipeline.StudyTimings()
            sources = pipeline.read_sources(job, timings)
            runs = pipeline.analyse_study(host, ["triage_probe", "triage_probe_heavy"], sources, runner.settings,
                                          tmp_path / mode / "outputs", timings)
            assert timings.decodes == 4
            findings[mode] = [(p.image.laterality, p.image.view, p.model_name, round(p.risk, 6))
                              for run in runs for p in run.predictions]
            row = runner.run(job)
            assert row["state"] == "done"
    assert findings["on"] == findings["off"] and len(findings["on"]) == 8


def test_with_read_ahead_the_next_model_s_inputs_are_prepared_while_a_model_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first model's forward pass waits until the second model has preprocessed an image: only a worker
    that prepares the next model's inputs while a model runs gets past it."""
    settings = harness_settings(tmp_path, worker={"read_ahead": "on"})
    for runner in _harness(tmp_path, monkeypatch, settings):
        study_uid = new_study_uid()
        views = [bright_mammogram(study_uid, seed=i, laterality=lat, view="CC") for i, lat in enumerate("LR")]
        job = runner.job(views)
        host = pipeline.model_host(runner.settings, "cpu")
        first, second = host.plugin("triage_probe"), host.plugin("triage_probe_heavy")
        second_prepared = threading.Event()
        seen_during_first_forward: list[bool] = []

        def forward(model: object, batch: object, options: object, real: object = first.forward) -> object:
            seen_during_first_forward.append(second_prepared.wait(timeout=30))
            return real(model, batch, options)  # type: ignore[operator]

        def preprocess(image: object, ref: object, options: object, real: object = second.preprocess) -> object:
            outcome = real(image, ref, options)  # type: ignore[operator]
            second_prepared.set()
            return outcome

        monkeypatch.setattr(first, "forward", forward)
        monkeypatch.setattr(second, "preprocess", preprocess)
        runs = pipeline.analyse_study(host, ["triage_probe", "triage_probe_heavy"], pipeline.read_sources(job),
                                      runner.settings, tmp_path / "outputs", pipeline.StudyTimings())
        assert [len(r.predictions) for r in runs] == [2, 2]
        assert seen_during_first_forward == [True]
        assert not any(t.name.startswith("read-ahead") for t in threading.enumerate())


def _with_digests(job: StudyJob) -> StudyJob:
    """*job* with the content digest the gateway takes while receiving on each instance."""
    root = Path(job.storage_root)
    return dataclasses.replace(job, instances=tuple(
        dataclasses.replace(i, content_digest=file_digest(root / i.path)) for i in job.instances))


def test_the_second_stage_reads_back_what_the_first_decoded_and_the_last_stage_removes_it(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped two stages are two tasks: the first leaves its decoded images for the second, so each source
    is decoded once for the study; once the report is written nothing of them is left on disk."""
    study_uid = new_study_uid()
    views = [bright_mammogram(study_uid, seed=i, laterality=lat, view=view)
             for i, (lat, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")])]
    job = _with_digests(harness.job(views))
    decoded: list[str] = []
    real_decode = pipeline.decode_frames
    monkeypatch.setattr(pipeline, "decode_frames", lambda path, policy: decoded.append(str(path))
                        or real_decode(path, policy))
    row = harness.run(job)
    assert row["state"] == "done" and len(json.loads(row["findings"])) == 8
    assert sorted(decoded) == sorted(str(Path(job.storage_root) / i.path) for i in job.instances)
    timeline = harness.timeline(job)
    first, rest = json.loads(timeline["timings:first"]), json.loads(timeline["timings:rest"])
    assert (first["decodes"], first["read_backs"]) == (4, 0)
    assert (rest["decodes"], rest["read_backs"]) == (0, 4)
    output_root = Path(harness.settings.gateway.data_dir).resolve() / "outputs" / job.job_id
    assert (output_root / pipeline.STUDY_REPORT_DIR).is_dir()
    assert not (output_root / pipeline.DECODED_DIR).exists()


def test_a_saved_image_is_read_back_only_for_the_same_bytes_and_geometry(harness: Harness) -> None:
    study_uid = new_study_uid()
    views = [bright_mammogram(study_uid, seed=i, laterality=lat, view="CC") for i, lat in enumerate("LR")]
    job = _with_digests(harness.job(views))
    sources = pipeline.read_sources(job)
    refs = [s.ref for s in sources if s.ref is not None]
    digests = pipeline.content_digests(sources)
    saved = harness.store_dir.parent / "decoded"
    first = pipeline.DecodedImages(pipeline.StudyTimings(), saved=saved, digests=digests)
    originals = [first.frames(ref, "first") for ref in refs]
    assert first.save(saved) == 2

    def second(digests: dict[str, str]) -> pipeline.StudyTimings:
        timings = pipeline.StudyTimings()
        images = pipeline.DecodedImages(timings, saved=saved, digests=digests)
        for ref, original in zip(refs, originals, strict=True):
            frames = images.frames(ref, "first")
            assert not isinstance(frames, str) and not isinstance(original, str)
            assert [(r, image.tobytes()) for r, image in frames] == [(r, image.tobytes()) for r, image in original]
            assert images.display(ref) is not None
        return timings

    def counts(digests: dict[str, str]) -> tuple[int, int]:
        timings = second(digests)
        return timings.decodes, timings.read_backs

    assert counts(digests) == (0, 2)
    # New bytes under the same UID (another digest): decoded again, never the old pixels.
    changed = {uid: "0" * 32 for uid in digests}
    assert counts(changed) == (2, 0)
    # No digest from the gateway: nothing is read back, and what is decoded without one is not saved.
    assert counts({}) == (2, 0)
    undigested = pipeline.DecodedImages(pipeline.StudyTimings(), digests={})
    assert all(not isinstance(undigested.frames(ref, "first"), str) for ref in refs)
    assert undigested.save(saved / "none") == 0
    assert not (saved / "none").exists()
    # One saved for another geometry than the header declares: decoded again.
    timings = pipeline.StudyTimings()
    images = pipeline.DecodedImages(timings, saved=saved, digests=digests)
    assert not isinstance(images.frames(dataclasses.replace(refs[1], rows=refs[1].rows + 1), "first"), str)
    assert (timings.decodes, timings.read_backs) == (1, 0)
    # Files cut short: decoded again.
    for file in saved.glob("*.npy"):
        file.write_bytes(file.read_bytes()[:200])
    assert counts(digests) == (2, 0)
    # No header value names a file.
    assert not any(uid in path.name for path in saved.iterdir() for uid in digests)
