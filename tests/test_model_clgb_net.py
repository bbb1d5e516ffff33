"""CLGB-Net: the oracles of docs/models/clgb-net.md, plus its training parts."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import numpy as np
import pluggy
import pytest
import timm
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset

import plugins.builtin.clgb_net as clgb_module
from gateway.settings import Settings
from plugins import hookspecs
from plugins.base import BASE_OPTIONS
from plugins.builtin.clgb_net import (
    CLASSES,
    MODEL_CFGS,
    MODEL_OPTIONS,
    CLGBNet,
    CLGBNetPlugin,
    GradScale,
    SEBlock,
    attention_heatmap,
    cam_heatmap,
    checkpoint_metadata,
    grad_scale,
    load_imagenet_backbones,
    pacs_triage_register_models,
)
from plugins.host import ModelHost
from plugins.manager import get_plugin_manager
from plugins.preprocess import read_image_ref
from plugins.synthetic import make_mg_image
from plugins.types import Prediction, SkippedImage
from plugins.weights import load_model, save_checkpoint
from tests.plugin_fixtures.dicom import write_ultrasound
from training.models.clgb_net import (
    ClgbNetRecipe,
    build_scheduler,
    clgb_loss,
    set_training_stage,
    train_transform,
)
from training.recipes import sgd_or_adam

SIZE = 224


@pytest.fixture(scope="module")
def model() -> CLGBNet:
    torch.manual_seed(0)
    return CLGBNet().eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def outputs(model: CLGBNet, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.no_grad():
        return model(batch, return_intermediates=True)


# --- oracle 12 and the registry --------------------------------------------------------------------------


def test_default_parameter_count_is_clgb_size(model: CLGBNet) -> None:
    count = sum(p.numel() for p in model.parameters())
    assert 55e6 < count < 60e6
    assert abs(count - 57.7e6) < 0.05e6


def test_builds_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Oracle 9, first half: building touches no network."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "socket", refuse)
    [plugin] = pacs_triage_register_models()
    built = plugin.build_model({**plugin.default_options, "cam_mode": "channel"})
    assert isinstance(built, CLGBNet)
    assert built.config_dict()["cam_mode"] == "channel"


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="cam_mode"):
        CLGBNet(cam_mode="pixel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of 32"):
        CLGBNet(img_size=200)


# --- oracles 1 and 2 ------------------------------------------------------------------------------------


def test_logits_and_probabilities(model: CLGBNet, outputs: tuple) -> None:
    logits, extras = outputs
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(torch.softmax(logits, 1).sum(1), torch.ones(2), atol=1e-6, rtol=0)
    assert extras["cam_logits"].shape == (2, 3)


def test_eval_is_deterministic_and_batch_one_works(
    model: CLGBNet, batch: torch.Tensor, outputs: tuple
) -> None:
    with torch.no_grad():
        again, _ = model(batch[:1])
    torch.testing.assert_close(again, outputs[0][:1], atol=1e-5, rtol=1e-5)


def test_intermediate_shapes(outputs: tuple) -> None:
    _, extras = outputs
    expected = {
        "c2": (2, 256, 56, 56),
        "c3": (2, 512, 28, 28),
        "c4": (2, 1024, 14, 14),
        "c5": (2, 2048, 7, 7),
        "p2": (2, 256, 56, 56),
        "p3": (2, 256, 28, 28),
        "p4": (2, 256, 14, 14),
        "p5": (2, 256, 7, 7),
        "pyramid_fused": (2, 1024, 7, 7),
        "swin_tokens": (2, 7, 7, 768),
        "fused_tokens": (2, 49, 768),
        "pooled": (2, 3840),
        "cam": (2, 3, 7, 7),
        "attention": (2, 1, 7, 7),
    }
    assert {k: tuple(extras[k].shape) for k in expected} == expected


# --- oracles 3, 4 and 5 ---------------------------------------------------------------------------------


def test_cam_identity(model: CLGBNet, outputs: tuple) -> None:
    _, extras = outputs
    cam, c5 = extras["cam"], extras["c5"]
    expected = torch.einsum("kc,bchw->bkhw", model.cam_fc.weight, c5)
    torch.testing.assert_close(cam, expected, atol=1e-5, rtol=1e-5)
    reconstructed = cam.mean((2, 3)) + model.cam_fc.bias
    assert (reconstructed - extras["cam_logits"]).abs().max() < 1e-5


def test_heatmap_range_and_sizes(outputs: tuple) -> None:
    logits, extras = outputs
    heat = cam_heatmap(extras["cam"], logits.argmax(1), (SIZE, SIZE))
    assert heat.shape == (2, 1, SIZE, SIZE)
    assert torch.allclose(heat.amin((1, 2, 3)), torch.zeros(2), atol=1e-6)
    assert torch.allclose(heat.amax((1, 2, 3)), torch.ones(2), atol=1e-5)
    original = cam_heatmap(extras["cam"], 2, (301, 250))
    assert original.shape == (2, 1, 301, 250)
    assert float(original.min()) >= 0.0 and float(original.max()) <= 1.0


def test_constant_cam_gives_zeros_not_nan() -> None:
    heat = cam_heatmap(torch.full((1, 3, 7, 7), 4.2), 0, (SIZE, SIZE))
    assert torch.isfinite(heat).all()
    assert float(heat.abs().max()) == 0.0


@pytest.mark.parametrize(("row", "col"), [(0, 0), (3, 5), (6, 6), (2, 0)])
def test_one_hot_cam_peaks_in_its_pixel_block(row: int, col: int) -> None:
    cam = torch.zeros(1, 3, 7, 7)
    cam[0, 1, row, col] = 1.0
    heat = cam_heatmap(cam, 1, (SIZE, SIZE))[0, 0]
    peak_row, peak_col = divmod(int(heat.argmax()), SIZE)
    assert 32 * row <= peak_row < 32 * row + 32
    assert 32 * col <= peak_col < 32 * col + 32


def test_attention_in_unit_range_and_detached(model: CLGBNet, batch: torch.Tensor, outputs: tuple) -> None:
    attention = outputs[1]["attention"]
    assert float(attention.min()) >= 0.0 and float(attention.max()) <= 1.0
    # Eval mode keeps the shared model's BatchNorm statistics intact; gradients are still tracked.
    _, extras = model(batch[:1])
    assert extras["cam"].requires_grad
    assert extras["attention"].requires_grad is False
    assert attention_heatmap(attention, (SIZE, SIZE)).shape == (2, 1, SIZE, SIZE)


# --- oracles 6 and 7 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("g", [0.25, 0.5, 2.0])
def test_gradscale_is_identity_forward_and_scales_backward(g: float) -> None:
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    upstream = torch.randn(2, 3, 4, 4)
    y = GradScale.apply(x, g)
    assert torch.equal(y, x)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, g * upstream)
    x2 = torch.randn(5, requires_grad=True)
    grad_scale(x2, g).sum().backward()
    torch.testing.assert_close(x2.grad, torch.full((5,), g))


def test_se_gates_and_fusion_weights(model: CLGBNet, outputs: tuple) -> None:
    gates = outputs[1]["se_gates"]
    assert float(gates.min()) > 0.0 and float(gates.max()) < 1.0
    se = SEBlock(64, 16)
    x = torch.randn(2, 64, 5, 5)
    assert se(x).shape == x.shape
    torch.testing.assert_close(model.fusion_weights().sum(), torch.tensor(1.0))
    torch.testing.assert_close(outputs[1]["fusion_weights"], torch.tensor([0.5, 0.5]))


# --- oracle 8 -------------------------------------------------------------------------------------------


def test_every_parameter_gets_a_gradient(batch: torch.Tensor) -> None:
    torch.manual_seed(2)
    net = CLGBNet().train()
    logits, extras = net(batch[:1])
    target = torch.tensor([2])
    loss, parts = clgb_loss(logits, extras["cam_logits"], target, aux_weight=0.5)
    expected = F.cross_entropy(logits, target) + 0.5 * F.cross_entropy(extras["cam_logits"], target)
    torch.testing.assert_close(loss.detach(), expected.detach())
    assert set(parts) == {"ce", "ce_aux"}
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_variant_flags_run(batch: torch.Tensor) -> None:
    net = CLGBNet(cam_mode="channel", swin_input="image_only", cam_detach=False).eval()
    assert net.cnn_to_swin is None
    logits, extras = net(batch[:1])
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
    assert extras["attention"].requires_grad


@pytest.mark.slow
def test_resnet_only_swin_input_runs(batch: torch.Tensor) -> None:
    net = CLGBNet(swin_input="resnet_only").eval()
    with torch.no_grad():
        logits, _ = net(batch[:1])
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


# --- oracle 9 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel_checkpoint(tmp_path_factory: pytest.TempPathFactory, model: CLGBNet) -> tuple[Path, CLGBNet]:
    """The shared model's weights under non-default flags (cam_mode changes no parameter), saved once."""
    variant = CLGBNet(cam_mode="channel", drop_rate=0.1).eval()
    variant.load_state_dict(model.state_dict())
    path = tmp_path_factory.mktemp("clgb") / "clgb_channel.safetensors"
    save_checkpoint(variant, path, checkpoint_metadata(variant, version="0.9", training_data="synthetic"))
    return path, variant


