"""One TID 1500 Comprehensive SR per study, holding every model's results.

Content tree (rows of PS3.16 TID 1500 / 1501 / 1600 / 4019):

* Procedure Reported from CID 100 "Quantitative Diagnostic Imaging Procedures" (SCT 363679005
  "Imaging procedure": the group has no mammography or breast ultrasound code).
* Image Library (TID 1600): one entry per evaluated image with its laterality and view (the source's
  ViewCodeSequence), then one per heatmap Secondary Capture that belongs to the report.
* Imaging Measurements: per model and image one TID 1501 group: Finding = the predicted class, the
  model's risk under the concept its :class:`~plugins.types.ScoreMeaning` names (DCM 111047 only for
  a calibrated probability of malignancy), each class probability as a numeric measurement, the
  BI-RADS category where the model gives one, TID 4019 algorithm identification and the source image.
  Then at most ``max_points`` localisations per image (TID 1410 groups, the predicted branch only,
  highest score first; regions at least :data:`MIN_REGION_PIXELS` wide).
  Then one conclusion group per breast and one for the study: the highest finding and score, the
  highest BI-RADS category, the triage category, and the model (its TID 4019 identification) and
  operating-point threshold behind it.
* Qualitative Evaluations: the disclaimer, the demo-weights notice and the triage explanation.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag

from plugins.types import CERTAINTY_OF_FINDING as CERTAINTY_OF_FINDING_CONCEPT
from plugins.types import (
    UNCALIBRATED_SUSPICION,
    ImageRef,
    LocalisationPoint,
    LocalisationRegion,
    OperatingPoint,
    Prediction,
    ScoreMeaning,
)
from workers import identity as labels
from workers import uids
from workers.identity import AlgorithmIdentity
from workers.outputs import (
    ARTIFICIAL_INTELLIGENCE,
    DISCLAIMER,
    MANUFACTURER,
    NO_UNITS,
    PRIVATE_SCHEME,
    QUALITATIVE_EVALUATIONS,
    ReportedModel,
    birads_concept,
    class_concept,
    is_multiframe,
)
from workers.triage import ModelRisk, TriageDecision

#: Decides a triage category from each model's risk and operating points (:func:`workers.triage.decide` with
#: the site's settings).
Triage = Callable[[Sequence[ModelRisk]], TriageDecision]

__all__ = [
    "MIN_REGION_PIXELS",
    "STUDY_SR_SERIES_NUMBER",
    "ModelResults",
    "build_study_sr",
    "prediction_from_record",
    "prediction_record",
    "score_concept",
]

#: Series Number of the study SR (the heatmap and CAD SR series use their own numbers).
STUDY_SR_SERIES_NUMBER = labels.series_number("sr")
#: The smallest side, in source pixels, of a localisation region drawn in a viewer.
MIN_REGION_PIXELS = 32

# CID 100 has no mammography or breast ultrasound procedure; "Imaging procedure" is its generic member.
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
PROBABILITY_OF_CANCER = codes.DCM.ProbabilityOfCancer
CERTAINTY_OF_FINDING = Code(*CERTAINTY_OF_FINDING_CONCEPT)
#: A score that is not a calibrated probability of malignancy, when its meaning names none.
SUSPICION_SCORE = Code(*UNCALIBRATED_SUSPICION.concept)
ASSESSMENT_CATEGORY = codes.DCM.AssessmentCategory
THRESHOLD_VALUE = Code("122411", "DCM", "Threshold Value")
PRIORITY = Code("260870009", "SCT", "Priority")
BREAST = Code("76752008", "SCT", "Breast")
LESION = Code("52988006", "SCT", "Lesion")
COMMENT = Code("121106", "DCM", "Comment")
ILLUSTRATION_OF_ROI = Code("121200", "DCM", "Illustration of ROI")
IMAGE_LATERALITY = codes.DCM.ImageLaterality
IMAGE_VIEW = codes.DCM.ImageView
#: SNOMED CT qualifier values of the triage categories of :data:`workers.triage.CATEGORIES`.
TRIAGE_CONCEPTS: dict[str, Code] = {
    "high": Code("75540009", "SCT", "High"),
    "intermediate": Code("11896004", "SCT", "Intermediate"),
    "routine": Code("50811001", "SCT", "Routine"),
}
_LATERALITY_CONCEPTS: dict[str, Code] = {
    "L": Code("7771000", "SCT", "Left"),
    "R": Code("24028007", "SCT", "Right"),
    "B": Code("51440002", "SCT", "Right and left"),
}


def score_concept(meaning: ScoreMeaning | None) -> Code:
    """The concept a model's risk is reported under: DCM 111047 only for a calibrated probability of
    malignancy, else the concept the plugin's :class:`ScoreMeaning` names (the uncalibrated suspicion
    score's when it names none)."""
    if meaning is None:
        meaning = UNCALIBRATED_SUSPICION
    value, scheme, text = meaning.concept
    if meaning.kind == "probability_of_malignancy":
        return PROBABILITY_OF_CANCER
    concept = Code(value, scheme, text[:64])
    if (concept.value, concept.scheme_designator) == (PROBABILITY_OF_CANCER.value, "DCM"):
        return SUSPICION_SCORE  # a suspicion score never passes for a probability of cancer
    return concept


