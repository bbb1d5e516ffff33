"""The papers' evaluation metrics, calibration, report figures and the papers' own numbers.

Labels are integer class indices and scores are per-class probabilities ``(N, K)``.  The standard metrics
come from scikit-learn (confusion matrix, precision/recall/F1, MCC, ROC and AUC, calibration curves) and
the softmax, log-softmax and the temperature search from SciPy; figures are drawn with matplotlib.  What no
library has is written here: the DIP score of ASG-MammoNet, specificity, the expected calibration error,
the percentile-bootstrap CI of the AUC, Youden's threshold, decision-curve net benefit, and the papers'
comparison tables, which are data files in :mod:`training.paper_tables`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.special import softmax as scipy_softmax
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from sklearn.manifold import TSNE

__all__ = [
    "PAPER_RESULTS",
    "Calibration",
    "ClassMetrics",
    "DecisionCurve",
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
    "decision_curve",
    "dice",
    "dip_score",
    "expected_calibration_error",
    "f1_score",
    "fit_temperature",
    "format_comparison",
    "format_report",
    "mask_recall",
    "matthews_corrcoef",
    "mean_std",
    "negative_log_likelihood",
    "paper_results",
    "precision",
    "recall",
    "reliability_curves",
    "render_confusion_matrix",
    "render_decision_curve",
    "render_reliability",
    "render_roc_curves",
    "render_tsne",
    "roc_auc",
    "roc_auc_ovr",
    "roc_curve",
    "sensitivity",
    "softmax",
    "specificity",
    "tsne_embedding",
    "write_summary_json",
    "youden_threshold",
]


# ---------------------------------------------------------------------------------------------------------
# Input checks: our error messages before sklearn's


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


def _probabilities(probs: Any, n: int) -> np.ndarray:
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != n or array.shape[1] < 2:
        raise ValueError(f"probabilities must be (N={n}, K>=2), not shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("probabilities hold NaN or infinite values")
    return array


# ---------------------------------------------------------------------------------------------------------
# Confusion-matrix metrics (scikit-learn)


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
    return skm.confusion_matrix(true, pred, labels=np.arange(size))


def binary_counts(y_true: Any, y_pred: Any, positive: int = 1) -> tuple[int, int, int, int]:
    """(TN, FP, FN, TP) with ``positive`` as the positive class and every other class as negative.

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param positive: index of the positive class.
    """
    true, pred = _pair(y_true, y_pred)
    tn, fp, fn, tp = skm.multilabel_confusion_matrix(true, pred, labels=[positive])[0].ravel()
    return int(tn), int(fp), int(fn), int(tp)


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of correct predictions.

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    """
    return float(skm.accuracy_score(*_pair(y_true, y_pred)))


def precision(y_true: Any, y_pred: Any, positive: int = 1) -> float:
    """TP / (TP + FP) for class ``positive``; 0.0 when nothing is predicted positive.

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param positive: index of the positive class.
    """
    true, pred = _pair(y_true, y_pred)
    return float(skm.precision_score(true, pred, labels=[positive], average="macro", zero_division=0))


def recall(y_true: Any, y_pred: Any, positive: int = 1) -> float:
    """TP / (TP + FN) for class ``positive`` (sensitivity); 0.0 when the class is absent.

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param positive: index of the positive class.
    """
    true, pred = _pair(y_true, y_pred)
    return float(skm.recall_score(true, pred, labels=[positive], average="macro", zero_division=0))


sensitivity = recall


def specificity(y_true: Any, y_pred: Any, positive: int = 1) -> float:
    """TN / (TN + FP) for class ``positive``; 0.0 when there are no negatives (scikit-learn has no such
    function: it is the recall of "not positive").

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param positive: index of the positive class.
    """
    tn, fp, _, _ = binary_counts(y_true, y_pred, positive)
    return float(tn) / float(tn + fp) if tn + fp else 0.0


def f1_score(y_true: Any, y_pred: Any, positive: int = 1) -> float:
    """Harmonic mean of precision and recall for class ``positive`` (2TP / (2TP + FP + FN)).

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param positive: index of the positive class.
    """
    true, pred = _pair(y_true, y_pred)
    return float(skm.f1_score(true, pred, labels=[positive], average="macro", zero_division=0))


def matthews_corrcoef(y_true: Any, y_pred: Any, n_classes: int | None = None) -> float:
    """Matthews correlation coefficient in [-1, 1], multi-class by Gorodkin's R_K; 0.0 when undefined.

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param n_classes: number of classes (unused: absent classes add nothing to R_K).
    """
    return _mcc(*_pair(y_true, y_pred))


