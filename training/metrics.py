"""The papers' evaluation metrics, calibration, report rendering and the papers' own numbers, in numpy alone.

Labels are integer class indices and scores are per-class probabilities ``(N, K)``.  Everything here is
written out by hand (sklearn and scipy are not dependencies): confusion-matrix metrics, MCC, the DIP score of
ASG-MammoNet, ROC curves and AUC (ties count one half, as in the Mann-Whitney U statistic) with a seeded
percentile-bootstrap CI, Dice, expected calibration error and temperature scaling.  Figures are drawn with
OpenCV so that reports need no plotting library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = [
    "PAPER_RESULTS",
    "Calibration",
    "ClassMetrics",
    "MetricReport",
    "PaperResult",
    "RocCurve",
    "accuracy",
    "binary_counts",
    "bootstrap_auc_ci",
    "bootstrap_ci",
    "calibrate",
    "classification_report",
    "confusion_matrix",
    "dice",
    "dip_score",
    "expected_calibration_error",
    "f1_score",
    "fit_temperature",
    "format_comparison",
    "format_report",
    "mask_recall",
    "matthews_corrcoef",
    "negative_log_likelihood",
    "paper_results",
    "precision",
    "recall",
    "render_confusion_matrix",
    "render_roc_curves",
    "roc_auc",
    "roc_auc_ovr",
    "roc_curve",
    "sensitivity",
    "softmax",
    "specificity",
    "write_summary_json",
]


# ---------------------------------------------------------------------------------------------------------
# Input checks


def _labels(y: Any, name: str = "y_true") -> np.ndarray:
    array = np.asarray(y)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, not shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices")
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"{name} holds a negative class index")
    return array.astype(np.int64, copy=False)


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    true, pred = _labels(y_true), _labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {true.size} vs {pred.size}")
    if not true.size:
        raise ValueError("no samples")
    return true, pred


def _scores(y_score: Any, n: int) -> np.ndarray:
    scores = np.asarray(y_score, dtype=np.float64)
    if scores.ndim != 1 or scores.size != n:
        raise ValueError(f"scores must be 1-D with {n} values, not shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores hold NaN or infinite values")
    return scores


def _safe_ratio(numerator: float, denominator: float) -> float:
    """Return numerator / denominator, or 0.0 when the denominator is 0 (sklearn's zero_division=0)."""
    return float(numerator) / float(denominator) if denominator else 0.0


# ---------------------------------------------------------------------------------------------------------
# Confusion-matrix metrics


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int | None = None) -> np.ndarray:
    """Count predictions, with true classes as rows and predicted classes as columns.

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param n_classes: matrix size (default: the largest index + 1).
    """
    true, pred = _pair(y_true, y_pred)
    size = int(max(true.max(), pred.max()) + 1) if n_classes is None else int(n_classes)
    if true.max() >= size or pred.max() >= size:
        raise ValueError(f"a class index is >= n_classes={size}")
    return np.bincount(true * size + pred, minlength=size * size).reshape(size, size)


def binary_counts(y_true: Any, y_pred: Any, positive: int = 1) -> tuple[int, int, int, int]:
    """(TN, FP, FN, TP) with ``positive`` as the positive class and every other class as negative.

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param positive: index of the positive class.
    """
    true, pred = _pair(y_true, y_pred)
    actual, predicted = true == positive, pred == positive
    tp = int(np.sum(actual & predicted))
    fp = int(np.sum(~actual & predicted))
    fn = int(np.sum(actual & ~predicted))
    tn = int(np.sum(~actual & ~predicted))
    return tn, fp, fn, tp


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of correct predictions.

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    """
    true, pred = _pair(y_true, y_pred)
    return float(np.mean(true == pred))


def precision(y_true: Any, y_pred: Any, positive: int = 1) -> float:
    """TP / (TP + FP) for class ``positive``; 0.0 when nothing is predicted positive.

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param positive: index of the positive class.
    """
    _, fp, _, tp = binary_counts(y_true, y_pred, positive)
    return _safe_ratio(tp, tp + fp)


def recall(y_true: Any, y_pred: Any, positive: int = 1) -> float:
    """TP / (TP + FN) for class ``positive`` (sensitivity); 0.0 when the class is absent.

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param positive: index of the positive class.
    """
    _, _, fn, tp = binary_counts(y_true, y_pred, positive)
    return _safe_ratio(tp, tp + fn)


sensitivity = recall


def specificity(y_true: Any, y_pred: Any, positive: int = 1) -> float:
    """TN / (TN + FP) for class ``positive``; 0.0 when there are no negatives.

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param positive: index of the positive class.
    """
    tn, fp, _, _ = binary_counts(y_true, y_pred, positive)
    return _safe_ratio(tn, tn + fp)


def f1_score(y_true: Any, y_pred: Any, positive: int = 1) -> float:
    """Harmonic mean of precision and recall for class ``positive`` (2TP / (2TP + FP + FN)).

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param positive: index of the positive class.
    """
    _, fp, fn, tp = binary_counts(y_true, y_pred, positive)
    return _safe_ratio(2 * tp, 2 * tp + fp + fn)


def matthews_corrcoef(y_true: Any, y_pred: Any, n_classes: int | None = None) -> float:
    """Matthews correlation coefficient in [-1, 1], multi-class by Gorodkin's R_K; 0.0 when undefined.

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param n_classes: number of classes (default: from the data).
    """
    matrix = confusion_matrix(y_true, y_pred, n_classes).astype(np.float64)
    total = matrix.sum()
    correct = np.trace(matrix)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    numerator = correct * total - float(predicted @ actual)
    denominator = math.sqrt((total**2 - float(predicted @ predicted)) * (total**2 - float(actual @ actual)))
    if denominator == 0:
        return 0.0
    return float(np.clip(numerator / denominator, -1.0, 1.0))


def dip_score(precision_value: float, recall_value: float) -> float:
    """ASG-MammoNet's Distance from the Ideal Position: ``1 - sqrt(((1-P)^2 + (1-R)^2) / 2)``, in [0, 1].

    :param precision_value: precision in [0, 1].
    :param recall_value: recall in [0, 1].
    """
    for name, value in (("precision", precision_value), ("recall", recall_value)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} {value} is not in [0, 1]")
    return 1.0 - math.sqrt(((1.0 - precision_value) ** 2 + (1.0 - recall_value) ** 2) / 2.0)


# ---------------------------------------------------------------------------------------------------------
# ROC


@dataclass(frozen=True)
class RocCurve:
    """ROC points from the strictest threshold (+inf, at (0, 0)) to the loosest (at (1, 1))."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float


