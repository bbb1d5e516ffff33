"""The oracles of docs/models/hybrid-birads.md and the training parts of the hybrid BI-RADS model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pluggy
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import plugins.builtin.hybrid_birads as hybrid_module
import plugins.builtin.us_fusion as us_module
from gateway.settings import Settings
from plugins import hookspecs
from plugins.builtin.hybrid_birads import (
    CLASS_NAMES,
    HybridBiradsNet,
    checkpoint_metadata,
    denormalise_grey,
    hybrid_birads_resnet50,
    load_imagenet_backbone,
    normalise,
    preprocess,
    summarise_probabilities,
)
from plugins.explain import grad_cam, normalise_minmax, upsample
from plugins.host import ModelHost
from plugins.preprocess import apply_clahe, decode_frames, read_image_ref
from plugins.synthetic import make_mg_image
from plugins.types import Prediction, SkippedImage
from plugins.weights import save_checkpoint
from tests.plugin_fixtures.dicom import write_ultrasound
from training.models.hybrid_birads import (
    HybridBiradsRecipe,
    augment,
    dal_loss,
    make_scheduler,
    ordinal_distance_matrix,
    oversample_indices,
    set_training_stage,
)
from training.recipes import adam


def _count(params: object) -> int:
    return sum(p.numel() for p in params)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def model() -> HybridBiradsNet:
    torch.manual_seed(0)
    return hybrid_birads_resnet50().eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def intermediates(model: HybridBiradsNet, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.forward_intermediates(batch)


# --- shapes and determinism ---------------------------------------------------------------------------------


def test_logits_shape_and_softmax(intermediates: dict[str, torch.Tensor]) -> None:
    logits = intermediates["logits"]
    assert logits.shape == (2, 5)
    assert torch.allclose(logits.softmax(1).sum(1), torch.ones(2), atol=1e-6)


def test_stage_shapes(model: HybridBiradsNet, intermediates: dict[str, torch.Tensor]) -> None:
    assert intermediates["layer4"].shape == (2, 2048, 7, 7)
    assert intermediates["proj"].shape == (2, 128, 7, 7)
    assert intermediates["tokens"].shape == (2, 49, 128)
    assert model.pos_embed.shape == (1, 49, 128)
    assert intermediates["encoded"].shape == (2, 49, 128)
    assert intermediates["pooled"].shape == (2, 128)
    assert intermediates["embedding"].shape == (2, 128)
    assert (intermediates["embedding"] >= 0).all()  # taken after the Dense-128 ReLU


def test_tokens_are_row_major_projection_plus_position(
    model: HybridBiradsNet, intermediates: dict[str, torch.Tensor]
) -> None:
    proj = intermediates["proj"]
    # token r*7 + c must be pixel (r, c) of the projected map plus its positional embedding
    expected = proj[:, :, 2, 5] + model.pos_embed[0, 2 * 7 + 5]
    assert torch.allclose(intermediates["tokens"][:, 2 * 7 + 5], expected, atol=1e-6)


def test_forward_matches_intermediates_and_is_deterministic(
    model: HybridBiradsNet, batch: torch.Tensor, intermediates: dict[str, torch.Tensor]
) -> None:
    with torch.no_grad():
        first = model(batch)
        second = model(batch)
    assert torch.equal(first, second)
    assert torch.allclose(first, intermediates["logits"], atol=1e-5)


def test_wrong_input_size_is_a_clear_error(model: HybridBiradsNet) -> None:
    with torch.no_grad(), pytest.raises(ValueError, match="positional embedding"):
        model(torch.zeros(1, 3, 256, 256))


def test_multi_scale_option_gives_245_tokens() -> None:
    ms = hybrid_birads_resnet50(scales=("layer3", "layer4")).eval()
    assert ms.pos_embed_layer3.shape == (1, 196, 128)
    with torch.no_grad():
        out = ms.forward_intermediates(torch.randn(1, 3, 224, 224))
    assert out["layer3"].shape == (1, 1024, 14, 14)
    assert out["tokens"].shape == (1, 245, 128)
    assert out["logits"].shape == (1, 5)
    assert ms.config_dict()["scales"] == ["layer3", "layer4"]


def test_smaller_resnet_backbone_option() -> None:
    # The demo profile trains from random weights with ResNet-18 tokens; everything after them is unchanged.
    small = hybrid_birads_resnet50(backbone="resnet18", input_size=96).eval()
    assert small.proj.in_channels == 512 and small.pos_embed.shape == (1, 9, 128)
    with torch.no_grad():
        out = small.forward_intermediates(torch.randn(2, 3, 96, 96))
    assert out["tokens"].shape == (2, 9, 128) and out["logits"].shape == (2, 5)
    assert small.config_dict()["backbone"] == "resnet18"
    assert _count(small.encoder.parameters()) == 132_480 and _count(small.head.parameters()) == 132_357
    # keras40 stage 2 on a basic block (no conv3): layer4 and the end of layer3's last block.
    params = {id(p) for p in set_training_stage(small, 2)}
    assert all(id(p) in params for p in small.backbone.layer4.parameters())
    assert all(id(p) in params for p in small.backbone.layer3[-1].conv2.parameters())
    assert not any(id(p) in params for p in small.backbone.layer3[-1].conv1.parameters())
    with pytest.raises(ValueError, match="timm ResNet"):
        hybrid_birads_resnet50(backbone="efficientnet_b0")


# --- parameter counts and staged unfreezing -----------------------------------------------------------------


def test_parameter_counts(model: HybridBiradsNet) -> None:
    assert _count(model.backbone.parameters()) == 23_508_032
    assert _count(model.proj.parameters()) == 262_272
    assert model.pos_embed.numel() == 6_272
    assert _count(model.encoder.parameters()) == 132_480
    assert _count(model.head.parameters()) == 132_357
    assert _count(model.parameters()) == 24_041_413


def _frozen_early_backbone(m: HybridBiradsNet) -> bool:
    bb = m.backbone
    early = [bb.conv1, bb.bn1, bb.layer1, bb.layer2, *list(bb.layer3)[:5]]
    return not any(p.requires_grad for module in early for p in module.parameters())


def test_training_stages() -> None:
    m = hybrid_birads_resnet50()
    stage1 = set_training_stage(m, 1)
    assert _count(stage1) == 533_381
    assert _frozen_early_backbone(m)
    stage2 = set_training_stage(m, 2)
    assert _count(stage2) == 16_352_645
    assert _frozen_early_backbone(m)
    assert not any(p.requires_grad for p in m.backbone.layer3[5].conv1.parameters())

    m.train()
    assert not m.backbone.bn1.training and not m.backbone.layer3[5].bn1.training
    assert m.backbone.layer3[5].bn2.training and m.backbone.layer4[0].bn1.training
    assert m.head.training

    fallback = hybrid_birads_resnet50(unfreeze="layer3_block")
    params = set_training_stage(fallback, 2)
    block5 = _count(fallback.backbone.layer3[5].parameters())
    assert _count(params) == 533_381 + 14_964_736 + block5


def test_optimizer_and_scheduler_factories(model: HybridBiradsNet) -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    hp = {k: h.default for k, h in HybridBiradsRecipe.HYPERPARAMETERS.items()}
    adam1, adam2 = adam(params, hp["stage1_lr"]), adam(params, hp["lr"])
    assert adam1.param_groups[0]["lr"] == 1e-4 and adam2.param_groups[0]["lr"] == 1e-5
    assert adam1.param_groups[0]["weight_decay"] == 0.0
    sched = make_scheduler(adam1)
    for _ in range(4):  # one good epoch, then 3 flat ones: patience 2 halves the lr once
        sched.step(1.0)
    assert adam1.param_groups[0]["lr"] == pytest.approx(5e-5)




# --- DAL ----------------------------------------------------------------------------------------------------


def test_distance_matrix() -> None:
    d = ordinal_distance_matrix(5)
    assert torch.equal(d, d.T)
    assert torch.all(d.diagonal() == 0)
    assert d[0, 4] == 4
    for i in range(1, 5):  # Toeplitz: constant along each diagonal
        assert torch.all(d[i:, i:] == d[:-i, :-i])


def test_dal_perfect_prediction_is_zero() -> None:
    logits = torch.zeros(5, 5)
    logits[torch.arange(5), torch.arange(5)] = 50.0
    assert dal_loss(logits, torch.arange(5)).item() < 1e-6


@pytest.mark.parametrize("d, expected", [(1, 1.0397), (2, 1.3863), (3, 1.7329), (4, 2.0794)])
def test_dal_half_mass_values(d: int, expected: float) -> None:
    logits = torch.full((1, 5), -1e4)
    logits[0, 0] = 0.0
    logits[0, d] = 0.0
    loss = dal_loss(logits, torch.tensor([0]), lam=1.0)
    assert loss.item() == pytest.approx(math.log(2) * (1 + 0.5 * d), abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert F.cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(math.log(2), abs=1e-6)


def test_dal_rises_with_distance() -> None:
    values = []
    for d in range(1, 5):
        logits = torch.full((1, 5), -1e4)
        logits[0, [0, d]] = 0.0
        values.append(dal_loss(logits, torch.tensor([0])).item())
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


def test_dal_properties_on_random_logits() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 5, generator=gen, requires_grad=True)
    target = torch.randint(0, 5, (16,), generator=gen)
    ce = F.cross_entropy(logits, target)
    assert torch.allclose(dal_loss(logits, target, lam=0.0), ce, rtol=0, atol=1e-7)
    loss = dal_loss(logits, target, lam=1.0)
    assert loss.item() >= ce.item()
    mirrored = dal_loss(logits.flip(1), 4 - target, lam=1.0)
    assert torch.allclose(loss, mirrored, atol=1e-6)
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    additive = dal_loss(logits.detach(), target, lam=0.5, mode="additive")
    p = logits.detach().softmax(1)
    e = (p * ordinal_distance_matrix(5)[target]).sum(1)
    assert torch.allclose(additive, ce.detach() + 0.5 * e.mean(), atol=1e-6)


def test_dal_trains_model_head() -> None:
    """Learning on generated data: a tiny linear classifier on separable ordinal clusters drives DAL down."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(5).repeat(20)
    x = F.one_hot(y, 5).float() * 3 + 0.3 * torch.randn(100, 5, generator=gen)
    net = torch.nn.Linear(5, 5)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    first = dal_loss(net(x), y).item()
    for _ in range(100):
        opt.zero_grad()
        loss = dal_loss(net(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < first / 5
    assert (net(x).argmax(1) == y).float().mean() > 0.95


# --- preprocessing ------------------------------------------------------------------------------------------


def test_caffe_normalisation() -> None:
    pixel = np.full((1, 1, 3), 128, dtype=np.uint8)
    out = normalise(pixel, "caffe")[:, 0, 0]
    assert torch.allclose(out, torch.tensor([24.061, 11.221, 4.32]), atol=1e-4)
    grey = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    x = normalise(np.repeat(grey[:, :, None], 3, axis=2), "caffe")
    assert torch.allclose(x[0] - x[1], torch.full((16, 16), 116.779 - 103.939), atol=1e-4)
    assert torch.allclose(x[1] - x[2], torch.full((16, 16), 123.68 - 116.779), atol=1e-4)
    imagenet = normalise(pixel, "imagenet")[:, 0, 0]
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(imagenet, expected, atol=1e-6)


def test_clahe_shape_dtype_and_constant_image() -> None:
    img = np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8)
    out = apply_clahe(img, 2.0, 8)
    assert out.shape == (224, 224) and out.dtype == np.uint8
    for value in (0, 100, 255):
        const = apply_clahe(np.full((224, 224), value, dtype=np.uint8))
        assert np.unique(const).size == 1


def test_preprocess_stretches_then_clahe() -> None:
    grey = np.random.default_rng(0).integers(0, 256, (300, 120), dtype=np.uint8)
    x, enhanced, box = preprocess(grey, norm_mode="imagenet")
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert enhanced.shape == (224, 224) and enhanced.dtype == np.uint8
    assert (box.pad_top, box.pad_left, box.crop) == (0, 0, (0, 0, 300, 120))  # stretched, not padded
    assert torch.allclose(x[0] * 0.229 + 0.485, x[2] * 0.225 + 0.406, atol=1e-5)  # identical channels
    pixels = torch.from_numpy(enhanced).float()
    assert torch.allclose(denormalise_grey(x[None])[0] * 255, pixels, atol=1e-3)
    caffe, _, _ = preprocess(grey, norm_mode="caffe")
    assert torch.allclose(denormalise_grey(caffe[None], "caffe")[0] * 255, pixels, atol=1e-3)


def test_augment_flips_rotates_and_keeps_shape() -> None:
    img = np.zeros((64, 64), dtype=np.uint8)
    img[:, :8] = 255
    rng = np.random.default_rng(0)
    outs = [augment(img, rng) for _ in range(40)]
    assert all(o.shape == (64, 64) and o.dtype == np.uint8 for o in outs)
    left_bright = sum(o[32, :8].mean() > 128 for o in outs)
    assert 5 < left_bright < 35  # about half flipped
    no_flip_rng = np.random.default_rng(1)
    # Reflect fill means a rotated constant image stays constant (no black corners).
    const = np.full((64, 64), 77, dtype=np.uint8)
    assert all(np.all(augment(const, no_flip_rng) == 77) for _ in range(5))


# --- token-order wiring -------------------------------------------------------------------------------------


def test_positional_embedding_breaks_permutation_invariance(model: HybridBiradsNet) -> None:
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randn(1, 49, 128, generator=gen)
    perm = torch.randperm(49, generator=gen)
    pos = model.pos_embed.detach() * 50  # a clearly non-zero P
    with torch.no_grad():
        base = model.encoder(tokens + pos).mean(1)
        shuffled = model.encoder(tokens[:, perm] + pos).mean(1)
        assert not torch.allclose(base, shuffled, atol=1e-4)
        plain = model.encoder(tokens).mean(1)
        plain_shuffled = model.encoder(tokens[:, perm]).mean(1)
    assert torch.allclose(plain, plain_shuffled, atol=1e-5)


# --- oversampling and split ---------------------------------------------------------------------------------


def test_oversampler_balances_and_keeps_every_sample() -> None:
    labels = np.array([0] * 47 + [1] * 154 + [2] * 16 + [3] * 31 + [4] * 40)
    idx = oversample_indices(labels, seed=42)
    counts = np.bincount(labels[idx], minlength=5)
    assert np.all(np.abs(counts - 154) <= 1)
    assert set(idx.tolist()) == set(range(len(labels)))
    assert not np.all(np.diff(idx) >= 0)  # shuffled




# --- Grad-CAM and outputs -----------------------------------------------------------------------------------


def test_grad_cam_shapes(model: HybridBiradsNet, batch: torch.Tensor) -> None:
    logits, cam = grad_cam(model, batch, model.cam_target_module())
    assert cam.shape == (2, 1, 7, 7)
    assert torch.isfinite(cam).all() and (cam >= 0).all()
    assert logits.shape == (2, 5)
    up = normalise_minmax(upsample(cam, (224, 224)))
    assert up.shape == (2, 1, 224, 224)
    assert up.min() >= 0 and up.max() <= 1
    _, proj_cam = grad_cam(model, batch[:1], model.cam_target_module("proj"), torch.tensor([3]))
    assert proj_cam.shape == (1, 1, 7, 7)


def test_grad_cam_with_frozen_backbone(batch: torch.Tensor) -> None:
    m = hybrid_birads_resnet50().eval()
    set_training_stage(m, 1)
    _, cam = grad_cam(m, batch[:1], m.cam_target_module())
    assert cam.shape == (1, 1, 7, 7) and torch.isfinite(cam).all()


def test_summarise_probabilities() -> None:
    out = summarise_probabilities([0.1, 0.2, 0.1, 0.4, 0.2])
    assert out["birads"] == 4
    assert out["risk"] == pytest.approx(0.6)
    assert out["expected_birads"] == pytest.approx(0.1 + 0.4 + 0.3 + 1.6 + 1.0)
    assert CLASS_NAMES[3] == "BI-RADS 4"


# --- weights and metadata -----------------------------------------------------------------------------------


def test_load_imagenet_backbone(tmp_path: Path) -> None:
    stock = timm.create_model("resnet50", pretrained=False)
    with torch.no_grad():
        stock.conv1.weight.fill_(0.5)
    path = tmp_path / "resnet50.safetensors"
    save_file(stock.state_dict(), str(path))
    m = hybrid_birads_resnet50()
    load_imagenet_backbone(m, path)
    assert torch.all(m.backbone.conv1.weight == 0.5)

    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wrong)
    with pytest.raises(ValueError, match="does not fit"):
        load_imagenet_backbone(m, wrong)
    with pytest.raises(FileNotFoundError):
        load_imagenet_backbone(m, tmp_path / "missing.safetensors")


