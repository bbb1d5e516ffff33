"""The oracles of docs/models/us-fusion.md, training parts and host wiring of the US-Fusion model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pluggy
import pytest
import timm
import torch
from safetensors.torch import save_file

import plugins.builtin.hybrid_birads as hybrid_module
import plugins.builtin.us_fusion as us_module
from gateway.settings import Settings
from plugins import hookspecs
from plugins.builtin.asg_mammonet import CBAM
from plugins.builtin.us_fusion import (
    MODEL_CFGS,
    UsFusionNet,
    UsFusionPlugin,
    checkpoint_metadata,
    default_shap_baselines,
    gradient_shap,
    load_imagenet_backbones,
    saliency,
    select_frames,
    signed_map,
    us_fusion_mnv2_dn121,
)
from plugins.explain import grad_cam
from plugins.host import ModelHost
from plugins.manager import get_plugin_manager
from plugins.preprocess import decode_frames, read_image_ref, to_grey
from plugins.synthetic import make_us_image
from plugins.types import Prediction, SkippedImage
from plugins.weights import save_checkpoint
from tests.plugin_fixtures.dicom import write_mammogram, write_ultrasound
from training.models.us_fusion import (
    UsFusionRecipe,
    class_weights,
    make_scheduler,
    train_transform,
)
from training.recipes import adam

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def model() -> UsFusionNet:
    torch.manual_seed(0)
    return us_fusion_mnv2_dn121().eval()


@pytest.fixture(scope="module")
def intermediates(model: UsFusionNet) -> dict[str, torch.Tensor]:
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.forward_intermediates(x)


def _small(batch: int = 2, size: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- shapes and size ----------------------------------------------------------------------------------------


def test_logits_shape_and_softmax(intermediates: dict[str, torch.Tensor]) -> None:
    assert intermediates["logits"].shape == (2, 2)
    assert torch.allclose(intermediates["logits"].softmax(1).sum(1), torch.ones(2), atol=1e-6)


def test_stage_shapes(intermediates: dict[str, torch.Tensor]) -> None:
    assert intermediates["branch_a"].shape == (2, 1280, 7, 7)
    assert intermediates["branch_b"].shape == (2, 1024, 7, 7)
    assert intermediates["proj_a"].shape == (2, 256, 7, 7)
    assert intermediates["proj_b"].shape == (2, 256, 7, 7)
    assert intermediates["fused"].shape == (2, 512, 7, 7)
    assert torch.equal(intermediates["fused"][:, :256], intermediates["proj_a"])
    assert intermediates["attended"].shape == (2, 512, 7, 7)
    assert intermediates["pooled"].shape == (2, 512)


def test_other_input_sizes(model: UsFusionNet) -> None:
    with torch.no_grad():
        at256 = model.forward_intermediates(torch.randn(1, 3, 256, 256))
        at225 = model.forward_intermediates(torch.randn(1, 3, 225, 225))
    assert at256["branch_a"].shape[-2:] == (8, 8) and at256["branch_b"].shape[-2:] == (8, 8)
    assert at225["branch_a"].shape[-2:] == (8, 8) and at225["branch_b"].shape[-2:] == (7, 7)
    assert at225["proj_b"].shape[-2:] == (8, 8)
    assert at225["logits"].shape == (1, 2)


def test_parameter_counts(model: UsFusionNet) -> None:
    assert _count(model.branch_a) == 2_223_872
    assert _count(model.branch_b) == 6_953_856
    assert _count(model.proj_a) == 328_192
    assert _count(model.proj_b) == 262_656
    assert _count(model.attention) == 33_410
    assert _count(model.head) == 131_842
    assert _count(model) == 9_933_828


@pytest.mark.parametrize(
    "options, width",
    [
        ({"fusion": "pooled_concat"}, 2304),
        ({"fusion": "a_only"}, 256),
        ({"fusion": "b_only"}, 256),
        ({"attention": "se"}, 512),
        ({"attention": "none"}, 512),
        ({"branch_a_features": "blocks"}, 512),
    ],
)
def test_options_build_and_run(options: dict[str, str], width: int) -> None:
    m = us_fusion_mnv2_dn121(**options).eval()
    assert m.num_features == width
    with torch.no_grad():
        out = m.forward_intermediates(_small(1, 32))
    assert out["logits"].shape == (1, 2)
    if options.get("branch_a_features") == "blocks":
        assert out["branch_a"].shape[1] == 320
    assert m.config_dict()[next(iter(options))] == next(iter(options.values()))


def test_invalid_options_raise() -> None:
    with pytest.raises(ValueError, match="pooled_concat"):
        UsFusionNet(fusion="pooled_concat", attention="cbam")
    with pytest.raises(ValueError, match="fusion"):
        UsFusionNet(fusion="sum")  # type: ignore[arg-type]


# --- both branches used, CBAM oracle, determinism -----------------------------------------------------------


def test_both_branches_receive_gradients() -> None:
    m = us_fusion_mnv2_dn121().train()
    loss = torch.nn.functional.cross_entropy(m(_small(2, 64)), torch.tensor([0, 1]))
    loss.backward()
    for branch in (m.branch_a, m.branch_b):
        norm = torch.sqrt(sum((p.grad**2).sum() for p in branch.parameters() if p.grad is not None))
        assert norm > 0


def test_zeroing_branch_a_changes_logits(model: UsFusionNet) -> None:
    x = _small(1, 64)
    with torch.no_grad():
        base = model(x)
        handle = model.proj_a.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
        try:
            zeroed = model(x)
        finally:
            handle.remove()
    assert not torch.allclose(base, zeroed)


def test_zero_cbam_is_a_quarter() -> None:
    cbam = CBAM(512, 16, 7)
    for p in cbam.parameters():
        torch.nn.init.zeros_(p)
    f = torch.randn(2, 512, 7, 7)
    assert torch.equal(cbam(f), 0.25 * f)


def test_eval_deterministic_and_batch_independent(model: UsFusionNet) -> None:
    x = _small(2, 64)
    with torch.no_grad():
        batched = model(x)
        again = model(x)
        single = torch.cat([model(x[:1]), model(x[1:])])
    assert torch.equal(batched, again)
    assert torch.allclose(batched, single, atol=1e-5)


# --- explanations -------------------------------------------------------------------------------------------


def test_grad_cam_and_saliency_at_224(model: UsFusionNet) -> None:
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    logits, cam = grad_cam(model, x, model.cam_target_module())
    assert cam.shape == (1, 1, 7, 7) and torch.isfinite(cam).all() and (cam >= 0).all()
    assert logits.shape == (1, 2)
    sal = saliency(model, x)
    assert sal.shape == (1, 1, 224, 224)
    assert (sal >= 0).all() and sal.max() > 0


def test_per_branch_grad_cam(model: UsFusionNet) -> None:
    x = _small(1, 64)
    branches = (("branch_a", model.branch_a.bn2), ("branch_b", model.branch_b.features.norm5))
    for layer, channels_map in branches:
        assert model.cam_target_module(layer) is channels_map  # type: ignore[arg-type]
        _, cam = grad_cam(model, x, channels_map, torch.tensor([1]))
        assert cam.shape == (1, 1, 2, 2) and torch.isfinite(cam).all()


def test_gradient_shap_shape_on_model(model: UsFusionNet) -> None:
    x = _small(1, 64)
    baselines = default_shap_baselines(x)
    assert baselines.shape == (1, 2, 3, 64, 64)
    gen = torch.Generator().manual_seed(0)
    attr = gradient_shap(model, x, baselines, n_samples=4, internal_batch_size=4, generator=gen)
    assert attr.shape == x.shape and torch.isfinite(attr).all()


def test_gradient_shap_completeness_on_linear_model() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    x = torch.randn(2, 3, 8, 8)
    zero = torch.zeros(1, 3, 8, 8)
    attr = gradient_shap(linear, x, zero, target=1, n_samples=50, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = linear(x)[:, 1] - linear(zero)[:, 1]
    assert torch.allclose(attr.flatten(1).sum(1), expected, atol=1e-4)


def test_gradient_shap_noise_and_shared_background() -> None:
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    x = torch.randn(3, 3, 2, 2)
    background = torch.randn(5, 3, 2, 2)
    gen = torch.Generator().manual_seed(0)
    attr = gradient_shap(linear, x, background, n_samples=8, stdevs=0.1, generator=gen)
    assert attr.shape == x.shape and torch.isfinite(attr).all()
    with pytest.raises(ValueError, match="do not fit"):
        gradient_shap(linear, x, torch.randn(5, 3, 4, 4))


# --- preprocessing ------------------------------------------------------------------------------------------


def test_rgb_with_identical_channels_keeps_grey_values() -> None:
    grey = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    assert np.array_equal(to_grey(np.repeat(grey[:, :, None], 3, axis=2)), grey)


def test_select_frames() -> None:
    assert select_frames(1, "first") == [0]
    assert select_frames(30, "middle") == [15]
    picks = select_frames(100, "mean_prob_over_frames")
    assert len(picks) == 16 and picks[0] == 0 and picks[-1] == 99
    assert select_frames(3, "mean_prob_over_frames") == [0, 1, 2]


def test_signed_map_range() -> None:
    attr = torch.randn(2, 3, 8, 8)
    signed = signed_map(attr)
    assert signed.shape == (2, 8, 8)
    assert torch.allclose(signed.abs().flatten(1).amax(1), torch.ones(2))
    assert torch.equal(signed_map(torch.zeros(1, 3, 4, 4)), torch.zeros(1, 4, 4))


# --- ImageNet weights ---------------------------------------------------------------------------------------


def test_load_imagenet_backbones(tmp_path: Path) -> None:
    mnv2 = timm.create_model("mobilenetv2_100", pretrained=False)
    dn121 = timm.create_model("densenet121", pretrained=False)
    with torch.no_grad():
        mnv2.conv_stem.weight.fill_(0.25)
        dn121.features.conv0.weight.fill_(0.75)
    mnv2_path, dn_path = tmp_path / "mnv2.safetensors", tmp_path / "dn121.pth"
    save_file(mnv2.state_dict(), str(mnv2_path))
    torch.save(dn121.state_dict(), dn_path)
    m = us_fusion_mnv2_dn121()
    load_imagenet_backbones(m, mnv2_path, dn_path)
    assert torch.all(m.branch_a.conv_stem.weight == 0.25)
    assert torch.all(m.branch_b.features.conv0.weight == 0.75)

    blocks = us_fusion_mnv2_dn121(branch_a_features="blocks")
    load_imagenet_backbones(blocks, mnv2_path)
    assert torch.all(blocks.branch_a.conv_stem.weight == 0.25)
    with pytest.raises(ValueError, match="does not fit"):
        load_imagenet_backbones(m, mobilenet_path=dn_path)
    with pytest.raises(ValueError, match="no branch_b"):
        load_imagenet_backbones(us_fusion_mnv2_dn121(fusion="a_only"), densenet_path=dn_path)


def test_config_dict_round_trips(model: UsFusionNet) -> None:
    cfg = model.config_dict()
    assert cfg["fusion"] == "spatial" and cfg["attention"] == "cbam" and cfg["cam_layer"] == "attention"
    rebuilt = UsFusionNet(**cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    meta = checkpoint_metadata(model, options={"frames": "first"})
    assert meta.class_names == ("benign", "malignant") and meta.input_size == (224, 224)
    assert meta.options["fusion"] == "spatial" and meta.options["frames"] == "first"


# --- training parts -----------------------------------------------------------------------------------------


def test_class_weights_and_loss() -> None:
    labels = [0] * 437 + [1] * 210
    w = class_weights(labels)
    assert torch.allclose(w, torch.tensor([647 / (2 * 437), 647 / (2 * 210)]))
    assert torch.allclose(class_weights([0, 1, 0, 1]), torch.ones(2))
    with pytest.raises(ValueError, match="at least one"):
        class_weights([0, 0])


def test_transforms() -> None:
    image = torch.randint(0, 256, (3, 300, 200), dtype=torch.uint8)
    torch.manual_seed(0)
    train = train_transform()
    a, b = train(image), train(image)
    assert a.shape == (3, 224, 224) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    names = [type(t).__name__ for t in train.transforms]
    assert "RandomVerticalFlip" not in names and "RandomHorizontalFlip" in names


def test_optimizer_and_scheduler() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    hp = {k: h.default for k, h in UsFusionRecipe.HYPERPARAMETERS.items()}
    opt = adam(params, hp["lr"], hp["weight_decay"])
    assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["weight_decay"] == 1e-4
    sched = make_scheduler(opt, steps_per_epoch=10)
    lrs = []
    for _ in range(500):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4 / 20) and lrs[19] == pytest.approx(1e-4)
    assert all(x <= y for x, y in zip(lrs[:20], lrs[1:20], strict=False))
    assert all(x >= y for x, y in zip(lrs[20:], lrs[21:], strict=False))
    assert lrs[-1] < 1e-7
    assert (hp["monitor"], hp["patience"]) == ("val_auc", 10)








def test_weighted_training_learns_generated_lesions() -> None:
    """A few Adam steps on bright-blob (malignant) vs dark (benign) images reduce the recipe's weighted loss."""
    torch.manual_seed(0)
    m = us_fusion_mnv2_dn121(fusion="a_only").train()
    x = torch.randn(8, 3, 32, 32) * 0.1
    y = torch.tensor([0, 1] * 4)
    x[y == 1, :, 8:24, 8:24] += 2.0
    recipe = UsFusionRecipe(UsFusionPlugin(MODEL_CFGS["us_fusion.v1"]), options={"fusion": "a_only"})
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss, _parts = recipe.loss(m(x), y, 0, y.tolist())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


