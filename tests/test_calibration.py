"""Calibration that corrects a shift in class prior, and operating points that keep their word.

The recipes train with balanced samplers and class weights, so a raw p(malignant) is calibrated (if at
all) at the training prior, not at the prevalence the model is used at.  ``pacs-triage train
--prevalence P`` fits Platt scaling (with an intercept) or isotonic regression on the held-out split
reweighted to P, and stores that calibrator and the operating points in the checkpoint; the host serves
the calibrated risk.  These tests measure what docs/training.md claims: the reliability (ECE) at the
stated prevalence before and after, and that each stored operating point gives its stated sensitivity
on held-out images, within the sampling error of the sample sizes involved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gateway.settings import PluginSettings, Settings
from plugins.host import ModelHost
from plugins.preprocess import read_image_ref
from plugins.synthetic import write_dataset_dir
from plugins.types import (
    HIGH_SENSITIVITY,
    HIGH_SPECIFICITY,
    PROBABILITY_OF_CANCER,
    OperatingPoint,
    Prediction,
    RiskCalibrator,
)
from plugins.weights import checkpoint_spec, load_checkpoint
from training.calibration import (
    CalibrationReport,
    choose_operating_points,
    fit_calibrator,
    prevalence_weights,
    reliability_at_prevalence,
)
from training.datasets import load_generic_csv
from training.evaluate import evaluate_checkpoint
from training.registry import recipe_class
from training.trainer import TrainConfig, train

SEED = 11
#: The deployment prevalence the tests state: far from the balanced prior the recipes train at.
PREVALENCE = 0.2


def sampling_error(rate: float, n: int) -> float:
    """Three standard errors of a proportion *rate* measured on *n* samples (rate kept off 0 and 1)."""
    rate = min(max(rate, 0.05), 0.95)
    return 3 * math.sqrt(rate * (1 - rate) / n)


def balanced_prior_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a model trained at a 50 % prior (balanced log-odds plus noise), half of them positive."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    log_odds = rng.normal(np.where(labels == 1, 1.0, -1.0), 1.2)
    return 1 / (1 + np.exp(-log_odds)), labels


def test_prevalence_weights_give_the_stated_prevalence() -> None:
    labels = np.array([1] * 30 + [0] * 70)
    weights = prevalence_weights(labels, 0.05)
    assert weights.sum() == pytest.approx(labels.size)
    assert weights[labels == 1].sum() / weights.sum() == pytest.approx(0.05)
    with pytest.raises(ValueError):
        prevalence_weights(labels, 1.0)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_removes_the_prior_shift_on_fresh_samples(method: str) -> None:
    held_out, labels = balanced_prior_scores(2000, seed=1)
    fresh, fresh_labels = balanced_prior_scores(4000, seed=2)
    calibrator = fit_calibrator(held_out, labels, PREVALENCE, method)
    before = reliability_at_prevalence(fresh, fresh_labels, PREVALENCE)
    after = reliability_at_prevalence(calibrator.apply(fresh), fresh_labels, PREVALENCE)
    # At 20 % prevalence a balanced-prior score overstates the risk; the calibrator takes it back.
    assert after < before / 3
    assert after < sampling_error(PREVALENCE, fresh.size)
    # The calibrated probabilities average to the stated prevalence on the reweighted sample.
    weights = prevalence_weights(fresh_labels, PREVALENCE)
    assert np.average(calibrator.apply(fresh), weights=weights) == pytest.approx(PREVALENCE, abs=0.02)
    # A calibrator never reorders the scores (so operating points keep their meaning).
    order = np.argsort(fresh)
    assert np.all(np.diff(np.asarray(calibrator.apply(fresh))[order]) >= -1e-12)
    assert RiskCalibrator.from_json_dict(calibrator.to_json_dict()) == calibrator


def test_operating_points_meet_their_targets_on_the_split_they_were_chosen_on() -> None:
    scores, labels = balanced_prior_scores(301, seed=3)
    sensitive, specific = choose_operating_points(scores, labels, sensitivity=0.95, specificity=0.9)
    positive = labels == 1
    assert sensitive.name == HIGH_SENSITIVITY and specific.name == HIGH_SPECIFICITY
    assert (scores[positive] >= sensitive.threshold).mean() == sensitive.sensitivity >= 0.95
    assert (scores[~positive] < specific.threshold).mean() == specific.specificity >= 0.9
    # The strictest threshold that still reaches the target: one step higher would miss it.
    assert (scores[positive] > sensitive.threshold).mean() < 0.95
    report = CalibrationReport.fit(scores, labels, PREVALENCE)
    assert report.ece_after is not None and report.ece_before is not None
    assert report.ece_after < report.ece_before


def test_the_host_serves_the_calibrated_risk_and_says_what_it_means(tmp_path: Path) -> None:
    from plugins.builtin.hybrid_birads import MODEL_CFGS as HYBRID
    from plugins.weights import CheckpointMetadata

    calibrator = RiskCalibrator(method="platt", prevalence=PREVALENCE, slope=0.8, intercept=-1.5)
    point = OperatingPoint(
        name=HIGH_SENSITIVITY, threshold=0.1, sensitivity=0.95, specificity=0.4, prevalence=PREVALENCE
    )
    host = ModelHost(Settings(plugins=PluginSettings(load_entrypoints=False, allow_demo_weights=True)), "cpu")
    spec = host.plugin("us_fusion").spec
    metadata = CheckpointMetadata.from_json_dict(
        {
            **CheckpointMetadata(
                architecture=spec.arch,
                model_id=spec.model_id,
                version="1",
                class_names=spec.classes,
                norm_mean=spec.mean,
                norm_std=spec.std,
                input_size=spec.input_size,
                calibrator=calibrator,
                operating_points=(point,),
            ).to_json_dict()
        },
        "test",
    )
    assert metadata.calibrator == calibrator and metadata.operating_points == (point,)
    assert checkpoint_spec(spec, metadata, "test").score.concept == PROBABILITY_OF_CANCER
    assert spec.score.concept != PROBABILITY_OF_CANCER  # uncalibrated: a suspicion score
    # A BI-RADS model's risk stays a suspicion score even once calibrated: its labels are BI-RADS.
    hybrid = next(iter(HYBRID.values()))
    hybrid_metadata = CheckpointMetadata(
        architecture=hybrid.arch,
        model_id=hybrid.model_id,
        version="1",
        class_names=hybrid.classes,
        norm_mean=hybrid.mean,
        norm_std=hybrid.std,
        input_size=hybrid.input_size,
        calibrator=calibrator,
    )
    assert checkpoint_spec(hybrid, hybrid_metadata, "test").score.kind == "suspicion_score"


@pytest.mark.slow
def test_two_demo_models_trained_with_prior_shifting_sampling_are_calibrated_at_the_stated_prevalence(
    tmp_path: Path,
) -> None:
    """us_fusion (class-weighted loss) and asg_mammonet (class-balanced sampler), tiny and briefly trained."""
    trained = {
        # One branch (MobileNetV2) and a few more epochs: the fused network learns little in two.
        "us_fusion": ({"epochs": 4}, {"fusion": "a_only"}, None),
        "asg_mammonet": ({"sampler": "class_balanced", "epochs": 2}, {}, (64, 64)),
    }
    settings = Settings(plugins=PluginSettings(load_entrypoints=False))
    host = ModelHost(settings, "cpu")
    for name, (hyper, options, input_size) in trained.items():
        profile = recipe_class(name, host.plugin_manager).demo_profile
        assert profile is not None
        records = load_generic_csv(
            write_dataset_dir(tmp_path / name / "train", profile.kind, 80, SEED, classes=profile.classes)
        )
        held_out = load_generic_csv(
            write_dataset_dir(
                tmp_path / name / "held-out", profile.kind, 64, SEED + 1, classes=profile.classes
            )
        )
        result = train(
            name,
            records,
            TrainConfig(out_dir=tmp_path / name / "run", seed=SEED, progress=False, prevalence=PREVALENCE),
            settings=settings,
            hyperparameters={**profile.hyperparameters, **hyper},
            options={**(profile.options or {}), **options},
            input_size=input_size or profile.input_size,
            dataset="synthetic",
            split={"train": 0.5, "val": 0.5},
            folds=0,
            demo=True,
            n_bootstrap=0,
            log_line=lambda line: None,
        )
        _, metadata = load_checkpoint(result.checkpoint)
        assert metadata.calibrator is not None and metadata.calibrator.prevalence == PREVALENCE
        assert {p.name for p in metadata.operating_points} == {HIGH_SENSITIVITY, HIGH_SPECIFICITY}
        served_spec = checkpoint_spec(host.plugin(name).spec, metadata, result.checkpoint)
        assert served_spec.score.kind == "probability_of_malignancy"
        assert result.summary_path is not None
        fitted = json.loads(result.summary_path.read_text())["risk_calibration"]
        n_val_positive, n_val_negative = fitted["n_positive"], fitted["n_negative"]

        evaluation = evaluate_checkpoint(
            result.checkpoint, held_out, settings=settings, localise=False, n_bootstrap=0
        )
        scored = evaluation.risk_targets()
        raw_scored = evaluation.risk_targets(raw=True)
        assert scored is not None and raw_scored is not None
        labels, risk = scored
        raw = raw_scored[1]
        assert not np.allclose(risk, raw)  # the host applied the calibrator
        before = reliability_at_prevalence(raw, labels, PREVALENCE)
        after = reliability_at_prevalence(risk, labels, PREVALENCE)
        assert after < before, (name, before, after)
        assert after < sampling_error(PREVALENCE, labels.size), (name, after)

        positive = labels.astype(bool)
        for point in metadata.operating_points:
            assert point.sensitivity is not None and point.specificity is not None
            held_sensitivity = float((risk[positive] >= point.threshold).mean())
            held_specificity = float((risk[~positive] < point.threshold).mean())
            # Chosen on n_val images and measured on others: both estimates carry sampling error.
            tolerance_sens = math.hypot(
                sampling_error(point.sensitivity, n_val_positive),
                sampling_error(point.sensitivity, int(positive.sum())),
            )
            tolerance_spec = math.hypot(
                sampling_error(point.specificity, n_val_negative),
                sampling_error(point.specificity, int((~positive).sum())),
            )
            assert abs(held_sensitivity - point.sensitivity) <= tolerance_sens, (
                name,
                point,
                held_sensitivity,
            )
            assert abs(held_specificity - point.specificity) <= tolerance_spec, (
                name,
                point,
                held_specificity,
            )
        by_name = {p.name: p for p in metadata.operating_points}
        assert by_name[HIGH_SENSITIVITY].sensitivity >= 0.95  # type: ignore[operator]
        assert by_name[HIGH_SPECIFICITY].specificity >= 0.90  # type: ignore[operator]

        # Served through the host: each prediction carries its calibrated risk, the raw one, the stored
        # points and the meaning "probability of cancer".
        served_host = ModelHost(
            Settings(
                plugins=PluginSettings(
                    load_entrypoints=False, models={name: {"weights": str(result.checkpoint)}}
                )
            ),
            "cpu",
        )  # type: ignore[dict-item]
        dicom = next(r.path for r in held_out if r.path.suffix == ".dcm")
        (prediction,) = served_host.run(name, [read_image_ref(dicom)])
        assert isinstance(prediction, Prediction) and prediction.uncalibrated_risk is not None
        assert prediction.risk == pytest.approx(metadata.calibrator.apply(prediction.uncalibrated_risk))
        assert prediction.operating_points == metadata.operating_points
        assert prediction.score.concept == PROBABILITY_OF_CANCER