def _binary_target(y_true: Any, positive: int | None) -> np.ndarray:
    true = _labels(y_true)
    if positive is None:
        if true.size and true.max() > 1:
            raise ValueError("y_true has more than two classes; say which one is positive")
        return np.asarray(true == 1, dtype=bool)
    return np.asarray(true == positive, dtype=bool)


def roc_curve(y_true: Any, y_score: Any, positive: int | None = None) -> RocCurve:
    """ROC curve of ``y_score`` for the positive class; one point per distinct score.

    :param y_true: class indices (0/1 unless ``positive`` is given).
    :param y_score: score of the positive class; higher means more positive.
    :param positive: positive class index (default 1 for binary labels).
    """
    target = _binary_target(y_true, positive)
    scores = _scores(y_score, target.size)
    n_pos, n_neg = int(target.sum()), int((~target).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs both positive and negative samples")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_target = scores[order], target[order]
    # The last index of each run of equal scores is where a threshold takes effect.
    distinct = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    tps = np.cumsum(sorted_target)[distinct]
    fps = (distinct + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, sorted_scores[distinct]]
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=float(np.trapezoid(tpr, fpr)))


def _weighted_auc(scores: np.ndarray, target: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """AUC (ties = 1/2) of each row of resample indices ``draws`` (B x N); NaN where a class is missing."""
    unique, group = np.unique(scores, return_inverse=True)
    n_groups = unique.size
    batch = draws.shape[0]
    cells = group[draws] + (np.arange(batch) * n_groups)[:, None]
    labels = target[draws]
    pos = np.bincount(cells[labels].ravel(), minlength=batch * n_groups).reshape(batch, n_groups)
    neg = np.bincount(cells[~labels].ravel(), minlength=batch * n_groups).reshape(batch, n_groups)
    below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (below + 0.5 * neg)).sum(axis=1, dtype=np.float64)
    pairs = pos.sum(axis=1).astype(np.float64) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)