@dataclass(frozen=True, kw_only=True)
class ModelResults:
    """One model's part of the study report."""

    model: ReportedModel
    predictions: Sequence[Prediction]
    #: What the model's risk means; ``None``: what its predictions say.
    score: ScoreMeaning | None = None
    #: Headers of the heatmap Secondary Captures of this model that the report references.
    heatmaps: Sequence[pydicom.Dataset] = field(default_factory=tuple)
    #: The AIR identity (network name, weights, Device UID); ``None``: as far as the predictions tell it.
    identity: AlgorithmIdentity | None = None

    @property
    def meaning(self) -> ScoreMeaning:
        if self.score is not None:
            return self.score
        return self.predictions[0].score if self.predictions else UNCALIBRATED_SUSPICION

    @property
    def algorithm_identity(self) -> AlgorithmIdentity:
        if self.identity is not None:
            return self.identity
        return AlgorithmIdentity.from_prediction(self.predictions[0], self.model.display_name)


# -------------------------------------------------------------------------
# Predictions kept between the pipeline's stages
# -------------------------------------------------------------------------


def prediction_record(prediction: Prediction) -> dict[str, Any]:
    """Everything the study report needs of *prediction*, JSON-safe (no maps)."""
    image = prediction.image
    return {
        "model_id": prediction.model_id,
        "model_name": prediction.model_name,
        "model_version": prediction.model_version,
        "image": {
            "sop_instance_uid": image.sop_instance_uid,
            "study_instance_uid": image.study_instance_uid,
            "series_instance_uid": image.series_instance_uid,
            "sop_class_uid": image.sop_class_uid,
            "modality": image.modality,
            "laterality": image.laterality,
            "view": image.view,
            "number_of_frames": image.number_of_frames,
            "frame_index": image.frame_index,
        },
        "classes": list(prediction.classes),
        "probabilities": [float(p) for p in prediction.probabilities],
        "predicted_class": prediction.predicted_class,
        "risk": float(prediction.risk),
        "birads": prediction.birads,
        "heatmap_method": prediction.heatmap_method,
        "points": [{"x": p.x, "y": p.y, "score": p.score, "label": p.label} for p in prediction.points],
        "regions": [
            {"points": [list(xy) for xy in r.points], "score": r.score, "label": r.label}
            for r in prediction.regions
        ],
        "demo_weights": prediction.demo_weights,
        "score": prediction.score.to_json_dict(),
        "operating_points": [dataclasses.asdict(point) for point in prediction.operating_points],
        "weights_sha256": prediction.weights_sha256,
        "parameters": _json_parameters(prediction.parameters),
    }


