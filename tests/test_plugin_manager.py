"""The plugin manager, the hooks, out-of-tree plugins (entry point and drop-in) and ``plugins list``."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from gateway.errors import StartupError
from gateway.settings import ModelSettings, PluginSettings, Settings
from plugins import cli
from plugins.base import TorchModelPlugin
from plugins.builtin.asg_mammonet import AsgMammoNetPlugin
from plugins.host import ModelHost
from plugins.manager import BUILTIN_PLUGINS, TRACE_ENV, get_plugin_manager
from plugins.preprocess import read_image_ref
from plugins.types import ImageRef, Prediction
from plugins.weights import CheckpointMetadata, save_checkpoint
from tests.plugin_fixtures.dicom import write_mammogram

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "plugin_fixtures"
OTHER_BUILTINS = ("clgb_net", "lem", "hybrid_birads", "us_fusion")


def make_settings(**plugins: object) -> Settings:
    disabled = (*OTHER_BUILTINS, *plugins.pop("disabled", ()))  # type: ignore[misc]
    return Settings(plugins=PluginSettings(disabled=disabled, **plugins))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def mammogram(tmp_path_factory: pytest.TempPathFactory) -> ImageRef:
    return read_image_ref(
        write_mammogram(tmp_path_factory.mktemp("mg") / "lmlo.dcm", view="MLO", rows=200, cols=160)
    )


# -------------------------------------------------------------------------
# Hooks: each hook has a test_hook_<name> here and a section in docs/plugins.md
# -------------------------------------------------------------------------


def hook_names() -> list[str]:
    pm = get_plugin_manager(make_settings(), load_entrypoints=False)
    return sorted(name for name in dir(pm.hook) if name.startswith("pacs_triage_"))


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_test(hook: str) -> None:
    tests = "".join(path.read_text() for path in Path(__file__).parent.glob("test_plugin_*.py"))
    assert f"def test_hook_{hook}(" in tests


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_documented(hook: str) -> None:
    docs = (REPO / "docs" / "plugins.md").read_text()
    pm = get_plugin_manager(make_settings(), load_entrypoints=False)
    arguments = getattr(pm.hook, hook).spec.argnames
    assert f"{hook}({', '.join(arguments)})" in docs


def test_hook_pacs_triage_register_models() -> None:
    pm = get_plugin_manager(make_settings(), load_entrypoints=False)
    registered = [plugin for returned in pm.hook.pacs_triage_register_models() for plugin in returned]
    assert [type(p) for p in registered] == [AsgMammoNetPlugin]
    assert all(isinstance(p, TorchModelPlugin) for p in registered)


def test_hook_pacs_triage_training_recipes() -> None:
    """Every registered model has the recipe that trains it (the built-ins are plugins of this hook);
    tests/test_training.py shows an extra plugin bringing its own."""
    from training.recipes import Recipe
    from training.registry import recipe_classes

    pm = get_plugin_manager(make_settings(), load_entrypoints=False)
    recipes = recipe_classes(pm)
    models = {p.spec.name for returned in pm.hook.pacs_triage_register_models() for p in returned}
    assert models and models <= set(recipes)
    assert all(issubclass(recipe, Recipe) and recipe.name == name for name, recipe in recipes.items())


def test_hook_pacs_triage_high_risk_study(mammogram: ImageRef) -> None:
    pm = get_plugin_manager(make_settings(), load_entrypoints=False)
    prediction = Prediction(
        model_id="asg_mammonet.v1",
        model_name="asg_mammonet",
        model_version="1.0",
        image=mammogram,
        classes=("benign", "malignant"),
        probabilities=(0.1, 0.9),
        predicted_class="malignant",
        risk=0.9,
        demo_weights=True,
    )
    with structlog.testing.capture_logs() as logs:
        pm.hook.pacs_triage_high_risk_study(study_instance_uid="1.2.3", risk=0.9, predictions=[prediction])
    [event] = [e for e in logs if e["event"] == "study.high_risk"]
    assert event["study_uid"] == "1.2.3" and event["risk"] == 0.9 and event["models"] == ["asg_mammonet.v1"]
    assert event["demo_weights"] is True
    assert "Test^Synthetic" not in repr(logs) and "SYN0001" not in repr(logs)  # no patient identifiers


# -------------------------------------------------------------------------
# The manager
# -------------------------------------------------------------------------


def test_builtins_register_under_their_module_names() -> None:
    pm = get_plugin_manager(Settings(), load_entrypoints=False)
    for module in BUILTIN_PLUGINS:
        present = importlib.util.find_spec(module) is not None  # others' models may not exist yet
        assert pm.has_plugin(module.rsplit(".", 1)[-1]) == present
    assert pm.has_plugin("notify") and pm.has_plugin("asg_mammonet")


def test_disabled_plugins_are_not_loaded() -> None:
    pm = get_plugin_manager(make_settings(disabled=("asg_mammonet",)), load_entrypoints=False)
    assert not pm.has_plugin("asg_mammonet") and pm.is_blocked("asg_mammonet")
    assert ModelHost(make_settings(disabled=("asg_mammonet",)), plugin_manager=pm).models == []


def test_a_drop_in_with_a_misspelt_hook_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "typo.py").write_text(
        "from plugins import hookimpl\n\n@hookimpl\ndef pacs_triage_register_model():\n    return []\n"
    )
    with pytest.raises(StartupError, match="unknown hook"):
        get_plugin_manager(make_settings(drop_in_dir=tmp_path), load_entrypoints=False)


def test_a_drop_in_that_fails_to_import_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import a_module_that_does_not_exist\n")
    with pytest.raises(StartupError, match=r"broken\.py failed to import"):
        get_plugin_manager(make_settings(drop_in_dir=tmp_path), load_entrypoints=False)


def test_tracing_logs_hook_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACE_ENV, "1")
    pm = get_plugin_manager(make_settings(), load_entrypoints=False)
    with structlog.testing.capture_logs() as logs:
        pm.hook.pacs_triage_register_models()
    events = [(e["event"], e["hook"]) for e in logs]
    assert ("plugin.hook.call", "pacs_triage_register_models") in events
    assert ("plugin.hook.done", "pacs_triage_register_models") in events


# -------------------------------------------------------------------------
# Out-of-tree plugins run inference through the host
# -------------------------------------------------------------------------


def test_drop_in_plugin_runs_through_the_host(tmp_path: Path, mammogram: ImageRef) -> None:
    drop_ins = tmp_path / "drop-ins"
    drop_ins.mkdir()
    shutil.copy(FIXTURES / "dropin" / "dropin_example.py", drop_ins)
    (drop_ins / "README.txt").write_text("not a plugin; ignored")
    settings = make_settings(drop_in_dir=drop_ins, allow_demo_weights=True, disabled=("asg_mammonet",))
    host = ModelHost(settings, plugin_manager=get_plugin_manager(settings, load_entrypoints=False))
    assert [p.name for p in host.models] == ["dropin_example"]
    [prediction] = host.run("dropin_example", [mammogram])
    assert isinstance(prediction, Prediction), prediction
    assert prediction.classes == ("normal", "benign", "malignant") and prediction.demo_weights
    assert prediction.heatmap is not None and prediction.heatmap.shape == (200, 160)
    assert prediction.heatmap_method == "Grad-CAM"


@pytest.fixture
def installed_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """pip-install the example package into a temporary target and put it on sys.path.

    A real wheel build and install (with its ``.dist-info/entry_points.txt``), outside the venv.
    """
    pytest.importorskip("setuptools", reason="building the example wheel without network needs setuptools")
    source = tmp_path / "src"
    shutil.copytree(FIXTURES / "example_plugin", source)  # building writes into the source tree
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    monkeypatch.syspath_prepend(str(target))
    try:
        yield target
    finally:
        sys.modules.pop("pacs_triage_example", None)


def test_installed_plugin_runs_through_the_host(
    installed_example: Path, tmp_path: Path, mammogram: ImageRef
) -> None:
    assert (next(installed_example.glob("*.dist-info")) / "entry_points.txt").read_text().count(
        "tiny_example"
    ) == 1
    import pacs_triage_example  # type: ignore[import-not-found]

    weights = tmp_path / "tiny.safetensors"
    plugin = pacs_triage_example.TinyExample(pacs_triage_example.SPEC)
    metadata = save_checkpoint(
        plugin.build_model({}),
        weights,
        CheckpointMetadata(
            architecture="test_efficientnet",
            model_id="tiny_example.v1",
            version="0.1.0",
            class_names=("normal", "suspicious"),
            norm_mean=(0.5,),
            norm_std=(0.25,),
            input_size=(64, 64),
        ),
    )
    settings = make_settings(
        models={"tiny_example": ModelSettings(weights=weights)}, disabled=("asg_mammonet",)
    )
    pm = get_plugin_manager(settings)
    assert pm.has_plugin("tiny_example")
    assert [dist.project_name for _, dist in pm.list_plugin_distinfo()] == ["pacs-triage-example-plugin"]
    host = ModelHost(settings, plugin_manager=pm)
    [prediction] = host.run("tiny_example", [mammogram])
    assert isinstance(prediction, Prediction), prediction
    assert prediction.model_id == "tiny_example.v1" and not prediction.demo_weights
    assert prediction.weights_sha256 == metadata.sha256
    assert prediction.heatmap is not None and prediction.heatmap.shape == (200, 160)


def test_docs_example_is_the_tested_example_plugin() -> None:
    docs = (REPO / "docs" / "plugins.md").read_text()
    source = (FIXTURES / "example_plugin" / "pacs_triage_example" / "__init__.py").read_text()
    assert source.strip() in docs
    packaging = (FIXTURES / "example_plugin" / "pyproject.toml").read_text()
    assert all(line.strip() in docs for line in packaging.splitlines())


# -------------------------------------------------------------------------
# pacs-triage plugins list
# -------------------------------------------------------------------------


def run_cli(settings: Settings, *argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    parser = argparse.ArgumentParser(prog="pacs-triage")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    assert args.func(args, settings) == 0
    return capsys.readouterr().out


def test_plugins_list_shows_asg_mammonet_and_its_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_cli(make_settings(), "plugins", "list", capsys=capsys)
    [line] = [line for line in out.splitlines() if line.startswith("asg_mammonet")]
    assert re.search(r"asg_mammonet\s+1\.0\s+MG\s+benign,malignant\s+yes\s+missing$", line)

    assert "demo (random init)" in run_cli(
        make_settings(allow_demo_weights=True), "plugins", "list", capsys=capsys
    )

    weights = tmp_path / "asg.safetensors"
    weights.write_bytes(b"placeholder weights")
    configured = make_settings(models={"asg_mammonet": ModelSettings(weights=weights)})
    [row] = json.loads(run_cli(configured, "plugins", "list", "--json", capsys=capsys))
    assert row["name"] == "asg_mammonet" and row["classes"] == ["benign", "malignant"]
    assert row["weights"] == f"{weights} sha256:{hashlib.sha256(b'placeholder weights').hexdigest()}"
    absent = make_settings(models={"asg_mammonet": ModelSettings(weights=tmp_path / "gone.safetensors")})
    assert f"missing ({tmp_path / 'gone.safetensors'})" in run_cli(absent, "plugins", "list", capsys=capsys)
