"""The model host: DICOM -> Prediction with a source-sized heatmap; weights, accept rules, failures."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from gateway.errors import PluginError, StartupError
from gateway.settings import ModelSettings, PluginSettings, Settings, WorkerSettings
from plugins import hookimpl
from plugins.base import BASE_OPTIONS, ModelOutput, TorchModelPlugin
from plugins.builtin.asg_mammonet import MODEL_CFGS, AsgMammoNet
from plugins.host import ModelHost, ReadAhead
from plugins.manager import get_plugin_manager
from plugins.preprocess import decode_frames, read_image_ref
from plugins.types import AcceptRule, ImageFailure, ModelSpec, Prediction, SkippedImage
from plugins.weights import CheckpointMetadata, file_sha256, save_checkpoint
from tests.plugin_fixtures.dicom import (
    BREAST_TOMOSYNTHESIS,
    MG_FOR_PROCESSING,
    write_mammogram,
    write_ultrasound,
)

# The other built-in models have their own tests; these tests run ASG-MammoNet and test plugins.
OTHER_BUILTINS = ("clgb_net", "lem", "hybrid_birads", "us_fusion")


def make_settings(
    *, allow_demo: bool = True, models: Mapping[str, ModelSettings] | None = None, **plugins: Any
) -> Settings:
    return Settings(
        plugins=PluginSettings(
            allow_demo_weights=allow_demo,
            disabled=(*OTHER_BUILTINS, *plugins.pop("disabled", ())),
            load_entrypoints=False,
            models=dict(models or {}),
            **plugins,
        )
    )


def make_host(settings: Settings, *extra_plugins: object) -> ModelHost:
    pm = get_plugin_manager(settings, load_entrypoints=False)
    for plugin in extra_plugins:
        pm.register(plugin)
    return ModelHost(settings, plugin_manager=pm)


@pytest.fixture(scope="module")
def mammograms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mammograms")
    return {
        "lcc": write_mammogram(root / "lcc.dcm", rows=320, cols=256, laterality="L", view="CC"),
        "rmlo": write_mammogram(root / "rmlo.dcm", rows=300, cols=240, laterality="R", view="MLO", seed=1),
    }


@pytest.fixture(scope="module")
def demo_host() -> ModelHost:
    return make_host(make_settings())


# -------------------------------------------------------------------------
# The path the "done when" names
# -------------------------------------------------------------------------


def test_mammogram_dicom_gives_a_prediction_and_a_source_sized_heatmap(
    demo_host: ModelHost, mammograms: dict[str, Path]
) -> None:
    refs = [read_image_ref(mammograms["lcc"]), read_image_ref(mammograms["rmlo"])]
    results = demo_host.run("asg_mammonet", refs)
    assert [type(r) for r in results] == [Prediction, Prediction]
    for ref, prediction in zip(refs, results, strict=True):
        assert isinstance(prediction, Prediction)
        assert prediction.image.sop_instance_uid == ref.sop_instance_uid
        assert prediction.model_id == "asg_mammonet.v1" and prediction.classes == ("benign", "malignant")
        assert sum(prediction.probabilities) == pytest.approx(1)
        assert prediction.risk == pytest.approx(prediction.probabilities[1])
        assert prediction.predicted_class == prediction.classes[int(np.argmax(prediction.probabilities))]
        assert prediction.heatmap is not None and prediction.heatmap_method == "Grad-CAM"
        header = pydicom.dcmread(ref.path, stop_before_pixels=True)
        assert prediction.heatmap.shape == (header.Rows, header.Columns)
        assert prediction.heatmap.dtype == np.float32
        assert 0 <= prediction.heatmap.min() and prediction.heatmap.max() <= 1
        assert prediction.demo_weights and prediction.weights_sha256 == ""


class EchoNet(nn.Module):
    """Its 'heatmap' is its own input, so mapping it back must reproduce the source image."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class EchoPlugin(TorchModelPlugin):
    default_options: ClassVar[Mapping[str, Any]] = {
        **BASE_OPTIONS,
        "crop": "breast",
        "normalise_laterality": True,
    }

    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        return EchoNet()

    def forward(self, model: nn.Module, batch: torch.Tensor, options: Mapping[str, Any]) -> ModelOutput:
        with torch.inference_mode():
            grey = batch[:, 0] * self.spec.std[0] + self.spec.mean[0]  # undo the normalisation
            return ModelOutput(logits=model(batch), heatmap=grey, heatmap_method="echo")