def prediction_from_record(record: Mapping[str, Any]) -> Prediction:
    """The :class:`Prediction` of a :func:`prediction_record` (without its maps)."""
    image = record["image"]
    return Prediction(
        model_id=record["model_id"],
        model_name=record["model_name"],
        model_version=record["model_version"],
        image=ImageRef(path=Path("/nonexistent"), **image),
        classes=tuple(record["classes"]),
        probabilities=tuple(record["probabilities"]),
        predicted_class=record["predicted_class"],
        risk=record["risk"],
        birads=record["birads"],
        heatmap_method=record["heatmap_method"],
        points=tuple(LocalisationPoint(**p) for p in record["points"]),
        regions=tuple(
            LocalisationRegion(
                points=tuple((float(x), float(y)) for x, y in r["points"]), score=r["score"], label=r["label"]
            )
            for r in record["regions"]
        ),
        demo_weights=record["demo_weights"],
        score=ScoreMeaning.from_json_dict(record.get("score")) or UNCALIBRATED_SUSPICION,
        operating_points=tuple(OperatingPoint(**point) for point in record.get("operating_points", ())),
        weights_sha256=record["weights_sha256"],
        parameters=dict(record["parameters"]),
    )


def _json_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as JSON keeps them; anything else as the text the report shows (``key=value``)."""
    return {
        k: v if isinstance(v, (str, int, float, bool)) or v is None else str(v) for k, v in parameters.items()
    }


def save_records(
    path: Path,
    predictions: Sequence[Prediction],
    model: ReportedModel,
    score: ScoreMeaning | None,
    identity: AlgorithmIdentity | None = None,
) -> None:
    """Write one model's *predictions*, identification and score meaning as JSON to *path* (atomically)."""
    document = {
        "model": {
            "model_id": model.model_id,
            "name": model.name,
            "version": model.version,
            "display_name": model.display_name,
            "parameters": _json_parameters(model.parameters),
        },
        "score": None if score is None else score.to_json_dict(),
        "identity": None if identity is None else dataclasses.asdict(identity),
        "predictions": [prediction_record(p) for p in predictions],
    }
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(document))
    temp.replace(path)


def load_records(
    path: Path,
) -> tuple[ReportedModel, ScoreMeaning | None, AlgorithmIdentity | None, list[Prediction]]:
    """What :func:`save_records` wrote: (model, score meaning, identity, predictions)."""
    document = json.loads(path.read_text())
    identity = document.get("identity")
    return (
        ReportedModel(**document["model"]),
        ScoreMeaning.from_json_dict(document["score"]),
        None if identity is None else AlgorithmIdentity(**identity),
        [prediction_from_record(r) for r in document["predictions"]],
    )


# -------------------------------------------------------------------------
# Content
# -------------------------------------------------------------------------


def _laterality(dataset: pydicom.Dataset) -> str:
    return str(dataset.get("ImageLaterality", "") or dataset.get("Laterality", "") or "")


def _image_label(dataset: pydicom.Dataset) -> str:
    label = f"{_laterality(dataset)} {dataset.get('ViewPosition', '') or ''}".strip()
    return label or f"image {dataset.get('InstanceNumber', '')}".strip()


def _frames(dataset: pydicom.Dataset, prediction: Prediction) -> list[int] | None:
    if is_multiframe(dataset):  # by IOD: a single-frame object with a Number of Frames is one frame
        return [prediction.image.frame_index + 1]
    return None


def _library_descriptors(dataset: pydicom.Dataset) -> list[hd.sr.ContentItem]:
    """TID 1602 laterality and view of a source: its own codes, never guessed."""
    items: list[hd.sr.ContentItem] = []
    laterality = _LATERALITY_CONCEPTS.get(_laterality(dataset))
    if laterality is not None:
        items.append(
            hd.sr.CodeContentItem(
                name=IMAGE_LATERALITY,
                value=laterality,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
            )
        )
    views = dataset.get("ViewCodeSequence") or []
    if views and views[0].get("CodeValue") and views[0].get("CodingSchemeDesignator"):
        view = views[0]
        items.append(
            hd.sr.CodeContentItem(
                name=IMAGE_VIEW,
                value=hd.sr.CodedConcept(
                    str(view.CodeValue),
                    str(view.CodingSchemeDesignator),
                    str(view.get("CodeMeaning", "") or view.CodeValue)[:64],
                ),
                relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
            )
        )
    return items