def _mcc(true: np.ndarray, pred: np.ndarray) -> float:
    if np.unique(np.concatenate([true, pred])).size < 2:
        return 0.0  # one class everywhere: R_K is 0/0, and sklearn warns before saying 0
    return float(skm.matthews_corrcoef(true, pred))


def dip_score(precision_value: float, recall_value: float) -> float:
    """ASG-MammoNet's Distance from the Ideal Position: ``1 - sqrt(((1-P)^2 + (1-R)^2) / 2)``, in [0, 1].

    :param precision_value: precision in [0, 1].
    :param recall_value: recall in [0, 1].
    """
    for name, value in (("precision", precision_value), ("recall", recall_value)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} {value} is not in [0, 1]")
    return 1.0 - math.sqrt(((1.0 - precision_value) ** 2 + (1.0 - recall_value) ** 2) / 2.0)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value), as the papers report repeated runs.

    :param values: one value per run or fold.
    """
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        raise ValueError("mean_std needs at least one finite value")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


# ---------------------------------------------------------------------------------------------------------
# ROC (scikit-learn)


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
    if target.all() or not target.any():
        raise ValueError("ROC needs both positive and negative samples")
    fpr, tpr, thresholds = skm.roc_curve(target, scores, drop_intermediate=False)
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=float(skm.auc(fpr, tpr)))


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
    return float(skm.roc_auc_score(target, scores))


def roc_auc_ovr(y_true: Any, probs: Any) -> tuple[float, dict[int, float]]:
    """Macro one-vs-rest AUC and the per-class AUCs; classes absent from ``y_true`` are left out.

    scikit-learn's ``roc_auc_score(multi_class="ovr")`` refuses a class absent from ``y_true``, which a
    small test split often lacks, so the per-class AUCs are computed one by one and averaged.

    :param y_true: class indices.
    :param probs: (N, K) class probabilities.
    """
    true = _labels(y_true)
    scores = _probabilities(probs, true.size)
    per_class = {
        k: float(skm.roc_auc_score(true == k, scores[:, k]))
        for k in range(scores.shape[1])
        if (true == k).any() and not (true == k).all()
    }
    if len(per_class) < 2:
        raise ValueError("one-vs-rest AUC needs at least two classes present")
    return float(np.mean(list(per_class.values()))), per_class


def youden_threshold(scores: Sequence[float], labels: Sequence[int]) -> float:
    """The score threshold maximising Youden's J = sensitivity + specificity - 1 (the ROC point farthest
    above the diagonal); predict positive when ``score >= threshold``.

    :param scores: positive-class scores, e.g. validation p(malignant).
    :param labels: 1 for positive.
    :raises ValueError: when the labels hold one class only.
    """
    target = _binary_target(labels, None)
    values = _scores(scores, target.size)
    if target.all() or not target.any():
        raise ValueError("Youden's J needs both classes in the labels")
    fpr, tpr, thresholds = skm.roc_curve(target, values, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    best = int(np.argmax(np.where(finite, tpr - fpr, -np.inf)))
    return float(thresholds[best])


# ---------------------------------------------------------------------------------------------------------
# Bootstrap confidence intervals (no library resamples with a skip rule for lost classes)


def _bootstrap_draws(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (math.nan, math.nan)
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


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
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha} must be in (0, 1)")
    true = np.asarray(y_true)
    other = np.asarray(y_other)
    values = np.full(n_boot, np.nan)
    for b, draw in enumerate(_bootstrap_draws(true.shape[0], n_boot, seed)):
        try:
            values[b] = metric(true[draw], other[draw])
        except ValueError:
            continue
    return _percentile_interval(values, alpha)


def bootstrap_auc_ci(
    y_true: Any,
    y_score: Any,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    positive: int | None = None,
) -> tuple[float, float]:
    """Percentile-bootstrap (1 - alpha) CI of the AUC; macro OvR when ``y_score`` is (N, K>2).

    Resamples in which a class is missing are skipped.

    :param y_true: class indices.
    :param y_score: positive-class scores (N,), or (N, K) probabilities (binary: column 1 or ``positive``).
    :param n_boot: number of resamples.
    :param alpha: 0.05 gives a 95 % interval.
    :param seed: the resampling seed.
    :param positive: positive class for binary scores.
    """
    true = _labels(y_true)
    scores = np.asarray(y_score, dtype=np.float64)
    if scores.ndim == 2 and scores.shape[1] == 2:
        scores = scores[:, 1 if positive is None else positive]
        positive = 1 if positive is None else positive
    if scores.ndim == 1:
        target = _binary_target(true, positive).astype(np.int64)
        return bootstrap_ci(
            roc_auc, target, _scores(scores, true.size), n_boot=n_boot, alpha=alpha, seed=seed
        )
    probs = _probabilities(scores, true.size)
    present = [k for k in range(probs.shape[1]) if (true == k).any()]

    def macro_auc(labels: np.ndarray, resampled: np.ndarray) -> float:
        # A resample that lost one of the classes present in the data is skipped, as in the binary case.
        if not all((labels == k).any() and not (labels == k).all() for k in present):
            raise ValueError("a class is missing from this resample")
        return float(np.mean([skm.roc_auc_score(labels == k, resampled[:, k]) for k in present]))

    return bootstrap_ci(macro_auc, true, probs, n_boot=n_boot, alpha=alpha, seed=seed)


# ---------------------------------------------------------------------------------------------------------
# Masks: Dice is the F1 score of the pixels, the pixel recall their recall


def _masks(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a.ravel(), b.ravel()


def dice(pred: Any, target: Any) -> float:
    """Dice similarity 2|A∩B| / (|A| + |B|) of two boolean masks; 1.0 when both are empty.

    :param pred: predicted mask.
    :param target: reference mask, same shape.
    """
    a, b = _masks(pred, target)
    return float(skm.f1_score(b, a, zero_division=1.0))


def mask_recall(pred: Any, target: Any) -> float:
    """Pixel recall |A∩B| / |B| of the reference mask (LEM's localisation recall); 1.0 for an empty target.

    :param pred: predicted mask.
    :param target: reference mask, same shape.
    """
    a, b = _masks(pred, target)
    return float(skm.recall_score(b, a, zero_division=1.0))


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
    probabilities: np.ndarray = scipy_softmax(_logits(logits) / temperature, axis=1)
    return probabilities


def negative_log_likelihood(logits: Any, y_true: Any, temperature: float = 1.0) -> float:
    """Mean cross-entropy of the tempered softmax.

    :param logits: (N, K) or (N,) logits.
    :param y_true: class indices.
    :param temperature: positive temperature.
    """
    z = _logits(logits)
    true = _labels(y_true)
    if true.size != z.shape[0]:
        raise ValueError(f"{z.shape[0]} logits but {true.size} labels")
    log_p = log_softmax(z / temperature, axis=1)
    return float(-np.mean(log_p[np.arange(true.size), true]))


def fit_temperature(logits: Any, y_true: Any, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Fit the temperature that minimises the validation NLL (Guo et al. 2017) within ``bounds``.

    The NLL is convex in 1/T, hence unimodal in log T, so SciPy's bounded scalar search finds the minimum;
    the bounds themselves are candidates too, for data that pushes T to an end (separable data).

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

    def nll(log_t: float) -> float:
        return negative_log_likelihood(z, true, math.exp(log_t))

    ends = (math.log(low_t), math.log(high_t))
    found = minimize_scalar(nll, bounds=ends, method="bounded", options={"xatol": 1e-8})
    return math.exp(min((float(found.x), *ends), key=nll))


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

    scikit-learn has calibration curves but no ECE; this is the one-line weighted sum over its bins.

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
    correct = (array.argmax(axis=1) == true).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(
        bins, weights=confidence, minlength=n_bins
    )
    return float(np.abs(gap).sum() / counts.sum())


def reliability_curves(
    y_true: Any, probs: Any, classes: Sequence[str], *, n_bins: int = 10
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One-vs-rest reliability curves (observed frequency against mean predicted probability, per bin)
    from :func:`sklearn.calibration.calibration_curve`; classes absent from *y_true* are left out.

    :param y_true: class indices.
    :param probs: (N, K) probabilities.
    :param classes: class names in column order.
    :param n_bins: equal-width bins.
    :returns: class name -> (mean predicted probability, observed frequency).
    """
    true = _labels(y_true)
    scores = _probabilities(probs, true.size)
    curves = {}
    for k, name in enumerate(classes):
        if (true == k).any():
            observed, predicted = calibration_curve(
                true == k, scores[:, k], n_bins=n_bins, strategy="uniform"
            )
            curves[name] = (predicted, observed)
    return curves


# ---------------------------------------------------------------------------------------------------------
# Decision-curve analysis (Vickers and Elkin 2006): no library in our stack has it


@dataclass(frozen=True)
class DecisionCurve:
    """Net benefit of acting on the model, on everyone and on no one, at each threshold probability."""

    thresholds: np.ndarray
    model: np.ndarray
    treat_all: np.ndarray

    def to_dict(self) -> dict[str, list[float]]:
        """Return the curves as JSON-ready lists (treat-none is 0 everywhere)."""
        return {
            "thresholds": self.thresholds.tolist(),
            "model": self.model.tolist(),
            "treat_all": self.treat_all.tolist(),
        }


def decision_curve(y_true: Any, y_score: Any, thresholds: Sequence[float] | None = None) -> DecisionCurve:
    """Net benefit ``TP/N - FP/N * p_t / (1 - p_t)`` of flagging the images whose score is >= ``p_t``.

    :param y_true: 1 for positive.
    :param y_score: the probability of the positive outcome (e.g. the risk of BI-RADS 4-5).
    :param thresholds: threshold probabilities in (0, 1); 0.01 to 0.99 by default.
    """
    target = _binary_target(y_true, None)
    scores = _scores(y_score, target.size)
    points = np.arange(0.01, 1.0, 0.01) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if np.any((points <= 0) | (points >= 1)):
        raise ValueError("decision-curve thresholds must lie strictly between 0 and 1")
    n = target.size
    odds = points / (1.0 - points)
    flagged = scores[None, :] >= points[:, None]
    tp = (flagged & target[None, :]).sum(axis=1)
    fp = (flagged & ~target[None, :]).sum(axis=1)
    prevalence = target.mean()
    return DecisionCurve(
        thresholds=points,
        model=tp / n - fp / n * odds,
        treat_all=prevalence - (1.0 - prevalence) * odds,
    )


def tsne_embedding(features: Any, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE of per-image feature vectors (:class:`sklearn.manifold.TSNE`), as the hybrid paper plots.

    :param features: (N, D) vectors, e.g. the model's logits.
    :param seed: the embedding's random state.
    :param perplexity: t-SNE perplexity, lowered to (N - 1) / 3 for small sets.
    """
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 4:
        raise ValueError(f"t-SNE needs (N >= 4, D) features, not shape {array.shape}")
    perplexity = min(perplexity, (array.shape[0] - 1) / 3.0)
    embedding: np.ndarray = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed
    ).fit_transform(array)
    return embedding


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
    classes = list(classes)
    if positive_class is None and k == 2:
        positive_class = classes[1]
    if positive_class is not None and positive_class not in classes:
        raise ValueError(f"positive class {positive_class!r} is not one of {classes}")
    positive = classes.index(positive_class) if positive_class is not None else None
    if threshold is not None:
        if positive is None:
            raise ValueError("a threshold needs a positive class")
        others = scores.copy()
        others[:, positive] = -np.inf
        pred = np.where(scores[:, positive] >= threshold, positive, others.argmax(axis=1))
    else:
        pred = scores.argmax(axis=1)
    labels = np.arange(k)
    p_all, r_all, f_all, support = skm.precision_recall_fscore_support(
        true, pred, labels=labels, average=None, zero_division=0
    )
    tn, fp = (skm.multilabel_confusion_matrix(true, pred, labels=labels)[:, 0, j] for j in (0, 1))
    s_all = np.divide(tn, tn + fp, out=np.zeros(k), where=(tn + fp) > 0)
    per_class: dict[str, ClassMetrics] = {}
    roc: dict[str, RocCurve] = {}
    for index, name in enumerate(classes):
        target = true == index
        auc = None
        if target.any() and not target.all():
            roc[name] = roc_curve(target.astype(np.int64), scores[:, index])
            auc = roc[name].auc
        per_class[name] = ClassMetrics(
            precision=float(p_all[index]),
            recall=float(r_all[index]),
            specificity=float(s_all[index]),
            f1=float(f_all[index]),
            support=int(support[index]),
            auc=auc,
        )
    auc_value: float | None
    auc_ci: tuple[float, float] | None = None
    if positive is not None:
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
        accuracy=float(skm.accuracy_score(true, pred)),
        precision=p,
        recall=r,
        specificity=s,
        f1=f,
        mcc=_mcc(true, pred),
        dip=dip_score(p, r),
        auc=auc_value,
        auc_ci=auc_ci,
        confusion=skm.confusion_matrix(true, pred, labels=labels),
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
# Figures (matplotlib's object API: no pyplot state, no display needed)


def _figure(title: str, size: tuple[float, float] = (5.5, 5.0)) -> tuple[Figure, Any]:
    figure = Figure(figsize=size, dpi=110, layout="constrained")
    axes = figure.subplots()
    axes.set_title(title)
    return figure, axes


def _save(figure: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out


def render_confusion_matrix(
    matrix: Any, classes: Sequence[str], path: str | Path, *, title: str = "Confusion matrix"
) -> Path:
    """Draw the confusion matrix (counts, coloured by the row share; true classes as rows) as a PNG.

    :param matrix: (K, K) counts.
    :param classes: class names.
    :param path: the PNG to write.
    :param title: the figure title.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"matrix shape {counts.shape} does not match {k} classes")
    figure, axes = _figure(title)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ink = "white" if shares[i, j] > 0.5 else "black"
            axes.text(j, i, f"{counts[i, j]}\n{100 * shares[i, j]:.1f}%", ha="center", va="center", color=ink)
    axes.set_xticks(range(k), labels=list(classes), rotation=30, ha="right")
    axes.set_yticks(range(k), labels=list(classes))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    return _save(figure, path)


def render_roc_curves(curves: Mapping[str, RocCurve], path: str | Path, *, title: str = "ROC curve") -> Path:
    """Draw ROC curves, with the chance diagonal and each curve's AUC in the legend, as a PNG.

    :param curves: legend label -> curve (e.g. ``report.roc``).
    :param path: the PNG to write.
    :param title: the figure title.
    """
    figure, axes = _figure(title)
    for name, curve in curves.items():
        skm.RocCurveDisplay(fpr=curve.fpr, tpr=curve.tpr, roc_auc=curve.auc, name=name).plot(ax=axes)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(title)
    return _save(figure, path)


def render_reliability(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, *, title: str = "Reliability"
) -> Path:
    """Draw reliability curves (observed frequency against predicted probability) with the diagonal.

    :param curves: from :func:`reliability_curves`.
    :param path: the PNG to write.
    :param title: the figure title.
    """
    figure, axes = _figure(title)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    for name, (predicted, observed) in curves.items():
        axes.plot(predicted, observed, marker="o", label=name)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("mean predicted probability")
    axes.set_ylabel("observed frequency")
    axes.legend(loc="upper left", fontsize="small")
    return _save(figure, path)


def render_decision_curve(curve: DecisionCurve, path: str | Path, *, title: str = "Decision curve") -> Path:
    """Draw net benefit against threshold probability for the model, treat-all and treat-none.

    :param curve: from :func:`decision_curve`.
    :param path: the PNG to write.
    :param title: the figure title.
    """
    figure, axes = _figure(title)
    axes.plot(curve.thresholds, curve.model, label="model")
    axes.plot(curve.thresholds, curve.treat_all, label="treat all", linestyle=":")
    axes.axhline(0.0, color="grey", linewidth=1, label="treat none")
    top = float(max(np.max(curve.model), np.max(curve.treat_all), 0.0))
    axes.set_ylim(-0.05 * max(top, 0.1), max(top, 0.1) * 1.1)
    axes.set_xlabel("threshold probability")
    axes.set_ylabel("net benefit")
    axes.legend(fontsize="small")
    return _save(figure, path)


def render_tsne(
    embedding: Any, y_true: Any, classes: Sequence[str], path: str | Path, *, title: str = "t-SNE"
) -> Path:
    """Scatter a 2-D embedding coloured by true class.

    :param embedding: (N, 2) from :func:`tsne_embedding`.
    :param y_true: class indices.
    :param classes: class names.
    :param path: the PNG to write.
    :param title: the figure title.
    """
    points = np.asarray(embedding, dtype=np.float64)
    true = _labels(y_true)
    figure, axes = _figure(title)
    for k, name in enumerate(classes):
        members = true == k
        if members.any():
            axes.scatter(points[members, 0], points[members, 1], s=12, label=name)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(fontsize="small", markerscale=1.5)
    return _save(figure, path)


# ---------------------------------------------------------------------------------------------------------
# The papers' reported numbers: one JSON file per architecture in training/paper_tables/


@dataclass(frozen=True)
class PaperResult:
    """What one paper reports for one data set, as fractions in [0, 1] (AUC and DIP as usual)."""

    architecture: str
    dataset: str
    metrics: Mapping[str, float]
    std: Mapping[str, float] = field(default_factory=dict)
    note: str = ""


def _load_paper_tables() -> tuple[PaperResult, ...]:
    results: list[PaperResult] = []
    for entry in sorted(resources.files("training.paper_tables").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        table = json.loads(entry.read_text(encoding="utf-8"))
        results.extend(
            PaperResult(
                architecture=table["architecture"],
                dataset=row["dataset"],
                metrics=row["metrics"],
                std=row.get("std", {}),
                note=row.get("note", ""),
            )
            for row in table["results"]
        )
    return tuple(results)


#: Every paper's reported results, read from the package's data files.
PAPER_RESULTS: tuple[PaperResult, ...] = _load_paper_tables()

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