# --- the plugin through the host ----------------------------------------------------------------


def test_region_crop_is_200_by_100(tmp_path: Path) -> None:
    """Spec §8.9: MinX0=10, MinY0=20, MaxX1=109, MaxY1=219 crops 200x100 (HxW) before the resize."""
    path = write_ultrasound(tmp_path / "us.dcm", rows=240, cols=160, frames=2, region=(20, 10, 200, 100))
    ref = read_image_ref(path)
    assert ref.us_region == (20, 10, 200, 100)
    ((_, image),) = decode_frames(path, "first")
    plugin = UsFusionPlugin(MODEL_CFGS["us_fusion.v1"])
    tensor, box = plugin.preprocess(image, ref, plugin.default_options)
    assert box.crop == (20, 10, 200, 100)
    assert tensor.shape == (3, 224, 224)
    std, mean = torch.tensor([0.229, 0.224, 0.225]), torch.tensor([0.485, 0.456, 0.406])
    pixels = tensor * std.view(3, 1, 1) + mean.view(3, 1, 1)
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[0], pixels[2], atol=1e-5)
    assert (box.pad_top, box.pad_left) == (0, 0)  # stretched, not letterboxed


def _host(**us_options: object) -> ModelHost:
    pm = pluggy.PluginManager("pacs_triage")
    pm.add_hookspecs(hookspecs)
    pm.register(us_module, "us_fusion")
    pm.register(hybrid_module, "hybrid_birads")
    settings = Settings.model_validate(
        {
            "plugins": {
                "allow_demo_weights": True,
                "models": {"us_fusion": {"batch_size": 2, "options": us_options}},
            }
        }
    )
    return ModelHost(settings, plugin_manager=pm)


