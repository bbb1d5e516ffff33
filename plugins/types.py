"""Typed contracts between the plugin host, the model plugins and the workers.

These are plain dataclasses with numpy payloads (no torch), so the workers' output builders and
tests can use them without loading a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import PacsTriageError
from gateway.errors import failure_reason as gateway_failure_reason


@dataclass(frozen=True, kw_only=True)
class AcceptRule:
    """Which images a model accepts.  Empty tuples mean "any"."""

    modalities: tuple[str, ...]
    sop_class_uids: tuple[str, ...] = ()
    #: ViewPosition / view code meanings, e.g. ("CC", "MLO").
    views: tuple[str, ...] = ()
    lateralities: tuple[str, ...] = ()
    #: Mammography "For Processing" (raw) images are skipped unless this is set.
    accept_for_processing: bool = False
    #: Tomosynthesis volumes are skipped unless this is set (their synthesized 2D views are accepted).
    accept_tomosynthesis_volumes: bool = False


@dataclass(frozen=True, kw_only=True)
class ScoreMeaning:
    """What a model's risk number means, so that outputs code it for what it is.

    Only a calibrated probability of malignancy may be reported as DCM 111047 "Probability of
    cancer"; anything else is a suspicion score on a stated scale with a stated reference.
    """

    #: ``probability_of_malignancy`` (calibrated) or ``suspicion_score``.
    kind: str
    #: Human-readable definition, e.g. ``p(BI-RADS >= 4)`` or ``calibrated p(malignant)``.
    description: str
    #: The coded concept for the SR: (code value, coding scheme designator, code meaning).
    concept: tuple[str, str, str]
    #: The range of the score, e.g. (0.0, 1.0).
    scale: tuple[float, float] = (0.0, 1.0)

    KINDS = ("probability_of_malignancy", "suspicion_score")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"score kind must be one of {self.KINDS}")
        if (self.kind == "probability_of_malignancy") != (self.concept[:2] == PROBABILITY_OF_CANCER[:2]):
            raise ValueError("DCM 111047 codes a calibrated probability of malignancy and nothing else")

    @property
    def is_probability_of_malignancy(self) -> bool:
        return self.kind == "probability_of_malignancy"

    def to_json_dict(self) -> dict[str, Any]:
        """This meaning as JSON keeps it (the kept predictions, a queued notification)."""
        return {
            "kind": self.kind,
            "description": self.description,
            "concept": list(self.concept),
            "scale": list(self.scale),
        }

    @classmethod
    def from_json_dict(cls, record: Mapping[str, Any] | None) -> ScoreMeaning | None:
        """What :meth:`to_json_dict` wrote; ``None`` for ``None`` (a meaning that was not stated)."""
        if record is None:
            return None
        value, scheme, text = record["concept"]
        low, high = record["scale"]
        return cls(
            kind=record["kind"],
            description=record["description"],
            concept=(value, scheme, text),
            scale=(low, high),
        )


#: PS3.16 DCM 111047 (CID 6048): only for a risk calibrated as the probability of malignancy.
PROBABILITY_OF_CANCER = ("111047", "DCM", "Probability of cancer")
#: PS3.16 DCM 111012 (CID 6048), "the likelihood that the feature analysed is in fact the type of
#: feature identified": a model's certainty in its own finding, on the model's own scale.
CERTAINTY_OF_FINDING = ("111012", "DCM", "Certainty of Finding")

#: What a model's risk means when its plugin does not say: the summed probability of its positive
#: classes, as the network gives it (not calibrated, so not a probability of malignancy).
UNCALIBRATED_SUSPICION = ScoreMeaning(
    kind="suspicion_score",
    description="p(positive classes), uncalibrated",
    concept=CERTAINTY_OF_FINDING,
)


def calibrated_probability(description: str = "calibrated p(malignant)") -> ScoreMeaning:
    """The meaning of a binary benign/malignant risk once a prior-shift-correcting calibrator maps it."""
    return ScoreMeaning(
        kind="probability_of_malignancy", description=description, concept=PROBABILITY_OF_CANCER
    )


@dataclass(frozen=True, kw_only=True)
class RiskCalibrator:
    """Maps a model's raw risk to a calibrated one, fitted by the training CLI on a held-out split at a
    stated deployment prevalence (so it corrects the class-prior shift of balanced sampling and class
    weights, which temperature scaling cannot).

    ``platt``: ``sigmoid(slope * logit(risk) + intercept)``; ``isotonic``: a non-decreasing step
    function, linearly interpolated between the fitted ``(xs, ys)`` knots.  numpy only, so the
    workers apply it without scikit-learn.
    """

    method: str
    #: The deployment prevalence the calibrator was fitted at.
    prevalence: float
    slope: float = 1.0
    intercept: float = 0.0
    xs: tuple[float, ...] = ()
    ys: tuple[float, ...] = ()

    METHODS = ("platt", "isotonic")

    def __post_init__(self) -> None:
        if self.method not in self.METHODS:
            raise ValueError(f"calibration method must be one of {self.METHODS}")
        if not 0.0 < self.prevalence < 1.0:
            raise ValueError("calibration prevalence must be in (0, 1)")
        if self.method == "isotonic" and (len(self.xs) != len(self.ys) or len(self.xs) < 1):
            raise ValueError("an isotonic calibrator needs as many knots xs as values ys, at least one")

    def apply(self, risk: Any) -> Any:
        """The calibrated risk of *risk* (a float or an array), in [0, 1]."""
        raw = np.asarray(risk, dtype=np.float64)
        if self.method == "platt":
            clipped = np.clip(raw, 1e-7, 1 - 1e-7)
            z = self.slope * np.log(clipped / (1 - clipped)) + self.intercept
            out = 1.0 / (1.0 + np.exp(-z))
        else:
            out = np.interp(raw, np.asarray(self.xs), np.asarray(self.ys))
        out = np.clip(out, 0.0, 1.0)
        return float(out) if out.ndim == 0 else out

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "prevalence": self.prevalence,
            "slope": self.slope,
            "intercept": self.intercept,
            "xs": list(self.xs),
            "ys": list(self.ys),
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> RiskCalibrator:
        return cls(
            method=str(data["method"]),
            prevalence=float(data["prevalence"]),
            slope=float(data.get("slope", 1.0)),
            intercept=float(data.get("intercept", 0.0)),
            xs=tuple(float(x) for x in data.get("xs") or ()),
            ys=tuple(float(y) for y in data.get("ys") or ()),
        )


@dataclass(frozen=True, kw_only=True)
class OperatingPoint:
    """A decision threshold on a model's risk with the performance it was chosen for.

    Stored in the checkpoint by the training CLI (measured on a held-out split at the stated
    prevalence), or taken from the plugin's defaults for untrained demo weights.
    """

    #: Stable name, e.g. ``high_sensitivity``, ``balanced``, ``high_specificity``.
    name: str
    threshold: float
    #: Sensitivity and specificity measured when the point was chosen; None when not measured.
    sensitivity: float | None = None
    specificity: float | None = None
    #: The prevalence the point was chosen at; None when not stated.
    prevalence: float | None = None

    @property
    def measured(self) -> bool:
        """False for a default point taken from a plugin's thresholds (nothing was measured)."""
        return self.sensitivity is not None or self.specificity is not None

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threshold": self.threshold,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "prevalence": self.prevalence,
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> OperatingPoint:
        def number(key: str) -> float | None:
            return None if data.get(key) is None else float(data[key])

        return cls(
            name=str(data["name"]),
            threshold=float(data["threshold"]),
            sensitivity=number("sensitivity"),
            specificity=number("specificity"),
            prevalence=number("prevalence"),
        )