def _image_library(images: Sequence[pydicom.Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 with one group per modality; entries carry TID 1602 descriptors and laterality/view."""
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    groups: dict[str, list[hd.sr.ImageContentItem]] = {}
    for dataset in images:
        entry = hd.sr.ImageContentItem(
            name=Code("260753009", "SCT", "Source"),
            referenced_sop_class_uid=dataset.SOPClassUID,
            referenced_sop_instance_uid=dataset.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        descriptors = hd.sr.ImageLibraryEntryDescriptors(
            dataset, additional_descriptors=_library_descriptors(dataset)
        )
        entry.ContentSequence = hd.sr.ContentSequence(cast(list[hd.sr.ContentItem], list(descriptors)))
        groups.setdefault(str(dataset.Modality), []).append(entry)
    library.ContentSequence = hd.sr.ContentSequence()
    for entries in groups.values():
        group = hd.sr.ContainerContentItem(
            name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        group.ContentSequence = hd.sr.ContentSequence(entries)
        library.ContentSequence.append(group)
    return library


def _algorithm(
    identity: AlgorithmIdentity,
    model: ReportedModel,
    predictions: Sequence[Prediction],
    demo: bool,
    manufacturer: str,
    extra: Mapping[str, Any] | None = None,
) -> hd.sr.AlgorithmIdentification:
    provenance: dict[str, Any] = {
        "model_id": identity.model_id,
        "demo_weights": demo,
        "weights": identity.weights,
        "device_uid": identity.device_uid,
    }
    weights = sorted({p.weights_sha256 for p in predictions if p.weights_sha256})
    if weights:
        provenance["weights_sha256"] = ",".join(weights)
    parameters = {**provenance, **model.parameters, **(extra or {})}
    return hd.sr.AlgorithmIdentification(
        name=identity.display_name[:64],
        version=identity.version[:64],
        parameters=[f"{key}={parameters[key]}" for key in sorted(parameters)],
        # No TID 4019 "Algorithm Manufacturer": PixelMed's TID 4019 predates that row; the Contributing
        # Equipment Sequence names the manufacturer.
        family=ARTIFICIAL_INTELLIGENCE,
    )


def _chosen_points(prediction: Prediction, max_points: int) -> list[LocalisationPoint]:
    """At most *max_points* points of the predicted branch, highest score first.

    A point whose label names the other class (LEM's minima on an image called malignant) belongs
    to the branch the model did not predict and is left out.
    """
    predicted = prediction.predicted_class.lower()
    others = [c.lower() for c in prediction.classes if c.lower() != predicted]
    chosen = [
        p
        for p in prediction.points
        if not any(other in p.label.lower() for other in others) or predicted in p.label.lower()
    ]
    return sorted(chosen, key=lambda p: p.score, reverse=True)[: max(0, max_points)]


def _visible_polygon(
    points: Sequence[tuple[float, float]], rows: int, columns: int
) -> list[tuple[float, float]]:
    """The region's polygon, or when it is narrower than :data:`MIN_REGION_PIXELS` a box of that size
    around it, kept inside the image."""
    data = np.asarray(points, dtype=np.float64)
    x0, y0 = data.min(axis=0)
    x1, y1 = data.max(axis=0)
    side = min(MIN_REGION_PIXELS, columns, rows)
    if x1 - x0 >= side and y1 - y0 >= side:
        return [(float(x), float(y)) for x, y in data]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    width, height = max(x1 - x0, side), max(y1 - y0, side)
    left = float(np.clip(cx - width / 2, 0, columns - width))
    top = float(np.clip(cy - height / 2, 0, rows - height))
    return [(left, top), (left + width, top), (left + width, top + height), (left, top + height)]


def _model_risks(entries: Sequence[tuple[ModelResults, Prediction]]) -> list[ModelRisk]:
    """Each model's highest risk among *entries*, with its operating points."""
    risks: dict[str, ModelRisk] = {}
    for _, prediction in entries:
        known = risks.get(prediction.model_name)
        if known is None or prediction.risk > known.risk:
            risks[prediction.model_name] = ModelRisk(
                model=prediction.model_name,
                risk=prediction.risk,
                operating_points=prediction.operating_points,
            )
    return list(risks.values())


def _heatmap_key(sc: pydicom.Dataset) -> tuple[str, int]:
    """(source SOP Instance UID, frame number) of the image a heatmap SC shows."""
    reference = sc.SourceImageSequence[0]
    return str(reference.ReferencedSOPInstanceUID), int(reference.get("ReferencedFrameNumber", 1) or 1)


def _finding_of_label(label: str) -> Code:
    return LESION


def _inside(data: np.ndarray, dataset: pydicom.Dataset, what: str) -> np.ndarray:
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    ok = (
        np.all(np.isfinite(data))
        and np.all(data[:, 0] >= 0)
        and np.all(data[:, 0] <= columns)
        and np.all(data[:, 1] >= 0)
        and np.all(data[:, 1] <= rows)
    )
    if not ok:
        raise ValueError(
            f"{what} has coordinates outside the {columns}x{rows} image {dataset.SOPInstanceUID}"
        )
    return data.astype(np.float32)


class _Groups:
    """Builds the measurement groups; tracking UIDs are unique within the report."""

    def __init__(self, sop_uid: str) -> None:
        self.sop_uid = sop_uid
        self.items: list[Any] = []

    def tracking(self, key: str, text: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=uids.tracking_uid(self.sop_uid, key), identifier=text[:64])

    def image(
        self,
        results: ModelResults,
        prediction: Prediction,
        dataset: pydicom.Dataset,
        algorithm: hd.sr.AlgorithmIdentification,
        max_points: int,
        heatmap: pydicom.Dataset | None,
    ) -> None:
        frames = _frames(dataset, prediction)
        key = f"{results.model.model_id}:{dataset.SOPInstanceUID}:{prediction.image.frame_index}"
        label = f"{results.model.name} {_image_label(dataset)}"
        measurements = [
            hd.sr.Measurement(
                name=score_concept(results.meaning), value=float(prediction.risk), unit=NO_UNITS
            )
        ]
        measurements += [
            hd.sr.Measurement(
                name=class_concept(name), value=float(np.clip(probability, 0, 1)), unit=NO_UNITS
            )
            for name, probability in zip(prediction.classes, prediction.probabilities, strict=True)
        ]
        evaluations = None
        if prediction.birads is not None:
            evaluations = [
                hd.sr.QualitativeEvaluation(ASSESSMENT_CATEGORY, birads_concept(prediction.birads))
            ]
        self.items.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=self.tracking(key, label),
                finding_type=class_concept(prediction.predicted_class),
                algorithm_id=algorithm,
                measurements=measurements,
                qualitative_evaluations=evaluations,
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(dataset, frames)],
            )
        )
        if heatmap is not None:
            group = self.items[-1][0]
            group.ContentSequence.append(
                hd.sr.ImageContentItem(
                    name=ILLUSTRATION_OF_ROI,
                    referenced_sop_class_uid=heatmap.SOPClassUID,
                    referenced_sop_instance_uid=heatmap.SOPInstanceUID,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        localisations: list[LocalisationPoint | LocalisationRegion] = [
            *_chosen_points(prediction, max_points),
            *prediction.regions,
        ]
        for number, item in enumerate(localisations, start=1):
            if isinstance(item, LocalisationPoint):
                graphic_type = hd.sr.GraphicTypeValues.POINT
                data = _inside(np.asarray([(item.x, item.y)], dtype=np.float64), dataset, f"point {number}")
            else:
                if len(item.points) < 3:
                    raise ValueError(f"region {number} has {len(item.points)} points; a polygon needs 3")
                polygon = _visible_polygon(item.points, rows, columns)
                polygon.append(polygon[0])  # DICOM closes a POLYLINE by repeating its first point
                graphic_type = hd.sr.GraphicTypeValues.POLYLINE
                data = _inside(np.asarray(polygon, dtype=np.float64), dataset, f"region {number}")
            measured = None
            if 0.0 <= item.score <= 1.0:
                # A localisation's score is the model's certainty in that spot, never a calibrated risk.
                measured = [
                    hd.sr.Measurement(name=CERTAINTY_OF_FINDING, value=float(item.score), unit=NO_UNITS)
                ]
            self.items.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=self.tracking(
                        f"{key}:roi:{number}", f"{label} localisation {number}"
                    ),
                    referenced_region=hd.sr.ImageRegion(
                        graphic_type=graphic_type,
                        graphic_data=data,
                        source_image=hd.sr.SourceImageForRegion.from_source_image(dataset, frames),
                    ),
                    finding_type=_finding_of_label(item.label),
                    algorithm_id=algorithm,
                    measurements=measured,
                )
            )

    def conclusion(
        self,
        key: str,
        text: str,
        entries: Sequence[tuple[ModelResults, Prediction]],
        algorithms: Mapping[str, hd.sr.AlgorithmIdentification],
        decision: TriageDecision | None,
        laterality: str | None,
    ) -> None:
        """The highest finding of *entries* with its score, the highest BI-RADS category and the triage
        category; identified by the model that set the triage category when it is among them, else by the
        model of the highest score."""
        deciding = [e for e in entries if decision is not None and e[1].model_name == decision.model]
        top = max(deciding or entries, key=lambda e: e[1].risk)
        results, prediction = top
        measurements = [
            hd.sr.Measurement(
                name=score_concept(results.meaning), value=float(prediction.risk), unit=NO_UNITS
            )
        ]
        if decision is not None and decision.operating_point is not None and deciding:
            measurements.append(
                hd.sr.Measurement(
                    name=THRESHOLD_VALUE, value=float(decision.operating_point.threshold), unit=NO_UNITS
                )
            )
        evaluations = []
        birads = [p.birads for _, p in entries if p.birads is not None]
        if birads:
            evaluations.append(hd.sr.QualitativeEvaluation(ASSESSMENT_CATEGORY, birads_concept(max(birads))))
        if decision is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(PRIORITY, TRIAGE_CONCEPTS[decision.category]))
        sites = None
        if laterality in _LATERALITY_CONCEPTS:
            sites = [hd.sr.FindingSite(anatomic_location=BREAST, laterality=_LATERALITY_CONCEPTS[laterality])]
        self.items.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=self.tracking(key, text),
                finding_type=class_concept(prediction.predicted_class),
                finding_sites=sites,
                algorithm_id=algorithms[results.model.model_id],
                measurements=measurements,
                qualitative_evaluations=evaluations or None,
            )
        )