def _spec(name: str, **changes: Any) -> ModelSpec:
    base = dict(
        model_id=f"{name}.v1",
        name=name,
        version="1",
        display_name=name,
        arch=name,
        classes=("benign", "malignant"),
        positive_classes=("malignant",),
        accepts=AcceptRule(modalities=("MG",)),
        input_size=(96, 96),
        mean=(0.5,),
        std=(0.5,),
    )
    return ModelSpec(**{**base, **changes})


class _Registers:
    def __init__(self, *plugins: TorchModelPlugin) -> None:
        self.plugins = list(plugins)

    @hookimpl
    def pacs_triage_register_models(self) -> list[TorchModelPlugin]:
        return self.plugins


def test_heatmap_is_aligned_with_the_source_after_crop_and_flip(mammograms: dict[str, Path]) -> None:
    # A right breast: cropped to the breast, mirrored, letterboxed; the echoed input must land back
    # on the source pixels it came from.
    host = make_host(make_settings(), _Registers(EchoPlugin(_spec("echo"))))
    [prediction] = host.run("echo", [read_image_ref(mammograms["rmlo"])])
    assert isinstance(prediction, Prediction) and prediction.heatmap is not None
    [(_, source)] = decode_frames(mammograms["rmlo"])
    source = source.astype(np.float32) / 255
    inside = prediction.heatmap > 0
    assert inside[:, -1].any() and not inside[:, :5].any()  # the crop hugs the right-hand chest wall
    correlation = np.corrcoef(prediction.heatmap[inside], source[inside])[0, 1]
    assert correlation > 0.8


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TORCH_DEVICE") != "cuda", reason="needs TORCH_DEVICE=cuda")
def test_runs_on_cuda_with_amp(mammograms: dict[str, Path]) -> None:
    settings = make_settings(models={"asg_mammonet": ModelSettings(options={"amp": True})})
    host = ModelHost(
        settings, device="cuda", plugin_manager=get_plugin_manager(settings, load_entrypoints=False)
    )
    results = host.run("asg_mammonet", [read_image_ref(p) for p in mammograms.values()])
    assert host.load("asg_mammonet").device.type == "cuda"
    assert all(isinstance(r, Prediction) and r.heatmap is not None for r in results), results


# -------------------------------------------------------------------------
# Weights
# -------------------------------------------------------------------------


def test_refuses_to_run_without_weights(mammograms: dict[str, Path]) -> None:
    host = make_host(make_settings(allow_demo=False))
    [failure] = host.run("asg_mammonet", [read_image_ref(mammograms["lcc"])])
    assert isinstance(failure, ImageFailure)
    assert "has no weights" in failure.error and "allow_demo_weights" in failure.error


def _asg_checkpoint(path: Path, **changes: Any) -> CheckpointMetadata:
    torch.manual_seed(3)
    metadata = CheckpointMetadata(
        architecture="asg_mammonet",
        model_id="asg_mammonet.v1",
        version="1.0",
        class_names=("benign", "malignant"),
        norm_mean=(0.3,),
        norm_std=(0.2,),
        input_size=(96, 96),
        thresholds={"malignant": 0.4},
        temperature=1.5,
        options={"cbam_reduction": 8},
        training_data="synthetic, for tests",
    )
    return save_checkpoint(AsgMammoNet(), path, dataclasses.replace(metadata, **changes))


def test_runs_with_a_checkpoint_and_reports_its_sha256(tmp_path: Path, mammograms: dict[str, Path]) -> None:
    weights = tmp_path / "asg.safetensors"
    metadata = _asg_checkpoint(weights)
    assert metadata.sha256 == file_sha256(weights)
    settings = make_settings(
        allow_demo=False, models={"asg_mammonet": ModelSettings(weights=weights, batch_size=2)}
    )
    host = make_host(settings)
    loaded = host.load("asg_mammonet")
    assert loaded is host.load("asg_mammonet")  # loaded once per process
    assert loaded.plugin.spec.mean == (0.3,) and loaded.plugin.spec.std == (0.2,)
    assert loaded.plugin.spec.input_size == (96, 96)  # the checkpoint's, not the spec's 224
    assert loaded.plugin.spec.thresholds == {"malignant": 0.4} and loaded.options["temperature"] == 1.5
    assert not loaded.demo_weights and loaded.weights_path == weights
    lcc, rmlo = (read_image_ref(p) for p in mammograms.values())
    results = host.run("asg_mammonet", [lcc, rmlo, lcc])  # batches of 2 and 1
    assert len(results) == 3 and all(isinstance(r, Prediction) for r in results)
    assert all(
        r.weights_sha256 == metadata.sha256 and not r.demo_weights
        for r in results
        if isinstance(r, Prediction)
    )
    # The same image gives the same answer in either batch.
    assert results[0].probabilities == pytest.approx(results[2].probabilities, abs=1e-5)  # type: ignore[union-attr]