#: The operating point names the triage policy reads, most sensitive first.
HIGH_SENSITIVITY = "high_sensitivity"
HIGH_SPECIFICITY = "high_specificity"


def default_operating_points(spec: ModelSpec) -> tuple[OperatingPoint, ...]:
    """Operating points for weights without measured ones: the plugin's thresholds on its positive
    classes, none measured (sensitivity and specificity None).  Empty when the spec sets no threshold."""
    thresholds = [spec.thresholds[c] for c in spec.positive_classes if c in spec.thresholds]
    if "risk" in spec.thresholds:
        thresholds.append(spec.thresholds["risk"])
    if not thresholds:
        return ()
    threshold = min(thresholds)
    # One unmeasured threshold serves both names: nothing distinguishes them without a held-out split.
    return (
        OperatingPoint(name=HIGH_SENSITIVITY, threshold=threshold),
        OperatingPoint(name=HIGH_SPECIFICITY, threshold=threshold),
    )


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What a model plugin is, modelled on timm's ``PretrainedCfg``."""

    #: Stable id in timm's ``arch.tag`` form, e.g. ``asg_mammonet.v1``; used in output UIDs.
    model_id: str
    #: Plugin name used in config (``plugins.models.<name>``) and on the CLI.
    name: str
    version: str
    display_name: str
    arch: str
    classes: tuple[str, ...]
    #: Classes whose summed probability is the risk score, e.g. ("malignant",).
    positive_classes: tuple[str, ...]
    accepts: AcceptRule
    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    #: Default decision thresholds, overridable in config.
    thresholds: dict[str, float] = field(default_factory=dict)
    paper: str = ""
    license: str = "Apache-2.0"
    #: True for BI-RADS-output models.
    gives_birads: bool = False
    #: What the risk (summed probability of ``positive_classes``) means as the network gives it.
    score: ScoreMeaning = UNCALIBRATED_SUSPICION
    #: What the risk means once a checkpoint's prior-shift-correcting calibrator maps it; ``None``
    #: keeps ``score`` (a calibrated BI-RADS score is still a suspicion score, not p(malignant)).
    calibrated_score: ScoreMeaning | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.accepts.modalities


