"""LEM: the oracles of docs/models/lem.md, plus its training parts."""

from __future__ import annotations

import dataclasses
import itertools
import math
import socket
from pathlib import Path

import cv2
import numpy as np
import pluggy
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import plugins.builtin.lem as lem_module
from gateway.settings import Settings
from plugins import hookspecs
from plugins.base import BASE_OPTIONS
from plugins.builtin.lem import (
    BACKBONES,
    CELL_PIXELS,
    CLASSES,
    LEM,
    MODEL_CFGS,
    MODEL_OPTIONS,
    LEMImageOutput,
    LEMPlugin,
    aggregate_extrema,
    checkpoint_metadata,
    excitation_backprop,
    extremum_list,
    extremum_seed,
    lesion_boxes,
    lesion_outlines,
    load_imagenet_backbone,
    local_extrema,
    pacs_triage_register_models,
    select_extrema,
    two_class_logits,
    visible_polygon,
)
from plugins.host import ModelHost
from plugins.manager import get_plugin_manager
from plugins.preprocess import map_to_source, read_image_ref
from plugins.synthetic import make_mg_image
from plugins.types import ImageRef, LocalisationRegion, Prediction, SkippedImage
from plugins.weights import load_model, save_checkpoint
from tests.plugin_fixtures.dicom import write_ultrasound
from training.models.lem import (
    LemRecipe,
    alpha_schedule,
    build_scheduler,
    lem_loss,
    sparse_loss,
    train_transform,
)
from training.recipes import sgd_or_adam

SMALL = (128, 96)


def hand_made_map() -> torch.Tensor:
    score = torch.zeros(1, 1, 5, 5)
    score[0, 0, 1, 1] = 3.0
    score[0, 0, 3, 3] = 2.0
    score[0, 0, 0, 4] = -1.0
    score[0, 0, 4, 0] = -2.0
    return score


def cells(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in mask[0, 0].nonzero().tolist()}


@pytest.fixture(scope="module")
def small_model() -> LEM:
    torch.manual_seed(0)
    return LEM("resnet18", img_size=SMALL).eval()


@pytest.fixture(scope="module")
def small_batch() -> torch.Tensor:
    return torch.randn(2, 3, *SMALL, generator=torch.Generator().manual_seed(1))


# --- oracle 1 -------------------------------------------------------------------------------------------


def test_hand_made_map_strict() -> None:
    score = hand_made_map()
    p_max, p_min = local_extrema(score, strict=True)
    assert cells(p_max) == {(1, 1), (3, 3)}
    assert cells(p_min) == {(0, 4), (4, 0)}
    s_plus, s_minus = aggregate_extrema(score, p_max, p_min, "mean")
    assert float(s_plus) == pytest.approx(2.5)
    assert float(s_minus) == pytest.approx(-1.5)
    assert float(torch.sigmoid(s_plus + s_minus)) == pytest.approx(0.731059, abs=1e-6)
    s_plus_sum, s_minus_sum = aggregate_extrema(score, p_max, p_min, "sum")
    assert (float(s_plus_sum), float(s_minus_sum)) == (5.0, -3.0)


def test_hand_made_map_through_the_model_pooling(small_model: LEM) -> None:
    out = small_model.pool(torch.zeros(1), hand_made_map())
    assert float(out["prob_lem"]) == pytest.approx(0.731059, abs=1e-6)
    assert float(out["z_gap"]) == pytest.approx(2.0 / 25)


def test_hand_made_map_non_strict() -> None:
    p_max, p_min = local_extrema(hand_made_map(), strict=False)
    assert int(p_max.sum()) == 8
    assert int(p_min.sum()) == 17


# --- oracles 2 and 3 ------------------------------------------------------------------------------------