_CONTENT_SEQUENCE = Tag(0x0040, 0xA730)
_REFERENCE_VALUE_TYPES = frozenset({"IMAGE", "COMPOSITE"})


class _ReportDocument(hd.sr.ComprehensiveSR):
    """A Comprehensive SR built by handing highdicom the report's root without its children, then attaching them.

    ``hd.sr.ComprehensiveSR.__init__`` deep-copies the whole content tree, parses the copy back into
    highdicom objects and walks it three times, building a ``ContentItem`` per node (evidence references,
    SCOORD3D): about 1.5 s for a four-model study report of about 1000 items, five times the time it took to
    build the tree.  Our tree is built by highdicom's own template classes already, so that second pass
    checks nothing new; the one check it makes that we need, every referenced instance being among the
    evidence, is made here by one walk of the tree.  The data set written is the one
    ``hd.sr.ComprehensiveSR`` writes (same elements, same order).  No upstream issue found for the
    constructor's cost (highdicom 0.28).

    :param content: The TID 1500 report (one root item), as for ``hd.sr.ComprehensiveSR``.
    """

    def __init__(
        self, evidence: Sequence[pydicom.Dataset], content: hd.sr.MeasurementReport, **kwargs: Any
    ) -> None:
        root = content[0]
        skeleton = pydicom.Dataset()
        skeleton.update({tag: element for tag, element in root.items() if tag != _CONTENT_SEQUENCE})
        skeleton.ContentSequence = []
        super().__init__(evidence=evidence, content=skeleton, **kwargs)
        known = {str(ds.SOPInstanceUID) for ds in evidence}
        missing = sorted(_referenced_instances(root.ContentSequence) - known)
        if missing:
            raise ValueError(f"the report references instances that are not among its evidence: {missing}")
        self.ContentSequence = root.ContentSequence
        self._report = content

    @property
    def content(self) -> hd.sr.ContentSequence:
        """The report's content tree (the TID 1500 root item and its children)."""
        return cast(hd.sr.ContentSequence, self._report)