def test_plugin_runs_through_host_and_ignores_mg(tmp_path: Path) -> None:
    torch.manual_seed(0)
    multi = write_ultrasound(tmp_path / "cine.dcm", rows=120, cols=160, frames=3, region=(20, 30, 80, 100))
    single = tmp_path / "single.dcm"
    phantom = make_us_image(3, "malignant", (96, 128), frames=1, photometric="MONOCHROME2")
    phantom.dataset.save_as(single, enforce_file_format=True)
    mammogram = write_mammogram(tmp_path / "mg.dcm", rows=96, cols=80)
    refs = [read_image_ref(p) for p in (multi, single, mammogram)]
    assert refs[1].sop_class_uid == US_IMAGE_STORAGE
    host = _host(saliency=True, shap=True, shap_samples=2)
    results = host.run("us_fusion", refs)
    assert [type(r) for r in results] == [Prediction, Prediction, SkippedImage]
    cine, still, skipped = results
    assert "modality MG" in skipped.reason  # type: ignore[union-attr]
    assert cine.image.frame_index == 0  # type: ignore[union-attr]  # the host's frame choice: first
    for prediction, shape in ((cine, (120, 160)), (still, (96, 128))):
        assert isinstance(prediction, Prediction)
        assert prediction.classes == ("benign", "malignant") and prediction.demo_weights
        assert prediction.risk == pytest.approx(prediction.probabilities[1])
        assert prediction.heatmap is not None and prediction.heatmap.shape == shape
        assert prediction.heatmap_method == "Grad-CAM"
        assert set(prediction.extra_maps) == {"saliency", "shap"}
        assert all(m.shape == shape and np.isfinite(m).all() for m in prediction.extra_maps.values())
    # Maps are zero outside the ultrasound region (20, 30, 80, 100) of the cine loop.
    assert isinstance(cine, Prediction) and cine.heatmap is not None
    assert np.all(cine.heatmap[:20] == 0) and np.all(cine.extra_maps["saliency"][:, :30] == 0)
    assert np.abs(cine.extra_maps["shap"]).max() <= 1 + 1e-6