def brute_force(score: torch.Tensor, strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, _, height, width = score.shape
    p_max = torch.zeros_like(score, dtype=torch.bool)
    p_min = torch.zeros_like(score, dtype=torch.bool)
    for b, i, j in itertools.product(range(batch), range(height), range(width)):
        window = [
            (r, c)
            for r in range(max(0, i - 1), min(height, i + 2))
            for c in range(max(0, j - 1), min(width, j + 2))
        ]
        assert len(window) in (4, 6, 9)
        centre = float(score[b, 0, i, j])
        others = [float(score[b, 0, r, c]) for r, c in window if (r, c) != (i, j)]
        if strict:
            p_max[b, 0, i, j] = all(centre > v for v in others)
            p_min[b, 0, i, j] = all(centre < v for v in others)
        else:
            p_max[b, 0, i, j] = all(centre >= v for v in others)
            p_min[b, 0, i, j] = all(centre <= v for v in others)
    return p_max, p_min


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extrema_match_brute_force(strict: bool, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    score = torch.randn(3, 1, 7, 6, generator=generator)
    # Rounding makes ties, which is where strict and non-strict differ.
    score = torch.round(score * 2) / 2
    expected_max, expected_min = brute_force(score, strict)
    p_max, p_min = local_extrema(score, strict)
    assert torch.equal(p_max, expected_max)
    assert torch.equal(p_min, expected_min)


def test_constant_map() -> None:
    score = torch.full((2, 1, 5, 4), 0.7)
    p_max, p_min = local_extrema(score, strict=True)
    assert not p_max.any() and not p_min.any()
    p_max, p_min = local_extrema(score, strict=False)
    assert p_max.all() and p_min.all()
    s_plus, s_minus = aggregate_extrema(score, *local_extrema(score, strict=True))
    assert torch.equal(s_plus, torch.zeros(2)) and torch.equal(s_minus, torch.zeros(2))


@pytest.mark.parametrize("dim", [-1, -2])
@pytest.mark.parametrize("strict", [True, False])
def test_flip_equivariance(dim: int, strict: bool) -> None:
    score = torch.round(torch.randn(2, 1, 9, 7, generator=torch.Generator().manual_seed(5)) * 3)
    p_max, p_min = local_extrema(score, strict)
    f_max, f_min = local_extrema(score.flip(dim), strict)
    assert torch.equal(f_max, p_max.flip(dim))
    assert torch.equal(f_min, p_min.flip(dim))


# --- oracle 4 -------------------------------------------------------------------------------------------


def test_eq1_gap_fc_equals_score_map_mean() -> None:
    torch.manual_seed(4)
    features = torch.rand(2, 16, 5, 4)
    fc = nn.Linear(16, 1)
    score_conv = nn.Conv2d(16, 1, 1)
    with torch.no_grad():
        score_conv.weight.copy_(fc.weight[..., None, None])
        score_conv.bias.copy_(fc.bias)
    via_score = torch.sigmoid(score_conv(features).mean((1, 2, 3)))
    via_fc = torch.sigmoid(fc(features.mean((2, 3))).squeeze(1))
    torch.testing.assert_close(via_score, via_fc, atol=1e-6, rtol=0)


# --- oracle 5 -------------------------------------------------------------------------------------------


def test_full_size_resnet18_shapes() -> None:
    torch.manual_seed(6)
    model = LEM("resnet18").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 1024, 832))
    assert out["features"].shape == (2, 512, 32, 26)
    assert out["score_map"].shape == (2, 1, 32, 26)
    for key in ("p_max", "p_min"):
        assert out[key].shape == (2, 1, 32, 26) and out[key].dtype == torch.bool
    for key in ("prob_lem", "prob_gap"):
        assert out[key].shape == (2,)
        assert bool(((out[key] > 0) & (out[key] < 1)).all())
    assert float(out["features"].min()) >= 0.0


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_backbone_shapes_at_full_size(backbone: str) -> None:
    channels = {
        "resnet18": 512,
        "resnet50": 2048,
        "resnet101": 2048,
        "densenet121": 1024,
        "densenet169": 1664,
    }
    # The meta device gives the full-size shapes without computing anything.
    with torch.device("meta"):
        model = LEM(backbone).eval()
        out = model(torch.empty(2, 3, 1024, 832))
    assert out["features"].shape == (2, channels[backbone], 32, 26)
    assert out["score_map"].shape == out["p_max"].shape == out["p_min"].shape == (2, 1, 32, 26)
    assert out["prob_lem"].shape == out["prob_gap"].shape == (2,)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_backbone_runs_for_real_at_small_size(backbone: str) -> None:
    torch.manual_seed(7)
    model = LEM(backbone, img_size=(64, 64)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out["score_map"].shape == (2, 1, 2, 2)
    assert bool(((out["prob_lem"] > 0) & (out["prob_lem"] < 1)).all())
    assert bool(((out["prob_gap"] > 0) & (out["prob_gap"] < 1)).all())


@pytest.mark.parametrize(
    ("backbone", "millions"),
    [
        ("resnet18", 11.2),
        ("resnet50", 23.5),
        ("resnet101", 42.5),
        ("densenet121", 7.0),
        ("densenet169", 12.5),
    ],
)
def test_parameter_counts(backbone: str, millions: float) -> None:
    with torch.device("meta"):
        model = LEM(backbone)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / 1e6 - millions) < 0.06
    # LEM adds C + 1 parameters to the bare trunk.
    trunk = sum(p.numel() for p in model.backbone.parameters())
    assert total - trunk == model.num_features + 1


# --- oracle 6 -------------------------------------------------------------------------------------------


def test_lem_gradient_reaches_only_extrema(small_model: LEM, small_batch: torch.Tensor) -> None:
    out = small_model(small_batch)
    out["score_map"].retain_grad()
    loss = F.binary_cross_entropy_with_logits(out["z_lem"], torch.tensor([1.0, 0.0]))
    loss.backward()
    grad = out["score_map"].grad
    extrema = out["p_max"] | out["p_min"]
    assert bool((grad[~extrema] == 0).all())
    assert bool((grad[extrema] != 0).any())
    small_model.zero_grad(set_to_none=True)


# --- oracles 7 and 8 ------------------------------------------------------------------------------------


def synthetic_out(score: torch.Tensor) -> dict[str, torch.Tensor]:
    p_max, p_min = local_extrema(score)
    s_plus, s_minus = aggregate_extrema(score, p_max, p_min)
    return {
        "score_map": score,
        "p_max": p_max,
        "p_min": p_min,
        "z_gap": score.mean((1, 2, 3)),
        "z_lem": s_plus + s_minus,
    }


