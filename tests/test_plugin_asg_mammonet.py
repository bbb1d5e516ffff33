"""ASG-MammoNet: the test oracles of docs/models/asg-mammonet.md and its training parts."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import timm
import torch

from plugins.base import BASE_OPTIONS
from plugins.builtin.asg_mammonet import (
    CBAM,
    MODEL_CFGS,
    AsgMammoNet,
    AsgMammoNetPlugin,
    pacs_triage_register_models,
)
from plugins.explain import grad_cam, linear_cam, normalise_minmax, upsample
from tests.plugin_fixtures.dicom import mammogram_pixels
from training.models.asg_mammonet import (
    AsgAugment,
    class_balanced_sampler,
    normalisation_stats,
)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def model() -> Iterator[AsgMammoNet]:
    torch.manual_seed(0)
    # Frozen as the host runs it; inputs below 224 px keep the suite fast (the net is fully convolutional).
    yield AsgMammoNet().eval().requires_grad_(False)


def test_registers_one_model_with_the_spec_contract() -> None:
    [plugin] = pacs_triage_register_models()
    assert isinstance(plugin, AsgMammoNetPlugin)
    spec = plugin.spec
    assert spec is MODEL_CFGS["asg_mammonet.v1"]
    assert (spec.name, spec.classes, spec.positive_classes) == (
        "asg_mammonet",
        ("benign", "malignant"),
        ("malignant",),
    )
    assert spec.input_size == (224, 224) and spec.modalities == ("MG",)
    assert "1.2.840.10008.5.1.4.1.1.1.2" in spec.accepts.sop_class_uids
    assert not spec.accepts.accept_for_processing and not spec.accepts.accept_tomosynthesis_volumes


# 1, 6 ---------------------------------------------------------------------


def test_logits_shape_softmax_and_batch_consistency(model: AsgMammoNet) -> None:
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits.softmax(dim=1).sum(dim=1), torch.ones(2), atol=1e-6, rtol=0)
    x = torch.randn(3, 3, 96, 96)
    with torch.inference_mode():
        logits = model(x)
        again = model(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(again, logits, atol=0, rtol=0)
    torch.testing.assert_close(singles, logits, atol=1e-4, rtol=1e-4)


# 2, 3, 4 ------------------------------------------------------------------


def test_backbone_and_cbam_shapes(model: AsgMammoNet) -> None:
    with torch.inference_mode():
        features = model.backbone(torch.randn(1, 3, 224, 224))[-1]
        assert features.shape == (1, 320, 7, 7)
        assert model.cbam(features).shape == (1, 320, 7, 7)
        assert CBAM(64, 8)(torch.randn(2, 64, 13, 9)).shape == (2, 64, 13, 9)


def test_cbam_with_zero_weights_is_a_quarter_identity() -> None:
    cbam = CBAM(320, 8)
    for parameter in cbam.parameters():
        torch.nn.init.zeros_(parameter)
    features = torch.randn(2, 320, 7, 7)
    assert torch.equal(cbam.channel(features), torch.full((2, 320, 1, 1), 0.5))
    assert torch.equal(cbam(features), 0.25 * features)


def test_attention_masks_lie_strictly_between_0_and_1() -> None:
    torch.manual_seed(1)
    cbam = CBAM(64, 8)
    features = torch.randn(2, 64, 13, 9) * 3
    channel = cbam.channel(features)
    spatial = cbam.spatial(channel * features)
    assert channel.shape == (2, 64, 1, 1) and spatial.shape == (2, 1, 13, 9)
    for mask in (channel, spatial):
        assert torch.all(mask > 0) and torch.all(mask < 1)


# 5 ------------------------------------------------------------------------


def test_parameter_counts(model: AsgMammoNet) -> None:
    assert count(model.cbam) == 26_058
    assert count(model.fc) == 642
    assert count(model.backbone) == 3_595_388
    assert count(model) == 3_622_088
    assert count(CBAM(320, 16)) == 13_238


def test_head_variant_has_1280_channels() -> None:
    variant = AsgMammoNet(cbam_after="head", cbam_reduction=16).eval()
    with torch.inference_mode():
        assert variant(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    assert variant.fc.in_features == 1280
    assert 4.1e6 < count(variant) < 4.3e6  # docs/models/asg-mammonet.md: about 4.22M


# 8 ------------------------------------------------------------------------


def test_training_set_normalisation_gives_zero_mean_unit_std() -> None:
    rng = np.random.default_rng(0)
    images = [(mammogram_pixels(96, 80, seed=i) >> 4).astype(np.uint8) for i in range(4)]
    images += [rng.integers(0, 256, (50, 70), dtype=np.uint8)]
    mean, std = normalisation_stats(images)
    values = np.concatenate([(im.astype(np.float64) / 255.0).ravel() for im in images])
    normalised = (values - mean) / std
    assert normalised.mean() == pytest.approx(0, abs=1e-9) and normalised.std() == pytest.approx(1, abs=1e-9)


# 9 ------------------------------------------------------------------------


def test_weighted_sampler_balances_classes() -> None:
    labels = [0] * 900 + [1] * 100
    sampler = class_balanced_sampler(labels, generator=torch.Generator().manual_seed(0))
    assert sampler.num_samples == 1000 and sampler.replacement
    drawn = torch.multinomial(
        sampler.weights, 20_000, replacement=True, generator=torch.Generator().manual_seed(1)
    )
    fraction = float(np.mean(np.asarray(labels)[drawn.numpy()]))
    assert fraction == pytest.approx(0.5, abs=0.02)
    assert len(list(sampler)) == 1000


# 10 -----------------------------------------------------------------------


def test_grad_cam_shapes_and_finiteness(model: AsgMammoNet) -> None:
    x = torch.randn(2, 3, 224, 224)
    logits, cam = grad_cam(model, x, model.cbam)
    assert logits.shape == (2, 2) and cam.shape == (2, 1, 7, 7)
    assert torch.all(cam >= 0) and torch.isfinite(cam).all()
    up = normalise_minmax(upsample(cam, (224, 224)))
    assert up.shape == (2, 1, 224, 224) and torch.isfinite(up).all()
    assert float(up.min()) >= 0 and float(up.max()) <= 1
    constant = normalise_minmax(
        upsample(grad_cam(model, torch.zeros(1, 3, 224, 224), model.cbam)[1], (224, 224))
    )
    assert torch.isfinite(constant).all()
    assert not torch.any(normalise_minmax(torch.zeros(1, 1, 7, 7)))  # an all-zero map stays zero


def test_cam_shortcut_equals_grad_cam(model: AsgMammoNet) -> None:
    # CBAM output -> global average pooling -> fc, so Grad-CAM is CAM / (H*W): no backward pass.
    x = torch.randn(2, 3, 128, 128)
    for target in (None, torch.tensor([1, 1])):
        slow_logits, slow = grad_cam(model, x, model.cbam, target)
        fast_logits, fast = linear_cam(model, x, model.cbam, model.fc, target)
        torch.testing.assert_close(fast_logits, slow_logits)
        torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-4)
        assert slow.abs().sum() > 0  # a meaningful comparison, not of two zero maps


def test_plugin_explains_with_the_shortcut(model: AsgMammoNet) -> None:
    plugin = AsgMammoNetPlugin(MODEL_CFGS["asg_mammonet.v1"])
    output = plugin.forward(model, torch.randn(2, 3, 96, 96), BASE_OPTIONS)
    assert output.heatmap is not None and output.heatmap.shape == (2, 3, 3)
    assert output.heatmap_method == "Grad-CAM" and float(output.heatmap.max()) <= 1
    malignant = plugin.forward(
        model, torch.randn(1, 3, 96, 96), {**BASE_OPTIONS, "cam_target_class": "malignant"}
    )
    assert malignant.logits.shape == (1, 2)


# 11 -----------------------------------------------------------------------




# 12 -----------------------------------------------------------------------


def test_stock_efficientnet_state_dict_loads_into_the_backbone() -> None:
    stock = timm.create_model("efficientnet_b0", pretrained=False)  # randomly initialised, same keys
    model = AsgMammoNet()
    result = model.backbone.load_state_dict(stock.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted({key.split(".")[0] for key in result.unexpected_keys}) == ["bn2", "classifier", "conv_head"]
    assert len(result.unexpected_keys) == 8


# Training parts ------------------------------------------------------------


def test_augmentation_keeps_geometry_and_range() -> None:
    image = (mammogram_pixels(300, 200) >> 4).astype(np.uint8)
    augment = AsgAugment(mean=(0.3,), std=(0.2,), rng=random.Random(0))
    outputs = [augment.augment(image) for _ in range(4)]
    assert all(o.shape == (224, 224) and o.dtype == np.uint8 for o in outputs)
    assert len({o.tobytes() for o in outputs}) == 4  # random
    tensor = augment(image)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32




def test_a_few_steps_learn_a_separable_toy_task() -> None:
    # Bright-centre vs dark-centre images at 64 px: the loss must fall (the full network trains).
    torch.manual_seed(0)
    net = AsgMammoNet().train()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(4, 3, 64, 64) * 0.1
    y = torch.tensor([0, 1] * 2)
    x[y == 1, :, 24:40, 24:40] += 2.0
    losses = []
    for _ in range(4):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
