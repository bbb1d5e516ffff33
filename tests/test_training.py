"""Training, evaluation, calibration and export of the five models on synthetic phantoms (issue 6).

Each architecture trains from random weights with its demo profile (the recipe's loss, sampler and
schedule at a small input size) on generated DICOM phantoms, must reach a held-out AUC of at least 0.9,
is evaluated through the plugin with the full metric report, calibrated on the validation split and
exported; the host then loads the exported checkpoint and predicts on a new synthetic DICOM.  Everything
runs on one CPU thread.  Every model learns its full task: the hybrid BI-RADS model all five grades.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gateway.settings import ModelSettings, PluginSettings, Settings, load_settings
from plugins import hookimpl
from plugins.host import ModelHost
from plugins.manager import get_plugin_manager
from plugins.preprocess import read_image_ref
from plugins.synthetic import make_mg_image, make_us_image, write_dataset_dir
from plugins.types import Prediction
from plugins.weights import file_sha256, load_checkpoint
from training import cli
from training.datasets import Record, dataset_fingerprint, load_generic_csv
from training.evaluate import evaluate_checkpoint, training_info
from training.models.lem import LemRecipe
from training.models.us_fusion import UsFusionRecipe
from training.recipes import Hyper, Recipe, parse_value
from training.registry import demo_profiles, get_recipe, recipe_classes
from training.trainer import (
    STATE_FILE,
    TrainConfig,
    TrainingInterrupted,
    deploy_checkpoint,
    held_out_records,
    train,
    train_demo,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ARCHITECTURES = ("asg_mammonet", "clgb_net", "lem", "hybrid_birads", "us_fusion")
DEMO_PROFILES = demo_profiles()
SEED = 3


@pytest.fixture(scope="module")
def phantom_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Record]]:
    """One synthetic data set per demo profile shape, shared by the tests."""
    root = tmp_path_factory.mktemp("phantoms")
    sets: dict[str, list[Record]] = {}
    for name in ARCHITECTURES:
        profile = DEMO_PROFILES[name]
        key = f"{profile.kind}-{profile.images}-{'+'.join(profile.classes or ('all',))}"
        if key not in sets:
            manifest = write_dataset_dir(
                root / key, profile.kind, profile.images, SEED, classes=profile.classes
            )
            sets[key] = load_generic_csv(manifest)
        sets[name] = sets[key]
    return sets


def _host(name: str, checkpoint: Path, **options: object) -> ModelHost:
    settings = Settings(
        plugins=PluginSettings(
            load_entrypoints=False,
            models={name: ModelSettings(weights=checkpoint, options=dict(options))},
        )
    )
    return ModelHost(settings)


def _fresh_phantom(name: str, folder: Path, label: str) -> Path:
    """A new image, not in any training set (another seed), as a DICOM file."""
    path = folder / f"{name}-{label}.dcm"
    if name == "us_fusion":
        phantom = make_us_image(9001, label, (120, 160))
    else:
        phantom = make_mg_image(9001, label)
    phantom.dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_trains_to_auc_calibrates_exports_and_serves(
    name: str, phantom_sets: dict[str, list[Record]], tmp_path: Path
) -> None:
    profile = DEMO_PROFILES[name]
    records = phantom_sets[name]
    lines: list[str] = []
    result = train(
        name,
        records,
        TrainConfig(out_dir=tmp_path / "run", seed=SEED, progress=False),
        hyperparameters=profile.hyperparameters,
        options=profile.options,
        input_size=profile.input_size,
        dataset="synthetic",
        split=profile.split,
        folds=0,
        n_bootstrap=200,
        log_line=lines.append,
    )
    log = "\n".join(lines)

    # Learning: the held-out (test split, other patients) AUC through the plugin's own inference path.
    assert result.test is not None
    report = result.test.report
    assert report.auc is not None and report.auc >= 0.9, f"{name} held-out AUC {report.auc}\n{log}"

    # The full metric report, with a bootstrap CI around the AUC, and its files.
    flat = result.test.flat()
    for metric in ("accuracy", "precision", "recall", "specificity", "f1", "mcc", "dip", "auc", "ece"):
        assert metric in flat and math.isfinite(flat[metric]), metric
    # A perfect AUC is 1 - 1e-16 as a mean of per-class AUCs and exactly 1 in every bootstrap resample.
    assert report.auc_ci is not None and report.auc_ci[0] - 1e-9 <= report.auc <= report.auc_ci[1] + 1e-9
    assert set(report.per_class) == set(result.metadata.class_names)
    test_dir = tmp_path / "run" / "test"
    for file in ("metrics.json", "confusion_matrix.png", "roc.png", "predictions.csv", "comparison.txt"):
        assert (test_dir / file).is_file(), file
    summary = json.loads((test_dir / "metrics.json").read_text())
    assert summary["auc"] == pytest.approx(report.auc) and summary["images_scored"] == report.n
    assert summary["calibration"]["ece_after"] is not None
    if name == "lem":
        assert "dice" in flat and 0.0 <= flat["dice"] <= 1.0

    # Calibration on the validation split: the fitted temperature cannot raise the validation NLL.
    calibration = result.calibration
    assert calibration is not None and calibration.temperature > 0
    assert calibration.nll_after <= calibration.nll_before + 1e-9
    assert "ECE" in log

    # Export: everything the plugin needs, and the data it came from.
    state, metadata = load_checkpoint(result.checkpoint)
    plugin = ModelHost(Settings()).plugin(name)
    assert metadata.architecture == plugin.spec.arch
    assert set(metadata.class_names) == set(plugin.spec.classes)
    assert metadata.input_size == profile.input_size
    assert metadata.temperature == pytest.approx(calibration.temperature)
    assert metadata.sha256 == file_sha256(result.checkpoint)
    assert not metadata.demo
    info = training_info(metadata)
    assert info["sha256"] == dataset_fingerprint(records)
    assert info["images"]["images"] == len(records) and info["generator"]["kind"] == profile.kind
    for key, value in profile.options.items():
        assert metadata.options[key] == value
    assert state

    # The plugin loads it and predicts on a DICOM it has never seen.
    dicom = _fresh_phantom(name, tmp_path, "malignant")
    host = _host(name, result.checkpoint)
    (prediction,) = host.run(name, [read_image_ref(dicom)])
    assert isinstance(prediction, Prediction), prediction
    assert prediction.weights_sha256 == metadata.sha256 and not prediction.demo_weights
    assert sum(prediction.probabilities) == pytest.approx(1.0)
    assert host.load(name).options["temperature"] == pytest.approx(calibration.temperature)


def test_resume_after_interruption_matches_an_uninterrupted_run(
    phantom_sets: dict[str, list[Record]], tmp_path: Path
) -> None:
    records = phantom_sets["us_fusion"][:40]
    settings = {
        "hyperparameters": {"epochs": 2, "warmup_epochs": 0, "lr": 1e-3, "batch_size": 8},
        "options": {"fusion": "a_only"},
        "input_size": (64, 64),
        "split": {"train": 0.6, "val": 0.2, "test": 0.2},
        "folds": 0,
        "n_bootstrap": 0,
        "log_line": lambda line: None,
    }
    whole = train(
        "us_fusion", records, TrainConfig(out_dir=tmp_path / "whole", seed=SEED, progress=False), **settings
    )
    interrupted = TrainConfig(out_dir=tmp_path / "parts", seed=SEED, progress=False, stop_after_epochs=1)
    with pytest.raises(TrainingInterrupted):
        train("us_fusion", records, interrupted, **settings)
    assert (tmp_path / "parts" / STATE_FILE).is_file()
    resumed_config = TrainConfig(out_dir=tmp_path / "parts", seed=SEED, progress=False, resume=True)
    resumed = train("us_fusion", records, resumed_config, **settings)
    first, _ = load_checkpoint(whole.checkpoint)
    second, _ = load_checkpoint(resumed.checkpoint)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], msg=key)
    assert [row["train_loss"] for row in whole.history] == pytest.approx(
        [row["train_loss"] for row in resumed.history]
    )


def test_cli_train_deploy_and_evaluate(
    phantom_sets: dict[str, list[Record]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "data.csv"
    rows = phantom_sets["us_fusion"][:40]
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows([str(r.path), r.label, r.patient_id] for r in rows)
    parser = argparse.ArgumentParser(prog="pacs-triage")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config")
    cli.register(parser.add_subparsers(dest="command", required=True), common)
    settings = Settings()

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return int(args.func(args, settings))

    config = tmp_path / "site.yaml"
    config.write_text("gateway:\n  port: 11113\n")
    out = tmp_path / "run"
    assert (
        run(
            "train",
            "--arch",
            "us_fusion",
            "--dataset",
            "csv",
            "--data",
            str(manifest),
            "--out",
            str(out),
            "--input-size",
            "64",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--set",
            "warmup_epochs=1",
            "--option",
            "fusion=a_only",
            "--split",
            "0.6,0.2,0.2",
            "--seed",
            "1",
            "--no-progress",
            "--bootstrap",
            "0",
            "--compare-paper",
            "--deploy",
            str(config),
        )
        == 0
    )
    output = capsys.readouterr().out
    checkpoint = out / "us_fusion.safetensors"
    assert "deployed" in output and checkpoint.is_file()
    deployed = load_settings(config, environ={})
    assert deployed.gateway.port == 11113
    assert deployed.plugin_config("us_fusion").weights == checkpoint.resolve()

    # evaluate --split test re-makes the held-out part from what the checkpoint records.
    _, metadata = load_checkpoint(checkpoint)
    held_out = held_out_records(load_generic_csv(manifest), metadata, "test")
    assert {str(r.path) for r in held_out} == set(json.loads((out / "splits.json").read_text())["test"])
    assert (
        run(
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            "--dataset",
            "csv",
            "--data",
            str(manifest),
            "--split",
            "test",
            "--out",
            str(tmp_path / "eval"),
            "--bootstrap",
            "0",
            "--no-progress",
        )
        == 0
    )
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["images_scored"] == len(held_out)
    assert evaluated["checkpoint_sha256"] == metadata.sha256

    assert run("train", "--arch", "lem", "--show-recipe") == 0
    recipe_text = capsys.readouterr().out
    assert "alpha_ramp_epochs" in recipe_text and "[paper]" in recipe_text
    assert run("train", "--arch", "lem", "--set", "no_such_thing=1", "--show-recipe") == 2


def test_demo_weights_are_labelled_demo_everywhere(tmp_path: Path) -> None:
    result = train_demo(
        "us_fusion",
        tmp_path / "demo",
        seed=SEED,
        epochs=1,
        images=24,
        progress=False,
        work_dir=tmp_path / "work",
        n_bootstrap=0,
        log_line=lambda line: None,
    )
    assert result.checkpoint == tmp_path / "demo" / "us_fusion.safetensors"
    assert result.test is not None and result.test.demo_weights
    _, metadata = load_checkpoint(result.checkpoint)
    assert metadata.demo and metadata.version == "demo"
    settings = Settings(
        plugins=PluginSettings(
            load_entrypoints=False, allow_demo_weights=True, demo_weights_dir=tmp_path / "demo"
        )
    )
    dicom = _fresh_phantom("us_fusion", tmp_path, "benign")
    (prediction,) = ModelHost(settings).run("us_fusion", [read_image_ref(dicom)])
    assert isinstance(prediction, Prediction) and prediction.demo_weights
    assert prediction.weights_sha256 == metadata.sha256

    # An unreadable image is reported by name; the others are still scored.
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not dicom")
    records = [Record(path=bad, label="benign"), *(p.record for p in result.test.predictions)]
    evaluation = evaluate_checkpoint(result.checkpoint, records, n_bootstrap=0)
    assert evaluation.failures[0][0] == str(bad) and "not a readable DICOM" in evaluation.failures[0][1]
    assert evaluation.report.n == len(records) - 1 and evaluation.demo_weights


# ---------------------------------------------------------------------------------------------------------
# The recipes themselves (fast)


def _plugin(name: str) -> object:
    return ModelHost(Settings(plugins=PluginSettings(load_entrypoints=False))).plugin(name)


def test_every_model_has_a_recipe_whose_defaults_are_tagged() -> None:
    recipes = recipe_classes()
    assert set(recipes) == set(ARCHITECTURES) == set(DEMO_PROFILES)
    for name, recipe in recipes.items():
        for key, hyper in recipe.HYPERPARAMETERS.items():
            assert isinstance(hyper, Hyper) and hyper.tag in ("paper", "inferred", "default"), (name, key)
        assert {"epochs", "batch_size", "lr"} <= set(recipe.HYPERPARAMETERS), name
        assert sum(recipe.split.values()) == pytest.approx(1.0)


def test_overrides_are_checked_and_typed() -> None:
    plugin = _plugin("lem")
    recipe = get_recipe(
        plugin, hyperparameters={"lr": "1e-2", "epochs": "3"}, options={"backbone": "resnet50"}
    )
    assert recipe.hp["lr"] == 0.01 and recipe.hp["epochs"] == 3 and recipe.options["backbone"] == "resnet50"
    with pytest.raises(ValueError, match="unknown hyperparameter lrr"):
        get_recipe(plugin, hyperparameters={"lrr": 1})
    with pytest.raises(ValueError, match="unknown option"):
        get_recipe(plugin, options={"backbone_name": "x"})
    with pytest.raises(ValueError, match="multiples of 32"):
        get_recipe(plugin, input_size=(100, 96))
    assert parse_value("0.8,1.0", [0.8, 1.0]) == [0.8, 1.0]
    assert parse_value("false", True) is False
    with pytest.raises(ValueError):
        parse_value("1.5", 3)


def test_labels_follow_each_paper() -> None:
    asg = get_recipe(_plugin("asg_mammonet"))
    us = get_recipe(_plugin("us_fusion"))
    hybrid = get_recipe(_plugin("hybrid_birads"))
    lem = get_recipe(_plugin("lem"))
    normal = Record(path=Path("n.dcm"), label="normal")
    assert asg.label_index(normal) == 0  # MIAS: normal merged into benign
    assert us.label_index(normal) is None  # BUSI: normal left out
    assert (
        get_recipe(_plugin("us_fusion"), hyperparameters={"normal_as_benign": True}).label_index(normal) == 0
    )
    assert lem.label_index(Record(path=Path("m.dcm"), label="malignant")) == 1
    assert hybrid.label_index(Record(path=Path("a.dcm"), label="malignant", birads=6)) == 4
    assert hybrid.label_index(Record(path=Path("b.dcm"), label="BI-RADS 3")) == 2
    assert hybrid.label_index(Record(path=Path("c.dcm"), label="x", birads=0)) is None
    with pytest.raises(ValueError, match="not one of"):
        get_recipe(_plugin("clgb_net")).label_index(Record(path=Path("d.dcm"), label="suspicious"))


def test_paper_stages_freeze_and_unfreeze_the_hybrid_backbone() -> None:
    recipe = get_recipe(_plugin("hybrid_birads"), input_size=(64, 64))
    model = recipe.build_model()
    stage1, stage2 = recipe.stages(steps_per_epoch=10)
    assert (stage1.epochs, stage2.epochs) == (4, 60) and stage2.early_stopping
    trainable1 = {id(p) for p in stage1.trainable(model)}
    assert not any(id(p) in trainable1 for p in model.backbone.parameters())
    trainable2 = {id(p) for p in stage2.trainable(model)}
    assert all(id(p) in trainable2 for p in model.backbone.layer4.parameters())
    assert not any(id(p) in trainable2 for p in model.backbone.layer1.parameters())
    assert stage1.optimizer(list(model.parameters())).param_groups[0]["lr"] == 1e-4


def test_imagenet_weights_load_through_timm(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("efficientnet_b0", pretrained=False)
    path = tmp_path / "efficientnet_b0.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    recipe = get_recipe(_plugin("asg_mammonet"), input_size=(64, 64))
    model = recipe.build_model()
    assert recipe.load_imagenet(model, {"backbone": str(path)})
    torch.testing.assert_close(model.backbone.conv_stem.weight, reference.conv_stem.weight)
    with pytest.raises(ValueError, match="does not fit"):
        recipe.load_imagenet(recipe.build_model(), {"backbone": str(_resnet_file(tmp_path))})


def _resnet_file(tmp_path: Path) -> Path:
    import timm

    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    return path


def test_deploy_keeps_the_rest_of_the_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("plugins:\n  allow_demo_weights: false\n  models:\n    lem:\n      batch_size: 2\n")
    checkpoint = tmp_path / "lem.safetensors"
    checkpoint.write_bytes(b"")
    deploy_checkpoint(checkpoint, "lem", config)
    settings = load_settings(config, environ={})
    assert settings.plugin_config("lem").weights == checkpoint.resolve()
    assert settings.plugin_config("lem").batch_size == 2 and not settings.plugins.allow_demo_weights
    assert (tmp_path / "config.yaml.bak").is_file()


# ---------------------------------------------------------------------------------------------------------
# Recipes come from the plugin manager (fast)


class _ExtraRecipe(UsFusionRecipe):
    """A third-party recipe: US-Fusion's protocol for a model plugin of its own."""

    name = "us_fusion_extra"