def test_alpha_zero_is_a_plain_gap_cnn() -> None:
    score = torch.randn(3, 1, 6, 5, generator=torch.Generator().manual_seed(8)).requires_grad_(True)
    target = torch.tensor([1, 0, 1])
    loss, parts = lem_loss(synthetic_out(score), target, alpha=0.0)
    expected = F.binary_cross_entropy_with_logits(
        score.mean((1, 2, 3)), target.float(), pos_weight=torch.tensor(3.0)
    )
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"gap"}
    (grad,) = torch.autograd.grad(loss, score)
    # GAP spreads the gradient evenly over every cell: nothing comes from the extremum terms.
    torch.testing.assert_close(grad, grad[:, :, :1, :1].expand_as(grad))


def test_alpha_one_has_no_gap_term() -> None:
    score = torch.randn(2, 1, 6, 5, generator=torch.Generator().manual_seed(9)).requires_grad_(True)
    out = synthetic_out(score)
    target = torch.tensor([0, 1])
    loss, parts = lem_loss(out, target, alpha=1.0)
    assert "gap" not in parts
    sparse, _, _ = sparse_loss(score, out["p_max"], out["p_min"], target)
    lem = F.binary_cross_entropy_with_logits(out["z_lem"], target.float(), pos_weight=torch.tensor(3.0))
    torch.testing.assert_close(loss, lem + sparse)
    (grad,) = torch.autograd.grad(loss, score)
    non_extremum = ~(out["p_max"] | out["p_min"]) & (score.abs() <= 1.0)
    assert bool((grad[non_extremum] == 0).all())
    with pytest.raises(ValueError, match="alpha"):
        lem_loss(out, target, alpha=1.5)


def test_pos_weight_three_weights_malignant_errors() -> None:
    out = synthetic_out(torch.zeros(2, 1, 3, 3))
    loss_pos, _ = lem_loss(out, torch.tensor([1, 1]), alpha=0.0)
    loss_neg, _ = lem_loss(out, torch.tensor([0, 0]), alpha=0.0)
    assert float(loss_pos) == pytest.approx(3 * float(loss_neg))


def test_alpha_schedule() -> None:
    values = [alpha_schedule(epoch) for epoch in range(400)]
    assert values[0] == 0.0 and values[50] == pytest.approx(0.5) and values[100] == 1.0 and values[-1] == 1.0
    assert all(b >= a for a, b in itertools.pairwise(values))
    started = [alpha_schedule(e, alpha0=0.2, ramp_epochs=10) for e in range(20)]
    assert started[0] == pytest.approx(0.2) and started[10] == 1.0
    assert all(b >= a for a, b in itertools.pairwise(started))


def test_sparse_loss_zero_inside_the_band_and_correct_extrema() -> None:
    # Non-extrema are 0 (inside [-1, 1]); maxima are positive and minima negative.
    score = hand_made_map() * 0.3
    p_max, p_min = local_extrema(score)
    # A benign image with positive maxima: those maxima contradict the label.
    total, elim, pen = sparse_loss(score, p_max, p_min, torch.tensor([0]))
    assert float(pen) == 0.0 and float(elim) > 0 and float(total) > 0
    # A malignant image with negative minima: contradicts too.
    _, elim, _ = sparse_loss(score, p_max, p_min, torch.tensor([1]))
    assert float(elim) > 0
    # A benign image whose only extremum is a negative minimum: nothing to penalise.
    only_minimum = torch.zeros(1, 1, 5, 5)
    only_minimum[0, 0, 2, 2] = -0.5
    mx, mn = local_extrema(only_minimum)
    total, elim, pen = sparse_loss(only_minimum, mx, mn, torch.tensor([0]))
    assert float(total) == 0.0


def test_sparse_loss_pulls_outliers_into_the_band() -> None:
    score = torch.zeros(1, 1, 5, 5)
    score[0, 0, 2, 2] = 5.0  # maximum
    score[0, 0, 0, 1] = 3.0  # not an extremum (next to the corner 3.5), outside [-1, 1]
    score[0, 0, 0, 0] = 3.5
    score = score.requires_grad_(True)
    p_max, p_min = local_extrema(score)
    assert not bool(p_max[0, 0, 0, 1] or p_min[0, 0, 0, 1])
    total, _, pen = sparse_loss(score, p_max, p_min, torch.tensor([1]))
    assert float(pen.detach()) > 0 and float(total.detach()) > 0
    (grad,) = torch.autograd.grad(total, score)
    assert float(grad[0, 0, 0, 1]) > 0  # gradient descent lowers the outlier towards the band


# --- oracle 9 -------------------------------------------------------------------------------------------


def tiny_trunk() -> nn.Sequential:
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[0] = 1.0
        conv.weight[1] = 0.25
        conv.weight[1, 0, 1, 1] = 3.0
    return nn.Sequential(conv, nn.ReLU())


@pytest.fixture(scope="module")
def tiny_setup() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]]:
    trunk = tiny_trunk()
    image = torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(10)) + 0.05
    weight = torch.tensor([1.0, -1.0])
    with torch.no_grad():
        features = trunk(image)
        score = torch.einsum("c,bchw->bhw", weight, features).unsqueeze(1)
    p_max, p_min = local_extrema(score)
    positive = (features > 0).all(1, keepdim=True)
    maxima = (p_max & positive)[0, 0].nonzero().tolist()
    minima = (p_min & positive)[0, 0].nonzero().tolist()
    assert maxima and minima
    return trunk, image, weight, tuple(maxima[0]), tuple(minima[0])


