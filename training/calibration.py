"""Calibration that corrects a shift in class prior, and operating points, fitted on a held-out split.

Balanced samplers, oversampling, ``pos_weight`` and class weights train a model as if the classes were
equally common.  Its p(positive) then overstates the risk at a screening prevalence, and temperature
scaling (one multiplier on the logits, no intercept) cannot move it back.  Here the held-out split is
*reweighted to the deployment prevalence the user states*: each positive weighs ``prevalence / n_pos``
and each negative ``(1 - prevalence) / n_neg``, so the weighted split has exactly that prevalence.  On
it we fit either

- Platt scaling with an intercept: ``sigmoid(a * logit(risk) + b)``, a weighted logistic regression
  (scikit-learn, no penalty) on Platt's smoothed targets; the intercept ``b`` absorbs the prior shift; or
- isotonic regression (scikit-learn), weighted, kept as its knots and linearly interpolated.

Operating points are chosen on the same held-out split on the calibrated risk: ``high_sensitivity``
is the highest threshold whose sensitivity is at least the stated one, ``high_specificity`` the lowest
whose specificity is at least the stated one (a study is positive when ``risk >= threshold``).  The
sensitivity and specificity each point achieves on the split are stored with it; neither depends on
the prevalence, which is stored too.

Reliability is the expected calibration error of p(positive) at the stated prevalence: equal-width
bins of the predicted probability, each contributing its weighted share times the gap between the
weighted positive rate and the weighted mean prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from plugins.types import HIGH_SENSITIVITY, HIGH_SPECIFICITY, OperatingPoint, RiskCalibrator

__all__ = [
    "CalibrationReport",
    "choose_operating_points",
    "fit_calibrator",
    "prevalence_weights",
    "reliability_at_prevalence",
]

_EPS = 1e-6


def _binary(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    risk = np.asarray(scores, dtype=np.float64).ravel()
    target = np.asarray(labels).astype(bool).ravel()
    if risk.shape != target.shape:
        raise ValueError(f"{risk.size} scores but {target.size} labels")
    if not np.all(np.isfinite(risk)):
        raise ValueError("scores must be finite")
    if target.all() or not target.any():
        raise ValueError("the held-out split needs both positives and negatives")
    return risk, target


def prevalence_weights(labels: Any, prevalence: float) -> np.ndarray:
    """Per-sample weights that give *labels* the stated *prevalence*, summing to the sample count.

    :raises ValueError: when *prevalence* is not in (0, 1) or one class is missing.
    """
    if not 0.0 < prevalence < 1.0:
        raise ValueError(f"prevalence {prevalence} must be in (0, 1)")
    target = np.asarray(labels).astype(bool).ravel()
    n_pos, n_neg = int(target.sum()), int((~target).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("prevalence weights need both positives and negatives")
    weights = np.where(target, prevalence / n_pos, (1.0 - prevalence) / n_neg)
    return weights * target.size


def fit_calibrator(scores: Any, labels: Any, prevalence: float, method: str = "platt") -> RiskCalibrator:
    """Fit a calibrator of the raw risk *scores* on held-out *labels* (1 = positive) reweighted to
    *prevalence*.

    :param scores: the model's raw risk on the held-out split, in [0, 1].
    :param labels: 1 where the image is positive (malignant, or BI-RADS >= 4 for a BI-RADS model).
    :param prevalence: the deployment prevalence of positives the user states.
    :param method: ``platt`` or ``isotonic``.
    """
    risk, target = _binary(scores, labels)
    weights = prevalence_weights(target, prevalence)
    if method == "platt":
        clipped = np.clip(risk, _EPS, 1 - _EPS)
        feature = np.log(clipped / (1 - clipped)).reshape(-1, 1)
        # Platt's (1999) smoothed targets, (N+ + 1) / (N+ + 2) and 1 / (N- + 2), keep a small split that a
        # threshold happens to separate from driving the slope to infinity.  Soft targets are fitted as each
        # sample twice, positive with weight t and negative with weight 1 - t (the same cross-entropy).
        n_pos, n_neg = int(target.sum()), int((~target).sum())
        soft = np.where(target, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
        model = LogisticRegression(C=np.inf, max_iter=1000)  # no penalty: maximum likelihood on soft targets
        model.fit(
            np.vstack([feature, feature]),
            np.r_[np.ones(risk.size), np.zeros(risk.size)].astype(int),
            sample_weight=np.r_[weights * soft, weights * (1 - soft)],
        )
        return RiskCalibrator(
            method="platt",
            prevalence=prevalence,
            slope=float(model.coef_[0, 0]),
            intercept=float(model.intercept_[0]),
        )
    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(risk, target.astype(float), sample_weight=weights)
        return RiskCalibrator(
            method="isotonic",
            prevalence=prevalence,
            xs=tuple(float(x) for x in iso.X_thresholds_),
            ys=tuple(float(y) for y in iso.y_thresholds_),
        )
    raise ValueError(f"calibration method {method!r} is not platt or isotonic")


def choose_operating_points(
    scores: Any,
    labels: Any,
    *,
    sensitivity: float = 0.95,
    specificity: float = 0.90,
    prevalence: float | None = None,
) -> tuple[OperatingPoint, ...]:
    """``high_sensitivity`` and ``high_specificity`` thresholds on *scores* (the calibrated risk), with
    the sensitivity and specificity each achieves on this split.

    :param sensitivity: the sensitivity ``high_sensitivity`` must reach.
    :param specificity: the specificity ``high_specificity`` must reach.
    :param prevalence: recorded with the points (it does not change them).
    """
    risk, target = _binary(scores, labels)
    positives = np.sort(risk[target])[::-1]
    negatives = np.sort(risk[~target])
    # The k-th highest positive: every positive at or above it is caught, so sensitivity >= k / n_pos.
    k = max(1, math.ceil(sensitivity * positives.size - 1e-9))
    sensitive = float(positives[k - 1])
    # Just above the k-th lowest negative: those k negatives stay below, so specificity >= k / n_neg.
    k = max(1, math.ceil(specificity * negatives.size - 1e-9))
    specific = float(np.nextafter(negatives[k - 1], np.inf))

    def point(name: str, threshold: float) -> OperatingPoint:
        called = risk >= threshold
        return OperatingPoint(
            name=name,
            threshold=threshold,
            sensitivity=float(called[target].mean()),
            specificity=float((~called[~target]).mean()),
            prevalence=prevalence,
        )

    return point(HIGH_SENSITIVITY, sensitive), point(HIGH_SPECIFICITY, specific)


def reliability_at_prevalence(
    probabilities: Any, labels: Any, prevalence: float, *, n_bins: int = 10
) -> float:
    """Expected calibration error of p(positive) on a split reweighted to *prevalence*."""
    risk, target = _binary(probabilities, labels)
    weights = prevalence_weights(target, prevalence)
    bins = np.clip(np.ceil(risk * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    weight = np.bincount(bins, weights=weights, minlength=n_bins)
    observed = np.bincount(bins, weights=weights * target, minlength=n_bins)
    predicted = np.bincount(bins, weights=weights * risk, minlength=n_bins)
    return float(np.abs(observed - predicted).sum() / weight.sum())


@dataclass(frozen=True, kw_only=True)
class CalibrationReport:
    """A fitted calibrator, its operating points and the reliability before and after, on one split."""

    #: None when no prevalence was stated (operating points only).
    calibrator: RiskCalibrator | None
    operating_points: tuple[OperatingPoint, ...]
    ece_before: float | None
    ece_after: float | None
    n_positive: int
    n_negative: int

    @classmethod
    def fit(
        cls,
        scores: Any,
        labels: Any,
        prevalence: float,
        *,
        method: str = "platt",
        sensitivity: float = 0.95,
        specificity: float = 0.90,
    ) -> CalibrationReport:
        """Calibrate *scores* at *prevalence* and choose the operating points on the calibrated risk."""
        risk, target = _binary(scores, labels)
        calibrator = fit_calibrator(risk, target, prevalence, method)
        calibrated = np.asarray(calibrator.apply(risk), dtype=np.float64)
        return cls(
            calibrator=calibrator,
            operating_points=choose_operating_points(
                calibrated, target, sensitivity=sensitivity, specificity=specificity, prevalence=prevalence
            ),
            ece_before=reliability_at_prevalence(risk, target, prevalence),
            ece_after=reliability_at_prevalence(calibrated, target, prevalence),
            n_positive=int(target.sum()),
            n_negative=int((~target).sum()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "calibrator": None if self.calibrator is None else self.calibrator.to_json_dict(),
            "operating_points": [p.to_json_dict() for p in self.operating_points],
            "ece_before_at_prevalence": self.ece_before,
            "ece_after_at_prevalence": self.ece_after,
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
        }

    def lines(self) -> list[str]:
        """Console lines: the calibrator, ECE before and after, each operating point."""
        c = self.calibrator
        out = []
        if c is not None:
            fitted = (
                f"Platt a={c.slope:.4f} b={c.intercept:.4f}"
                if c.method == "platt"
                else f"isotonic, {len(c.xs)} knots"
            )
            out.append(
                f"{fitted} at prevalence {c.prevalence:g} ({self.n_positive} positive, {self.n_negative} "
                f"negative held-out images): ECE {self.ece_before:.4f} -> {self.ece_after:.4f}"
            )
        for p in self.operating_points:
            out.append(
                f"operating point {p.name}: risk >= {p.threshold:.4f} (held-out sensitivity "
                f"{p.sensitivity:.3f}, specificity {p.specificity:.3f})"
            )
        return out