class _ExtraRecipePlugin:
    @hookimpl
    def pacs_triage_training_recipes(self) -> list[type[Recipe]]:
        return [_ExtraRecipe]


def test_a_plugin_brings_its_own_recipe_through_the_hook() -> None:
    manager = get_plugin_manager(
        Settings(plugins=PluginSettings(load_entrypoints=False)), load_entrypoints=False
    )
    assert "us_fusion_extra" not in recipe_classes(manager)
    manager.register(_ExtraRecipePlugin(), "extra")
    recipes = recipe_classes(manager)
    assert recipes["us_fusion_extra"] is _ExtraRecipe
    assert set(ARCHITECTURES) < set(recipes)  # the built-ins are still there, registered once
    assert recipe_classes(manager) == recipes
    assert demo_profiles(manager)["us_fusion_extra"] is UsFusionRecipe.demo_profile


def test_the_built_in_recipes_are_plugins_that_can_be_disabled_and_clashes_are_refused() -> None:
    disabled = get_plugin_manager(
        Settings(plugins=PluginSettings(load_entrypoints=False, disabled=("training.lem",))),
        load_entrypoints=False,
    )
    recipes = recipe_classes(disabled)
    assert "lem" not in recipes and "us_fusion" in recipes
    with pytest.raises(
        ValueError, match="no training recipe for model 'lem'; recipes exist for asg_mammonet"
    ):
        get_recipe(_plugin("lem"), plugin_manager=disabled)

    class Clash:
        @hookimpl
        def pacs_triage_training_recipes(self) -> list[type[Recipe]]:
            return [type("OtherLem", (LemRecipe,), {})]

    clashing = get_plugin_manager(
        Settings(plugins=PluginSettings(load_entrypoints=False)), load_entrypoints=False
    )
    clashing.register(Clash(), "clash")
    with pytest.raises(ValueError, match="two recipes train model 'lem'"):
        recipe_classes(clashing)

    class NotARecipe:
        @hookimpl
        def pacs_triage_training_recipes(self) -> list[type]:
            return [dict]

    wrong = get_plugin_manager(
        Settings(plugins=PluginSettings(load_entrypoints=False)), load_entrypoints=False
    )
    wrong.register(NotARecipe(), "wrong")
    with pytest.raises(ValueError, match="not a Recipe subclass"):
        recipe_classes(wrong)


def test_the_plugins_package_never_imports_training() -> None:
    code = (
        "import sys, plugins.manager, plugins.host, plugins.cli; "
        "from gateway.settings import Settings, PluginSettings; "
        "plugins.manager.get_plugin_manager(Settings(plugins=PluginSettings(load_entrypoints=False))); "
        "assert not [m for m in sys.modules if m == 'training' or m.startswith('training.')], sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