def test_checkpoint_round_trip(channel_checkpoint: tuple[Path, CLGBNet], batch: torch.Tensor) -> None:
    path, variant = channel_checkpoint
    with torch.no_grad():
        reference, _ = variant(batch[:1])
    restored, metadata = load_model(CLGBNetPlugin(MODEL_CFGS["clgb_net.v1"]), path)
    assert isinstance(restored, CLGBNet)
    assert restored.config_dict() == variant.config_dict()
    assert restored.cam_mode == "channel"
    with torch.no_grad():
        logits, _ = restored(batch[:1])
    assert torch.equal(logits, reference)
    # Oracle 11: the label map survives the round trip through the metadata.
    assert metadata.class_names == ("normal", "benign", "malignant")
    assert metadata.architecture == "clgb_net" and metadata.input_size == (SIZE, SIZE)
    assert (metadata.version, metadata.training_data) == ("0.9", "synthetic")
    assert metadata.options["cam_mode"] == "channel" and set(metadata.options) == set(MODEL_OPTIONS)


def test_imagenet_checkpoints_load_with_only_head_keys_left(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(3)
    resnet = timm.create_model("resnet50", pretrained=False)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")
    save_file({k: v.contiguous() for k, v in swin.state_dict().items()}, str(tmp_path / "swin.safetensors"))
    net = CLGBNet()
    load_imagenet_backbones(net, cnn_path=tmp_path / "resnet50.pth", swin_path=tmp_path / "swin.safetensors")
    torch.testing.assert_close(net.cnn.layer4[2].conv3.weight, resnet.layer4[2].conv3.weight)
    swin_weight = swin.layers[3].blocks[1].mlp.fc2.weight
    torch.testing.assert_close(net.swin.layers[3].blocks[1].mlp.fc2.weight, swin_weight)

    # Foreign or incomplete checkpoints are refused, not half-loaded silently.
    state = {k: v for k, v in resnet.state_dict().items() if not k.startswith("layer4")}
    torch.save({**state, "neck.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    refused = r"does not fit: \d+ missing keys \['layer4.*1 unexpected keys \['neck.weight'\]"
    with pytest.raises(ValueError, match=refused):
        load_imagenet_backbones(net, cnn_path=tmp_path / "bad.pth")


# --- oracle 10 ------------------------------------------------------------------------------------------


def _mammo_dataset(pixels: np.ndarray, photometric: str) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    return ds


def test_train_transform_shapes_and_flips() -> None:
    image = np.zeros((256, 200), dtype=np.uint8)
    image[:, :100] = 255
    torch.manual_seed(0)
    outs = [train_transform(SIZE, scale=(1.0, 1.0), ratio=(200 / 256, 200 / 256))(image) for _ in range(20)]
    assert all(o.shape == (3, SIZE, SIZE) and o.dtype == torch.float32 for o in outs)
    bright_left = [bool(o[0, :, :50].mean() > o[0, :, -50:].mean()) for o in outs]
    assert any(bright_left) and not all(bright_left)


# --- oracle 11 and the training parts -------------------------------------------------------------------


def test_label_map_order() -> None:
    assert CLASSES == ("normal", "benign", "malignant")


def test_optimizer_and_restarting_cosine_schedule() -> None:
    net = torch.nn.Linear(4, 3)
    # The recipe's own optimiser at its defaults.
    optimizer = sgd_or_adam(
        {k: h.default for k, h in ClgbNetRecipe.HYPERPARAMETERS.items()}, list(net.parameters())
    )
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-3, 0.9, 1e-4)
    assert group["nesterov"] is False
    scheduler = build_scheduler(optimizer)
    lrs = []
    for _ in range(60):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[24] < 1e-4 and lrs[25] == pytest.approx(1e-3) and lrs[50] == pytest.approx(1e-3)
    assert all(a > b for a, b in itertools.pairwise(lrs[:25]))


def test_staged_training_freezes_later_blocks() -> None:
    net = CLGBNet(swin_name="swin_tiny_patch4_window7_224")
    assert set_training_stage(net, 1) == ["cnn", "cam_fc"]
    assert all(p.requires_grad for p in net.cnn.parameters())
    assert not any(p.requires_grad for p in net.swin.parameters())
    assert not net.fusion_logits.requires_grad
    set_training_stage(net, 2)
    assert all(p.requires_grad for p in net.fpn.parameters())
    assert not any(p.requires_grad for p in net.swin.parameters())
    set_training_stage(net, 3)
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="stage"):
        set_training_stage(net, 4)


# --- the plugin through the host -----------------------------------------------------------------------


def test_registers_one_mg_model() -> None:
    [plugin] = pacs_triage_register_models()
    assert isinstance(plugin, CLGBNetPlugin) and plugin.spec is MODEL_CFGS["clgb_net.v1"]
    spec = plugin.spec
    assert (spec.name, spec.arch, spec.classes) == ("clgb_net", "clgb_net", ("normal", "benign", "malignant"))
    assert spec.positive_classes == ("malignant",) and spec.modalities == ("MG",)
    assert spec.input_size == (SIZE, SIZE)
    assert not spec.accepts.accept_for_processing and not spec.accepts.accept_tomosynthesis_volumes
    assert plugin.default_options["keep_aspect"] is False  # the paper's plain resize
    assert {k: plugin.default_options[k] for k in MODEL_OPTIONS} == MODEL_OPTIONS
    manager = get_plugin_manager(Settings(), load_entrypoints=False)
    names = {p.name for returned in manager.hook.pacs_triage_register_models() for p in returned}
    assert "clgb_net" in names


def _host(**models: object) -> ModelHost:
    pm = pluggy.PluginManager("pacs_triage")
    pm.add_hookspecs(hookspecs)
    pm.register(clgb_module, "clgb_net")
    settings = Settings.model_validate(
        {"plugins": {"allow_demo_weights": True, "models": {"clgb_net": models}}}
    )
    return ModelHost(settings, plugin_manager=pm)


def test_plugin_runs_through_host_and_ignores_us(tmp_path: Path) -> None:
    mammogram = tmp_path / "mg.dcm"
    make_mg_image(3, size=(128, 104), birads=5).dataset.save_as(mammogram, enforce_file_format=True)
    ultrasound = write_ultrasound(tmp_path / "us.dcm", rows=64, cols=80, frames=1, region=(5, 5, 50, 60))
    results = _host().run("clgb_net", [read_image_ref(mammogram), read_image_ref(ultrasound)])
    assert [type(r) for r in results] == [Prediction, SkippedImage]
    prediction, skipped = results
    assert isinstance(prediction, Prediction) and isinstance(skipped, SkippedImage)
    assert "modality US" in skipped.reason
    assert prediction.classes == CLASSES and prediction.demo_weights
    assert sum(prediction.probabilities) == pytest.approx(1.0)
    assert prediction.risk == pytest.approx(prediction.probabilities[2])
    assert prediction.heatmap is not None and prediction.heatmap.shape == (128, 104)
    assert prediction.heatmap_method == "CAM"
    assert float(prediction.heatmap.min()) >= 0 and float(prediction.heatmap.max()) <= 1
    assert float(prediction.heatmap.max()) > 0.9  # the CAM's peak survives the trip back to the source grid
    assert prediction.extra_maps == {}, "the attention map is attached only on request"


def test_checkpoint_options_reach_the_host(tmp_path: Path, channel_checkpoint: tuple[Path, CLGBNet]) -> None:
    path, variant = channel_checkpoint
    mammogram = tmp_path / "mg.dcm"
    make_mg_image(4, size=(96, 80), birads=2).dataset.save_as(mammogram, enforce_file_format=True)
    host = _host(weights=str(path))
    (prediction,) = host.run("clgb_net", [read_image_ref(mammogram)])
    assert isinstance(prediction, Prediction) and not prediction.demo_weights
    loaded = host.load("clgb_net").model
    assert isinstance(loaded, CLGBNet) and loaded.config_dict() == variant.config_dict()
    # The reported version names the plugin and the weights, so retrained weights give new output UIDs.
    assert prediction.weights_sha256 and prediction.model_version.startswith("1.0/w")
    assert prediction.weights_sha256[:8] in prediction.model_version


def test_plugin_forward_without_explanation(model: CLGBNet, batch: torch.Tensor) -> None:
    plugin = CLGBNetPlugin(MODEL_CFGS["clgb_net.v1"])
    output = plugin.forward(model, batch[:1], {**BASE_OPTIONS, "explain": False})
    assert output.logits.shape == (1, 3) and output.heatmap is None
    benign = plugin.forward(model, batch[:1], {**BASE_OPTIONS, "cam_target_class": "benign"})
    assert benign.heatmap is not None and benign.heatmap.shape == (1, SIZE, SIZE)


def test_attention_map_only_on_request(model: CLGBNet, batch: torch.Tensor, outputs: tuple) -> None:
    plugin = CLGBNetPlugin(MODEL_CFGS["clgb_net.v1"])
    assert plugin.default_options["attention_map"] is False
    plain = plugin.forward(model, batch, plugin.default_options)
    assert plain.heatmap is not None and plain.extra_maps == {}
    asked = plugin.forward(model, batch, {**plugin.default_options, "attention_map": True})
    assert set(asked.extra_maps) == {"attention"}
    attention = asked.extra_maps["attention"]
    assert attention.shape == (batch.shape[0], SIZE, SIZE)
    assert float(attention.min()) >= 0.0 and float(attention.max()) <= 1.0
    torch.testing.assert_close(attention, attention_heatmap(outputs[1]["attention"], (SIZE, SIZE))[:, 0])
    torch.testing.assert_close(asked.heatmap, plain.heatmap)
