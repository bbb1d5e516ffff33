"""The study SR: one TID 1500 report over every model, its content tree row by row, the validators' verdicts,
LEM's capped points, and at most three new series per mammogram in a pipeline run."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from plugins.types import LocalisationPoint, LocalisationRegion, OperatingPoint, Prediction, ScoreMeaning
from tests import validators
from tests.conftest import require_binary
from tests.pipeline_cases import (  # noqa: F401
    Harness,
    _harness,
    bright_mammogram,
    harness,
    harness_settings,
    new_study_uid,
)
from tests.test_outputs import make_mammogram, make_prediction, make_ultrasound, round_trip
from workers import outputs, pipeline, study_report
from workers.identity import AlgorithmIdentity
from workers.outputs import ReportedModel
from workers.study_report import ModelResults, build_study_sr
from workers.triage import ModelRisk, TriageDecision, decide

CALIBRATED = ScoreMeaning(
    kind="probability_of_malignancy",
    description="calibrated p(malignant)",
    concept=("111047", "DCM", "Probability of cancer"),
)
SUSPICION = ScoreMeaning(
    kind="suspicion_score", description="p(BI-RADS >= 4)", concept=("111012", "DCM", "Certainty of Finding")
)
HIGH = TriageDecision(
    category="high",
    risk=0.8,
    model="other",
    policy="high when any model is at or above its high-sensitivity point",
    operating_point=OperatingPoint(name="high_sensitivity", threshold=0.3, sensitivity=0.95),
)


def children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def walk(item: Dataset) -> Iterator[Dataset]:
    for child in children(item):
        yield child
        yield from walk(child)


def name(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def value(item: Dataset) -> tuple[str, str]:
    code = item.ConceptCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def named(item: Dataset, code: tuple[str, str]) -> list[Dataset]:
    return [c for c in children(item) if name(c) == code]


def groups(sr: Dataset) -> list[Dataset]:
    (measurements,) = named(sr, ("126010", "DCM"))
    return named(measurements, ("125007", "DCM"))


def referenced_uid(group: Dataset) -> str | None:
    for item in walk(group):
        if item.ValueType == "IMAGE" and name(item) != ("121200", "DCM"):
            return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return None


@pytest.fixture
def images() -> list[Dataset]:
    return [make_mammogram("L", "CC"), make_mammogram("R", "MLO")]


def two_models(
    images: list[Dataset], *, first_score: ScoreMeaning | None = SUSPICION, heatmap: bool = True
) -> list[ModelResults]:
    first = [
        make_prediction(images[0], birads=4, localise=True),
        make_prediction(images[1], probabilities=(0.9, 0.1)),
    ]
    second = [
        dataclasses.replace(
            p,
            model_id="other.v1",
            model_name="other",
            birads=None,
            probabilities=(0.2, 0.8) if i == 0 else (0.7, 0.3),
            risk=0.8 if i == 0 else 0.3,
        )
        for i, p in enumerate(first)
    ]
    scs = [outputs.build_heatmap_sc(images[0], None, first[0])] if heatmap else []
    return [
        ModelResults(
            model=ReportedModel.from_prediction(first[0]), predictions=first, score=first_score, heatmaps=scs
        ),
        ModelResults(model=ReportedModel.from_prediction(second[0]), predictions=second, score=CALIBRATED),
    ]


def test_root_rows_follow_tid_1500_with_procedure_from_cid_100(images: list[Dataset]) -> None:
    sr = round_trip(build_study_sr(images, two_models(images), decision=HIGH))
    rows = [name(c) for c in children(sr)]
    # Language, observer, procedure reported, image library, imaging measurements, qualitative evaluations.
    library, measurements, evaluations = ("111028", "DCM"), ("126010", "DCM"), ("C0034375", "UMLS")
    assert (
        rows.index(("121058", "DCM"))
        < rows.index(library)
        < rows.index(measurements)
        < rows.index(evaluations)
    )
    procedures = [value(c) for c in named(sr, ("121058", "DCM"))]
    group = codes.cid100
    cid100 = {(getattr(group, k).value, getattr(group, k).scheme_designator) for k in group.dir()}
    assert procedures and set(procedures) <= cid100


def test_image_library_entries_carry_laterality_and_the_source_view_code(images: list[Dataset]) -> None:
    sr = round_trip(build_study_sr(images, two_models(images)))
    (library,) = named(sr, ("111028", "DCM"))
    entries = [i for i in walk(library) if i.ValueType == "IMAGE"]
    assert {str(e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for e in entries} == {
        str(ds.SOPInstanceUID) for ds in images
    }
    by_uid = {str(ds.SOPInstanceUID): ds for ds in images}
    for entry in entries:
        source = by_uid[str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
        (laterality,) = named(entry, ("111027", "DCM"))
        assert (
            value(laterality) == {"L": ("7771000", "SCT"), "R": ("24028007", "SCT")}[source.ImageLaterality]
        )
        (view,) = named(entry, ("111031", "DCM"))
        assert value(view) == (
            source.ViewCodeSequence[0].CodeValue,
            source.ViewCodeSequence[0].CodingSchemeDesignator,
        )


def test_one_group_per_model_and_image_with_the_predicted_finding_and_its_score(
    images: list[Dataset],
) -> None:
    results = two_models(images)
    sr = round_trip(build_study_sr(images, results, max_points=0))
    image_groups = [
        g for g in groups(sr) if referenced_uid(g) is not None and not named(g, ("111030", "DCM"))
    ]
    assert len(image_groups) == sum(len(r.predictions) for r in results)
    for group in image_groups:
        (finding,) = named(group, ("121071", "DCM"))
        (algorithm,) = named(group, ("111001", "DCM"))
        model = str(algorithm.TextValue)
        result = next(r for r in results if r.model.display_name == model)
        prediction = next(p for p in result.predictions if p.image.sop_instance_uid == referenced_uid(group))
        assert value(finding) == (
            outputs.class_concept(prediction.predicted_class).value,
            outputs.class_concept(prediction.predicted_class).scheme_designator,
        )
        numbers = {
            name(n): float(n.MeasuredValueSequence[0].NumericValue)
            for n in children(group)
            if n.ValueType == "NUM"
        }
        # 111047 only for the calibrated probability of malignancy; a suspicion score under its own concept.
        score = ("111047", "DCM") if result.score is CALIBRATED else ("111012", "DCM")
        assert numbers[score] == pytest.approx(prediction.risk)
        assert ("111047", "DCM") not in numbers or result.score is CALIBRATED
        for class_name, probability in zip(prediction.classes, prediction.probabilities, strict=True):
            concept = outputs.class_concept(class_name)
            assert numbers[(concept.value, concept.scheme_designator)] == pytest.approx(probability)
        # No loose Impression items: the class is the TID 1501 Finding; BI-RADS a qualitative evaluation.
        assert not named(group, ("121073", "DCM"))
        birads = named(group, ("111005", "DCM"))
        assert len(birads) == (prediction.birads is not None)


def test_score_concept_is_111047_only_for_a_calibrated_probability() -> None:
    assert study_report.score_concept(CALIBRATED).value == "111047"
    assert study_report.score_concept(SUSPICION).value == "111012"
    assert study_report.score_concept(None).value != "111047"
    with pytest.raises(ValueError):
        dataclasses.replace(SUSPICION, concept=("111047", "DCM", "Probability of cancer"))


def test_conclusions_per_breast_and_study_name_triage_model_and_threshold(images: list[Dataset]) -> None:
    results = two_models(images)
    triage = partial(decide, fallback_threshold=0.5)
    sr = round_trip(build_study_sr(images, results, decision=HIGH, triage=triage))
    conclusions = [g for g in groups(sr) if referenced_uid(g) is None]
    assert len(conclusions) == 3  # right breast, left breast, study
    by_side = {"R": "24028007", "L": "7771000"}
    for side, code in by_side.items():
        (breast,) = [
            g
            for g in conclusions
            if any(value(m) == (code, "SCT") for s in named(g, ("363698007", "SCT")) for m in children(s))
        ]
        on_side = [p for r in results for p in r.predictions if p.image.laterality == side]
        expected = triage(
            [
                ModelRisk(model=m, risk=max(p.risk for p in on_side if p.model_name == m))
                for m in {p.model_name for p in on_side}
            ]
        )
        (category,) = named(breast, ("260870009", "SCT"))
        assert value(category) == (study_report.TRIAGE_CONCEPTS[expected.category].value, "SCT")
        (finding,) = named(breast, ("121071", "DCM"))
        top = max(on_side, key=lambda p: p.risk)
        assert value(finding)[0] == outputs.class_concept(top.predicted_class).value
    (study,) = [g for g in conclusions if not named(g, ("363698007", "SCT"))]
    (category,) = named(study, ("260870009", "SCT"))
    assert value(category) == ("75540009", "SCT")  # high, the study decision's
    (algorithm,) = named(study, ("111001", "DCM"))
    assert str(algorithm.TextValue) == "other"  # the model that set it
    parameters = [str(p.TextValue) for p in walk(study) if name(p) == ("111002", "DCM")]
    assert "operating_point=high_sensitivity" in parameters
    numbers = {
        name(n): float(n.MeasuredValueSequence[0].NumericValue)
        for n in children(study)
        if n.ValueType == "NUM"
    }
    assert numbers[("122411", "DCM")] == pytest.approx(0.3)  # its threshold
    assert numbers[("111047", "DCM")] == pytest.approx(0.8)
    # The highest BI-RADS category any model gave.
    (birads,) = named(study, ("111005", "DCM"))
    assert value(birads) == (outputs.birads_concept(4).value, "SCT")
    text = " ".join(str(i.TextValue) for i in walk(sr) if i.ValueType == "TEXT")
    assert "high_sensitivity" in text and "NOT FOR DIAGNOSTIC USE" in text


def test_without_a_decision_no_conclusion_claims_a_triage_category(images: list[Dataset]) -> None:
    sr = round_trip(build_study_sr(images, two_models(images)))
    conclusions = [g for g in groups(sr) if referenced_uid(g) is None]
    assert len(conclusions) == 3
    assert all(not named(g, ("260870009", "SCT")) and not named(g, ("122411", "DCM")) for g in conclusions)


def test_the_report_references_its_heatmaps(images: list[Dataset]) -> None:
    results = two_models(images)
    sr = round_trip(build_study_sr(images, results))
    (sc,) = results[0].heatmaps
    illustrations = [i for i in walk(sr) if i.ValueType == "IMAGE" and name(i) == ("121200", "DCM")]
    assert [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in illustrations] == [
        str(sc.SOPInstanceUID)
    ]
    evidence = {
        str(r.ReferencedSOPInstanceUID)
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for series in s.ReferencedSeriesSequence
        for r in series.ReferencedSOPSequence
    }
    assert str(sc.SOPInstanceUID) in evidence


def lem_like(ds: Dataset, points: int = 20) -> Prediction:
    base = make_prediction(ds)
    labels = ("LEM local maximum (suspected malignant)", "LEM local minimum (suspected benign)")
    spots = tuple(
        LocalisationPoint(x=5.0 + i, y=5.0 + i, score=(i * 37 % 100) / 100, label=labels[i % 2])
        for i in range(points)
    )
    tiny = LocalisationRegion(
        points=((30.0, 30.0), (30.4, 30.0), (30.4, 30.4), (30.0, 30.4)), score=0.6, label="LEM lesion region"
    )
    return dataclasses.replace(base, points=spots, regions=(tiny,))


@pytest.mark.parametrize("k", [0, 3, 5])
def test_lem_points_are_at_most_k_of_the_predicted_branch_by_score(images: list[Dataset], k: int) -> None:
    prediction = lem_like(images[0])
    assert prediction.predicted_class == "malignant"
    result = ModelResults(model=ReportedModel.from_prediction(prediction), predictions=[prediction])
    sr = round_trip(build_study_sr(images[:1], [result], max_points=k))
    points = [i for i in walk(sr) if i.ValueType == "SCOORD" and i.GraphicType == "POINT"]
    assert len(points) == k
    expected = sorted((p for p in prediction.points if "malignant" in p.label), key=lambda p: -p.score)[:k]
    assert [tuple(float(v) for v in p.GraphicData) for p in points] == [(e.x, e.y) for e in expected]
    findings = {value(i) for g in groups(sr) for i in named(g, ("121071", "DCM"))}
    assert all(scheme != outputs.PRIVATE_SCHEME for _, scheme in findings)


def test_lesion_regions_are_polygons_a_person_can_see(images: list[Dataset]) -> None:
    prediction = lem_like(images[0], points=0)
    result = ModelResults(model=ReportedModel.from_prediction(prediction), predictions=[prediction])
    sr = round_trip(build_study_sr(images[:1], [result]))
    (region,) = [i for i in walk(sr) if i.ValueType == "SCOORD" and i.GraphicType == "POLYLINE"]
    xs, ys = region.GraphicData[0::2], region.GraphicData[1::2]
    assert max(xs) - min(xs) >= study_report.MIN_REGION_PIXELS
    assert max(ys) - min(ys) >= study_report.MIN_REGION_PIXELS
    assert min(xs) >= 0 and max(xs) <= images[0].Columns and min(ys) >= 0 and max(ys) <= images[0].Rows
    assert (region.GraphicData[0], region.GraphicData[1]) == (region.GraphicData[-2], region.GraphicData[-1])


def test_kept_predictions_round_trip(images: list[Dataset], tmp_path: Path) -> None:
    prediction = lem_like(images[0], points=3)
    model = ReportedModel.from_prediction(prediction)
    identity = AlgorithmIdentity.from_prediction(prediction, "LEM")
    study_report.save_records(tmp_path / "p.json", [prediction], model, SUSPICION, identity)
    reported, score, back_identity, (back,) = study_report.load_records(tmp_path / "p.json")
    assert (reported, score, back_identity) == (model, SUSPICION, identity)
    assert back.score == prediction.score
    assert (back.points, back.regions, back.risk, back.classes) == (
        prediction.points,
        prediction.regions,
        prediction.risk,
        prediction.classes,
    )


def test_kept_maps_draw_the_heatmap_the_full_map_draws(images: list[Dataset], tmp_path: Path) -> None:
    # A full-field-sized map (larger than an SC's image part) with a sparse peak, as LEM's extrema are.
    rng = np.random.default_rng(1)
    full = cv2.resize(rng.random((12, 9)).astype(np.float32), (2200, 2700), interpolation=cv2.INTER_LINEAR)
    full[1300, 1000] = 1.0
    with_map = dataclasses.replace(make_prediction(images[0]), heatmap=full, extra_maps={"saliency": full})
    without_map = dataclasses.replace(with_map, heatmap=None, extra_maps={})
    path = tmp_path / pipeline.HEATMAPS_FILE
    pipeline.write_kept_maps(path, pipeline.keep_maps([without_map, with_map], "all", extra_maps=True))
    kept = pipeline.read_kept_maps(path)
    none, back = kept.attach([without_map, without_map])
    assert kept.frames == "all"
    assert none.heatmap is None and none.extra_maps == {}
    assert back.heatmap is not None and set(back.extra_maps) == {"saliency"}
    assert back.heatmap.shape == outputs.image_part_size(*full.shape) != full.shape  # the size the SC shows
    display = rng.integers(0, 256, full.shape, dtype=np.uint8)
    drawn = [
        outputs.render_heatmap_overlay(display, outputs.heatmap_values(p), caption_lines=["test"]).astype(int)
        for p in (with_map, back)
    ]
    assert drawn[0].shape == drawn[1].shape
    assert np.abs(drawn[0] - drawn[1]).max() <= 2  # float16 rounding, nothing else


@pytest.mark.parametrize("what", ["study SR", "heatmap SC"])
def test_settled_vrs_write_the_bytes_pydicom_writes_alone(what: str, images: list[Dataset], tmp_path: Path) -> None:
    """pipeline.settle_ambiguous_vrs (one pass over the tree, then marked settled) changes no byte pydicom writes."""

    def build() -> Dataset:
        if what == "heatmap SC":  # a source header's own sequences, read from a file, are nested in it
            return outputs.build_heatmap_sc(round_trip(images[0]), None, make_prediction(images[0]))
        return build_study_sr(images, two_models(images), decision=HIGH, software_version="0.1.0")

    plain = build()
    settled = copy.deepcopy(plain)
    plain.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    pipeline.settle_ambiguous_vrs(settled)
    settled.save_as(tmp_path / "settled.dcm", enforce_file_format=True)
    assert (tmp_path / "settled.dcm").read_bytes() == (tmp_path / "plain.dcm").read_bytes()
    nested = [item for item in walk(settled)] if what == "study SR" else []
    assert all(item.original_encoding == (False, True) for item in nested)


@pytest.mark.peers
@pytest.mark.parametrize("kind", ["mammogram", "ultrasound", "lem"])
def test_both_validators_pass_the_study_report(kind: str, images: list[Dataset], tmp_path: Path) -> None:
    if kind == "mammogram":
        sr = build_study_sr(images, two_models(images), decision=HIGH, software_version="0.1.0")
    elif kind == "ultrasound":
        us = make_ultrasound()
        prediction = make_prediction(us, localise=True, frame_index=1)
        sc = outputs.build_heatmap_sc(us, None, prediction)
        sr = build_study_sr(
            [us],
            [
                ModelResults(
                    model=ReportedModel.from_prediction(prediction), predictions=[prediction], heatmaps=[sc]
                )
            ],
        )
    else:
        prediction = lem_like(images[0])
        sr = build_study_sr(
            images[:1],
            [
                ModelResults(
                    model=ReportedModel.from_prediction(prediction), predictions=[prediction], score=SUSPICION
                )
            ],
        )
    path = tmp_path / f"{kind}.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, warnings = validators.dciodvfy(path)
    assert errors == [], "\n".join(errors + warnings)
    assert validators.pixelmed_sr_errors(path) == []


def _series(runner: Harness, job_id: str) -> dict[str, list[pydicom.Dataset]]:
    series: dict[str, list[pydicom.Dataset]] = {}
    for analysis in runner.store.analyses(job_id):
        for path in json.loads(analysis["outputs"]):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return series


def four_views() -> list[Dataset]:
    study_uid = new_study_uid()
    return [
        bright_mammogram(study_uid, seed=i, laterality=lat, view=view)
        for i, (lat, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")])
    ]


def test_a_mammogram_gives_one_study_report_and_one_heatmap_series(harness: Harness) -> None:  # noqa: F811
    views = four_views()
    job = harness.job(views)
    row = harness.run(job)
    assert row["state"] == "done"
    series = _series(harness, job.job_id)
    assert len(series) <= 3
    reports = [
        ds
        for members in series.values()
        for ds in members
        if ds.SOPClassUID.name == "Comprehensive SR Storage"
    ]
    assert len(reports) == 1
    sr = hd.sr.srread(
        next(
            Path(p)
            for a in harness.store.analyses(job.job_id)
            for p in json.loads(a["outputs"])
            if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID.name == "Comprehensive SR Storage"
        )
    )
    # Both models (the first stage's and the later one's) are in it, each with its own identification.
    model_ids = {
        str(i.TextValue)
        for i in walk(sr)
        if name(i) == ("111002", "DCM") and str(i.TextValue).startswith("model_id=")
    }
    assert model_ids == {"model_id=triage_probe.test", "model_id=triage_probe_heavy.test"}
    # IHE AIR: one Contributing Equipment item (with its Device UID) per model.
    devices = {str(i.DeviceUID) for i in sr.ContributingEquipmentSequence if "DeviceUID" in i}
    assert len(devices) == 2
    heatmaps = [ds for members in series.values() for ds in members if ds.Modality != "SR"]
    assert len(heatmaps) == len(views)
    assert len({str(ds.SeriesInstanceUID) for ds in heatmaps}) == 1


def test_the_heatmap_series_shows_the_model_that_set_the_triage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The heavier probe runs first here.  Both probes score the same brightness, so neither crosses a point
    # and the triage names the model with the highest risk, the first by name on a tie: the later stage's.
    settings = harness_settings(
        tmp_path, triage={"first_stage_model": "triage_probe_heavy", "high_risk_threshold": 0.99}
    )
    for runner in _harness(tmp_path, monkeypatch, settings):
        views = four_views()
        job = runner.job(views)
        row = runner.run(job)
        assert row["state"] == "done"
        deciding = str(row["triage_model"])
        assert deciding and deciding != settings.triage.first_stage_model
        series = _series(runner, job.job_id)
        assert len(series) <= 3
        heatmaps = [ds for members in series.values() for ds in members if ds.Modality != "SR"]
        assert len(heatmaps) == len(views)
        assert len({str(ds.SeriesInstanceUID) for ds in heatmaps}) == 1
        # Each SC identifies the deciding model (IHE AIR), and only it.
        for sc in heatmaps:
            (algorithm,) = [e for e in sc.ContributingEquipmentSequence if "DeviceUID" in e]
            assert f"({deciding}.test)" in str(algorithm.ManufacturerModelName)
        # The study SR references exactly those SCs.
        (sr_path,) = [
            Path(p)
            for a in runner.store.analyses(job.job_id)
            for p in json.loads(a["outputs"])
            if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID.name == "Comprehensive SR Storage"
        ]
        sr = pydicom.dcmread(sr_path)
        illustrations = {
            str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for i in walk(sr)
            if i.ValueType == "IMAGE" and name(i) == ("121200", "DCM")
        }
        assert illustrations == {str(ds.SOPInstanceUID) for ds in heatmaps}
        # Every output was queued for delivery once.
        delivered = [p for a in runner.store.analyses(job.job_id) for p in json.loads(a["outputs"])]
        assert len(delivered) == len(set(delivered)) == len(views) + 2  # the SCs, the study SR, the CAD SR


def test_per_model_reports_stay_available_through_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = harness_settings(tmp_path, outputs={"report": "per-model"})
    for per_model in _harness(tmp_path, monkeypatch, settings):
        job = per_model.job(four_views())
        assert per_model.run(job)["state"] == "done"
        series = _series(per_model, job.job_id)
        reports = [ds for members in series.values() for ds in members if ds.Modality == "SR"]
        assert len(reports) == 2  # one per model, each in a series of its own
        assert len({str(ds.SeriesInstanceUID) for ds in reports}) == 2
        assert len({int(ds.SeriesNumber) for ds in reports}) == 2
    assert pipeline.STUDY_REPORT_DIR == "study-report"


def readme_example() -> hd.sr.ComprehensiveSR:
    """The two-model study SR whose dsrdump excerpt the README shows."""
    images = [make_mammogram("L", "CC"), make_mammogram("R", "MLO")]
    return build_study_sr(
        images, two_models(images), decision=HIGH, created=datetime.datetime(2026, 1, 1, 10)
    )


@pytest.mark.peers
def test_the_readme_dsrdump_excerpt_matches_what_is_produced(tmp_path: Path) -> None:
    binary = require_binary("dsrdump")
    path = tmp_path / "example.dcm"
    readme_example().save_as(path, enforce_file_format=True)
    dump = subprocess.run([binary, "-Ec", str(path)], capture_output=True, text=True, check=True).stdout
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- study-sr-dsrdump -->", 1)[1].split("```", 2)[1]
    lines = [line[2:] for line in block.splitlines() if line.strip() and line.strip() != "..."]
    assert len(lines) > 20
    produced = iter(dump.splitlines())
    # Every README line is printed, in the README's order (``...`` skips items).
    missing = [line for line in lines if line not in produced]
    assert missing == [], "README lines dsrdump does not print in this order:\n" + "\n".join(missing)