def one_hot(position: tuple[int, int], shape: tuple[int, int] = (9, 9)) -> torch.Tensor:
    seeds = torch.zeros(1, 1, *shape)
    seeds[0, 0, position[0], position[1]] = 1.0
    return seeds


def test_eb_seed_channels(tiny_setup: tuple) -> None:
    trunk, image, weight, maximum, minimum = tiny_setup
    features = trunk(image)
    seed_max = extremum_seed(features, weight, one_hot(maximum), torch.zeros(1, 1, 9, 9))
    seed_min = extremum_seed(features, weight, torch.zeros(1, 1, 9, 9), one_hot(minimum))
    assert float(seed_max[0, 0, maximum[0], maximum[1]]) == pytest.approx(1.0)
    assert float(seed_max[0, 1].abs().sum()) == 0.0
    assert float(seed_min[0, 1, minimum[0], minimum[1]]) == pytest.approx(1.0)
    assert float(seed_min[0, 0].abs().sum()) == 0.0


def test_eb_maps_are_probabilities_inside_the_receptive_field(tiny_setup: tuple) -> None:
    trunk, image, weight, maximum, minimum = tiny_setup
    zeros = torch.zeros(1, 1, 9, 9)
    for position, seeds in ((maximum, (one_hot(maximum), zeros)), (minimum, (zeros, one_hot(minimum)))):
        pixel_map = excitation_backprop(trunk, weight, image, *seeds)[0]
        assert float(pixel_map.min()) >= 0.0
        assert float(pixel_map.sum()) == pytest.approx(1.0, abs=1e-5)
        outside = torch.ones(9, 9, dtype=torch.bool)
        i, j = position
        outside[max(0, i - 1) : i + 2, max(0, j - 1) : j + 2] = False
        assert float(pixel_map[outside].abs().max()) == 0.0


def test_eb_is_linear_in_the_seeds(tiny_setup: tuple) -> None:
    trunk, image, weight, maximum, minimum = tiny_setup
    zeros = torch.zeros(1, 1, 9, 9)
    first = excitation_backprop(trunk, weight, image, one_hot(maximum), zeros)
    second = excitation_backprop(trunk, weight, image, zeros, one_hot(minimum))
    both = excitation_backprop(trunk, weight, image, one_hot(maximum), one_hot(minimum))
    torch.testing.assert_close(both, first + second, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backbone", ["resnet18", "densenet121"])
def test_eb_conserves_mass_through_real_backbones(backbone: str) -> None:
    torch.manual_seed(11)
    model = LEM(backbone, img_size=(64, 64)).eval()
    image = torch.randn(1, 3, 64, 64)
    seeds = torch.zeros(1, 1, 2, 2)
    seeds[0, 0, 1, 0] = 1.0
    pixel_map = excitation_backprop(
        model.backbone.forward_features, model.score.weight.view(-1), image, seeds, seeds, model.image_floor
    )
    assert pixel_map.shape == (1, 64, 64)
    assert float(pixel_map.min()) >= 0.0
    assert float(pixel_map.sum()) == pytest.approx(2.0, abs=1e-3)


def test_eb_refuses_ops_without_a_rule() -> None:
    trunk = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Sigmoid())
    zeros = torch.zeros(1, 1, 5, 5)
    with pytest.raises(NotImplementedError, match="sigmoid"):
        excitation_backprop(trunk, torch.tensor([1.0, -1.0]), torch.rand(1, 1, 5, 5), zeros, zeros)


# --- oracles 10 and 11 ----------------------------------------------------------------------------------


def test_localisation_outputs(small_model: LEM, small_batch: torch.Tensor) -> None:
    loc = small_model.localise(small_batch)
    assert loc.location_map.shape == (2, 1, *SMALL) and loc.lesion_mask.shape == (2, 1, *SMALL)
    assert float(loc.location_map.min()) >= 0.0 and float(loc.location_map.max()) == pytest.approx(1.0)
    assert loc.lesion_mask.dtype == torch.bool and bool(loc.lesion_mask.any())
    for b in range(2):
        assert loc.extrema[b], "Algorithm 2 always selects at least one extremum"
        for extremum in loc.extrema[b]:
            assert 0 <= extremum.x < SMALL[1] and 0 <= extremum.y < SMALL[0]
            assert (extremum.x, extremum.y) == (32 * extremum.col + 16, 32 * extremum.row + 16)
        for x0, y0, x1, y1 in loc.boxes[b]:
            assert 0 <= x0 < x1 <= SMALL[1] and 0 <= y0 < y1 <= SMALL[0]
    assert small_model.training is False


@pytest.mark.parametrize("force", [True, False])
def test_algorithm2_branch_follows_the_prediction(
    small_model: LEM, small_batch: torch.Tensor, force: bool
) -> None:
    loc = small_model.localise(small_batch, force_max=torch.tensor([force, force]))
    assert loc.use_max.tolist() == [force, force]
    p_max, p_min = local_extrema(loc.score_map)
    allowed = p_max if force else p_min
    for b in range(2):
        selected = loc.selected[b]
        chosen = selected & allowed[b]
        flat = loc.score_map[b].flatten()
        global_extreme = int(flat.argmax() if force else flat.argmin())
        assert bool(chosen.eq(selected).all()) or int(selected.flatten().nonzero()) == global_extreme
        assert {e.kind for e in loc.extrema[b]} == {"max" if force else "min"}


