"""The Mammography CAD SR: its content tree against the rows of PS3.16 TID 4000 and the templates it includes,
the validators' verdicts, rendering intent after each model's operating point, marks inside their images,
algorithm identification on every finding, stable UIDs, and its settings."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset

from gateway.settings import OutputsSettings
from plugins.types import LocalisationPoint, LocalisationRegion, OperatingPoint, Prediction, ScoreMeaning
from tests import validators
from tests.test_outputs import make_mammogram, make_prediction, round_trip
from workers import cad_sr, pipeline
from workers.cad_sr import AlgorithmRun, build_cad_sr, heatmap_peaks, rendering_point
from workers.outputs import ReportedModel
from workers.study_report import ModelResults
from workers.triage import TriageDecision

MANDATORY, OPTIONAL = "M", "U"
BY_REFERENCE = ("by-reference", "")
ALGORITHM_ROWS = {
    ("111001", "DCM"): ("TEXT", "HAS PROPERTIES", MANDATORY),  # TID 4019 Algorithm Name
    ("111003", "DCM"): ("TEXT", "HAS PROPERTIES", MANDATORY),  # Algorithm Version
    ("111002", "DCM"): ("TEXT", "HAS PROPERTIES", OPTIONAL),  # Algorithm Parameters
}
GEOMETRY_SOURCE = {BY_REFERENCE: ("", "SELECTED FROM", MANDATORY)}  # TID 4021 rows 2 and 4
PERFORMED_ROWS = {  # TID 4017 / 4018
    **ALGORITHM_ROWS,
    BY_REFERENCE: ("", "HAS PROPERTIES", MANDATORY),  # row 4: the Image Library entries it read
}
#: Parent concept -> {child concept: (value type, relationship, requirement)}: the rows of TID 4000, 1204,
#: 4020, 4001, 4002, 4003, 4006, 4019, 4021, 4013, 4015-4018 and 4023 this document uses.
TEMPLATE: dict[tuple[str, str], dict[tuple[str, str], tuple[str, str, str]]] = {
    ("111036", "DCM"): {  # TID 4000 Mammography CAD Report
        ("121049", "DCM"): ("CODE", "HAS CONCEPT MOD", MANDATORY),  # TID 1204 Language
        ("111028", "DCM"): ("CONTAINER", "CONTAINS", MANDATORY),  # row 3 Image Library
        ("111017", "DCM"): ("CODE", "CONTAINS", MANDATORY),  # row 5 TID 4001
        ("111064", "DCM"): ("CODE", "CONTAINS", MANDATORY),  # row 6 Summary of Detections
        ("111065", "DCM"): ("CODE", "CONTAINS", MANDATORY),  # row 8 Summary of Analyses
    },
    ("111028", "DCM"): {("260753009", "SCT"): ("IMAGE", "CONTAINS", MANDATORY)},  # TID 4020 row 1
    ("260753009", "SCT"): {  # TID 4020 descriptors
        ("111027", "DCM"): ("CODE", "HAS ACQ CONTEXT", MANDATORY),  # laterality: every test image has one
        ("111031", "DCM"): ("CODE", "HAS ACQ CONTEXT", MANDATORY),  # view
        ("111044", "DCM"): ("TEXT", "HAS ACQ CONTEXT", OPTIONAL),
        ("111043", "DCM"): ("TEXT", "HAS ACQ CONTEXT", OPTIONAL),
        ("111060", "DCM"): ("DATE", "HAS ACQ CONTEXT", OPTIONAL),
        ("111061", "DCM"): ("TIME", "HAS ACQ CONTEXT", OPTIONAL),
        ("111018", "DCM"): ("DATE", "HAS ACQ CONTEXT", OPTIONAL),
        ("111019", "DCM"): ("TIME", "HAS ACQ CONTEXT", OPTIONAL),
        ("110901", "DCM"): ("NUM", "HAS ACQ CONTEXT", OPTIONAL),
        ("110902", "DCM"): ("NUM", "HAS ACQ CONTEXT", OPTIONAL),
        ("110903", "DCM"): ("NUM", "HAS ACQ CONTEXT", OPTIONAL),
        ("110910", "DCM"): ("NUM", "HAS ACQ CONTEXT", OPTIONAL),
        ("110911", "DCM"): ("NUM", "HAS ACQ CONTEXT", OPTIONAL),
    },
    ("111031", "DCM"): {("111032", "DCM"): ("CODE", "HAS CONCEPT MOD", OPTIONAL)},
    ("111017", "DCM"): {  # TID 4001 with its TID 4002 body
        ("111033", "DCM"): ("TEXT", "HAS PROPERTIES", MANDATORY),
        **ALGORITHM_ROWS,
        ("111034", "DCM"): ("CONTAINER", "INFERRED FROM", OPTIONAL),  # TID 4003, one per finding
    },
    ("111034", "DCM"): {  # TID 4003
        ("111056", "DCM"): ("CODE", "HAS CONCEPT MOD", MANDATORY),
        ("111059", "DCM"): ("CODE", "CONTAINS", MANDATORY),
    },
    ("111059", "DCM"): {  # TID 4006
        ("111056", "DCM"): ("CODE", "HAS CONCEPT MOD", MANDATORY),
        **ALGORITHM_ROWS,
        ("111012", "DCM"): ("NUM", "HAS PROPERTIES", OPTIONAL),
        ("111047", "DCM"): ("NUM", "HAS PROPERTIES", OPTIONAL),
        ("111010", "DCM"): ("SCOORD", "HAS PROPERTIES", MANDATORY),  # TID 4021 Center
        ("111041", "DCM"): ("SCOORD", "HAS PROPERTIES", OPTIONAL),  # TID 4021 Outline
        ("111058", "DCM"): ("TEXT", "HAS PROPERTIES", OPTIONAL),  # TID 4013
    },
    ("111056", "DCM"): {("111071", "DCM"): ("NUM", "HAS PROPERTIES", OPTIONAL)},  # TID 4006 row 3
    ("111010", "DCM"): GEOMETRY_SOURCE,
    ("111041", "DCM"): GEOMETRY_SOURCE,
    ("111064", "DCM"): {  # TID 4015
        ("111063", "DCM"): ("CONTAINER", "INFERRED FROM", OPTIONAL),
        ("111025", "DCM"): ("CONTAINER", "INFERRED FROM", OPTIONAL),
    },
    ("111065", "DCM"): {  # TID 4016
        ("111062", "DCM"): ("CONTAINER", "INFERRED FROM", OPTIONAL),
        ("111024", "DCM"): ("CONTAINER", "INFERRED FROM", OPTIONAL),
    },
    ("111063", "DCM"): {("111022", "DCM"): ("CODE", "CONTAINS", MANDATORY)},
    ("111025", "DCM"): {("111022", "DCM"): ("CODE", "CONTAINS", MANDATORY)},
    ("111062", "DCM"): {("111004", "DCM"): ("CODE", "CONTAINS", MANDATORY)},
    ("111024", "DCM"): {("111004", "DCM"): ("CODE", "CONTAINS", MANDATORY)},
    ("111022", "DCM"): {  # TID 4017 with TID 4023
        **PERFORMED_ROWS,
        ("111072", "DCM"): ("NUM", "HAS PROPERTIES", MANDATORY),
        ("111092", "DCM"): ("NUM", "HAS PROPERTIES", OPTIONAL),
    },
    ("111004", "DCM"): PERFORMED_ROWS,  # TID 4018
}
#: Leaves: content items the template gives no children.
LEAVES = {
    ("121049", "DCM"),
    ("111027", "DCM"),
    ("111032", "DCM"),
    ("111033", "DCM"),
    ("111001", "DCM"),
    ("111003", "DCM"),
    ("111002", "DCM"),
    ("111012", "DCM"),
    ("111047", "DCM"),
    ("111058", "DCM"),
    ("111071", "DCM"),
    ("111072", "DCM"),
    ("111092", "DCM"),
    BY_REFERENCE,
} | {
    code
    for code, row in TEMPLATE[("260753009", "SCT")].items()
    if row[0] != "CODE" or code == ("111027", "DCM")
}

SUSPICION = ScoreMeaning(
    kind="suspicion_score",
    description="p(malignant), uncalibrated",
    concept=("111012", "DCM", "Certainty of Finding"),
)
CALIBRATED = ScoreMeaning(
    kind="probability_of_malignancy",
    description="calibrated p(malignant)",
    concept=("111047", "DCM", "Probability of cancer"),
)
POINTS = (
    OperatingPoint(name="high_sensitivity", threshold=0.3, sensitivity=0.95),
    OperatingPoint(name="high_specificity", threshold=0.6, specificity=0.9),
)


def key(item: Dataset) -> tuple[str, str]:
    if "ConceptNameCodeSequence" not in item:
        return BY_REFERENCE
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def walk(item: Dataset) -> Iterator[Dataset]:
    for child in children(item):
        yield child
        yield from walk(child)


def named(item: Dataset, code: tuple[str, str]) -> list[Dataset]:
    return [c for c in children(item) if key(c) == code]


def value(item: Dataset) -> tuple[str, str]:
    code = item.ConceptCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def number(item: Dataset) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def resolve(sr: Dataset, identifier: list[int]) -> Dataset:
    """The content item a by-reference identifier names (1 is the root)."""
    assert identifier[0] == 1
    item = sr
    for position in identifier[1:]:
        item = children(item)[position - 1]
    return item


def template_violations(sr: Dataset) -> list[str]:
    """Every content item outside the TEMPLATE rows, of the wrong value type or relationship, and every
    mandatory row missing, as readable lines."""
    problems: list[str] = []

    def check(item: Dataset, path: str) -> None:
        parent = key(item)
        rows = TEMPLATE.get(parent)
        if rows is None:
            if children(item) and parent not in LEAVES:
                problems.append(f"{path}: {parent} has children but no template rows")
            elif children(item):
                problems.append(f"{path}: leaf {parent} has children")
            return
        for child in children(item):
            code = key(child)
            if code not in rows:
                problems.append(f"{path}: {code} is not a row under {parent}")
                continue
            value_type, relationship, _ = rows[code]
            if str(child.get("ValueType", "")) != value_type:
                problems.append(f"{path}/{code}: value type {child.get('ValueType', '')} is not {value_type}")
            if str(child.RelationshipType) != relationship:
                problems.append(f"{path}/{code}: relationship {child.RelationshipType} is not {relationship}")
            check(child, f"{path}/{code[0]}")
        present = {key(c) for c in children(item)}
        for code, (_, _, requirement) in rows.items():
            if requirement == MANDATORY and code not in present:
                problems.append(f"{path}: mandatory row {code} is missing under {parent}")

    assert key(sr) == ("111036", "DCM")
    check(sr, "root")
    return problems


def lem_prediction(image: Dataset) -> Prediction:
    """LEM's output shape: malignant maxima, a benign minimum, and one region of the predicted branch."""
    base = make_prediction(image, probabilities=(0.3, 0.7))
    return dataclasses.replace(
        base,
        model_id="lem.v1",
        model_name="lem",
        heatmap_method="LEM excitation backprop",
        points=(
            LocalisationPoint(x=20.5, y=40.5, score=0.9, label="LEM local maximum (suspected malignant)"),
            LocalisationPoint(x=40.5, y=60.5, score=0.45, label="LEM local maximum (suspected malignant)"),
            LocalisationPoint(x=10.5, y=15.5, score=0.2, label="LEM local maximum (suspected malignant)"),
            LocalisationPoint(x=30.5, y=30.5, score=0.1, label="LEM local minimum (suspected benign)"),
        ),
        regions=(
            LocalisationRegion(
                points=((10.0, 30.0), (30.0, 30.0), (30.0, 50.0), (10.0, 50.0)),
                score=0.8,
                label="LEM lesion region (suspected malignant)",
            ),
        ),
        operating_points=POINTS,
    )