@dataclass(frozen=True, kw_only=True)
class Letterbox:
    """How a source image was resized and padded; ``to_source`` inverts it.

    A point (x, y) in the model input maps to ((x - pad_left) / scale + crop_left,
    (y - pad_top) / scale + crop_top) in the source image.
    """

    source_shape: tuple[int, int]
    #: The crop taken from the source before resizing: (top, left, height, width).
    crop: tuple[int, int, int, int]
    scale: float
    pad_top: int
    pad_left: int
    output_shape: tuple[int, int]
    #: True when the image was mirrored to normalise laterality.
    flipped: bool = False
    #: Row scale when it differs from ``scale`` (a stretched resize, or the rounding of the resized
    #: height); ``None`` means ``scale`` applies to both axes.
    scale_y: float | None = None

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        """Map a point (x, y) in the model input to source-image coordinates.

        Coordinates are continuous, as in DICOM SCOORD: pixel (row r, column c) covers
        [c, c + 1) x [r, r + 1), so its centre is (c + 0.5, r + 0.5).
        """
        top, left, _height, width = self.crop
        source_x = (x - self.pad_left) / self.scale
        source_y = (y - self.pad_top) / (self.scale if self.scale_y is None else self.scale_y)
        if self.flipped:
            source_x = width - source_x
        return source_x + left, source_y + top