def _referenced_instances(items: Sequence[pydicom.Dataset]) -> set[str]:
    """SOP Instance UIDs of every IMAGE and COMPOSITE item in *items* and below."""
    found: set[str] = set()
    for item in items:
        if item.get("ValueType") in _REFERENCE_VALUE_TYPES:
            found.add(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        if _CONTENT_SEQUENCE in item:
            found |= _referenced_instances(item.ContentSequence)
    return found


def build_study_sr(
    evidence: Sequence[pydicom.Dataset],
    results: Sequence[ModelResults],
    *,
    decision: TriageDecision | None = None,
    triage: Triage | None = None,
    max_points: int = 5,
    series_number: int | None = None,
    instance_number: int = 1,
    manufacturer: str = MANUFACTURER,
    software_version: str = "",
    institution_name: str | None = None,
    created: datetime.datetime | None = None,
    source_digests: Mapping[str, str] | None = None,
    series_key: tuple[str, str] = ("study-report", "1"),
    model_series: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the study's TID 1500 Measurement Report over every model in *results*.

    :param evidence: Headers of the evaluated instances (patient and study attributes).
    :param results: Each model's predictions, score meaning and heatmap SCs.
    :param decision: The study's triage decision; its category and the model and operating point behind
        it are stated in the study conclusion.
    :param triage: Decides each breast's triage category from its images' risks (the study's policy); without
        it the breast conclusions state no triage category.
    :param max_points: At most this many localisation points per image and model.
    :param series_number: By default the study SR's (:func:`workers.identity.series_number`), or with
        *per_model* the model's own.
    :param series_key: (id, version) the series UID is derived from; a per-model report passes its model's.
    :param model_series: Plugin name of the model whose own report this is (``outputs.report: per-model``).
    :param source_digests: SOP Instance UID -> digest of that source's content; the report's UID
        changes with its sources' content.
    :raises ValueError: on no predictions, mixed studies, a prediction whose image is not in *evidence*,
        or a prediction of another model than its :class:`ModelResults` names.
    """
    if not any(r.predictions for r in results):
        raise ValueError("a study report needs at least one prediction")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence}
    used: dict[str, pydicom.Dataset] = {}
    for result in results:
        for prediction in result.predictions:
            if (prediction.model_id, prediction.model_version) != (
                result.model.model_id,
                result.model.version,
            ):
                raise ValueError(
                    f"prediction of {prediction.model_id} {prediction.model_version} does not belong "
                    f"to {result.model.model_id} {result.model.version}"
                )
            uid = prediction.image.sop_instance_uid
            if uid not in by_uid:
                raise ValueError(f"image {uid} of a prediction is not among the evidence")
            used[uid] = by_uid[uid]
    evaluated = list(used.values())
    study_uids = {str(ds.StudyInstanceUID) for ds in evaluated}
    if len(study_uids) != 1:
        raise ValueError(f"the evaluated images belong to several studies: {sorted(study_uids)}")
    study_uid = study_uids.pop()
    heatmaps = [sc for r in results for sc in r.heatmaps if str(sc.StudyInstanceUID) == study_uid]

    digests = [f"{uid}={source_digests[uid]}" for uid in used if source_digests and uid in source_digests]
    models_key = ",".join(sorted(f"{r.model.model_id}@{r.model.version}" for r in results if r.predictions))
    sop_uid = uids.sr_instance_uid(
        study_uid,
        [*used, *(str(sc.SOPInstanceUID) for sc in heatmaps)],
        series_key[0],
        f"{series_key[1]}:{models_key}",
        digests,
    )
    demo = any(p.demo_weights for r in results for p in r.predictions)

    groups = _Groups(sop_uid)
    algorithms: dict[str, hd.sr.AlgorithmIdentification] = {}
    entries: list[tuple[ModelResults, Prediction]] = []
    for result in results:
        if not result.predictions:
            continue
        extra: dict[str, Any] = {}
        if (
            decision is not None
            and decision.model == result.model.name
            and decision.operating_point is not None
        ):
            extra = {
                "operating_point": decision.operating_point.name,
                "operating_threshold": f"{decision.operating_point.threshold:.6g}",
            }
        extra["score"] = result.meaning.description
        algorithm = _algorithm(
            result.algorithm_identity,
            result.model,
            result.predictions,
            any(p.demo_weights for p in result.predictions),
            manufacturer,
            extra,
        )
        algorithms[result.model.model_id] = algorithm
        illustrations = {_heatmap_key(sc): sc for sc in result.heatmaps}
        for prediction in result.predictions:
            image = prediction.image
            groups.image(
                result,
                prediction,
                used[image.sop_instance_uid],
                algorithm,
                max_points,
                illustrations.get((image.sop_instance_uid, image.frame_index + 1)),
            )
            entries.append((result, prediction))
    for side in ("R", "L"):
        on_side = [e for e in entries if _laterality(used[e[1].image.sop_instance_uid]) == side]
        if on_side:
            name = "right" if side == "R" else "left"
            breast = None if triage is None else triage(_model_risks(on_side))
            groups.conclusion(
                f"breast:{side}", f"Conclusion {name} breast", on_side, algorithms, breast, side
            )
    groups.conclusion("study", "Conclusion study", entries, algorithms, decision, None)

    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device_uid(*series_key),
            name="pacs-triage",
            manufacturer_name=manufacturer,
            model_name="pacs-triage AI gateway",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=[IMAGING_PROCEDURE],
        imaging_measurements=groups.items,
    )
    root = report[0]
    content = list(root.ContentSequence)
    # TID 1500 row 5 (Image Library) comes before row 6 (Imaging Measurements).
    at = next(i for i, item in enumerate(content) if item.ConceptNameCodeSequence[0].CodeValue == "126010")
    content.insert(at, _image_library(evaluated))
    statements = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    statements.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
            for text in _statements(results, demo, decision)
        ]
    )
    content.append(statements)
    root.ContentSequence = hd.sr.ContentSequence(content, is_root=False)

    coding_schemes = None
    names = {c for r in results for p in r.predictions for c in p.classes}
    if any(class_concept(name).scheme_designator == PRIVATE_SCHEME for name in names):
        coding_schemes = [
            CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="pacs-triage model classes",
                responsible_organization=manufacturer,
            )
        ]
    created = created or datetime.datetime.now()
    identities = [r.algorithm_identity for r in results if r.predictions]
    description = labels.series_description(
        "AI report", identities[0].short_name if model_series else f"{len(identities)} model(s)"
    )
    if series_number is None:
        series_number = labels.series_number("sr", model_series)
    sr = _ReportDocument(
        evidence=[*evaluated, *heatmaps],
        content=report,
        series_instance_uid=uids.sr_series_uid(study_uid, *series_key),
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        series_description=description,
        manufacturer_model_name="pacs-triage AI gateway",
        software_versions=software_version or labels.software_version(),
        content_date=created.date(),
        content_time=created.time().replace(microsecond=0),
        coding_schemes=coding_schemes,
    )
    # IHE AIR: one Contributing Equipment item per model, its Device UID from the checkpoint's digest.
    labels.add_contributing_equipment(sr, *identities)
    return sr


def _statements(results: Sequence[ModelResults], demo: bool, decision: TriageDecision | None) -> list[str]:
    models = ", ".join(
        f"{r.model.display_name} {r.model.version} ({r.model.model_id})" for r in results if r.predictions
    )
    texts = [f"{DISCLAIMER} Produced by {models}; not reviewed by a physician."]
    for result in results:
        if result.predictions:
            texts.append(f"{result.model.display_name}: the score is {result.meaning.description}.")
    if decision is not None:
        texts.append(f"Triage {decision.explanation}. Policy: {decision.policy}")
    for result in results:
        if result.predictions and (notice := result.algorithm_identity.notice):
            texts.append(f"{result.algorithm_identity.short_name}: {notice}")
    return texts