def test_selection_thresholds_fallback_and_top_k() -> None:
    score = hand_made_map().repeat(2, 1, 1, 1)
    p_max, p_min = local_extrema(score)
    selected, use_max = select_extrema(score, p_max, p_min, torch.tensor([0.7, 0.2]))
    assert use_max.tolist() == [True, False]
    assert cells(selected[:1]) == {(1, 1), (3, 3)} and cells(selected[1:]) == {(0, 4), (4, 0)}
    capped, _ = select_extrema(score, p_max, p_min, torch.tensor([0.7, 0.2]), top_k=1)
    assert cells(capped[:1]) == {(1, 1)} and cells(capped[1:]) == {(4, 0)}
    negative = -hand_made_map().abs() - 0.1  # no maximum with S > 0: the global max is used
    mx, mn = local_extrema(negative)
    fallback, _ = select_extrema(negative, mx, mn, torch.tensor([0.9]))
    assert cells(fallback) == {(0, 0)}


def test_extremum_list_and_boxes() -> None:
    score = hand_made_map()
    p_max, _ = local_extrema(score)
    (points,) = extremum_list(score, p_max, "max", (160, 160))
    listed = [(p.row, p.col, p.x, p.y, p.score) for p in points]
    assert listed == [(1, 1, 48.0, 48.0, 3.0), (3, 3, 112.0, 112.0, 2.0)]
    mask = np.zeros((10, 12), dtype=bool)
    mask[1:3, 2:5] = True
    mask[7, 9] = True
    assert sorted(lesion_boxes(mask)) == [(2, 1, 5, 3), (9, 7, 10, 8)]


def synthetic_mammogram() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    image = np.zeros((400, 300), dtype=np.uint8)
    top, left, height, width = 40, 0, 320, 180
    image[top : top + height, left : left + width] = 80
    image[0, 299] = 50  # a stray pixel, like a burnt-in label, outside the breast
    return image, (top, left, height, width)


# --- oracle 12 ------------------------------------------------------------------------------------------


def test_builds_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "socket", refuse)
    [plugin] = pacs_triage_register_models()
    model = plugin.build_model({**plugin.default_options, "strict": False, "agg": "sum"})
    assert isinstance(model, LEM)
    assert model.config_dict()["strict"] is False and model.config_dict()["agg"] == "sum"
    assert model.img_size == (1024, 832)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_model: LEM) -> Path:
    path = tmp_path_factory.mktemp("lem") / "lem_small.safetensors"
    save_checkpoint(small_model, path, checkpoint_metadata(small_model, version="0.1"))
    return path


def test_checkpoint_round_trip(small_checkpoint: Path, small_model: LEM, small_batch: torch.Tensor) -> None:
    restored, metadata = load_model(LEMPlugin(MODEL_CFGS["lem.v1"]), small_checkpoint)
    assert isinstance(restored, LEM)
    with torch.no_grad():
        assert torch.equal(restored(small_batch)["score_map"], small_model(small_batch)["score_map"])
    assert metadata.class_names == CLASSES == ("benign", "malignant")
    assert metadata.architecture == "lem" and metadata.input_size == SMALL
    assert metadata.options == {k: v for k, v in small_model.config_dict().items() if k in MODEL_OPTIONS}
    assert metadata.options["backbone"] == "resnet18" and metadata.options["strict"] is True
    assert "BI-RADS >= 4" in metadata.training_data
    assert restored.config_dict() == small_model.config_dict()


