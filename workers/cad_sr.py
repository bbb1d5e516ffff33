"""The study's Mammography CAD SR (SOP Class 1.2.840.10008.5.1.4.1.1.88.50), root template PS3.16 TID 4000.

Breast workstations draw a Mammography CAD SR as marks over the images.  Content tree (rows of TID 4000,
4001, 4002, 4003, 4006, 4015-4021, 4023; see docs/outputs.md "Mammography CAD SR"):

* Language of Content Item and Descendants (TID 1204).
* Image Library: one TID 4020 entry per evaluated MG image with its laterality, view (and view modifiers),
  patient orientation, image position where the image has one, study and content date and time and size.
* CAD Processing and Findings Summary (CID 6047), with the overall impression (TID 4002: the triage in words
  and every model's TID 4019 identification) and, inferred from it, one Individual Impression/Recommendation
  (TID 4003) per finding holding its Single Image Finding (TID 4006): finding type (CID 6014), Rendering
  Intent (CID 6034) after the model's operating point, the CAD Operating Point of an optional mark, TID 4019
  algorithm identification, Certainty of Finding or Probability of cancer, and its Center and Outline
  (TID 4021) on the image, by reference to the Image Library entry.
* Summary of Detections and Summary of Analyses (CID 6042), each model listed as a successful and/or failed
  detection (TID 4017, with its TID 4023 operating points) and analysis (TID 4018).

highdicom has no Mammography CAD SR class, and its SR document classes reject the by-reference relationships
(SELECTED FROM / HAS PROPERTIES an Image Library entry) that TID 4017 and TID 4021 ask for; the content items
are highdicom's public content item classes, the by-reference items and the document are plain pydicom
datasets (the modules of the PS3.3 A.35.5 Mammography CAD SR IOD).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.uid import UID, ExplicitVRLittleEndian

from plugins.types import (
    CERTAINTY_OF_FINDING as CERTAINTY_OF_FINDING_CONCEPT,
)
from plugins.types import (
    LocalisationPoint,
    LocalisationRegion,
    OperatingPoint,
    Prediction,
)
from workers import identity as labels
from workers import uids
from workers.identity import AlgorithmIdentity
from workers.outputs import DISCLAIMER, ReportedModel
from workers.study_report import ModelResults, score_concept
from workers.triage import FALLBACK_HIGH, ModelRisk, TriageDecision, category_points

__all__ = [
    "MAMMOGRAPHY_CAD_SR_STORAGE",
    "AlgorithmRun",
    "CadFinding",
    "build_cad_sr",
    "findings_of",
    "heatmap_peaks",
    "plateau_maxima",
    "rendering_point",
]

#: PS3.4 Mammography CAD SR Storage.
MAMMOGRAPHY_CAD_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.50")
_MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"

# Concept names (PS3.16 DCM unless noted).
MAMMOGRAPHY_CAD_REPORT = Code("111036", "DCM", "Mammography CAD Report")
IMAGE_LIBRARY = Code("111028", "DCM", "Image Library")
CAD_PROCESSING_SUMMARY = Code("111017", "DCM", "CAD Processing and Findings Summary")
SUMMARY_OF_DETECTIONS = Code("111064", "DCM", "Summary of Detections")
SUMMARY_OF_ANALYSES = Code("111065", "DCM", "Summary of Analyses")
SUCCESSFUL_DETECTIONS = Code("111063", "DCM", "Successful Detections")
FAILED_DETECTIONS = Code("111025", "DCM", "Failed Detections")
SUCCESSFUL_ANALYSES = Code("111062", "DCM", "Successful Analyses")
FAILED_ANALYSES = Code("111024", "DCM", "Failed Analyses")
DETECTION_PERFORMED = Code("111022", "DCM", "Detection Performed")
ANALYSIS_PERFORMED = Code("111004", "DCM", "Analysis Performed")
INDIVIDUAL_IMPRESSION = Code("111034", "DCM", "Individual Impression/Recommendation")
SINGLE_IMAGE_FINDING = Code("111059", "DCM", "Single Image Finding")
RENDERING_INTENT = Code("111056", "DCM", "Rendering Intent")
CAD_OPERATING_POINT = Code("111071", "DCM", "CAD Operating Point")
MAXIMUM_CAD_OPERATING_POINT = Code("111072", "DCM", "Maximum CAD Operating Point")
RECOMMENDED_CAD_OPERATING_POINT = Code("111092", "DCM", "Recommended CAD Operating Point")
CERTAINTY_OF_FINDING = Code(*CERTAINTY_OF_FINDING_CONCEPT)
PROBABILITY_OF_CANCER = Code("111047", "DCM", "Probability of cancer")
IMPRESSION_DESCRIPTION = Code("111033", "DCM", "Impression Description")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
CENTER = Code("111010", "DCM", "Center")
OUTLINE = Code("111041", "DCM", "Outline")
SOURCE = Code("260753009", "SCT", "Source")
IMAGE_LATERALITY = Code("111027", "DCM", "Image Laterality")
IMAGE_VIEW = Code("111031", "DCM", "Image View")
IMAGE_VIEW_MODIFIER = Code("111032", "DCM", "Image View Modifier")
PATIENT_ORIENTATION_ROW = Code("111044", "DCM", "Patient Orientation Row")
PATIENT_ORIENTATION_COLUMN = Code("111043", "DCM", "Patient Orientation Column")
STUDY_DATE = Code("111060", "DCM", "Study Date")
STUDY_TIME = Code("111061", "DCM", "Study Time")
CONTENT_DATE = Code("111018", "DCM", "Content Date")
CONTENT_TIME = Code("111019", "DCM", "Content Time")
IMAGE_POSITION = (
    Code("110901", "DCM", "Image Position (Patient) X"),
    Code("110902", "DCM", "Image Position (Patient) Y"),
    Code("110903", "DCM", "Image Position (Patient) Z"),
)
PIXEL_DATA_ROWS = Code("110910", "DCM", "Pixel Data Rows")
PIXEL_DATA_COLUMNS = Code("110911", "DCM", "Pixel Data Columns")

# Units the templates fix.
PERCENT = Code("%", "UCUM", "Percent")
MILLIMETRE = Code("mm", "UCUM", "millimeter")
PIXELS = Code("{pixels}", "UCUM", "pixels")
#: TID 4006 row 3: a CAD Operating Point is a bin number from 1 to the Maximum CAD Operating Point.
OPERATING_POINT_RANGE = Code("{1:n}", "UCUM", "range: 1:n")
#: TID 4023 row 1: arbitrary units.
ARBITRARY_UNIT = Code("[arb'U]", "UCUM", "arbitrary unit")
#: TID 4023 row 2: 0 shows no Presentation Optional mark.
RECOMMENDED_RANGE = Code("{0:n}", "UCUM", "range:0:n")

# CID 6034 Intended Use of CAD Output.
PRESENTATION_REQUIRED = Code(
    "111150", "DCM", "Presentation Required: Rendering device is expected to present"
)
PRESENTATION_OPTIONAL = Code("111151", "DCM", "Presentation Optional: Rendering device may present")
# CID 6042 Status of Results.
SUCCEEDED = Code("111222", "DCM", "Succeeded")
PARTIALLY_SUCCEEDED = Code("111223", "DCM", "Partially Succeeded")
FAILED = Code("111224", "DCM", "Failed")
NOT_ATTEMPTED = Code("111225", "DCM", "Not Attempted")
# CID 6047 CAD Processing and Findings Summary.
ALL_SUCCEEDED_WITHOUT_FINDINGS = Code("111241", "DCM", "All algorithms succeeded; without findings")
ALL_SUCCEEDED_WITH_FINDINGS = Code("111242", "DCM", "All algorithms succeeded; with findings")
NOT_ALL_SUCCEEDED_WITHOUT_FINDINGS = Code("111243", "DCM", "Not all algorithms succeeded; without findings")
NOT_ALL_SUCCEEDED_WITH_FINDINGS = Code("111244", "DCM", "Not all algorithms succeeded; with findings")
NONE_SUCCEEDED = Code("111245", "DCM", "No algorithms succeeded; without findings")
#: CID 6043: every model's image-level risk is what the study's triage (the overall impression) is made of.
OVERALL_IMPRESSION_ANALYSIS = Code("111234", "DCM", "Overall Impression / Recommendation Analysis")
# CID 6014 Mammography Single Image Finding.  A model says what it found only through its localisations'
# labels.  A malignancy classifier's localisation or heatmap peak does not tell a mass from calcifications:
# it is a selected region (TID 4013 describes it), never a type the model did not name.  A mass is the CAD
# templates' "Mammography breast density" (TID 4011 "Mammography CAD Density" describes its shape and margins).
SELECTED_REGION = Code("111099", "DCM", "Selected region")
SELECTED_REGION_DESCRIPTION = Code("111058", "DCM", "Selected Region Description")
MASS = Code("129793001", "SCT", "Mammography breast density")
CALCIFICATION_CLUSTER = Code("129769006", "SCT", "Calcification Cluster")
INDIVIDUAL_CALCIFICATION = Code("129770007", "SCT", "Individual Calcification")
_FINDING_WORDS: tuple[tuple[re.Pattern[str], Code], ...] = (
    (
        re.compile(r"calcification\s+cluster|cluster\s+of\s+calcifications|microcalcification", re.I),
        CALCIFICATION_CLUSTER,
    ),
    (re.compile(r"calcification", re.I), INDIVIDUAL_CALCIFICATION),
    (re.compile(r"\bmass\b", re.I), MASS),
)
#: A localisation labelled with a non-suspicious class marks where the model sees no finding (LEM's minima,
#: "suspected benign"): it is never a CAD mark.
_NOT_A_FINDING = re.compile(r"\b(benign|normal|negative)\b", re.I)
# CID 6022 Side (of the breast).
_SIDES: dict[str, Code] = {
    "L": Code("80248007", "SCT", "Left breast"),
    "R": Code("73056007", "SCT", "Right breast"),
    "B": Code("63762007", "SCT", "Both breasts"),
}
_ENGLISH = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
_LO = 64


# -------------------------------------------------------------------------
# Inputs
# -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AlgorithmRun:
    """One model's part of the CAD SR: its results (predictions with their heatmaps, where kept) and the
    images it was given but gave no prediction for."""

    results: ModelResults
    #: SOP Instance UIDs of images the model failed on (its journalled failures).
    failed_images: Sequence[str] = ()
    #: False for a model the site's configuration lists for the study that never ran on it: left out of the
    #: summaries, which list attempted algorithms only.
    attempted: bool = True
    #: Reads a prediction's heatmap where the maps are kept apart from the predictions: only an image at or
    #: above the model's rendering point has peaks, so only its map is read.  By default the prediction's own.
    heatmap_of: Callable[[Prediction], np.ndarray | None] | None = None

    @property
    def status(self) -> Code:
        """CID 6042: succeeded, partially succeeded (some images failed) or failed (no prediction)."""
        if not self.attempted:
            return NOT_ATTEMPTED
        if not self.results.predictions:
            return FAILED
        return PARTIALLY_SUCCEEDED if self.failed_images else SUCCEEDED


@dataclass(frozen=True, kw_only=True)
class CadFinding:
    """One CAD mark: a point (and outline) on one image, the score behind it and where it came from."""

    prediction: Prediction
    #: Centre in source pixels, continuous (x = column, y = row), as DICOM SCOORD.
    center: tuple[float, float]
    #: Closed outline in source pixels, when the model drew a region.
    outline: tuple[tuple[float, float], ...] = ()
    #: The number the rendering intent is decided on, on the model's risk scale.
    score: float
    #: The concept *score* is reported under (Certainty of Finding, or Probability of cancer when calibrated).
    concept: Code
    finding_type: Code = SELECTED_REGION
    #: Where the finding comes from, in our words (an algorithm parameter).
    origin: str = ""


# -------------------------------------------------------------------------
# Operating points and findings
# -------------------------------------------------------------------------


def rendering_point(
    prediction: Prediction, *, high_point: str, fallback_threshold: float
) -> tuple[OperatingPoint, tuple[float, ...]]:
    """The operating point a model's marks are presented at, and the thresholds of its more sensitive points.

    The point is the one the triage makes a study ``high`` at (``triage.high_operating_point``, read as
    :func:`workers.triage.category_points` reads it); a model without that point uses the site-wide
    ``triage.high_risk_threshold``.  The lower thresholds, highest first, are the model's other operating
    points (and the triage's intermediate point) below it: they number the CAD Operating Points of the
    optional marks.
    """
    risk = ModelRisk(
        model=prediction.model_name, risk=prediction.risk, operating_points=prediction.operating_points
    )
    points = category_points(risk, high_point=high_point, fallback_threshold=fallback_threshold)
    point = points.get("high") or OperatingPoint(name=FALLBACK_HIGH, threshold=fallback_threshold)
    thresholds = {p.threshold for p in prediction.operating_points} | {p.threshold for p in points.values()}
    lower = tuple(sorted((t for t in thresholds if t < point.threshold), reverse=True))
    return point, lower


def operating_point_bin(score: float, lower: Sequence[float]) -> int:
    """The CAD Operating Point (1-based) of an optional mark: 1 when it reaches the first lower threshold,
    2 the second, ...; one past the last when it reaches none."""
    for number, threshold in enumerate(lower, start=1):
        if score >= threshold:
            return number
    return len(lower) + 1


def finding_type(label: str) -> Code:
    """CID 6014 code of a localisation, from what its label names; a selected region when it names no type."""
    for pattern, code in _FINDING_WORDS:
        if pattern.search(label):
            return code
    return SELECTED_REGION


def heatmap_peaks(
    heat: np.ndarray, rows: int, columns: int, *, limit: int
) -> list[tuple[float, float, float]]:
    """The local maxima of a heatmap as (x, y, value) in the source image's continuous pixel coordinates,
    highest first, at most *limit*.

    *heat* covers the whole image (a kept map is the source shrunk uniformly to the SC's image part, as
    :func:`workers.outputs.map_for_display` keeps it, and the SC stretches it back over the image), so map
    pixel (r, c) is source point ((c + 0.5) * columns / width, (r + 0.5) * rows / height).  A peak is the
    centre of a plateau of pixels equal to the largest value within an eighth of the map's longer side, at
    least half the map's maximum, and at least that far from a higher peak.
    """
    # fmax drops NaN, and with minimum it clips infinities: np.clip(np.nan_to_num(x), 0, 1) in two passes.
    values = np.minimum(np.fmax(np.asarray(heat, dtype=np.float32), 0.0), 1.0)
    if values.ndim != 2 or values.size == 0 or limit <= 0:
        return []
    top = float(values.max())
    if top <= 0.0:
        return []
    height, width = values.shape
    radius = max(1, round(max(height, width) / 8))
    maxima = plateau_maxima(values, radius, 0.5 * top)
    ys, xs = np.divmod(np.flatnonzero(maxima), width)  # np.nonzero's raster order, a tenth of its time
    y0, x0 = int(ys.min()), int(xs.min())
    crop = maxima[y0 : int(ys.max()) + 1, x0 : int(xs.max()) + 1]
    count, component = cv2.connectedComponents(crop.astype(np.uint8), connectivity=8)
    labels = component[ys - y0, xs - x0]
    # Sums of integer coordinates are exact in float64: these are the means np.mean gives, plateau by plateau.
    sizes = np.bincount(labels, minlength=count)[1:]
    mean_x = np.bincount(labels, weights=xs, minlength=count)[1:] / sizes
    mean_y = np.bincount(labels, weights=ys, minlength=count)[1:] / sizes
    # Neighbouring maxima lie in each other's window, so a plateau's pixels are equal: any one gives its value.
    first = np.unique(labels, return_index=True)[1]
    candidates = list(
        zip(values[ys[first], xs[first]].tolist(), mean_x.tolist(), mean_y.tolist(), strict=True)
    )
    candidates.sort(key=lambda c: (-c[0], c[2], c[1]))
    chosen: list[tuple[float, float, float]] = []
    for value, x, y in candidates:
        if any((x - cx) ** 2 + (y - cy) ** 2 <= radius**2 for _, cx, cy in chosen):
            continue
        chosen.append((value, x, y))
        if len(chosen) == limit:
            break
    return [((x + 0.5) * columns / width, (y + 0.5) * rows / height, value) for value, x, y in chosen]


def plateau_maxima(values: np.ndarray, radius: int, floor: float) -> np.ndarray:
    """Where *values* (a 2-D float32 map, no NaN) is at least *floor* and at least every value within
    *radius* (a (2 radius + 1)-pixel square, cut at the map's edges): the pixels
    ``(values >= cv2.dilate(values, square)) & (values >= floor)`` marks.

    A square dilation of a full-field map costs a fifth of a second, and its two 1-D passes a tenth.  Only a
    pixel that is the largest of its tile (a 16th of *radius*) can be a maximum, and the tiles' maxima bound
    every window from below (the tiles wholly inside it) and above (the tiles it meets): a tile whose maximum
    reaches the upper bound holds maxima for certain, one below the lower bound holds none, and the few in
    between are settled exactly, by counting the higher pixels in each window (an integral image).
    """
    height, width = values.shape
    tile = radius // 16
    if tile < 2:
        return (values >= _square_dilation(values, radius)) & (values >= floor)
    tall, wide = -(-height // tile), -(-width // tile)
    padded = np.full((tall * tile, wide * tile), -1.0, dtype=np.float32)  # below any value: never a maximum
    padded[:height, :width] = values
    tile_max = padded.reshape(tall, tile, wide * tile).max(axis=1).reshape(tall, wide, tile).max(axis=2)
    # Tiles within `inside` tiles lie wholly inside the window of every pixel of a tile; a window meets no
    # tile further than `meets` tiles away.
    inside = (radius - tile + 1) // tile
    meets = (radius + tile - 1) // tile
    candidate = (tile_max >= floor) & (tile_max >= _square_dilation(tile_max, inside))
    tiles = padded.reshape(tall, tile, wide, tile)
    tile_mask = (tiles == tile_max[:, None, :, None]) & candidate[:, None, :, None]
    mask = tile_mask.reshape(padded.shape)
    unsettled = candidate & (tile_max < _square_dilation(tile_max, meets))
    examined = 0
    for level in np.unique(tile_max[unsettled]):
        ty, tx = np.nonzero(unsettled & (tile_max == level))
        y0, y1 = max(0, int(ty.min()) * tile - radius), min(height, (int(ty.max()) + 1) * tile + radius)
        x0, x1 = max(0, int(tx.min()) * tile - radius), min(width, (int(tx.max()) + 1) * tile + radius)
        examined += (y1 - y0) * (x1 - x0)
        if examined > values.size // 2:  # a map of many plateaus: the plain dilation is cheaper
            return (values >= _square_dilation(values, radius)) & (values >= floor)
        higher = cv2.integral((values[y0:y1, x0:x1] > level).astype(np.uint8))
        which, dy, dx = np.nonzero(tile_mask[ty, :, tx, :])
        ys, xs = ty[which] * tile + dy, tx[which] * tile + dx
        top, bottom = np.maximum(ys - radius, 0) - y0, np.minimum(ys + radius + 1, height) - y0
        left, right = np.maximum(xs - radius, 0) - x0, np.minimum(xs + radius + 1, width) - x0
        above = higher[bottom, right] - higher[top, right] - higher[bottom, left] + higher[top, left]
        mask[ys[above > 0], xs[above > 0]] = False
    return mask[:height, :width]


def _square_dilation(values: np.ndarray, radius: int) -> np.ndarray:
    """``cv2.dilate`` with a (2 radius + 1)-pixel square, as a row pass and a column pass: the square is the
    sum of its sides, and a window cut at the map's edges is the same either way."""
    side = 2 * radius + 1
    rows = cv2.dilate(values, np.ones((1, side), dtype=np.uint8))
    return cv2.dilate(rows, np.ones((side, 1), dtype=np.uint8))


def _inside(x: float, y: float, rows: int, columns: int) -> tuple[float, float]:
    return float(np.clip(x, 0.0, columns)), float(np.clip(y, 0.0, rows))


def findings_of(
    results: ModelResults,
    header: pydicom.Dataset,
    prediction: Prediction,
    point: OperatingPoint,
    *,
    max_points: int,
    max_peaks: int,
    heatmap_of: Callable[[Prediction], np.ndarray | None] | None = None,
) -> list[CadFinding]:
    """The CAD marks of one prediction.

    A model that localises (LEM) gives its points (its certainty at that spot, at most *max_points*, highest
    first) and regions (outline and centre, scored with the image's risk); a localisation whose label names a
    benign or normal class is left out.  Any other model gives the peaks of its heatmap (at most *max_peaks*)
    on an image whose risk is at or above *point*, scored with that risk; its heatmap is *heatmap_of* the
    prediction where given (read only then), else the prediction's own.
    """
    rows, columns = int(header.Rows), int(header.Columns)
    image_score = score_concept(results.meaning)
    risk_concept = PROBABILITY_OF_CANCER if image_score == PROBABILITY_OF_CANCER else CERTAINTY_OF_FINDING
    found: list[CadFinding] = []
    if prediction.points or prediction.regions:
        marks: list[LocalisationPoint] = sorted(
            (p for p in prediction.points if not _NOT_A_FINDING.search(p.label)), key=lambda p: -p.score
        )[: max(0, max_points)]
        for mark in marks:
            found.append(
                CadFinding(
                    prediction=prediction,
                    center=_inside(mark.x, mark.y, rows, columns),
                    score=float(np.clip(mark.score, 0.0, 1.0)),
                    concept=CERTAINTY_OF_FINDING,  # the model's certainty at the spot, never a calibrated risk
                    finding_type=finding_type(mark.label),
                    origin=f"localisation point ({mark.label or 'unlabelled'})",
                )
            )
        regions: list[LocalisationRegion] = [
            r for r in prediction.regions if len(r.points) >= 3 and not _NOT_A_FINDING.search(r.label)
        ]
        for region in regions:
            outline = tuple(_inside(x, y, rows, columns) for x, y in region.points)
            xs, ys = zip(*outline, strict=True)
            found.append(
                CadFinding(
                    prediction=prediction,
                    center=((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2),
                    outline=outline,
                    score=float(prediction.risk),
                    concept=risk_concept,
                    finding_type=finding_type(region.label),
                    origin=f"localisation region ({region.label or 'unlabelled'}), scored with the image's risk",
                )
            )
        return found
    if prediction.risk < point.threshold:
        return found
    heat = prediction.heatmap if heatmap_of is None else heatmap_of(prediction)
    if heat is None:
        return found
    for x, y, _ in heatmap_peaks(heat, rows, columns, limit=max_peaks):
        found.append(
            CadFinding(
                prediction=prediction,
                center=_inside(x, y, rows, columns),
                score=float(prediction.risk),
                concept=risk_concept,
                origin=f"{prediction.heatmap_method or 'heatmap'} peak, scored with the image's risk",
            )
        )
    return found


# -------------------------------------------------------------------------
# Content
# -------------------------------------------------------------------------

_Relationship = str | hd.sr.RelationshipTypeValues
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_HAS_PROPERTIES = hd.sr.RelationshipTypeValues.HAS_PROPERTIES
_HAS_CONCEPT_MOD = hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD
_HAS_ACQ_CONTEXT = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
_INFERRED_FROM = hd.sr.RelationshipTypeValues.INFERRED_FROM


def _with_children(item: pydicom.Dataset, children: Sequence[pydicom.Dataset]) -> pydicom.Dataset:
    """*item* as a plain dataset with *children*: by-reference items are datasets that highdicom's
    ContentSequence does not take."""
    plain = pydicom.Dataset(item)
    if children:
        plain.ContentSequence = DicomSequence(list(children))
    return plain


def _by_reference(relationship: str, identifier: Sequence[int]) -> pydicom.Dataset:
    """A by-reference relationship (PS3.3 C.17.3.2.5) to the content item at *identifier*."""
    item = pydicom.Dataset()
    item.RelationshipType = relationship
    item.ReferencedContentItemIdentifier = [int(i) for i in identifier]
    return item


def _code_item(
    name: Code, value: Code | hd.sr.CodedConcept, relationship: _Relationship
) -> hd.sr.CodeContentItem:
    return hd.sr.CodeContentItem(name=name, value=value, relationship_type=relationship)


def _num(name: Code, value: float, unit: Code, relationship: _Relationship) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=value, unit=unit, relationship_type=relationship)


def _text(name: Code, value: str, relationship: _Relationship) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=relationship)


def _library_entry(header: pydicom.Dataset) -> pydicom.Dataset:
    """TID 4020: the image and the descriptors a workstation hangs marks by."""
    entry = hd.sr.ImageContentItem(
        name=SOURCE,
        referenced_sop_class_uid=header.SOPClassUID,
        referenced_sop_instance_uid=header.SOPInstanceUID,
        relationship_type=_CONTAINS,
    )
    items: list[pydicom.Dataset] = []
    side = _SIDES.get(str(header.get("ImageLaterality", "") or header.get("Laterality", "") or ""))
    if side is not None:
        items.append(_code_item(IMAGE_LATERALITY, side, _HAS_ACQ_CONTEXT))
    views = header.get("ViewCodeSequence") or []
    if views and views[0].get("CodeValue") and views[0].get("CodingSchemeDesignator"):
        view = _coded(views[0])
        modifiers = [
            _code_item(IMAGE_VIEW_MODIFIER, _coded(m), _HAS_CONCEPT_MOD)
            for m in views[0].get("ViewModifierCodeSequence") or []
            if m.get("CodeValue") and m.get("CodingSchemeDesignator")
        ]
        items.append(_with_children(_code_item(IMAGE_VIEW, view, _HAS_ACQ_CONTEXT), modifiers))
    orientation = list(header.get("PatientOrientation") or [])
    if len(orientation) == 2 and all(orientation):
        items.append(_text(PATIENT_ORIENTATION_ROW, str(orientation[0]), _HAS_ACQ_CONTEXT))
        items.append(_text(PATIENT_ORIENTATION_COLUMN, str(orientation[1]), _HAS_ACQ_CONTEXT))
    for name, keyword, kind in (
        (STUDY_DATE, "StudyDate", "date"),
        (STUDY_TIME, "StudyTime", "time"),
        (CONTENT_DATE, "ContentDate", "date"),
        (CONTENT_TIME, "ContentTime", "time"),
    ):
        value = str(header.get(keyword, "") or "")
        if not value:
            continue
        try:
            if kind == "date":
                items.append(
                    hd.sr.DateContentItem(name=name, value=value, relationship_type=_HAS_ACQ_CONTEXT)
                )
            else:
                items.append(
                    hd.sr.TimeContentItem(name=name, value=value, relationship_type=_HAS_ACQ_CONTEXT)
                )
        except ValueError:
            continue  # a malformed source date is left out, not copied
    position = header.get("ImagePositionPatient")
    if position is not None and len(position) == 3:
        for name, coordinate in zip(IMAGE_POSITION, position, strict=True):
            items.append(_num(name, float(coordinate), MILLIMETRE, _HAS_ACQ_CONTEXT))
    items.append(_num(PIXEL_DATA_ROWS, int(header.Rows), PIXELS, _HAS_ACQ_CONTEXT))
    items.append(_num(PIXEL_DATA_COLUMNS, int(header.Columns), PIXELS, _HAS_ACQ_CONTEXT))
    return _with_children(entry, items)


def _coded(item: pydicom.Dataset) -> hd.sr.CodedConcept:
    meaning = str(item.get("CodeMeaning", "") or item.CodeValue)[:_LO]
    return hd.sr.CodedConcept(str(item.CodeValue), str(item.CodingSchemeDesignator), meaning)


def _parameters(
    identity: AlgorithmIdentity,
    model: ReportedModel,
    predictions: Sequence[Prediction],
    point: OperatingPoint | None,
    meaning: str,
    extra: Mapping[str, str] | None = None,
) -> list[str]:
    values: dict[str, object] = {
        "model_id": identity.model_id,
        "weights": identity.weights,
        "device_uid": identity.device_uid,
        "demo_weights": any(p.demo_weights for p in predictions),
        "score": meaning,
        **model.parameters,
    }
    digests = sorted({p.weights_sha256 for p in predictions if p.weights_sha256})
    if digests:
        values["weights_sha256"] = ",".join(digests)
    if point is not None:
        values["operating_point"] = point.name
        values["operating_threshold"] = f"{point.threshold:.6g}"
    values.update(extra or {})
    return [f"{key}={values[key]}" for key in sorted(values)]


def _algorithm(identity: AlgorithmIdentity, version: str, parameters: Sequence[str]) -> list[pydicom.Dataset]:
    """TID 4019 (HAS PROPERTIES form): name, version, and one Algorithm Parameters item each."""
    items: list[pydicom.Dataset] = [
        _text(ALGORITHM_NAME, identity.display_name or identity.model, _HAS_PROPERTIES),
        _text(ALGORITHM_VERSION, version or "unknown", _HAS_PROPERTIES),
    ]
    items += [_text(ALGORITHM_PARAMETERS, text, _HAS_PROPERTIES) for text in parameters]
    return items


@dataclass
class _Model:
    """What the tree needs of one model, worked out once."""

    run: AlgorithmRun
    identity: AlgorithmIdentity
    point: OperatingPoint
    lower: tuple[float, ...]
    parameters: list[str]
    findings: list[CadFinding] = field(default_factory=list)

    @property
    def maximum_operating_point(self) -> int:
        return len(self.lower) + 1

    def tree(self, extra: Mapping[str, str] | None = None) -> list[pydicom.Dataset]:
        results = self.run.results
        parameters = self.parameters
        if extra:
            parameters = sorted([*parameters, *(f"{k}={v}" for k, v in extra.items())])
        return _algorithm(self.identity, results.model.version or self.identity.version, parameters)


def _single_image_finding(
    model: _Model, finding: CadFinding, entry: Sequence[int]
) -> tuple[pydicom.Dataset, bool]:
    """TID 4006 for *finding*, and whether it must be presented."""
    required = finding.score >= model.point.threshold
    intent = _code_item(
        RENDERING_INTENT, PRESENTATION_REQUIRED if required else PRESENTATION_OPTIONAL, _HAS_CONCEPT_MOD
    )
    if not required:
        _with_children(
            intent,
            [
                _num(
                    CAD_OPERATING_POINT,
                    operating_point_bin(finding.score, model.lower),
                    OPERATING_POINT_RANGE,
                    _HAS_PROPERTIES,
                )
            ],
        )
    children: list[pydicom.Dataset] = [intent, *model.tree({"finding_source": finding.origin})]
    concept = finding.concept
    if finding.finding_type == SELECTED_REGION:
        concept = CERTAINTY_OF_FINDING  # TID 4006 row 7: no Probability of cancer on a selected region
    children.append(_num(concept, round(100.0 * finding.score, 4), PERCENT, _HAS_PROPERTIES))
    center = hd.sr.ScoordContentItem(
        name=CENTER,
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.asarray([finding.center], dtype=np.float32),
        relationship_type=_HAS_PROPERTIES,
    )
    children.append(_with_children(center, [_by_reference("SELECTED FROM", entry)]))
    if finding.outline:
        closed = [*finding.outline, finding.outline[0]]  # a closed POLYLINE repeats its first point
        outline = hd.sr.ScoordContentItem(
            name=OUTLINE,
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.asarray(closed, dtype=np.float32),
            relationship_type=_HAS_PROPERTIES,
        )
        children.append(_with_children(outline, [_by_reference("SELECTED FROM", entry)]))
    if finding.finding_type == SELECTED_REGION:
        description = f"{finding.origin}; the model does not say whether it is a mass or calcifications"
        children.append(_text(SELECTED_REGION_DESCRIPTION, description, _HAS_PROPERTIES))
    item = _code_item(SINGLE_IMAGE_FINDING, finding.finding_type, _CONTAINS)
    return _with_children(item, children), required


def _summary(
    name: Code,
    models: Sequence[_Model],
    performed: Code,
    success: Code,
    failure: Code,
    value_of: Mapping[str, Code],
    library: Mapping[str, Sequence[int]],
) -> pydicom.Dataset:
    """Summary of Detections / Analyses (TID 4015 / 4016 with TID 4017 / 4018 items)."""
    attempted = [m for m in models if m.run.attempted]
    statuses = [m.run.status for m in attempted]
    if not attempted:
        overall = NOT_ATTEMPTED
    elif all(s == SUCCEEDED for s in statuses):
        overall = SUCCEEDED
    elif all(s == FAILED for s in statuses):
        overall = FAILED
    else:
        overall = PARTIALLY_SUCCEEDED
    summary = _code_item(name, overall, _CONTAINS)
    groups: list[pydicom.Dataset] = []
    for container, wanted in (
        (success, (SUCCEEDED, PARTIALLY_SUCCEEDED)),
        (failure, (FAILED, PARTIALLY_SUCCEEDED)),
    ):
        performed_items = []
        for model in attempted:
            if model.run.status not in wanted:
                continue
            if container == success:
                images = sorted({p.image.sop_instance_uid for p in model.run.results.predictions})
            else:
                images = [uid for uid in model.run.failed_images if uid in library] or sorted(library)
            children = [
                *model.tree(),
                *(_by_reference("HAS PROPERTIES", library[uid]) for uid in images if uid in library),
            ]
            if performed == DETECTION_PERFORMED:
                children += [
                    _num(
                        MAXIMUM_CAD_OPERATING_POINT,
                        model.maximum_operating_point,
                        ARBITRARY_UNIT,
                        _HAS_PROPERTIES,
                    ),
                    _num(RECOMMENDED_CAD_OPERATING_POINT, 0, RECOMMENDED_RANGE, _HAS_PROPERTIES),
                ]
            value = value_of[model.run.results.model.model_id]
            performed_items.append(_with_children(_code_item(performed, value, _CONTAINS), children))
        if performed_items:
            groups.append(
                _with_children(
                    hd.sr.ContainerContentItem(name=container, relationship_type=_INFERRED_FROM),
                    performed_items,
                )
            )
    return _with_children(summary, groups)


def _processing_summary(models: Sequence[_Model], with_findings: bool) -> Code:
    attempted = [m for m in models if m.run.attempted]
    succeeded = [m for m in attempted if m.run.status == SUCCEEDED]
    if not any(m.run.status in (SUCCEEDED, PARTIALLY_SUCCEEDED) for m in attempted):
        return NONE_SUCCEEDED
    if attempted and len(succeeded) == len(attempted):
        return ALL_SUCCEEDED_WITH_FINDINGS if with_findings else ALL_SUCCEEDED_WITHOUT_FINDINGS
    return NOT_ALL_SUCCEEDED_WITH_FINDINGS if with_findings else NOT_ALL_SUCCEEDED_WITHOUT_FINDINGS


def _impression_text(models: Sequence[_Model], decision: TriageDecision | None) -> str:
    names = ", ".join(
        f"{m.identity.display_name} {m.run.results.model.version}" for m in models if m.run.attempted
    )
    text = f"{DISCLAIMER} CAD marks by {names or 'no model'}; not reviewed by a physician."
    if decision is not None:
        text += f" Triage {decision.explanation}."
    notices = sorted({m.identity.notice for m in models if m.run.attempted and m.identity.notice})
    return " ".join([text, *notices])


# -------------------------------------------------------------------------
# The document
# -------------------------------------------------------------------------


def build_cad_sr(
    evidence: Sequence[pydicom.Dataset],
    runs: Sequence[AlgorithmRun],
    *,
    decision: TriageDecision | None = None,
    high_point: str = "high_specificity",
    fallback_threshold: float = 0.7,
    max_points: int = 5,
    max_peaks: int = 3,
    manufacturer: str = labels.MANUFACTURER,
    model_name: str = "pacs-triage CAD",
    institution_name: str | None = None,
    software_version: str = "",
    source_digests: Mapping[str, str] | None = None,
    created: datetime.datetime | None = None,
) -> pydicom.Dataset:
    """Build the study's Mammography CAD SR over every model in *runs*.

    :param evidence: Headers of the study's MG For Presentation images (single-frame) the models were given.
    :param runs: Each model's results (predictions with their heatmaps where kept) and failures.
    :param decision: The study's triage decision, stated in the overall impression.
    :param high_point: ``triage.high_operating_point``: the operating point marks are presented at.
    :param fallback_threshold: ``triage.high_risk_threshold``, for a model without that point.
    :param max_points: At most this many localisation points per image and model (``outputs.max_points``).
    :param max_peaks: At most this many heatmap peaks per image and model (``outputs.cad_sr.max_peaks``).
    :param manufacturer: ``outputs.cad_sr.manufacturer`` (Manufacturer, 0008,0070).
    :param model_name: ``outputs.cad_sr.model_name`` (Manufacturer's Model Name, 0008,1090).
    :param source_digests: SOP Instance UID -> digest of that source's content; new bytes give new UIDs.
    :raises ValueError: on no MG image, images of several studies, or a prediction whose image is not in
        *evidence*.
    """
    headers = {
        str(ds.SOPInstanceUID): ds
        for ds in evidence
        if str(ds.get("Modality", "")) == "MG"
        and str(ds.SOPClassUID) != _MG_FOR_PROCESSING
        and str(ds.get("PresentationIntentType", "") or "").upper() != "FOR PROCESSING"
        and int(ds.get("NumberOfFrames", 1) or 1) == 1
    }
    if not headers:
        raise ValueError("a Mammography CAD SR needs at least one single-frame MG For Presentation image")
    studies = {str(ds.StudyInstanceUID) for ds in headers.values()}
    if len(studies) != 1:
        raise ValueError(f"the images belong to several studies: {sorted(studies)}")
    study_uid = studies.pop()

    models: list[_Model] = []
    used: dict[str, pydicom.Dataset] = {}
    for run in runs:
        results = run.results
        predictions = [p for p in results.predictions if p.image.sop_instance_uid in headers]
        if len(predictions) != len(results.predictions):
            raise ValueError(
                f"a prediction of {results.model.model_id} is on an image that is not in the evidence"
            )
        identity = (
            results.algorithm_identity
            if predictions or results.identity is not None
            else AlgorithmIdentity(
                model=results.model.name,
                model_id=results.model.model_id,
                version=results.model.version,
                display_name=results.model.display_name,
                weights="unknown",
            )
        )
        point = OperatingPoint(name=FALLBACK_HIGH, threshold=fallback_threshold)
        lower: tuple[float, ...] = ()
        if predictions:
            point, lower = rendering_point(
                predictions[0], high_point=high_point, fallback_threshold=fallback_threshold
            )
        model = _Model(
            run=run,
            identity=identity,
            point=point,
            lower=lower,
            parameters=_parameters(identity, results.model, predictions, point, results.meaning.description),
        )
        for prediction in predictions:
            used[prediction.image.sop_instance_uid] = headers[prediction.image.sop_instance_uid]
            model.findings += findings_of(
                results,
                headers[prediction.image.sop_instance_uid],
                prediction,
                point,
                max_points=max_points,
                max_peaks=max_peaks,
                heatmap_of=run.heatmap_of,
            )
        for uid in run.failed_images:
            if uid in headers:
                used[uid] = headers[uid]
        models.append(model)
    if not used:
        used = dict(headers)  # every model failed before naming an image: the images it was given
    library_images = [used[uid] for uid in sorted(used, key=lambda u: _image_order(used[u]))]
    # Root items: 1 language, 2 Image Library, 3 findings summary, 4 detections, 5 analyses.
    library = {str(ds.SOPInstanceUID): (1, 2, number) for number, ds in enumerate(library_images, start=1)}

    impressions: list[pydicom.Dataset] = []
    for model in models:
        for finding in model.findings:
            sif, required = _single_image_finding(
                model, finding, library[finding.prediction.image.sop_instance_uid]
            )
            intent = PRESENTATION_REQUIRED if required else PRESENTATION_OPTIONAL
            container = hd.sr.ContainerContentItem(
                name=INDIVIDUAL_IMPRESSION, relationship_type=_INFERRED_FROM
            )
            impressions.append(
                _with_children(container, [_code_item(RENDERING_INTENT, intent, _HAS_CONCEPT_MOD), sif])
            )
    body = [
        _text(IMPRESSION_DESCRIPTION, _impression_text(models, decision), _HAS_PROPERTIES),
        *(item for m in models if m.run.attempted for item in m.tree()),
    ]
    summary = _with_children(
        _code_item(CAD_PROCESSING_SUMMARY, _processing_summary(models, bool(impressions)), _CONTAINS),
        [*body, *impressions],
    )
    detections = _summary(
        SUMMARY_OF_DETECTIONS,
        models,
        DETECTION_PERFORMED,
        SUCCESSFUL_DETECTIONS,
        FAILED_DETECTIONS,
        {m.run.results.model.model_id: _detected_type(m) for m in models},
        library,
    )
    analyses = _summary(
        SUMMARY_OF_ANALYSES,
        models,
        ANALYSIS_PERFORMED,
        SUCCESSFUL_ANALYSES,
        FAILED_ANALYSES,
        {m.run.results.model.model_id: OVERALL_IMPRESSION_ANALYSIS for m in models},
        library,
    )
    root_items = [
        *hd.sr.LanguageOfContentItemAndDescendants(language=_ENGLISH),
        _with_children(
            hd.sr.ContainerContentItem(name=IMAGE_LIBRARY, relationship_type=_CONTAINS),
            [_library_entry(ds) for ds in library_images],
        ),
        summary,
        detections,
        analyses,
    ]

    digests = [
        f"{uid}={source_digests[uid]}" for uid in sorted(used) if source_digests and uid in source_digests
    ]
    models_key = ",".join(
        sorted(
            f"{m.run.results.model.model_id}@{m.run.results.model.version}:{m.run.status.value}"
            for m in models
        )
    )
    settings_key = (
        f"{high_point}:{fallback_threshold:.6g}:{max_points}:{max_peaks}:{manufacturer}:{model_name}"
    )
    sop_uid = uids.sr_instance_uid(study_uid, list(used), "cad-sr", f"1:{models_key}:{settings_key}", digests)
    source = next(iter(library_images))
    created = created or datetime.datetime.now()
    identities = [m.identity for m in models]  # a failed model too: the document stays recognisably ours
    return _document(
        source,
        root_items,
        library_images,
        sop_uid=sop_uid,
        series_uid=uids.sr_series_uid(study_uid, "cad-sr", "1"),
        manufacturer=manufacturer,
        model_name=model_name,
        institution_name=institution_name,
        software_version=software_version or labels.software_version(),
        created=created,
        identities=identities,
    )


def _image_order(header: pydicom.Dataset) -> tuple[str, str, int, str]:
    return (
        str(header.get("ImageLaterality", "") or ""),
        str(header.get("ViewPosition", "") or ""),
        int(header.get("InstanceNumber", 0) or 0),
        str(header.SOPInstanceUID),
    )


def _detected_type(model: _Model) -> Code:
    """What a model's detection looks for: the one finding type it reported, else a selected region."""
    types = {(f.finding_type.value, f.finding_type.scheme_designator): f.finding_type for f in model.findings}
    return next(iter(types.values())) if len(types) == 1 else SELECTED_REGION


def _document(
    source: pydicom.Dataset,
    root_items: Sequence[pydicom.Dataset],
    images: Sequence[pydicom.Dataset],
    *,
    sop_uid: str,
    series_uid: str,
    manufacturer: str,
    model_name: str,
    institution_name: str | None,
    software_version: str,
    created: datetime.datetime,
    identities: Sequence[AlgorithmIdentity],
) -> pydicom.Dataset:
    """The Mammography CAD SR IOD (PS3.3 A.35.5): Patient, General Study, SR Document Series, General
    Equipment, SR Document General, SR Document Content and SOP Common, from the source's header."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MAMMOGRAPHY_CAD_SR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    ds.SOPClassUID = MAMMOGRAPHY_CAD_SR_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = created.strftime("%Y%m%d")
    ds.InstanceCreationTime = created.strftime("%H%M%S")
    # Patient and General Study: copied as the source has them (type 2 stays empty when the source's is).
    for keyword in (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
        "StudyDescription",
    ):
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
        elif keyword not in ("IssuerOfPatientID", "StudyDescription"):
            setattr(ds, keyword, "")
    ds.Modality = "SR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = labels.series_number("cad_sr")
    ds.SeriesDescription = labels.series_description("AI CAD marks")
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model_name
    ds.SoftwareVersions = software_version
    if institution_name:
        ds.InstitutionName = institution_name
    ds.InstanceNumber = 1
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PreliminaryFlag = "PRELIMINARY"
    ds.ContentDate = created.strftime("%Y%m%d")
    ds.ContentTime = created.strftime("%H%M%S")
    ds.PerformedProcedureCodeSequence = []
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(images)
    ds.ValueType = "CONTAINER"
    concept = pydicom.Dataset()
    concept.CodeValue = MAMMOGRAPHY_CAD_REPORT.value
    concept.CodingSchemeDesignator = MAMMOGRAPHY_CAD_REPORT.scheme_designator
    concept.CodeMeaning = MAMMOGRAPHY_CAD_REPORT.meaning
    ds.ConceptNameCodeSequence = [concept]
    ds.ContinuityOfContent = "SEPARATE"
    template = pydicom.Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "4000"
    ds.ContentTemplateSequence = [template]
    ds.ContentSequence = DicomSequence(list(root_items))
    # IHE AIR: one Contributing Equipment item per model, so our marks stay recognisable whatever
    # Manufacturer the site gives the document.
    labels.add_contributing_equipment(ds, *identities)
    return ds


def _evidence(images: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Current Requested Procedure Evidence: every referenced image, by study and series."""
    by_series: dict[tuple[str, str], list[pydicom.Dataset]] = {}
    for image in images:
        by_series.setdefault((str(image.StudyInstanceUID), str(image.SeriesInstanceUID)), []).append(image)
    studies: dict[str, pydicom.Dataset] = {}
    for (study_uid, series_uid), members in by_series.items():
        study = studies.get(study_uid)
        if study is None:
            study = studies[study_uid] = pydicom.Dataset()
            study.StudyInstanceUID = study_uid
            study.ReferencedSeriesSequence = []
        series = pydicom.Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = []
        for image in members:
            reference = pydicom.Dataset()
            reference.ReferencedSOPClassUID = image.SOPClassUID
            reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
            series.ReferencedSOPSequence.append(reference)
        study.ReferencedSeriesSequence.append(series)
    return list(studies.values())