def test_a_checkpoint_of_another_architecture_fails_clearly(
    tmp_path: Path, mammograms: dict[str, Path]
) -> None:
    weights = tmp_path / "other.safetensors"
    _asg_checkpoint(weights, architecture="resnet50")
    host = make_host(make_settings(models={"asg_mammonet": ModelSettings(weights=weights)}))
    [failure] = host.run("asg_mammonet", [read_image_ref(mammograms["lcc"])])
    assert isinstance(failure, ImageFailure) and "'resnet50' model, not 'asg_mammonet'" in failure.error


def test_a_missing_weights_file_fails_clearly(tmp_path: Path, mammograms: dict[str, Path]) -> None:
    host = make_host(
        make_settings(models={"asg_mammonet": ModelSettings(weights=tmp_path / "nope.safetensors")})
    )
    [failure] = host.run("asg_mammonet", [read_image_ref(mammograms["lcc"])])
    assert isinstance(failure, ImageFailure) and "nope.safetensors" in failure.error


# -------------------------------------------------------------------------
# Accept rules
# -------------------------------------------------------------------------


def test_skips_for_processing_tomosynthesis_and_other_modalities(
    demo_host: ModelHost, tmp_path: Path
) -> None:
    plugin = demo_host.plugin("asg_mammonet")
    raw = read_image_ref(write_mammogram(tmp_path / "raw.dcm", sop_class=MG_FOR_PROCESSING))
    volume = read_image_ref(write_mammogram(tmp_path / "dbt.dcm", sop_class=BREAST_TOMOSYNTHESIS, frames=3))
    synthesized = read_image_ref(write_mammogram(tmp_path / "s2d.dcm"))  # synthesized 2D: MG For Presentation
    ultrasound = read_image_ref(write_ultrasound(tmp_path / "us.dcm"))
    assert "For Processing" in (demo_host.skip_reason(plugin, raw) or "")
    assert "tomosynthesis" in (demo_host.skip_reason(plugin, volume) or "")
    assert "modality US" in (demo_host.skip_reason(plugin, ultrasound) or "")
    assert demo_host.skip_reason(plugin, synthesized) is None
    results = demo_host.run("asg_mammonet", [raw, volume, ultrasound])
    assert all(isinstance(r, SkippedImage) for r in results)


def test_config_can_accept_tomosynthesis_volumes(tmp_path: Path) -> None:
    volume = read_image_ref(
        write_mammogram(tmp_path / "dbt.dcm", sop_class=BREAST_TOMOSYNTHESIS, frames=3, rows=96, cols=80)
    )
    options = {"accept_tomosynthesis_volumes": True, "frames": "all"}
    host = make_host(make_settings(models={"asg_mammonet": ModelSettings(options=options)}))
    results = host.run("asg_mammonet", [volume])
    assert [type(r) for r in results] == [Prediction] * 3
    assert [r.image.frame_index for r in results] == [0, 1, 2]


def test_views_and_lateralities(tmp_path: Path) -> None:
    rule = AcceptRule(modalities=("MG",), views=("CC",), lateralities=("L",))
    host = make_host(make_settings(), _Registers(EchoPlugin(_spec("picky", accepts=rule))))
    plugin = host.plugin("picky")
    lcc = read_image_ref(write_mammogram(tmp_path / "lcc.dcm", view="CC", laterality="L"))
    lmlo = read_image_ref(write_mammogram(tmp_path / "lmlo.dcm", view="MLO", laterality="L"))
    rcc = read_image_ref(write_mammogram(tmp_path / "rcc.dcm", view="CC", laterality="R"))
    assert host.skip_reason(plugin, lcc) is None
    assert "view MLO" in (host.skip_reason(plugin, lmlo) or "")
    assert "laterality R" in (host.skip_reason(plugin, rcc) or "")


# -------------------------------------------------------------------------
# Failures stay with the image and the plugin
# -------------------------------------------------------------------------


class Raising(EchoPlugin):
    def forward(self, model: nn.Module, batch: torch.Tensor, options: Mapping[str, Any]) -> ModelOutput:
        raise RuntimeError("boom")