def roc_auc(y_true: Any, y_score: Any, positive: int | None = None) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2.

    :param y_true: class indices (0/1 unless ``positive`` is given).
    :param y_score: score of the positive class.
    :param positive: positive class index (default 1 for binary labels).
    """
    target = _binary_target(y_true, positive)
    scores = _scores(y_score, target.size)
    if target.all() or not target.any():
        raise ValueError("AUC needs both positive and negative samples")
    return float(_weighted_auc(scores, target, np.arange(target.size)[None, :])[0])


def _probabilities(probs: Any, n: int) -> np.ndarray:
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != n or array.shape[1] < 2:
        raise ValueError(f"probabilities must be (N={n}, K>=2), not shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("probabilities hold NaN or infinite values")
    return array


def roc_auc_ovr(y_true: Any, probs: Any) -> tuple[float, dict[int, float]]:
    """Macro one-vs-rest AUC and the per-class AUCs; classes absent from ``y_true`` are left out.

    :param y_true: class indices.
    :param probs: (N, K) class probabilities.
    """
    true = _labels(y_true)
    scores = _probabilities(probs, true.size)
    per_class = {}
    for k in range(scores.shape[1]):
        target = true == k
        if target.any() and not target.all():
            per_class[k] = roc_auc(target.astype(np.int64), scores[:, k])
    if len(per_class) < 2:
        raise ValueError("one-vs-rest AUC needs at least two classes present")
    return float(np.mean(list(per_class.values()))), per_class


def _bootstrap_draws(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (math.nan, math.nan)
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_auc_ci(
    y_true: Any,
    y_score: Any,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    positive: int | None = None,
) -> tuple[float, float]:
    """Percentile-bootstrap (1 - alpha) CI of the AUC, vectorised; macro OvR when ``y_score`` is (N, K>2).

    Resamples in which a class is missing are skipped.

    :param y_true: class indices.
    :param y_score: positive-class scores (N,), or (N, K) probabilities (binary: column 1 or ``positive``).
    :param n_boot: number of resamples.
    :param alpha: 0.05 gives a 95 % interval.
    :param seed: the resampling seed.
    :param positive: positive class for binary scores.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha} must be in (0, 1)")
    true = _labels(y_true)
    scores = np.asarray(y_score, dtype=np.float64)
    if scores.ndim == 2 and scores.shape[1] == 2:
        scores = scores[:, 1 if positive is None else positive]
        positive = 1 if positive is None else positive
    # Chunks keep the B x N index matrix small for large evaluation sets.
    chunk = max(1, 4_000_000 // max(1, true.size))
    draws_all = _bootstrap_draws(true.size, n_boot, seed)
    values = []
    for start in range(0, n_boot, chunk):
        draws = draws_all[start : start + chunk]
        if scores.ndim == 1:
            target = _binary_target(true, positive)
            values.append(_weighted_auc(_scores(scores, true.size), target, draws))
        else:
            probs = _probabilities(scores, true.size)
            per_class = [
                _weighted_auc(probs[:, k], true == k, draws)
                for k in range(probs.shape[1])
                if (true == k).any()
            ]
            # A resample that lost a class is skipped (NaN), as in the binary case.
            values.append(np.mean(np.stack(per_class), axis=0))
    return _percentile_interval(np.concatenate(values), alpha)


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y_true: Any,
    y_other: Any,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap CI of any ``metric(y_true, y_other)``; resamples where it raises are skipped.

    :param metric: a function of the resampled labels and predictions (or scores).
    :param y_true: class indices.
    :param y_other: predictions or scores, resampled with the same rows.
    :param n_boot: number of resamples.
    :param alpha: 0.05 gives a 95 % interval.
    :param seed: the resampling seed.
    """
    true = np.asarray(y_true)
    other = np.asarray(y_other)
    values = np.full(n_boot, np.nan)
    for b, draw in enumerate(_bootstrap_draws(true.shape[0], n_boot, seed)):
        try:
            values[b] = metric(true[draw], other[draw])
        except ValueError:
            continue
    return _percentile_interval(values, alpha)


# ---------------------------------------------------------------------------------------------------------
# Masks


def dice(pred: Any, target: Any) -> float:
    """Dice similarity 2|A∩B| / (|A| + |B|) of two boolean masks; 1.0 when both are empty.

    :param pred: predicted mask.
    :param target: reference mask, same shape.
    """
    a, b = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.sum(a & b)) / total


def mask_recall(pred: Any, target: Any) -> float:
    """Pixel recall |A∩B| / |B| of the reference mask (LEM's localisation recall); 1.0 for an empty target.

    :param pred: predicted mask.
    :param target: reference mask, same shape.
    """
    a, b = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return 1.0 if not b.any() else float(np.sum(a & b)) / float(b.sum())


# ---------------------------------------------------------------------------------------------------------
# Calibration


def _logits(logits: Any) -> np.ndarray:
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim == 1:
        # A single binary logit z is the two-class logit pair (0, z).
        array = np.stack([np.zeros_like(array), array], axis=1)
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"logits must be (N,) or (N, K>=2), not shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("logits hold NaN or infinite values")
    return array


def softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``; (N,) binary logits give (N, 2).

    :param logits: (N, K) or (N,) logits.
    :param temperature: positive temperature.
    """
    if not temperature > 0:
        raise ValueError(f"temperature {temperature} must be positive")
    z = _logits(logits) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    probabilities: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return probabilities


def negative_log_likelihood(logits: Any, y_true: Any, temperature: float = 1.0) -> float:
    """Mean cross-entropy of the tempered softmax.

    :param logits: (N, K) or (N,) logits.
    :param y_true: class indices.
    :param temperature: positive temperature.
    """
    z = _logits(logits) / temperature
    true = _labels(y_true)
    if true.size != z.shape[0]:
        raise ValueError(f"{z.shape[0]} logits but {true.size} labels")
    shifted = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_norm - shifted[np.arange(true.size), true]))