@pytest.mark.parametrize("backbone", ["resnet18", "densenet121"])
def test_imagenet_checkpoint_loads_with_only_head_keys_left(tmp_path: Path, backbone: str) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(12)
    reference = timm.create_model(backbone, pretrained=False)
    path = tmp_path / f"{backbone}.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = LEM(backbone, img_size=(64, 64))
    load_imagenet_backbone(model, path)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name])
    state = {k: v for k, v in reference.state_dict().items() if "conv" not in k.split(".")[0]}
    torch.save({**state, "neck.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"does not fit: .* 1 unexpected keys \['neck.weight'\]"):
        load_imagenet_backbone(model, tmp_path / "bad.pth")


# --- training parts -------------------------------------------------------------------------------------


def test_optimizer_and_step_decay() -> None:
    net = nn.Linear(3, 1)
    optimizer = sgd_or_adam(
        {k: h.default for k, h in LemRecipe.HYPERPARAMETERS.items()}, list(net.parameters())
    )
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-3, 0.9, 1e-4)
    scheduler = build_scheduler(optimizer)
    lrs = []
    for _ in range(400):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[7] == pytest.approx(1e-3) and lrs[8] == pytest.approx(9e-4)
    assert lrs[16] == pytest.approx(8.1e-4)
    assert lrs[-1] == pytest.approx(1e-3 * 0.9**49)


def test_train_augmentation() -> None:
    torch.manual_seed(13)
    image = torch.zeros(1, 64, 48)
    image[:, 16:48, :20] = 0.8
    transform = train_transform()
    outs = [transform(image) for _ in range(12)]
    assert all(o.shape == (3, 64, 48) and o.dtype == torch.float32 for o in outs)
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    raw = [o * std + mean for o in outs]
    # The channels stay copies of one gray image; noise and rotation make every draw different.
    assert all(torch.allclose(r[0], r[1], atol=1e-5) and torch.allclose(r[1], r[2], atol=1e-5) for r in raw)
    assert not torch.equal(raw[0], raw[1])
    assert all(float(r.min()) >= -1e-5 and float(r.max()) <= 1 + 1e-5 for r in raw)
    left_bright = [bool(r[0, :, :24].mean() > r[0, :, 24:].mean()) for r in raw]
    assert any(left_bright) and not all(left_bright)


def test_lem_learns_a_synthetic_bright_spot_task() -> None:
    """A few SGD steps on the full Eq. 8 loss lower it on a fixed batch: the pieces train together."""
    torch.manual_seed(14)
    model = LEM("resnet18", img_size=(64, 64)).train()
    images = torch.randn(4, 3, 64, 64) * 0.1
    images[:2, :, 20:30, 20:30] += 2.0
    target = torch.tensor([1, 1, 0, 0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    losses = []
    for step in range(8):
        loss, _ = lem_loss(model(images), target, alpha=alpha_schedule(step, ramp_epochs=4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        final, _ = lem_loss(model(images), target, alpha=1.0)
    assert math.isfinite(losses[-1]) and float(final) < losses[0]


# --- the plugin through the host -----------------------------------------------------------------------


def test_registers_one_mg_model() -> None:
    [plugin] = pacs_triage_register_models()
    assert isinstance(plugin, LEMPlugin) and plugin.spec is MODEL_CFGS["lem.v1"]
    spec = plugin.spec
    assert (spec.name, spec.arch, spec.classes) == ("lem", "lem", CLASSES)
    assert spec.positive_classes == ("malignant",)
    assert spec.modalities == ("MG",) and spec.input_size == (1024, 832)
    assert not spec.accepts.accept_for_processing and not spec.accepts.accept_tomosynthesis_volumes
    assert plugin.default_options["crop"] == "breast" and plugin.default_options["keep_aspect"] is False
    assert {k: plugin.default_options[k] for k in MODEL_OPTIONS} == MODEL_OPTIONS
    manager = get_plugin_manager(Settings(), load_entrypoints=False)
    names = {p.name for returned in manager.hook.pacs_triage_register_models() for p in returned}
    assert "lem" in names


def test_two_class_logits_give_the_lem_probability() -> None:
    z = torch.tensor([-2.0, 0.0, 1.5])
    torch.testing.assert_close(torch.softmax(two_class_logits(z), 1)[:, 1], torch.sigmoid(z))


def _host(**models: object) -> ModelHost:
    pm = pluggy.PluginManager("pacs_triage")
    pm.add_hookspecs(hookspecs)
    pm.register(lem_module, "lem")
    settings = Settings.model_validate({"plugins": {"allow_demo_weights": True, "models": {"lem": models}}})
    return ModelHost(settings, plugin_manager=pm)


def test_plugin_runs_through_host_and_ignores_us(tmp_path: Path, small_checkpoint: Path) -> None:
    mammogram = tmp_path / "mg.dcm"
    make_mg_image(5, size=(256, 208), birads=5).dataset.save_as(mammogram, enforce_file_format=True)
    ultrasound = write_ultrasound(tmp_path / "us.dcm", rows=64, cols=80, frames=1, region=(5, 5, 50, 60))
    # The small checkpoint (128x96 input) keeps this CPU test fast; the full-size path is the same code.
    host = _host(weights=str(small_checkpoint), batch_size=2)
    refs = [read_image_ref(mammogram), read_image_ref(ultrasound), read_image_ref(mammogram)]
    results = host.run("lem", refs)
    assert [type(r) for r in results] == [Prediction, SkippedImage, Prediction]
    prediction, skipped, again = results
    assert isinstance(prediction, Prediction) and isinstance(again, Prediction)
    assert isinstance(skipped, SkippedImage)
    assert "modality US" in skipped.reason
    assert prediction.classes == CLASSES and not prediction.demo_weights
    assert prediction.risk == pytest.approx(prediction.probabilities[1])
    assert prediction.heatmap is not None and prediction.heatmap.shape == (256, 208)
    assert prediction.heatmap_method == "LEM excitation backprop"
    assert float(prediction.heatmap.min()) >= 0 and float(prediction.heatmap.max()) <= 1
    assert prediction.extra_maps == {}, "the score map is attached only on request"
    assert prediction.points, "the chosen extrema become points"
    kind = "maximum" if prediction.probabilities[1] >= 0.5 else "minimum"
    for point in prediction.points:
        assert kind in point.label and 0 < point.score < 1
        assert 0 <= point.x < 208 and 0 <= point.y < 256
    assert 1 <= len(prediction.regions) <= 5
    for region in prediction.regions:
        assert prediction.predicted_class in region.label  # only the predicted branch's regions
        xs, ys = zip(*region.points, strict=True)
        assert 0 <= min(xs) <= max(xs) <= 208 and 0 <= min(ys) <= max(ys) <= 256
        assert max(xs) - min(xs) >= 32 and max(ys) - min(ys) >= 32
    assert again.points == prediction.points  # batching changes nothing
    assert again.regions == prediction.regions


@pytest.mark.slow
def test_full_size_demo_model_runs_through_host(tmp_path: Path) -> None:
    mammogram = tmp_path / "mg.dcm"
    make_mg_image(6, size=(512, 416), birads=4).dataset.save_as(mammogram, enforce_file_format=True)
    (prediction,) = _host(options={"score_map": True}).run("lem", [read_image_ref(mammogram)])
    assert isinstance(prediction, Prediction) and prediction.demo_weights
    assert prediction.heatmap is not None and prediction.heatmap.shape == (512, 416)
    assert prediction.extra_maps["score_map"].shape == (512, 416)
    assert prediction.points and prediction.regions


def test_points_land_on_the_source_pixels_of_their_cells(small_model: LEM) -> None:
    """The plugin's postprocess maps each extremum's cell centre through the letterbox's inverse."""
    plugin = LEMPlugin(dataclasses.replace(MODEL_CFGS["lem.v1"], input_size=SMALL))
    image, _ = synthetic_mammogram()
    ref = _stub_ref()
    tensor, box = plugin.preprocess(image, ref, plugin.default_options)
    assert tensor.shape == (3, *SMALL)
    output = plugin.forward(small_model, tensor.unsqueeze(0), plugin.default_options)
    (image_output,) = output.split()
    assert isinstance(image_output, LEMImageOutput) and image_output.extrema
    prediction = plugin.postprocess(image_output, box, ref, plugin.default_options)
    for extremum, point in zip(image_output.extrema, prediction.points, strict=True):
        assert (point.x, point.y) == pytest.approx(box.to_source(extremum.x, extremum.y))
        top, left, height, width = box.crop
        assert left <= point.x <= left + width and top <= point.y <= top + height


def test_cam_target_class_forces_the_branch(small_model: LEM, small_batch: torch.Tensor) -> None:
    plugin = LEMPlugin(dataclasses.replace(MODEL_CFGS["lem.v1"], input_size=SMALL))
    for target, kind in (("malignant", "max"), ("benign", "min")):
        options = {**plugin.default_options, "cam_target_class": target}
        output = plugin.forward(small_model, small_batch, options)
        assert all(e.kind == kind for image in output.extrema for e in image)
    quiet = plugin.forward(small_model, small_batch, {**BASE_OPTIONS, "explain": False})
    assert quiet.heatmap is None and quiet.logits.shape == (2, 2)


def _stub_ref() -> ImageRef:
    return ImageRef(
        path=Path("synthetic.dcm"),
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_instance_uid="1.2.3.4.5",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
        modality="MG",
    )


# --- regions: outlines of the smoothed location map ----------------------------------------------------


def _blob(shape: tuple[int, int], centre: tuple[float, float], sigma: float) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


def _lesion_output(heatmap: np.ndarray, malignant: bool, kind: str = "max") -> LEMImageOutput:
    """What the network gives for an image with a synthetic lesion: its location map, and one extremum
    of the branch *kind*."""
    extremum = lem_module.Extremum(
        row=0, col=0, x=16.0, y=16.0, score=1.0 if kind == "max" else -1.0, kind=kind
    )
    logit = 2.0 if malignant else -2.0
    return LEMImageOutput(logits=np.array([0.0, logit]), heatmap=heatmap, extrema=(extremum,))


def _polygon_mask(region: LocalisationRegion, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(region.points)).astype(np.int32)], 1)
    return mask.astype(bool)


@pytest.mark.parametrize("input_size", [SMALL, (1024, 832)], ids=["source-larger", "source-smaller"])
def test_regions_are_visible_polygons_on_the_maps_high_areas(input_size: tuple[int, int]) -> None:
    """Two synthetic lesions (a strong and a weak blob) under pixel-scale speckle: two regions, strongest
    first, each a polygon at least region_min_pixels across that holds its lesion's peak and covers the
    high part of the (source-mapped) map around it; the speckle makes none."""
    plugin = LEMPlugin(dataclasses.replace(MODEL_CFGS["lem.v1"], input_size=input_size))
    options = plugin.default_options
    image, _ = synthetic_mammogram()
    _, box = plugin.preprocess(image, _stub_ref(), options)
    height, width = input_size
    strong_at, weak_at = (0.3 * height, 0.4 * width), (0.75 * height, 0.6 * width)
    lesions = [_blob(input_size, strong_at, height / 40), 0.8 * _blob(input_size, weak_at, height / 30)]
    speckle = np.random.default_rng(3).random(input_size) < 0.002
    heatmap = np.where(speckle, np.maximum(sum(lesions), 0.7), sum(lesions)).astype(np.float32)
    prediction = plugin.postprocess(_lesion_output(heatmap, malignant=True), box, _stub_ref(), options)
    assert prediction.heatmap is not None
    regions = prediction.regions
    assert len(regions) == 2, "one region per lesion, none for the speckle"
    assert regions[0].score >= regions[1].score
    top, left, crop_h, crop_w = box.crop
    min_pixels = options["region_min_pixels"]
    for region, lesion, lesion_at in zip(regions, lesions, (strong_at, weak_at), strict=True):
        assert len(region.points) >= 3 and "suspected malignant" in region.label
        xs, ys = np.asarray(region.points).T
        assert xs.max() - xs.min() >= min_pixels and ys.max() - ys.min() >= min_pixels
        # At least a score-map cell across, measured back in model-input pixels.
        scale_y = box.scale if box.scale_y is None else box.scale_y
        assert (xs.max() - xs.min()) * box.scale >= CELL_PIXELS - 1e-6
        assert (ys.max() - ys.min()) * scale_y >= CELL_PIXELS - 1e-6
        assert left <= xs.min() and xs.max() <= left + crop_w
        assert top <= ys.min() and ys.max() <= top + crop_h
        peak_x, peak_y = box.to_source(lesion_at[1] + 0.5, lesion_at[0] + 0.5)
        polygon = np.asarray(region.points, dtype=np.float32)
        assert cv2.pointPolygonTest(polygon, (peak_x, peak_y), False) >= 0, "the lesion's peak is inside"
        # The lesion's high part (at least 0.6 of its peak), mapped onto the source as the host maps the
        # heatmap, lies inside its polygon.
        on_source = map_to_source(lesion, box)
        high = on_source >= 0.6 * float(on_source.max())
        assert (_polygon_mask(region, on_source.shape) & high).sum() >= 0.95 * high.sum()


def test_regions_follow_the_predicted_branch_and_the_cap() -> None:
    plugin = LEMPlugin(dataclasses.replace(MODEL_CFGS["lem.v1"], input_size=SMALL))
    image, _ = synthetic_mammogram()
    _, box = plugin.preprocess(image, _stub_ref(), plugin.default_options)
    heatmap = sum(
        (1.0 - 0.1 * i) * _blob(SMALL, (20 + 30 * i, 20 + 20 * (i % 3)), 3.0) for i in range(4)
    ).astype(np.float32)
    capped = plugin.postprocess(
        _lesion_output(heatmap, malignant=True),
        box,
        _stub_ref(),
        {**plugin.default_options, "max_regions": 2},
    )
    assert len(capped.regions) == 2 and capped.regions[0].score > capped.regions[1].score
    benign = plugin.postprocess(
        _lesion_output(heatmap, False, "min"), box, _stub_ref(), plugin.default_options
    )
    assert benign.regions and all("suspected benign" in r.label for r in benign.regions)
    # A map of the branch the model did not predict (cam_target_class forced it) gives no regions.
    forced = plugin.postprocess(
        _lesion_output(heatmap, False, "max"), box, _stub_ref(), plugin.default_options
    )
    assert forced.regions == () and forced.points
    empty = plugin.postprocess(
        _lesion_output(np.zeros(SMALL, np.float32), True), box, _stub_ref(), plugin.default_options
    )
    assert empty.regions == ()


def test_lesion_outlines_trace_the_thresholded_smoothed_map() -> None:
    location = np.zeros((60, 80), dtype=np.float32)
    location[10:30, 20:50] = 1.0  # a 30 x 20 rectangle
    location[45, 70] = 0.9  # one speck
    (outline, speck) = lesion_outlines(location, threshold=0.5, sigma=0)
    assert outline.score == 1.0 and outline.area == 600 and speck.area == 1
    xs, ys = outline.polygon.T
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (20.5, 49.5, 10.5, 29.5)  # edge pixels' centres
    assert speck.polygon.shape == (4, 2)  # too thin to outline: its pixel's square
    smoothed = lesion_outlines(location, threshold=0.5, sigma=4.0)
    assert len(smoothed) == 1, "smoothing leaves the speck below the threshold"
    assert lesion_outlines(np.zeros((8, 8), np.float32)) == []
    assert len(lesion_outlines(location, 0.5, 0, limit=1)) == 1


def test_visible_polygon_stretches_and_stays_inside() -> None:
    triangle = np.array([(1.0, 1.0), (3.0, 1.0), (3.0, 2.0)])
    wide = visible_polygon(triangle, 8, (0, 0, 100, 100))
    assert np.ptp(wide, axis=0).tolist() == [8.0, 8.0] and wide.min() >= 0
    big = np.array([(10.0, 10.0), (60.0, 10.0), (60.0, 40.0)])
    np.testing.assert_array_equal(visible_polygon(big, 8, (0, 0, 100, 100)), big)
    clipped = visible_polygon(triangle, 8, (0, 0, 5, 100))
    assert np.ptp(clipped, axis=0).tolist() == [5.0, 8.0]
    with pytest.raises(ValueError, match="extent"):
        visible_polygon(np.array([(1.0, 1.0), (2.0, 1.0), (3.0, 1.0)]), 8, (0, 0, 10, 10))


def test_score_map_only_on_request(small_model: LEM, small_batch: torch.Tensor) -> None:
    plugin = LEMPlugin(dataclasses.replace(MODEL_CFGS["lem.v1"], input_size=SMALL))
    assert plugin.default_options["score_map"] is False
    plain = plugin.forward(small_model, small_batch, plugin.default_options)
    assert plain.heatmap is not None and plain.extra_maps == {}
    asked = plugin.forward(small_model, small_batch, {**plugin.default_options, "score_map": True})
    score = small_model.localise(small_batch).score_map[:, 0]
    torch.testing.assert_close(asked.extra_maps["score_map"], torch.sigmoid(score))