@dataclass(frozen=True, kw_only=True)
class ImageRef:
    """An image handed to a plugin: where it is and what the DICOM header says about it."""

    path: Path
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    laterality: str = ""
    view: str = ""
    presentation_intent: str = ""
    number_of_frames: int = 1
    frame_index: int = 0
    #: The first 2-D ultrasound region (Sequence of Ultrasound Regions) as (top, left, height, width).
    us_region: tuple[int, int, int, int] | None = None
    #: Geometry the header declares, for the pixel budget checked before decoding (0 = not given).
    rows: int = 0
    columns: int = 0
    samples_per_pixel: int = 1
    bits_allocated: int = 16
    #: Body Part Examined, upper case ("BREAST"), for routing.
    body_part: str = ""
    #: Anatomic Region Sequence: code value and meaning, upper case ("76752008", "BREAST").
    anatomic_region: tuple[str, ...] = ()
    #: The AE title that sent the study (set by the worker from the job, not read from the file).
    calling_ae: str = ""

    @property
    def declared_pixel_bytes(self) -> int:
        """Bytes the stored pixels of every frame take once decoded: rows x columns x frames x bytes per sample."""
        bytes_per_sample = max(1, (self.bits_allocated + 7) // 8)
        return (
            self.rows
            * self.columns
            * self.samples_per_pixel
            * max(1, self.number_of_frames)
            * bytes_per_sample
        )


@dataclass(frozen=True, kw_only=True)
class LocalisationPoint:
    """A point in source-image pixel coordinates (column x, row y)."""

    x: float
    y: float
    score: float = 1.0
    label: str = ""


@dataclass(frozen=True, kw_only=True)
class LocalisationRegion:
    """A closed polygon in source-image pixel coordinates, as (x, y) pairs."""

    points: tuple[tuple[float, float], ...]
    score: float = 1.0
    label: str = ""


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """One model's result on one image."""

    model_id: str
    model_name: str
    model_version: str
    image: ImageRef
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]
    predicted_class: str
    #: Probability mass on the model's positive classes, in [0, 1]; what triage uses.
    risk: float
    #: BI-RADS category 1-5 where the model gives one.
    birads: int | None = None
    #: Float32 map in [0, 1] with the source image's rows x columns.
    heatmap: np.ndarray | None = None
    heatmap_method: str = ""
    #: Further explanation maps (saliency, SHAP, the model's own maps), same geometry as ``heatmap``.
    extra_maps: dict[str, np.ndarray] = field(default_factory=dict)
    points: tuple[LocalisationPoint, ...] = ()
    regions: tuple[LocalisationRegion, ...] = ()
    #: True when the model ran with untrained demo weights; every output must say so.
    demo_weights: bool = False
    weights_sha256: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    #: What ``risk`` means (the spec's score, or its calibrated score once a calibrator applied).
    score: ScoreMeaning = UNCALIBRATED_SUSPICION
    #: The risk before the checkpoint's calibrator; ``None`` when no calibrator applied.
    uncalibrated_risk: float | None = None
    #: The model's operating points on ``risk``, as the host loaded them.
    operating_points: tuple[OperatingPoint, ...] = ()

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.probabilities):
            raise InvalidPredictionError("classes and probabilities differ in length")
        if not all(np.isfinite(p) and -1e-6 <= p <= 1 + 1e-6 for p in self.probabilities):
            raise InvalidPredictionError(f"probabilities are not in [0, 1]: {self.probabilities}")
        if not (np.isfinite(self.risk) and 0.0 <= self.risk <= 1.0):
            raise InvalidPredictionError(f"risk {self.risk} is not in [0, 1]")
        if self.predicted_class not in self.classes:
            raise InvalidPredictionError(
                f"predicted class {self.predicted_class!r} is not one of {self.classes}"
            )
        if self.birads is not None and not 0 <= self.birads <= 6:
            raise InvalidPredictionError(f"BI-RADS category {self.birads} is out of range")
        if self.heatmap is not None and (self.heatmap.ndim != 2 or not np.all(np.isfinite(self.heatmap))):
            raise InvalidPredictionError("heatmap must be a finite 2-D array")


@dataclass(frozen=True, kw_only=True)
class ImageFailure:
    """A model could not process one image; recorded, never raised to the worker."""

    model_name: str
    image: ImageRef
    error: str


@dataclass(frozen=True, kw_only=True)
class SkippedImage:
    """A model declined an image (wrong modality, For Processing, a tomosynthesis volume...)."""

    model_name: str
    image: ImageRef
    reason: str


# -------------------------------------------------------------------------
# Failure reasons
# -------------------------------------------------------------------------


class InvalidPredictionError(PacsTriageError, ValueError):
    """A plugin's output breaks the :class:`Prediction` contract (its message holds model outputs only)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for Python's ``MemoryError`` and torch's ``OutOfMemoryError`` (named, so no torch import here)."""
    return isinstance(exc, MemoryError) or any(
        cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__
    )


def failure_reason(doing: str, exc: BaseException) -> str:
    """The one way a failure is described wherever it is stored or shown (journal, dead letter, page, log).

    The reason is *doing* (our own words), the exception's type and, only for the project's own
    errors (:class:`~gateway.errors.PacsTriageError`, whose messages we write), its message.  A
    foreign exception's message is left out: pydicom's "Unable to convert '1958-11-23' to 'DA'
    object" quotes a birth date, a decoder's allocation error the image's geometry.  An
    allocation failure is named out of memory.

    :param doing: What was being done, e.g. ``"decoding"`` or ``"building outputs"``.
    :param exc: What was raised.
    """
    if is_out_of_memory(exc):  # a GPU's allocation failure too, which the gateway's rule cannot know
        return f"{doing}: out of memory ({type(exc).__name__})"
    return gateway_failure_reason(doing, exc)