def test_registered_by_the_plugin_manager() -> None:
    pm = get_plugin_manager(Settings(), load_entrypoints=False)
    names = {plugin.name for returned in pm.hook.pacs_triage_register_models() for plugin in returned}
    assert {"us_fusion", "hybrid_birads"} <= names


def test_checkpoint_options_reach_the_host(tmp_path: Path) -> None:
    """A single-branch ablation checkpoint is rebuilt from its metadata options and strictly loaded."""
    torch.manual_seed(4)
    trained = us_fusion_mnv2_dn121(fusion="a_only").eval()
    weights = tmp_path / "us_a_only.safetensors"
    save_checkpoint(trained, weights, checkpoint_metadata(trained))
    path = write_ultrasound(tmp_path / "us.dcm", rows=96, cols=128, frames=1, region=(10, 10, 70, 100))
    pm = pluggy.PluginManager("pacs_triage")
    pm.add_hookspecs(hookspecs)
    pm.register(us_module, "us_fusion")
    settings = Settings.model_validate({"plugins": {"models": {"us_fusion": {"weights": str(weights)}}}})
    host = ModelHost(settings, plugin_manager=pm)
    (prediction,) = host.run("us_fusion", [read_image_ref(path)])
    assert isinstance(prediction, Prediction) and not prediction.demo_weights
    assert prediction.extra_maps == {}  # saliency and SHAP only when asked for
    assert isinstance(host.load("us_fusion").model, UsFusionNet)
    assert host.load("us_fusion").model.fusion == "a_only"