def classifier_predictions(
    images: list[Dataset], *, heatmap_shape: tuple[int, int] | None = None
) -> list[Prediction]:
    """A classifier without points: high risk on the first image (a heatmap with one hot spot), low on the other."""
    predictions = []
    for index, image in enumerate(images):
        prediction = make_prediction(image, probabilities=(0.2, 0.8) if index == 0 else (0.9, 0.1))
        if heatmap_shape is not None:
            heat = np.zeros(heatmap_shape, dtype=np.float32)
            heat[heatmap_shape[0] // 4, heatmap_shape[1] // 4] = 1.0
            prediction = dataclasses.replace(prediction, heatmap=heat)
        predictions.append(dataclasses.replace(prediction, model_id="clf.v1", model_name="clf"))
    return predictions


def runs(images: list[Dataset], *, calibrated: bool = False, failing: bool = True) -> list[AlgorithmRun]:
    lem = [lem_prediction(images[0])]
    clf = classifier_predictions(images)
    if calibrated:
        clf = [dataclasses.replace(p, score=CALIBRATED) for p in clf]
    result = [
        AlgorithmRun(
            results=ModelResults(
                model=ReportedModel.from_prediction(lem[0]), predictions=lem, score=SUSPICION
            )
        ),
        AlgorithmRun(
            results=ModelResults(
                model=ReportedModel.from_prediction(clf[0]),
                predictions=clf,
                score=CALIBRATED if calibrated else SUSPICION,
            ),
            failed_images=[str(images[1].SOPInstanceUID)] if failing else [],
        ),
    ]
    if failing:
        broken = ReportedModel(model_id="broken.v1", name="broken", version="1.0", display_name="broken")
        result.append(AlgorithmRun(results=ModelResults(model=broken, predictions=[]), failed_images=[]))
    return result


@pytest.fixture
def images() -> list[Dataset]:
    return [make_mammogram("L", "CC"), make_mammogram("R", "MLO")]


def build(images: list[Dataset], **kwargs: object) -> Dataset:
    options: dict[str, object] = {"fallback_threshold": 0.5, "source_digests": {}}
    options.update(kwargs)
    return round_trip(build_cad_sr(images, runs(images), **options))  # type: ignore[arg-type]


def findings(sr: Dataset) -> list[Dataset]:
    (summary,) = named(sr, ("111017", "DCM"))
    return [
        sif for container in named(summary, ("111034", "DCM")) for sif in named(container, ("111059", "DCM"))
    ]


def parameters(item: Dataset) -> dict[str, str]:
    texts = [str(c.TextValue) for c in named(item, ("111002", "DCM"))]
    return dict(text.split("=", 1) for text in texts)


# -------------------------------------------------------------------------
# The validators and the template
# -------------------------------------------------------------------------


def test_the_validators_report_no_error(images: list[Dataset], tmp_path: Path) -> None:
    path = tmp_path / "cad.dcm"
    decision = TriageDecision(
        category="high", risk=0.8, model="clf", operating_point=POINTS[1], policy="test"
    )
    build(images, decision=decision).save_as(path, enforce_file_format=True)
    assert validators.dciodvfy_errors(path) == []
    assert validators.pixelmed_sr_errors(path, heap="1g") == []


@pytest.mark.parametrize("calibrated", [False, True])
def test_the_content_tree_follows_the_template_rows(images: list[Dataset], calibrated: bool) -> None:
    sr = round_trip(build_cad_sr(images, runs(images, calibrated=calibrated), fallback_threshold=0.5))
    assert str(sr.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.88.50"
    assert str(sr.ContentTemplateSequence[0].TemplateIdentifier) == "4000"
    assert template_violations(sr) == []
    # Every by-reference item names an Image Library entry.
    (library,) = named(sr, ("111028", "DCM"))
    entries = {str(e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for e in children(library)}
    assert entries == {str(ds.SOPInstanceUID) for ds in images}
    references = [i for i in walk(sr) if key(i) == BY_REFERENCE]
    assert references
    assert all(resolve(sr, list(r.ReferencedContentItemIdentifier)) in children(library) for r in references)
    # A calibrated risk is reported as Probability of cancer on a typed finding only; an uncalibrated one never.
    concepts = {key(c) for f in findings(sr) for c in children(f) if c.ValueType == "NUM"}
    assert ("111047", "DCM") not in concepts or calibrated


def test_the_summaries_say_which_models_succeeded_partially_or_failed(images: list[Dataset]) -> None:
    sr = build(images)
    for summary_code, success, failure, performed in (
        (("111064", "DCM"), ("111063", "DCM"), ("111025", "DCM"), ("111022", "DCM")),
        (("111065", "DCM"), ("111062", "DCM"), ("111024", "DCM"), ("111004", "DCM")),
    ):
        (summary,) = named(sr, summary_code)
        assert value(summary) == ("111223", "DCM")  # partially succeeded: one model failed, one partly
        (succeeded,) = named(summary, success)
        (failed,) = named(summary, failure)
        names = {
            side: sorted(str(named(p, ("111001", "DCM"))[0].TextValue) for p in named(container, performed))
            for side, container in (("ok", succeeded), ("failed", failed))
        }
        assert len(names["ok"]) == 2  # lem and the classifier (on the image it read)
        assert len(names["failed"]) == 2  # the classifier (on the image it failed) and the broken model
    (processing,) = named(sr, ("111017", "DCM"))
    assert value(processing) == ("111244", "DCM")  # not all algorithms succeeded; with findings

    clean = round_trip(build_cad_sr(images, runs(images, failing=False), fallback_threshold=0.5))
    (detections,) = named(clean, ("111064", "DCM"))
    assert value(detections) == ("111222", "DCM")
    assert named(detections, ("111025", "DCM")) == []


# -------------------------------------------------------------------------
# Findings
# -------------------------------------------------------------------------


def test_rendering_intent_follows_each_model_s_operating_point(images: list[Dataset]) -> None:
    sr = build(images, high_point="high_specificity")
    marks = findings(sr)
    assert marks
    for sif in marks:
        params = parameters(sif)
        threshold = float(params["operating_threshold"])
        (score_item,) = [c for c in children(sif) if c.ValueType == "NUM"]
        score = number(score_item) / 100
        (intent,) = named(sif, ("111056", "DCM"))
        required = value(intent) == ("111150", "DCM")
        assert required == (score >= threshold - 1e-6), (params, score)
        operating = named(intent, ("111071", "DCM"))
        assert bool(operating) == (not required)  # a CAD Operating Point on optional marks only
        if operating:
            assert number(operating[0]) >= 1
    # LEM: its maxima and its region, never its benign minimum; the classifier: its hot image's peak only.
    sources = [parameters(sif)["finding_source"] for sif in marks]
    assert not any("benign" in s for s in sources)
    assert sum("localisation point" in s for s in sources) == 3
    assert sum("localisation region" in s for s in sources) == 1
    assert sum("peak" in s for s in sources) == 1
    # Each model's point: LEM's own high-specificity threshold, the classifier's site fallback.
    thresholds = {parameters(sif)["model_id"]: parameters(sif)["operating_threshold"] for sif in marks}
    assert thresholds == {"lem.v1": "0.6", "clf.v1": "0.5"}


def test_marks_lie_inside_the_image_they_were_found_on(images: list[Dataset]) -> None:
    sr = build(images)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in images}
    for sif in findings(sr):
        for geometry in [*named(sif, ("111010", "DCM")), *named(sif, ("111041", "DCM"))]:
            (reference,) = children(geometry)
            entry = resolve(sr, list(reference.ReferencedContentItemIdentifier))
            image = by_uid[str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
            assert str(image.PresentationIntentType) == "FOR PRESENTATION"
            data = np.asarray(geometry.GraphicData, dtype=np.float64).reshape(-1, 2)
            assert np.all(data >= 0)
            assert np.all(data[:, 0] <= int(image.Columns)) and np.all(data[:, 1] <= int(image.Rows))
            if geometry.GraphicType == "POLYLINE":
                assert np.allclose(data[0], data[-1]) and len(data) >= 4  # closed


def test_every_finding_names_its_algorithm(images: list[Dataset]) -> None:
    sr = build(images)
    for sif in findings(sr):
        assert named(sif, ("111001", "DCM")) and named(sif, ("111003", "DCM"))
        assert {"model_id", "operating_point", "operating_threshold", "score", "finding_source"} <= set(
            parameters(sif)
        )


def test_heatmap_peaks_map_to_source_pixels_as_the_sc_stretches_the_map() -> None:
    # A kept map is the source shrunk to the SC's size: map pixel (r, c) covers source pixels around
    # ((c + 0.5) * columns / width, (r + 0.5) * rows / height).
    heat = np.zeros((48, 32), dtype=np.float32)
    heat[12, 8] = 1.0
    heat[40, 28] = 0.7
    heat[41, 28] = 0.2  # a shoulder of the second peak, not a peak
    peaks = heatmap_peaks(heat, 960, 640, limit=3)
    assert [(round(x), round(y)) for x, y, _ in peaks] == [(170, 250), (570, 810)]
    assert heatmap_peaks(heat, 960, 640, limit=1) == peaks[:1]
    assert heatmap_peaks(np.zeros((8, 8), dtype=np.float32), 8, 8, limit=3) == []


def square_dilation_peaks(
    heat: np.ndarray, rows: int, columns: int, *, limit: int
) -> list[tuple[float, ...]]:
    """The peak finder as first written: one square dilation over the whole map, every plateau's pixels
    listed apart.  The fast one must give exactly its answer."""
    values = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)), 0.0, 1.0)
    if values.ndim != 2 or values.size == 0 or limit <= 0 or float(values.max()) <= 0.0:
        return []
    top = float(values.max())
    height, width = values.shape
    radius = max(1, round(max(height, width) / 8))
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), dtype=np.uint8)
    maxima = (values >= cv2.dilate(values, kernel)) & (values >= 0.5 * top)
    count, component = cv2.connectedComponents(maxima.astype(np.uint8), connectivity=8)
    candidates = []
    for label in range(1, count):
        ys, xs = np.nonzero(component == label)
        candidates.append((float(values[ys[0], xs[0]]), float(xs.mean()), float(ys.mean())))
    candidates.sort(key=lambda c: (-c[0], c[2], c[1]))
    chosen: list[tuple[float, float, float]] = []
    for peak, x, y in candidates:
        if any((x - cx) ** 2 + (y - cy) ** 2 <= radius**2 for _, cx, cy in chosen):
            continue
        chosen.append((peak, x, y))
        if len(chosen) == limit:
            break
    return [((x + 0.5) * columns / width, (y + 0.5) * rows / height, peak) for peak, x, y in chosen]