def test_config_dict_round_trips(model: HybridBiradsNet) -> None:
    cfg = model.config_dict()
    for key in ("norm_mode", "clahe_clip_limit", "clahe_tile_grid", "input_size", "dal_lambda", "scales"):
        assert key in cfg
    assert cfg["norm_mode"] == "imagenet" and cfg["dal_lambda"] == 1.0 and cfg["scales"] == ["layer4"]
    rebuilt = HybridBiradsNet(**cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(ValueError, match="norm_mode"):
        HybridBiradsNet(norm_mode="tf")  # type: ignore[arg-type]
    meta = checkpoint_metadata(model)
    assert meta.class_names == CLASS_NAMES and meta.input_size == (224, 224)
    assert meta.options["norm_mode"] == "imagenet" and meta.options["dal_lambda"] == 1.0
    assert meta.options["scales"] == ["layer4"] and meta.options["clahe_clip_limit"] == 2.0


# --- the plugin through the host ----------------------------------------------------------------


def _host(tmp_path: Path, **hybrid: object) -> ModelHost:
    pm = pluggy.PluginManager("pacs_triage")
    pm.add_hookspecs(hookspecs)
    pm.register(hybrid_module, "hybrid_birads")
    pm.register(us_module, "us_fusion")
    settings = Settings.model_validate(
        {"plugins": {"allow_demo_weights": True, "models": {"hybrid_birads": hybrid}}}
    )
    return ModelHost(settings, plugin_manager=pm)


def _write(tmp_path: Path) -> tuple[Path, Path]:
    mammogram = tmp_path / "mg.dcm"
    make_mg_image(7, size=(128, 104), birads=4).dataset.save_as(mammogram, enforce_file_format=True)
    ultrasound = write_ultrasound(tmp_path / "us.dcm", rows=96, cols=128, frames=2, region=(10, 10, 70, 100))
    return mammogram, ultrasound


def test_plugin_runs_through_host_and_ignores_us(tmp_path: Path) -> None:
    mammogram, ultrasound = _write(tmp_path)
    host = _host(tmp_path)
    results = host.run("hybrid_birads", [read_image_ref(mammogram), read_image_ref(ultrasound)])
    assert [type(r) for r in results] == [Prediction, SkippedImage]
    prediction, skipped = results
    assert isinstance(prediction, Prediction) and isinstance(skipped, SkippedImage)
    assert "modality US" in skipped.reason
    assert prediction.classes == CLASS_NAMES and prediction.demo_weights
    assert prediction.birads == int(np.argmax(prediction.probabilities)) + 1
    assert prediction.risk == pytest.approx(prediction.probabilities[3] + prediction.probabilities[4])
    assert prediction.heatmap is not None and prediction.heatmap.shape == (128, 104)
    assert prediction.heatmap_method == "Grad-CAM"
    assert 0 <= prediction.heatmap.min() and prediction.heatmap.max() <= 1
    assert prediction.extra_maps["clahe"].shape == (128, 104)
    assert host.plugin("hybrid_birads").spec.gives_birads


def test_checkpoint_options_reach_the_host(tmp_path: Path) -> None:
    """A checkpoint trained with caffe normalisation is rebuilt, strictly loaded and served in caffe mode."""
    torch.manual_seed(3)
    trained = hybrid_birads_resnet50(norm_mode="caffe", cam_layer="proj").eval()
    weights = tmp_path / "hybrid.safetensors"
    save_checkpoint(trained, weights, checkpoint_metadata(trained))
    mammogram, _ = _write(tmp_path)
    host = _host(tmp_path, weights=str(weights))
    (prediction,) = host.run("hybrid_birads", [read_image_ref(mammogram)])
    assert isinstance(prediction, Prediction) and not prediction.demo_weights
    ((_, image),) = decode_frames(mammogram, "middle")
    x, _, _ = preprocess(image, norm_mode="caffe")
    with torch.no_grad():
        expected = trained(x[None]).softmax(1)[0]
    assert np.allclose(prediction.probabilities, expected.numpy(), atol=1e-5)