class ReturnsNaN(EchoPlugin):
    def forward(self, model: nn.Module, batch: torch.Tensor, options: Mapping[str, Any]) -> ModelOutput:
        logits = torch.zeros(batch.shape[0], 2)
        logits[0] = float("nan")  # only the first image of the batch is garbage
        return ModelOutput(logits=logits)


class WrongShape(EchoPlugin):
    def forward(self, model: nn.Module, batch: torch.Tensor, options: Mapping[str, Any]) -> ModelOutput:
        return ModelOutput(logits=torch.zeros(batch.shape[0], 5))


class OutOfMemory(EchoPlugin):
    calls = 0

    def forward(self, model: nn.Module, batch: torch.Tensor, options: Mapping[str, Any]) -> ModelOutput:
        OutOfMemory.calls += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class NaNHeatmap(EchoPlugin):
    def forward(self, model: nn.Module, batch: torch.Tensor, options: Mapping[str, Any]) -> ModelOutput:
        return ModelOutput(
            logits=torch.zeros(batch.shape[0], 2), heatmap=torch.full((batch.shape[0], 4, 4), float("nan"))
        )


class BadBuild(EchoPlugin):
    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        raise ImportError("needs a library that is not installed")


FAILING = {
    # The type, never the message: a foreign exception's message may quote the data set.
    "raising": (Raising, "forward failed: RuntimeError"),
    "wrong_shape": (WrongShape, "logits have shape (2, 5), expected (2, 2)"),
    "oom": (OutOfMemory, "out of memory"),
    "nan_heatmap": (NaNHeatmap, "heatmap must be a finite 2-D array"),
    "bad_build": (BadBuild, "cannot be loaded: needs a library"),
}


@pytest.fixture(scope="module")
def mixed_host() -> ModelHost:
    """ASG-MammoNet and five broken plugins in one host, batch size 2."""
    broken = [cls(_spec(name)) for name, (cls, _) in FAILING.items()] + [ReturnsNaN(_spec("nan"))]
    models = {p.name: ModelSettings(batch_size=2) for p in broken}
    return make_host(make_settings(models=models), _Registers(*broken))


@pytest.mark.parametrize("name", FAILING)
def test_a_failing_plugin_fails_its_images_and_others_carry_on(
    name: str, mixed_host: ModelHost, mammograms: dict[str, Path]
) -> None:
    message = FAILING[name][1]
    refs = [read_image_ref(p) for p in mammograms.values()]
    failures = mixed_host.run(name, refs)
    assert len(failures) == 2 and all(isinstance(f, ImageFailure) and message in f.error for f in failures)
    assert not any("boom" in f.error for f in failures)
    assert [f.image.sop_instance_uid for f in failures] == [r.sop_instance_uid for r in refs]
    assert all(isinstance(r, Prediction) for r in mixed_host.run("asg_mammonet", refs))


def test_out_of_memory_retries_one_image_at_a_time(
    mixed_host: ModelHost, mammograms: dict[str, Path]
) -> None:
    OutOfMemory.calls = 0
    mixed_host.run("oom", [read_image_ref(p) for p in mammograms.values()])
    assert OutOfMemory.calls == 3  # the batch of 2, then each image alone


def test_nan_fails_only_the_image_that_has_it(mixed_host: ModelHost, mammograms: dict[str, Path]) -> None:
    first, second = mixed_host.run("nan", [read_image_ref(p) for p in mammograms.values()])
    assert isinstance(first, ImageFailure) and "non-finite" in first.error
    assert isinstance(second, Prediction)


def test_an_undecodable_image_fails_alone(
    tmp_path: Path, demo_host: ModelHost, mammograms: dict[str, Path]
) -> None:
    good = read_image_ref(mammograms["lcc"])
    broken_path = tmp_path / "broken.dcm"
    broken_path.write_bytes(mammograms["lcc"].read_bytes()[:2000])  # truncated in the pixel data
    broken = dataclasses.replace(good, path=broken_path, sop_instance_uid="1.2.3.4")
    failure, prediction = demo_host.run("asg_mammonet", [broken, good])
    assert isinstance(failure, ImageFailure) and "broken.dcm" in failure.error
    assert isinstance(prediction, Prediction)


# -------------------------------------------------------------------------
# Configuration
# -------------------------------------------------------------------------


def test_unknown_option_stops_start_up() -> None:
    settings = make_settings(models={"asg_mammonet": ModelSettings(options={"cbam_reducton": 16})})
    with pytest.raises(StartupError, match="cbam_reducton"):
        make_host(settings)