def fit_temperature(logits: Any, y_true: Any, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Fit the temperature that minimises the validation NLL (Guo et al. 2017), without torch or scipy.

    NLL is convex in beta = 1/T (a log-sum-exp of linear functions minus a linear one), so its derivative,
    mean(E_p[z] - z_y), is increasing and bisection on it finds the unique minimum within ``bounds``.

    :param logits: validation logits, (N, K) or (N,).
    :param y_true: validation class indices.
    :param bounds: the search range of T.
    """
    z = _logits(logits)
    true = _labels(y_true)
    if true.size != z.shape[0] or true.size == 0:
        raise ValueError(f"{z.shape[0]} logits but {true.size} labels")
    low_t, high_t = bounds
    if not 0 < low_t < high_t:
        raise ValueError(f"bounds {bounds} must satisfy 0 < low < high")
    chosen = z[np.arange(true.size), true]

    def slope(beta: float) -> float:
        scaled = beta * z
        scaled -= scaled.max(axis=1, keepdims=True)
        p = np.exp(scaled)
        p /= p.sum(axis=1, keepdims=True)
        return float(np.mean((p * z).sum(axis=1) - chosen))

    beta_low, beta_high = 1.0 / high_t, 1.0 / low_t
    if slope(beta_low) >= 0:
        return high_t
    if slope(beta_high) <= 0:
        return low_t
    for _ in range(100):
        middle = math.sqrt(beta_low * beta_high)
        if slope(middle) > 0:
            beta_high = middle
        else:
            beta_low = middle
        if beta_high / beta_low < 1 + 1e-10:
            break
    return 1.0 / math.sqrt(beta_low * beta_high)


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and what it did to the NLL and the ECE of the split it was fitted on."""

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float

    def to_dict(self) -> dict[str, float]:
        """Return the fields as a JSON-ready dict."""
        return {
            "temperature": self.temperature,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
        }


def calibrate(
    logits: Any, y_true: Any, *, n_bins: int = 15, bounds: tuple[float, float] = (0.05, 20.0)
) -> Calibration:
    """Fit temperature scaling on validation logits and report NLL and ECE before and after.

    :param logits: validation logits, (N, K) or (N,).
    :param y_true: validation class indices.
    :param n_bins: ECE bins.
    :param bounds: the search range of T.
    """
    temperature = fit_temperature(logits, y_true, bounds=bounds)
    return Calibration(
        temperature=temperature,
        nll_before=negative_log_likelihood(logits, y_true),
        nll_after=negative_log_likelihood(logits, y_true, temperature),
        ece_before=expected_calibration_error(softmax(logits), y_true, n_bins=n_bins),
        ece_after=expected_calibration_error(softmax(logits, temperature), y_true, n_bins=n_bins),
    )


def expected_calibration_error(probs: Any, y_true: Any, *, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins: sum over bins of (n_b/N) |accuracy_b - confidence_b|.

    :param probs: (N, K) probabilities, or (N,) probabilities of class 1 for a binary model.
    :param y_true: class indices.
    :param n_bins: number of bins on (0, 1].
    """
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim == 1:
        array = np.stack([1.0 - array, array], axis=1)
    true = _labels(y_true)
    array = _probabilities(array, true.size)
    confidence = array.max(axis=1)
    correct = array.argmax(axis=1) == true
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        members = bins == b
        if members.any():
            total += members.mean() * abs(float(correct[members].mean()) - float(confidence[members].mean()))
    return float(total)


# ---------------------------------------------------------------------------------------------------------
# The full report


@dataclass(frozen=True)
class ClassMetrics:
    """One-vs-rest metrics of one class."""

    precision: float
    recall: float
    specificity: float
    f1: float
    support: int
    auc: float | None


@dataclass(frozen=True)
class MetricReport:
    """Every metric the papers report, for one evaluation run."""

    classes: tuple[str, ...]
    n: int
    #: The positive class of binary metrics, or None when P/R/specificity/F1 are macro averages.
    positive_class: str | None
    accuracy: float
    precision: float
    recall: float
    specificity: float
    f1: float
    mcc: float
    dip: float
    #: Binary AUC of the positive class, or macro one-vs-rest AUC; None when a class is missing.
    auc: float | None
    auc_ci: tuple[float, float] | None
    confusion: np.ndarray
    per_class: dict[str, ClassMetrics]
    roc: dict[str, RocCurve]
    #: Decision threshold on the positive-class probability, or None for argmax.
    threshold: float | None = None
    ece: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def sensitivity(self) -> float:
        """Sensitivity is recall."""
        return self.recall

    def flat(self) -> dict[str, float]:
        """Scalar metrics by name, per-class ones as ``metric[class]``, as :func:`format_comparison` reads."""
        values: dict[str, float] = {
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "specificity": self.specificity,
            "f1": self.f1,
            "mcc": self.mcc,
            "dip": self.dip,
        }
        if self.auc is not None:
            values["auc"] = self.auc
        if self.ece is not None:
            values["ece"] = self.ece
        for name, metrics in self.per_class.items():
            values[f"precision[{name}]"] = metrics.precision
            values[f"recall[{name}]"] = metrics.recall
            values[f"f1[{name}]"] = metrics.f1
            if metrics.auc is not None:
                values[f"auc[{name}]"] = metrics.auc
        values.update(self.extra)
        return values

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready summary (ROC curves as point lists)."""
        return {
            "classes": list(self.classes),
            "n": self.n,
            "positive_class": self.positive_class,
            "averaging": "binary" if self.positive_class else "macro",
            "threshold": self.threshold,
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "sensitivity": self.recall,
            "specificity": self.specificity,
            "f1": self.f1,
            "mcc": self.mcc,
            "dip": self.dip,
            "auc": self.auc,
            "auc_ci95": list(self.auc_ci) if self.auc_ci else None,
            "ece": self.ece,
            "confusion_matrix": self.confusion.tolist(),
            "per_class": {
                name: {
                    "precision": m.precision,
                    "recall": m.recall,
                    "specificity": m.specificity,
                    "f1": m.f1,
                    "support": m.support,
                    "auc": m.auc,
                }
                for name, m in self.per_class.items()
            },
            "roc": {
                name: {"fpr": curve.fpr.tolist(), "tpr": curve.tpr.tolist(), "auc": curve.auc}
                for name, curve in self.roc.items()
            },
            "extra": dict(self.extra),
        }


def classification_report(
    y_true: Any,
    probs: Any,
    classes: Sequence[str],
    *,
    positive_class: str | None = None,
    threshold: float | None = None,
    n_bootstrap: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> MetricReport:
    """All metrics for one set of predictions.

    Binary problems (two classes, or ``positive_class`` given) report precision, recall, specificity and F1
    of the positive class (default: the second class, e.g. "malignant"); multi-class problems report their
    macro averages over the classes present.  AUC is the positive class's (binary) or macro one-vs-rest,
    with a percentile-bootstrap CI; DIP uses the reported precision and recall.

    :param y_true: class indices into ``classes``.
    :param probs: (N, K) class probabilities.
    :param classes: class names, in index order.
    :param positive_class: the positive class of binary metrics.
    :param threshold: predict the positive class when its probability is >= this (binary only); None: argmax.
    :param n_bootstrap: bootstrap resamples for the AUC CI (0 skips the CI).
    :param alpha: 0.05 gives a 95 % CI.
    :param seed: the bootstrap seed.
    """
    true = _labels(y_true)
    scores = _probabilities(probs, true.size)
    k = scores.shape[1]
    if len(classes) != k:
        raise ValueError(f"{len(classes)} class names for {k} probability columns")
    if true.size == 0:
        raise ValueError("no samples")
    if true.max() >= k:
        raise ValueError(f"y_true holds class index {int(true.max())} but there are {k} classes")
    if positive_class is None and k == 2:
        positive_class = classes[1]
    positive = classes.index(positive_class) if positive_class is not None else None
    if positive_class is not None and positive is None:
        raise ValueError(f"positive class {positive_class!r} is not one of {list(classes)}")
    if threshold is not None:
        if positive is None:
            raise ValueError("a threshold needs a positive class")
        others = scores.copy()
        others[:, positive] = -np.inf
        pred = np.where(scores[:, positive] >= threshold, positive, others.argmax(axis=1))
    else:
        pred = scores.argmax(axis=1)
    matrix = confusion_matrix(true, pred, k)
    per_class: dict[str, ClassMetrics] = {}
    roc: dict[str, RocCurve] = {}
    for index, name in enumerate(classes):
        target = true == index
        auc = None
        if target.any() and not target.all():
            curve = roc_curve(target.astype(np.int64), scores[:, index])
            roc[name] = curve
            auc = curve.auc
        per_class[name] = ClassMetrics(
            precision=precision(true, pred, index),
            recall=recall(true, pred, index),
            specificity=specificity(true, pred, index),
            f1=f1_score(true, pred, index),
            support=int(target.sum()),
            auc=auc,
        )
    auc_value: float | None
    auc_ci: tuple[float, float] | None = None
    if positive is not None and (k == 2 or positive_class is not None):
        chosen = per_class[classes[positive]]
        p, r, s, f = chosen.precision, chosen.recall, chosen.specificity, chosen.f1
        auc_value = chosen.auc
        if auc_value is not None and n_bootstrap > 0:
            auc_ci = bootstrap_auc_ci(
                true, scores[:, positive], n_boot=n_bootstrap, alpha=alpha, seed=seed, positive=positive
            )
        roc = {classes[positive]: roc[classes[positive]]} if classes[positive] in roc else {}
    else:
        present = [per_class[name] for name in classes if per_class[name].support > 0]
        p = float(np.mean([m.precision for m in present]))
        r = float(np.mean([m.recall for m in present]))
        s = float(np.mean([m.specificity for m in present]))
        f = float(np.mean([m.f1 for m in present]))
        aucs = [m.auc for m in per_class.values() if m.auc is not None]
        auc_value = float(np.mean(aucs)) if len(aucs) >= 2 else None
        if auc_value is not None and n_bootstrap > 0:
            auc_ci = bootstrap_auc_ci(true, scores, n_boot=n_bootstrap, alpha=alpha, seed=seed)
    return MetricReport(
        classes=tuple(classes),
        n=int(true.size),
        positive_class=positive_class,
        accuracy=accuracy(true, pred),
        precision=p,
        recall=r,
        specificity=s,
        f1=f,
        mcc=matthews_corrcoef(true, pred, k),
        dip=dip_score(p, r),
        auc=auc_value,
        auc_ci=auc_ci,
        confusion=matrix,
        per_class=per_class,
        roc=roc,
        threshold=threshold,
        ece=expected_calibration_error(scores, true),
    )


def format_report(report: MetricReport) -> str:
    """Format a plain-text summary with the per-class table, for the console.

    :param report: the report.
    """
    averaging = f"positive class {report.positive_class!r}" if report.positive_class else "macro average"
    auc = "n/a" if report.auc is None else f"{report.auc:.4f}"
    if report.auc_ci:
        auc += f" (95% CI {report.auc_ci[0]:.4f}-{report.auc_ci[1]:.4f})"
    lines = [
        f"n = {report.n}, {averaging}",
        f"accuracy {report.accuracy:.4f}  precision {report.precision:.4f}  recall {report.recall:.4f}  "
        f"specificity {report.specificity:.4f}  F1 {report.f1:.4f}",
        f"MCC {report.mcc:.4f}  DIP {report.dip:.4f}  AUC {auc}"
        + ("" if report.ece is None else f"  ECE {report.ece:.4f}"),
        "",
        f"{'class':<14}{'precision':>10}{'recall':>10}{'specif.':>10}{'F1':>10}{'AUC':>10}{'support':>9}",
    ]
    for name, m in report.per_class.items():
        class_auc = "-" if m.auc is None else f"{m.auc:.4f}"
        lines.append(
            f"{name[:13]:<14}{m.precision:>10.4f}{m.recall:>10.4f}{m.specificity:>10.4f}{m.f1:>10.4f}"
            f"{class_auc:>10}{m.support:>9}"
        )
    return "\n".join(lines)


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_summary_json(
    report: MetricReport, path: str | Path, *, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write the report (plus ``extra``, e.g. temperatures, ECE before/after, the model id) as JSON.

    Non-finite numbers become null so that the file is strict JSON.

    :param report: the report.
    :param path: the output file (its folder is created).
    :param extra: more top-level fields.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = report.to_dict() | dict(extra or {})
    out.write_text(json.dumps(_json_ready(body), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------------
# Figures (OpenCV, so no plotting library is needed)

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_GREY = (200, 200, 200)
#: BGR colours for successive ROC curves.
_CURVE_COLOURS = (
    (180, 119, 31),
    (14, 127, 255),
    (44, 160, 44),
    (40, 39, 214),
    (189, 103, 148),
    (75, 86, 140),
)


def _text(
    image: np.ndarray,
    text: str,
    origin: tuple[int, int],
    scale: float = 0.5,
    colour: tuple[int, ...] = _BLACK,
    *,
    centre: bool = False,
    thickness: int = 1,
) -> None:
    (width, height), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x, y = origin
    if centre:
        x, y = x - width // 2, y + height // 2
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)


def render_confusion_matrix(
    matrix: Any, classes: Sequence[str], path: str | Path, *, title: str = "Confusion matrix"
) -> Path:
    """Draw the confusion matrix (counts and row percentages, true classes as rows) as a PNG.

    :param matrix: (K, K) counts.
    :param classes: class names.
    :param path: the PNG to write.
    :param title: the figure title.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"matrix shape {counts.shape} does not match {k} classes")
    cell = 110 if k <= 5 else 70
    left, top = 150, 80
    width, height = left + k * cell + 30, top + k * cell + 70
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    for i in range(k):
        for j in range(k):
            # White to dark blue by the row share, so each true class reads as its own distribution.
            t = float(shares[i, j])
            colour = tuple(round(255 + (c - 255) * t) for c in (107, 48, 8))
            x0, y0 = left + j * cell, top + i * cell
            cv2.rectangle(image, (x0, y0), (x0 + cell, y0 + cell), colour, -1)
            cv2.rectangle(image, (x0, y0), (x0 + cell, y0 + cell), _GREY, 1)
            ink = _WHITE if t > 0.5 else _BLACK
            _text(image, str(int(counts[i, j])), (x0 + cell // 2, y0 + cell // 2 - 10), 0.6, ink, centre=True)
            _text(image, f"{100 * t:.1f}%", (x0 + cell // 2, y0 + cell // 2 + 14), 0.45, ink, centre=True)
    for index, name in enumerate(classes):
        label = name if len(name) <= 16 else name[:15] + "."
        _text(image, label, (8, top + index * cell + cell // 2 + 5), 0.45)
        _text(image, label, (left + index * cell + cell // 2, top - 14), 0.45, centre=True)
    _text(image, title, (8, 26), 0.6, thickness=2)
    _text(image, "true (rows) / predicted (columns)", (8, height - 22), 0.45)
    return _write_png(image, path)


def render_roc_curves(curves: Mapping[str, RocCurve], path: str | Path, *, title: str = "ROC curve") -> Path:
    """Draw ROC curves, with the chance diagonal and each curve's AUC in the legend, as a PNG.

    :param curves: legend label -> curve (e.g. ``report.roc``).
    :param path: the PNG to write.
    :param title: the figure title.
    """
    size, margin = 420, 60
    width, height = size + 2 * margin, size + 2 * margin + 20
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    x0, y0 = margin, margin + 20

    def to_pixel(fpr: float, tpr: float) -> tuple[int, int]:
        return round(x0 + fpr * size), round(y0 + (1.0 - tpr) * size)

    for tick in np.linspace(0, 1, 6):
        x, _ = to_pixel(tick, 0)
        _, y = to_pixel(0, tick)
        cv2.line(image, (x, y0), (x, y0 + size), (235, 235, 235), 1)
        cv2.line(image, (x0, y), (x0 + size, y), (235, 235, 235), 1)
        _text(image, f"{tick:.1f}", (x, y0 + size + 16), 0.4, centre=True)
        _text(image, f"{tick:.1f}", (x0 - 34, y + 4), 0.4)
    cv2.rectangle(image, (x0, y0), (x0 + size, y0 + size), _BLACK, 1)
    for step in range(0, size, 12):
        cv2.line(
            image, (x0 + step, y0 + size - step), (x0 + step + 6, y0 + size - step - 6), (150, 150, 150), 1
        )
    for index, (name, curve) in enumerate(curves.items()):
        colour = _CURVE_COLOURS[index % len(_CURVE_COLOURS)]
        points = np.array([to_pixel(f, t) for f, t in zip(curve.fpr, curve.tpr, strict=True)], dtype=np.int32)
        cv2.polylines(image, [points], False, colour, 2, cv2.LINE_AA)
        legend_y = y0 + size - 16 - 20 * (len(curves) - 1 - index)
        cv2.line(image, (x0 + size - 200, legend_y - 4), (x0 + size - 176, legend_y - 4), colour, 2)
        _text(image, f"{name[:18]} (AUC {curve.auc:.3f})", (x0 + size - 170, legend_y), 0.42)
    _text(image, title, (x0, 30), 0.6, thickness=2)
    _text(image, "false positive rate", (x0 + size // 2, y0 + size + 36), 0.45, centre=True)
    rotated = np.full((24, 200, 3), 255, dtype=np.uint8)
    _text(rotated, "true positive rate", (100, 8), 0.45, centre=True)
    vertical = cv2.rotate(rotated, cv2.ROTATE_90_COUNTERCLOCKWISE)
    top = y0 + size // 2 - vertical.shape[0] // 2
    image[top : top + vertical.shape[0], 4 : 4 + vertical.shape[1]] = vertical
    return _write_png(image, path)


def _write_png(image: np.ndarray, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), image):
        raise OSError(f"could not write {out}")
    return out


# ---------------------------------------------------------------------------------------------------------
# The papers' reported numbers (from the "Reported results" section of each spec in shared/specs/)


@dataclass(frozen=True)
class PaperResult:
    """What one paper reports for one data set, as fractions in [0, 1] (AUC and DIP as usual)."""

    architecture: str
    dataset: str
    metrics: Mapping[str, float]
    std: Mapping[str, float] = field(default_factory=dict)
    note: str = ""


PAPER_RESULTS: tuple[PaperResult, ...] = (
    PaperResult(
        "asg_mammonet",
        "MIAS",
        {
            "accuracy": 0.9915,
            "precision": 0.9854,
            "recall": 0.9920,
            "specificity": 0.9913,
            "f1": 0.9887,
            "auc": 0.9963,
            "dip": 0.9901,
        },
        {
            "accuracy": 0.0042,
            "precision": 0.0074,
            "recall": 0.0053,
            "specificity": 0.0043,
            "f1": 0.0056,
            "auc": 0.0022,
            "dip": 0.0047,
        },
        "Table 3, mean ± std of 10 runs, 20% test split; probably leaks augmented images (spec §7): "
        "an upper bound",
    ),
    PaperResult(
        "asg_mammonet",
        "CBIS-DDSM",
        {
            "accuracy": 0.9978,
            "precision": 0.9982,
            "recall": 0.9978,
            "specificity": 0.9978,
            "f1": 0.9980,
            "auc": 0.9993,
            "dip": 0.9980,
        },
        {
            "accuracy": 0.0009,
            "precision": 0.0009,
            "recall": 0.0011,
            "specificity": 0.0011,
            "f1": 0.0008,
            "auc": 0.0005,
            "dip": 0.0007,
        },
        "Table 3, mass subset, mean ± std of 10 runs; an upper bound (spec §7)",
    ),
    PaperResult(
        "asg_mammonet",
        "INbreast",
        {
            "accuracy": 0.9964,
            "precision": 0.9979,
            "recall": 0.9968,
            "specificity": 0.9955,
            "f1": 0.9973,
            "auc": 0.9993,
            "dip": 0.9965,
        },
        {
            "accuracy": 0.0019,
            "precision": 0.0029,
            "recall": 0.0018,
            "specificity": 0.0061,
            "f1": 0.0014,
            "auc": 0.0012,
            "dip": 0.0025,
        },
        "Table 3, mean ± std of 10 runs; an upper bound (spec §7)",
    ),
    PaperResult(
        "clgb_net",
        "private (Anhui), test n=355",
        {
            "accuracy": 0.904,
            "precision": 0.900,
            "recall": 0.935,
            "f1": 0.900,
            "auc": 0.92,
            "auc[malignant]": 0.98,
            "auc[benign]": 0.91,
            "auc[normal]": 0.87,
        },
        {},
        "3 classes (normal/benign/malignant); macro averages; private data, not reproducible",
    ),
    PaperResult(
        "hybrid_birads",
        "INbreast BI-RADS (Kaggle), test",
        {
            "accuracy": 0.921,
            "f1": 0.920,
            "mcc": 0.903,
            "auc": 0.987,
            "f1[BI-RADS 4]": 0.923,
            "f1[BI-RADS 5]": 0.969,
            "auc[BI-RADS 3]": 1.000,
            "auc[BI-RADS 5]": 0.996,
        },
        {},
        "Table 3; macro F1, mean one-vs-rest AUC; ~62 test images: judge on accuracy 0.92 ± 0.04 "
        "and AUC >= 0.95",
    ),
    PaperResult(
        "lem",
        "INbreast, test",
        {"accuracy": 0.963, "auc": 0.976, "dice": 0.37},
        {},
        "best backbone (probably DenseNet-169); Dice of the localisation maps",
    ),
    PaperResult(
        "us_fusion",
        "BUSI",
        {"auc": 0.9834},
        {},
        "abstract only; benign vs malignant",
    ),
    PaperResult(
        "us_fusion",
        "private clinical (2171 images)",
        {"auc": 0.9320},
        {},
        "abstract only; private data, not reproducible",
    ),
)

_METRIC_ORDER = ("accuracy", "precision", "recall", "specificity", "f1", "mcc", "auc", "dip", "dice", "ece")


def _architecture_key(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def paper_results(architecture: str, dataset: str | None = None) -> list[PaperResult]:
    """Return one architecture's reported results, optionally of one data set (case-insensitive prefix).

    :param architecture: e.g. "asg_mammonet" or "ASG-MammoNet".
    :param dataset: e.g. "MIAS"; all data sets when None.
    """
    key = _architecture_key(architecture)
    results = [r for r in PAPER_RESULTS if r.architecture == key]
    if not results:
        known = sorted({r.architecture for r in PAPER_RESULTS})
        raise ValueError(f"no reported results for architecture {architecture!r}; known: {', '.join(known)}")
    if dataset is not None:
        results = [r for r in results if r.dataset.lower().startswith(dataset.strip().lower())]
        if not results:
            raise ValueError(f"{architecture} reports no results on a data set called {dataset!r}")
    return results


def _metric_sort_key(name: str) -> tuple[int, str]:
    base = name.split("[", 1)[0]
    rank = _METRIC_ORDER.index(base) if base in _METRIC_ORDER else len(_METRIC_ORDER)
    return (rank, name)


def format_comparison(
    ours: MetricReport | Mapping[str, float], architecture: str, dataset: str | None = None
) -> str:
    """Format a plain-text table of our metrics beside the paper's, a row per metric the paper reports.

    :param ours: our report, or a ``metric -> value`` mapping (e.g. ``report.flat() | {"dice": 0.41}``).
    :param architecture: the architecture whose paper to quote.
    :param dataset: quote only this data set of the paper.
    """
    values = ours.flat() if isinstance(ours, MetricReport) else dict(ours)
    results = paper_results(architecture, dataset)
    names = sorted({name for r in results for name in r.metrics}, key=_metric_sort_key)
    headers = ["metric", "ours"] + [f"paper: {r.dataset}" for r in results]
    rows = []
    for name in names:
        ours_value = values.get(name)
        row = [name, "—" if ours_value is None or not math.isfinite(ours_value) else f"{ours_value:.4f}"]
        for result in results:
            if name not in result.metrics:
                row.append("—")
            elif name in result.std:
                row.append(f"{result.metrics[name]:.4f} ± {result.std[name]:.4f}")
            else:
                row.append(f"{result.metrics[name]:.4f}")
        rows.append(row)
    widths = [max(len(str(line[i])) for line in [headers, *rows]) for i in range(len(headers))]
    out = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in [headers, *rows]
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.extend(f"note ({r.dataset}): {r.note}" for r in results if r.note)
    return "\n".join(out)