def random_map(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Maps like the models' (a coarse map stretched smoothly, kept as float16, with plateaus) and worse."""
    height, width = shape
    if kind == "noise":
        return rng.random(shape, dtype=np.float32)
    if kind == "constant":
        return np.full(shape, 0.25, dtype=np.float32)
    if kind == "sparse":
        spots = np.zeros(shape, dtype=np.float32)
        spots[rng.integers(0, height, 12), rng.integers(0, width, 12)] = rng.random(12, dtype=np.float32)
        return spots
    # A model's map is made of few cells (a CAM's feature map: 7 to 64 a side) stretched over the image.
    coarse = rng.random((min(16, max(2, height // 32)), min(16, max(2, width // 32))), dtype=np.float32)
    stretched = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    heat: np.ndarray = (stretched - stretched.min()) / max(float(np.ptp(stretched)), 1e-6)
    if kind == "cam":  # as kept: float16, so equal neighbours form plateaus; saturated at the top
        return np.minimum(heat * 1.2, 1.0).astype(np.float16).astype(np.float32)
    if kind == "steps":  # a few levels only: wide plateaus everywhere
        return np.round(heat * 6) / 6
    if kind == "edges":  # its maxima on the borders, where windows are cut
        heat = heat * 0.2
        heat[0, :] = np.linspace(0.5, 1.0, width)
        heat[:, -1] = 0.9
        return heat
    heat[rng.random(shape) < 0.001] = np.nan  # "dirty": NaN and infinities, as nan_to_num takes them
    heat[0, 0], heat[-1, -1] = np.inf, -np.inf
    return heat.astype(np.float32)


@pytest.mark.parametrize("kind", ["noise", "constant", "sparse", "cam", "steps", "edges", "dirty"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (48, 40), (300, 212), (520, 401), (1024, 788)])
def test_the_peak_finder_gives_what_a_square_dilation_gives(kind: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng([*shape, *kind.encode()])
    for _ in range(2):
        heat = random_map(kind, shape, rng)
        assert heatmap_peaks(heat, 3328, 2560, limit=5) == square_dilation_peaks(heat, 3328, 2560, limit=5)
        values = np.clip(np.nan_to_num(heat), 0.0, 1.0)
        radius = max(1, round(max(shape) / 8))
        square = np.ones((2 * radius + 1, 2 * radius + 1), dtype=np.uint8)
        floor = 0.5 * float(values.max())
        expected = (values >= cv2.dilate(values, square)) & (values >= floor)
        assert np.array_equal(cad_sr.plateau_maxima(values, radius, floor), expected)


def test_the_peak_finder_is_exact_on_a_full_field_map() -> None:
    # The size a full-field mammogram's kept map has (map_for_display), where the tiles do the work.
    heat = random_map("cam", (2048, 1575), np.random.default_rng(7))
    assert heatmap_peaks(heat, 3328, 2560, limit=3) == square_dilation_peaks(heat, 3328, 2560, limit=3)


def test_a_classifier_s_peak_is_on_its_hot_spot_in_source_coordinates(images: list[Dataset]) -> None:
    clf = classifier_predictions(images, heatmap_shape=(24, 16))
    run = AlgorithmRun(results=ModelResults(model=ReportedModel.from_prediction(clf[0]), predictions=clf))
    sr = round_trip(build_cad_sr(images, [run], fallback_threshold=0.5))
    (mark,) = findings(sr)
    (center,) = named(mark, ("111010", "DCM"))
    x, y = (float(v) for v in center.GraphicData)
    rows, columns = int(images[0].Rows), int(images[0].Columns)
    assert (x, y) == pytest.approx(((4 + 0.5) * columns / 16, (6 + 0.5) * rows / 24), abs=1e-3)
    assert value(mark) == ("111099", "DCM")  # a classifier does not tell a mass from calcifications
    assert named(mark, ("111058", "DCM"))


def test_maps_kept_apart_give_the_same_marks_and_only_the_wanted_ones_are_read(
    images: list[Dataset], tmp_path: Path
) -> None:
    # The worker keeps each model's maps in an archive; the CAD SR reads a map only for an image at or above
    # the model's rendering point, and its document is the one built from every map read up front.
    clf = classifier_predictions(images, heatmap_shape=(24, 16))
    path = tmp_path / pipeline.HEATMAPS_FILE
    pipeline.write_kept_maps(path, pipeline.keep_maps(clf, "first", extra_maps=False))
    as_kept = [dataclasses.replace(p, heatmap=None) for p in clf]
    model = ReportedModel.from_prediction(clf[0])
    created = datetime.datetime(2026, 12, 6, 10, 0, 0)
    read_up_front = pipeline.read_kept_maps(path).attach(as_kept)
    expected = build_cad_sr(
        images,
        [AlgorithmRun(results=ModelResults(model=model, predictions=read_up_front))],
        fallback_threshold=0.5,
        created=created,
    )
    reader = pipeline.kept_heatmaps(path, as_kept)
    read: list[Prediction] = []

    def reading(prediction: Prediction) -> np.ndarray | None:
        read.append(prediction)
        return reader(prediction)

    run = AlgorithmRun(results=ModelResults(model=model, predictions=as_kept), heatmap_of=reading)
    assert build_cad_sr(images, [run], fallback_threshold=0.5, created=created) == expected
    assert len(findings(round_trip(expected))) == 1
    assert [p.risk >= 0.5 for p in read] == [True]  # the low-risk image's map stays in the archive


def test_the_operating_point_falls_back_to_the_site_threshold() -> None:
    prediction = make_prediction(make_mammogram())
    point, lower = rendering_point(prediction, high_point="high_specificity", fallback_threshold=0.7)
    assert (point.threshold, lower) == (0.7, (0.35,))
    lem = lem_prediction(make_mammogram())
    point, lower = rendering_point(lem, high_point="high_specificity", fallback_threshold=0.7)
    assert (point.name, point.threshold, lower) == ("high_specificity", 0.6, (0.3,))
    assert cad_sr.operating_point_bin(0.45, lower) == 1 and cad_sr.operating_point_bin(0.1, lower) == 2


# -------------------------------------------------------------------------
# Identity: UIDs, manufacturer, settings
# -------------------------------------------------------------------------


def test_uids_are_stable_and_change_with_the_sources_bytes(images: list[Dataset]) -> None:
    digests = {str(ds.SOPInstanceUID): "a" * 32 for ds in images}
    first = build(images, source_digests=digests)
    again = build(images, source_digests=digests)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    changed = build(images, source_digests={**digests, str(images[0].SOPInstanceUID): "b" * 32})
    assert changed.SOPInstanceUID != first.SOPInstanceUID
    assert changed.SeriesInstanceUID == first.SeriesInstanceUID
    assert str(first.SOPInstanceUID) != str(images[0].StudyInstanceUID)


def test_manufacturer_and_model_name_come_from_the_settings(images: list[Dataset]) -> None:
    settings = OutputsSettings(cad_sr={"manufacturer": "Listed Vendor", "model_name": "Listed CAD 2"}).cad_sr
    sr = build(images, manufacturer=settings.manufacturer, model_name=settings.model_name)
    assert (sr.Manufacturer, sr.ManufacturerModelName) == ("Listed Vendor", "Listed CAD 2")
    # Our own marks stay recognisable: one AIR Contributing Equipment item per model, the failed one too.
    assert len(sr.ContributingEquipmentSequence) == 3
    assert {str(item.Manufacturer) for item in sr.ContributingEquipmentSequence} == {"pacs-triage"}
    assert str(sr.SeriesDescription).startswith("NOT FOR DIAGNOSTIC USE")
    assert int(sr.SeriesNumber) == 9960


@pytest.mark.parametrize(
    "bad",
    [
        {"manufacturer": ""},
        {"manufacturer": "a\\b"},
        {"model_name": "x" * 65},
        {"model_name": "   "},
        {"max_peaks": -1},
    ],
)
def test_cad_sr_settings_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        OutputsSettings(cad_sr=bad)
    defaults = OutputsSettings().cad_sr
    assert (defaults.enabled, defaults.manufacturer) == (True, "pacs-triage")


def test_a_study_without_mammograms_has_no_cad_sr(images: list[Dataset]) -> None:
    ultrasound = make_mammogram()
    ultrasound.Modality = "US"
    with pytest.raises(ValueError):
        build_cad_sr([ultrasound], [], fallback_threshold=0.5)


def test_the_conformance_statement_lists_the_cad_sr_and_the_hl7_profile() -> None:
    from gateway.settings import load_settings
    from workers.conformance import conformance_statement

    text = conformance_statement(
        load_settings(Path(__file__).parent.parent / "configs" / "default.yaml", environ={})
    )
    assert (
        f"| Mammography CAD SR Storage | {cad_sr.MAMMOGRAPHY_CAD_SR_STORAGE} |" in text
    )  # proposed, role SCU
    assert f"| Mammography CAD SR | {cad_sr.MAMMOGRAPHY_CAD_SR_STORAGE} |" in text  # produced
    assert "### 6.1 HL7 v2 messages" in text and "ORU^R01" in text and "OMI^O23" in text
    assert "| Explicit VR Big Endian (Retired) |" in text