def test_bad_option_values_stop_start_up() -> None:
    settings = make_settings(models={"asg_mammonet": ModelSettings(options={"frames": "random"})})
    with pytest.raises(StartupError, match=r"options\.frames is 'random', not one of first, middle"):
        make_host(settings)


def test_duplicate_model_names_stop_start_up() -> None:
    with pytest.raises(StartupError, match="two plugins register a model named 'asg_mammonet'"):
        make_host(make_settings(), _Registers(EchoPlugin(MODEL_CFGS["asg_mammonet.v1"])))


def test_disabled_models_are_not_run(mammograms: dict[str, Path]) -> None:
    host = make_host(make_settings(models={"asg_mammonet": ModelSettings(enabled=False)}))
    assert host.models == [] and [p.name for p in host.registered_models] == ["asg_mammonet"]
    [failure] = host.run("asg_mammonet", [read_image_ref(mammograms["lcc"])])
    assert isinstance(failure, ImageFailure) and "disabled" in failure.error
    with pytest.raises(PluginError, match="no such model"):
        host.run("nonexistent", [])


# -------------------------------------------------------------------------
# Reading ahead: decoding and preprocessing on a thread of their own
# -------------------------------------------------------------------------


def _reading_ahead(host: ModelHost) -> ModelHost:
    worker = host.settings.worker.model_copy(update={"read_ahead": "on"})
    return ModelHost(host.settings.model_copy(update={"worker": worker}), plugin_manager=host.plugin_manager)


@pytest.mark.parametrize("name", ["asg_mammonet", "nan", "raising", "bad_build"])
def test_reading_ahead_gives_what_reading_in_turn_gives(
    name: str, tmp_path: Path, mixed_host: ModelHost, mammograms: dict[str, Path]
) -> None:
    """Each image's result, in order, is the same whether its decoding and preprocessing ran ahead on a
    thread of their own or in turn: predictions, failures (a broken file's included) and their words."""
    refs = [read_image_ref(p) for p in mammograms.values()]
    broken_path = tmp_path / "broken.dcm"
    broken_path.write_bytes(mammograms["lcc"].read_bytes()[:2000])
    refs.insert(1, dataclasses.replace(refs[0], path=broken_path, sop_instance_uid="1.2.3.4"))
    ahead = _reading_ahead(mixed_host)
    assert ahead.reads_ahead() and not mixed_host.reads_ahead()
    in_turn, read_ahead = mixed_host.run(name, refs * 2), ahead.run(name, refs * 2)
    assert [type(r) for r in read_ahead] == [type(r) for r in in_turn]
    for a, b in zip(read_ahead, in_turn, strict=True):
        assert a.image == b.image
        if isinstance(a, Prediction) and isinstance(b, Prediction):
            assert a.probabilities == pytest.approx(b.probabilities)
            assert (a.heatmap is None) == (b.heatmap is None)
            assert a.heatmap is None or np.allclose(a.heatmap, b.heatmap, atol=1e-6)
        else:
            assert isinstance(a, ImageFailure) and isinstance(b, ImageFailure) and a.error == b.error


def test_read_ahead_is_on_for_cuda_only_unless_set() -> None:
    for device, mode, expected in [("cpu", "auto", False), ("cuda:0", "auto", True), ("cpu", "on", True),
                                   ("cuda", "off", False)]:
        settings = make_settings().model_copy(update={"worker": WorkerSettings(read_ahead=mode)})
        assert ModelHost(settings, device=device).reads_ahead() is expected


def test_read_ahead_stays_within_its_depth_and_hands_on_what_the_producer_raises() -> None:
    produced: list[int] = []

    def items() -> Iterator[int]:
        for number in range(10):
            produced.append(number)
            yield number
        raise ValueError("the tenth item was the last")

    consumed = []
    with pytest.raises(ValueError, match="the last"):
        for item in ReadAhead(items(), depth=2):
            time.sleep(0.01)  # a slow consumer: the producer waits for room instead of running on
            assert len(produced) <= item + 1 + 2 + 1  # at most the queue's depth and one in hand ahead
            consumed.append(item)
    assert consumed == list(range(10))


def test_a_consumer_that_stops_early_stops_the_producer() -> None:
    produced: list[int] = []

    def endless() -> Iterator[int]:
        number = 0
        while True:
            produced.append(number)
            yield number
            number += 1

    for item in ReadAhead(endless(), depth=3, name="endless"):
        if item == 5:
            break
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count <= 5 + 3 + 2
    assert not any(thread.name == "endless" for thread in threading.enumerate())
