"""Tests of the metrics: hand-computed cases, identities, calibration, figures, paper table."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import metrics as m

# ---------------------------------------------------------------------------------------------------------
# Confusion-matrix metrics


def test_hand_computed_binary_case() -> None:
    # TN=3, FP=1, FN=2, TP=4.
    y_true = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    y_pred = [0, 0, 0, 1, 0, 0, 1, 1, 1, 1]
    assert m.binary_counts(y_true, y_pred) == (3, 1, 2, 4)
    np.testing.assert_array_equal(m.confusion_matrix(y_true, y_pred), [[3, 1], [2, 4]])
    assert m.accuracy(y_true, y_pred) == pytest.approx(0.7)
    assert m.precision(y_true, y_pred) == pytest.approx(4 / 5)
    assert m.recall(y_true, y_pred) == m.sensitivity(y_true, y_pred) == pytest.approx(4 / 6)
    assert m.specificity(y_true, y_pred) == pytest.approx(3 / 4)
    assert m.f1_score(y_true, y_pred) == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    expected_mcc = (4 * 3 - 1 * 2) / math.sqrt((4 + 1) * (4 + 2) * (3 + 1) * (3 + 2))
    assert m.matthews_corrcoef(y_true, y_pred) == pytest.approx(expected_mcc)


def test_zero_division_gives_zero_and_bad_input_is_named() -> None:
    assert m.precision([0, 1], [0, 0]) == 0.0
    assert m.recall([0, 0], [0, 1]) == 0.0
    assert m.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        m.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="integer class indices"):
        m.accuracy([0.5, 1], [0, 1])


def test_mcc_extremes_and_multiclass() -> None:
    y = [0, 1, 2, 0, 1, 2]
    assert m.matthews_corrcoef(y, y) == pytest.approx(1.0)
    assert m.matthews_corrcoef([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(-1.0)
    # Gorodkin's R_K by hand on a 3x3 matrix [[2,1,0],[0,2,1],[1,0,2]]: c=6, s=9, p=t=(3,3,3).
    y_true = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 1, 2, 2, 2, 0]
    assert m.matthews_corrcoef(y_true, y_pred) == pytest.approx((6 * 9 - 27) / (81 - 27))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=60),
)
def test_mcc_is_bounded_and_accuracy_matches_the_diagonal(pairs: list[tuple[int, int]]) -> None:
    y_true, y_pred = zip(*pairs, strict=True)
    mcc = m.matthews_corrcoef(y_true, y_pred, 4)
    assert -1.0 <= mcc <= 1.0
    matrix = m.confusion_matrix(y_true, y_pred, 4)
    assert matrix.sum() == len(pairs)
    assert m.accuracy(y_true, y_pred) == pytest.approx(np.trace(matrix) / len(pairs))


def test_dip_score_edges_and_the_papers_check() -> None:
    assert m.dip_score(1.0, 1.0) == 1.0
    assert m.dip_score(0.0, 0.0) == pytest.approx(0.0)
    assert m.dip_score(1.0, 0.0) == pytest.approx(1 - math.sqrt(0.5))
    assert m.dip_score(0.3, 0.8) == m.dip_score(0.8, 0.3)
    # Spec §7: CBIS-DDSM P = 0.9982, R = 0.9978 gives 0.99799, reported as 0.9980.
    assert m.dip_score(0.9982, 0.9978) == pytest.approx(0.99799, abs=1e-5)
    with pytest.raises(ValueError, match="precision"):
        m.dip_score(1.2, 0.5)


# ---------------------------------------------------------------------------------------------------------
# ROC and AUC


def test_auc_identities() -> None:
    y = [0, 0, 0, 1, 1, 1]
    assert m.roc_auc(y, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]) == 1.0
    assert m.roc_auc(y, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]) == 0.0
    assert m.roc_auc(y, [0.5] * 6) == 0.5
    # One tie between a positive and a negative counts one half: 8.5 of 9 pairs.
    assert m.roc_auc(y, [0.1, 0.2, 0.7, 0.7, 0.8, 0.9]) == pytest.approx(8.5 / 9)
    with pytest.raises(ValueError, match="both positive and negative"):
        m.roc_auc([1, 1], [0.2, 0.3])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=2, max_size=40).filter(
        lambda rows: 0 < sum(label for label, _ in rows) < len(rows)
    )
)
def test_auc_is_the_mann_whitney_statistic_and_the_curve_area(rows: list[tuple[bool, int]]) -> None:
    y = np.array([int(label) for label, _ in rows])
    scores = np.array([float(score) for _, score in rows])
    positives, negatives = scores[y == 1], scores[y == 0]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(positives, negatives)]
    expected = float(np.mean(pairs))
    assert m.roc_auc(y, scores) == pytest.approx(expected)
    curve = m.roc_curve(y, scores)
    assert curve.auc == pytest.approx(expected)
    assert curve.fpr[0] == curve.tpr[0] == 0.0 and curve.fpr[-1] == curve.tpr[-1] == 1.0
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.tpr) >= 0)
    # AUC depends only on the order of the scores.
    assert m.roc_auc(y, np.exp(scores) * 3 + 1) == pytest.approx(expected)


def test_ovr_auc_and_bootstrap_ci() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    logits = rng.normal(0, 1, (400, 3))
    logits[np.arange(400), y] += 1.5
    probs = m.softmax(logits)
    macro, per_class = m.roc_auc_ovr(y, probs)
    assert set(per_class) == {0, 1, 2}
    assert macro == pytest.approx(np.mean([m.roc_auc((y == k).astype(int), probs[:, k]) for k in range(3)]))
    low, high = m.bootstrap_auc_ci(y, probs, n_boot=300, seed=5)
    assert low < macro < high and high - low < 0.15
    assert m.bootstrap_auc_ci(y, probs, n_boot=300, seed=5) == (low, high)


def test_binary_bootstrap_matches_the_generic_bootstrap_and_narrows_with_n() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    scores = y + rng.normal(0, 1.2, 300)
    fast = m.bootstrap_auc_ci(y, scores, n_boot=200, seed=3)
    slow = m.bootstrap_ci(m.roc_auc, y, scores, n_boot=200, seed=3)
    assert fast == pytest.approx(slow)
    assert fast[0] < m.roc_auc(y, scores) < fast[1]
    y_big = rng.integers(0, 2, 3000)
    scores_big = y_big + rng.normal(0, 1.2, 3000)
    big = m.bootstrap_auc_ci(y_big, scores_big, n_boot=200, seed=3)
    assert big[1] - big[0] < (fast[1] - fast[0]) / 2


# ---------------------------------------------------------------------------------------------------------
# Masks


def test_dice_and_recall() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    assert m.dice(a, b) == 1.0 and m.mask_recall(a, b) == 1.0
    a[:5] = True
    assert m.dice(a, a) == 1.0 and m.dice(a, ~a) == 0.0
    b[:, :5] = True  # overlap 25, |A| = |B| = 50
    assert m.dice(a, b) == pytest.approx(0.5) and m.mask_recall(a, b) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        m.dice(a, np.zeros((5, 5), bool))


# ---------------------------------------------------------------------------------------------------------
# Calibration


def _calibrated_logits(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true class distribution the labels are drawn from."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, k))
    probs = m.softmax(logits)
    y = np.array([rng.choice(k, p=p) for p in probs])
    return logits, y


def test_ece_is_small_when_calibrated_and_large_when_overconfident() -> None:
    logits, y = _calibrated_logits(4000, 3, 0)
    assert m.expected_calibration_error(m.softmax(logits), y) < 0.03
    assert m.expected_calibration_error(m.softmax(logits * 4), y) > 0.15
    # A binary model's probabilities of class 1 can be passed as a vector.
    binary = m.softmax(logits[:, :2])
    assert m.expected_calibration_error(binary[:, 1], (y == 1).astype(int)) == pytest.approx(
        m.expected_calibration_error(binary, (y == 1).astype(int))
    )


def test_temperature_scaling_fixes_overconfident_logits() -> None:
    logits, y = _calibrated_logits(3000, 3, 1)
    assert m.fit_temperature(logits, y) == pytest.approx(1.0, abs=0.15)
    overconfident = logits * 3.0
    temperature = m.fit_temperature(overconfident, y)
    assert temperature == pytest.approx(3.0, rel=0.15)
    assert m.negative_log_likelihood(overconfident, y, temperature) < m.negative_log_likelihood(
        overconfident, y
    )
    before = m.expected_calibration_error(m.softmax(overconfident), y)
    after = m.expected_calibration_error(m.softmax(overconfident, temperature), y)
    assert after < before / 2
    # The fitted T is the NLL minimum: nudging it either way does not help.
    best = m.negative_log_likelihood(overconfident, y, temperature)
    assert best <= m.negative_log_likelihood(overconfident, y, temperature * 1.05) + 1e-12
    assert best <= m.negative_log_likelihood(overconfident, y, temperature / 1.05) + 1e-12
    summary = m.calibrate(overconfident, y)
    assert summary.temperature == pytest.approx(temperature)
    assert summary.nll_after < summary.nll_before and summary.ece_after < summary.ece_before / 2
    assert set(summary.to_dict()) == {"temperature", "nll_before", "nll_after", "ece_before", "ece_after"}
    # Argmax, hence accuracy, is unchanged by a temperature.
    np.testing.assert_array_equal(m.softmax(overconfident, temperature).argmax(1), overconfident.argmax(1))


def test_temperature_for_single_binary_logits_and_bounds() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, 2000)
    y = (rng.random(2000) < 1 / (1 + np.exp(-z))).astype(int)
    assert m.fit_temperature(z * 5, y) == pytest.approx(5.0, rel=0.2)
    assert m.softmax(z).shape == (2000, 2)
    # Perfectly separable data pushes T to the lower bound rather than diverging.
    assert m.fit_temperature(np.array([-3.0, 3.0]), np.array([0, 1]), bounds=(0.1, 10)) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------
# Report, figures, JSON


def _binary_predictions(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1, n))))
    return y, np.stack([1 - p, p], axis=1)


def test_binary_report_uses_the_positive_class(tmp_path: Path) -> None:
    y, probs = _binary_predictions()
    report = m.classification_report(y, probs, ["benign", "malignant"], n_bootstrap=200)
    pred = probs.argmax(1)
    assert report.positive_class == "malignant"
    assert report.precision == pytest.approx(m.precision(y, pred))
    assert report.specificity == pytest.approx(m.specificity(y, pred))
    assert report.auc == pytest.approx(m.roc_auc(y, probs[:, 1]))
    assert report.auc_ci is not None and report.auc_ci[0] < report.auc < report.auc_ci[1]
    assert report.dip == pytest.approx(m.dip_score(report.precision, report.recall))
    assert report.per_class["benign"].recall == pytest.approx(report.specificity)
    assert report.per_class["malignant"].support == int(y.sum())
    strict = m.classification_report(y, probs, ["benign", "malignant"], threshold=0.9, n_bootstrap=0)
    assert strict.recall < report.recall and strict.specificity > report.specificity and strict.auc_ci is None
    text = m.format_report(report)
    assert "malignant" in text and "AUC" in text and "95% CI" in text
    summary = m.write_summary_json(
        report, tmp_path / "out" / "summary.json", extra={"temperature": 1.7, "x": math.nan}
    )
    loaded = json.loads(summary.read_text())
    assert loaded["auc"] == pytest.approx(report.auc) and loaded["temperature"] == 1.7 and loaded["x"] is None
    assert loaded["confusion_matrix"] == report.confusion.tolist()


def test_multiclass_report_macro_averages() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), y] += 2
    classes = ["normal", "benign", "malignant"]
    report = m.classification_report(y, m.softmax(logits), classes, n_bootstrap=100)
    assert report.positive_class is None
    assert report.recall == pytest.approx(np.mean([report.per_class[c].recall for c in classes]))
    assert report.auc == pytest.approx(m.roc_auc_ovr(y, m.softmax(logits))[0])
    assert set(report.roc) == set(classes)
    assert report.confusion.sum() == 300 and report.mcc > 0.5


def test_figures_are_written(tmp_path: Path) -> None:
    y, probs = _binary_predictions()
    report = m.classification_report(y, probs, ["benign", "malignant"], n_bootstrap=0)
    cm_path = m.render_confusion_matrix(report.confusion, report.classes, tmp_path / "cm.png")
    roc_path = m.render_roc_curves(report.roc, tmp_path / "roc.png", title="ROC (test)")
    for path in (cm_path, roc_path):
        image = cv2.imread(str(path))
        assert image is not None and image.shape[0] > 200 and image.shape[1] > 200
        assert image.std() > 10  # something was drawn
    with pytest.raises(ValueError, match="does not match"):
        m.render_confusion_matrix(report.confusion, ["a", "b", "c"], tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------------------
# The papers' table


def test_paper_table_is_consistent_with_its_own_dip() -> None:
    cbis = m.paper_results("ASG-MammoNet", "CBIS")[0]
    assert m.dip_score(cbis.metrics["precision"], cbis.metrics["recall"]) == pytest.approx(
        cbis.metrics["dip"], abs=1e-4
    )
    architectures = {r.architecture for r in m.PAPER_RESULTS}
    assert architectures == {"asg_mammonet", "clgb_net", "hybrid_birads", "lem", "us_fusion"}
    for result in m.PAPER_RESULTS:
        assert all(0.0 <= v <= 1.0 for v in result.metrics.values()), result


def test_format_comparison_puts_ours_beside_the_paper() -> None:
    y, probs = _binary_predictions()
    report = m.classification_report(y, probs, ["benign", "malignant"], n_bootstrap=0)
    table = m.format_comparison(report, "asg_mammonet")
    header = table.splitlines()[0]
    assert "ours" in header and "paper: MIAS" in header and "paper: INbreast" in header
    assert f"{report.accuracy:.4f}" in table and "0.9915 ± 0.0042" in table
    lem = m.format_comparison(report.flat() | {"dice": 0.41}, "lem")
    assert "0.4100" in lem and "0.3700" in lem
    only_busi = m.format_comparison({"auc": 0.9}, "US-Fusion", "busi")
    assert "paper: BUSI" in only_busi and "private" not in only_busi.splitlines()[0]
    birads = m.format_comparison({"accuracy": 0.8}, "hybrid_birads")
    assert "mcc" in birads and "—" in birads
    with pytest.raises(ValueError, match="known"):
        m.paper_results("vgg16")


# ---------------------------------------------------------------------------------------------------------
# Operating points and the papers' extra figures


def test_youden_threshold_is_the_roc_point_farthest_above_the_diagonal() -> None:
    assert m.youden_threshold([0.1, 0.2, 0.3, 0.6, 0.7, 0.9], [0, 0, 0, 1, 1, 1]) == 0.6
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    scores = y + rng.normal(0, 1.0, 300)
    threshold = m.youden_threshold(scores, y)
    pred = (scores >= threshold).astype(int)
    best = m.recall(y, pred) + m.specificity(y, pred) - 1
    for other in np.unique(scores):
        alternative = (scores >= other).astype(int)
        assert m.recall(y, alternative) + m.specificity(y, alternative) - 1 <= best + 1e-12
    with pytest.raises(ValueError, match="both classes"):
        m.youden_threshold([0.2, 0.4], [1, 1])


def test_decision_curve_net_benefit() -> None:
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    perfect = m.decision_curve(y, y.astype(float), thresholds=[0.1, 0.5])
    # A perfect model flags the two positives only: net benefit = prevalence at every threshold.
    np.testing.assert_allclose(perfect.model, [0.2, 0.2])
    np.testing.assert_allclose(perfect.treat_all, [0.2 - 0.8 * (0.1 / 0.9), 0.2 - 0.8])
    useless = m.decision_curve(y, np.full(10, 0.5), thresholds=[0.3])
    np.testing.assert_allclose(useless.model, useless.treat_all)  # flags everyone, like treat-all
    with pytest.raises(ValueError, match="strictly between"):
        m.decision_curve(y, y, thresholds=[1.0])


def test_reliability_curves_follow_the_diagonal_when_calibrated_and_tsne_separates_classes(
    tmp_path: Path,
) -> None:
    logits, y = _calibrated_logits(3000, 3, 5)
    curves = m.reliability_curves(y, m.softmax(logits), ["a", "b", "c"])
    assert set(curves) == {"a", "b", "c"}
    for predicted, observed in curves.values():
        assert np.all(np.abs(predicted - observed) < 0.1)
    overconfident = m.reliability_curves(y, m.softmax(logits * 4), ["a", "b", "c"])
    assert max(np.abs(p - o).max() for p, o in overconfident.values()) > 0.15
    rng = np.random.default_rng(6)
    labels = np.repeat([0, 1], 30)
    features = rng.normal(0, 0.3, (60, 5)) + labels[:, None] * 4.0
    embedding = m.tsne_embedding(features)
    centres = [embedding[labels == k].mean(axis=0) for k in (0, 1)]
    spread = max(embedding[labels == k].std(axis=0).max() for k in (0, 1))
    assert np.linalg.norm(centres[0] - centres[1]) > 2 * spread
    figures = [
        m.render_reliability(curves, tmp_path / "reliability.png"),
        m.render_decision_curve(m.decision_curve(labels, labels * 0.8 + 0.1), tmp_path / "dca.png"),
        m.render_tsne(embedding, labels, ["benign", "malignant"], tmp_path / "tsne.png"),
    ]
    for path in figures:
        image = cv2.imread(str(path))
        assert image is not None and image.std() > 10


def test_mean_std_of_repeated_runs() -> None:
    assert m.mean_std([0.9, 0.8, 1.0]) == (pytest.approx(0.9), pytest.approx(0.1))
    assert m.mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        m.mean_std([])
