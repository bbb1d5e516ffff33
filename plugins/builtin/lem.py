"""LEM: Local Extremum Mapping for weakly supervised mammogram classification and localisation.

Paper: Zhu, Zhang, Wang, Wang, Wang, Qian, "Local Extremum Mapping for Weak Supervision Learning on Mammogram
Classification and Localization", Bioengineering 2025, 12(4), 325, doi:10.3390/bioengineering12040325.

LEM replaces a CNN's GAP + FC head by a 1x1 conv score map whose local maxima (suspected malignant regions)
and local minima (suspected benign regions) alone are pooled into the image probability.  Localisation
(Algorithm 2) back-propagates the chosen extrema to the pixels with excitation backprop.  Our copy of the
paper lost every equation and most constants; ``[D]`` marks a default of ours where it is silent and ``[P]``
what it states.  Every [D] choice is a constructor option, listed by ``LEM.config_dict()`` for the checkpoint
metadata.  ``docs/models/lem.md`` describes the build, where it differs from the paper and why, and its test
oracles.

Variants: one registered model, ``lem.v1``; the ``backbone`` option picks the paper's ``resnet18`` (default),
``resnet50``, ``resnet101``, ``densenet121`` or ``densenet169``, at 1024x832 input.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from plugins import hookimpl, weights
from plugins.base import BASE_OPTIONS, MAMMOGRAPHY_2D, ImageOutput, ModelOutput, ModelPlugin, TorchModelPlugin
from plugins.types import (
    CERTAINTY_OF_FINDING,
    ImageRef,
    Letterbox,
    LocalisationPoint,
    LocalisationRegion,
    ModelSpec,
    Prediction,
    ScoreMeaning,
)
from plugins.weights import CheckpointMetadata

__all__ = [
    "BACKBONES",
    "CELL_PIXELS",
    "CLASSES",
    "LEM",
    "MODEL_CFGS",
    "MODEL_OPTIONS",
    "ExcitationBackpropMode",
    "Extremum",
    "LEMImageOutput",
    "LEMLocalisation",
    "LEMModelOutput",
    "LEMPlugin",
    "LesionOutline",
    "aggregate_extrema",
    "checkpoint_metadata",
    "excitation_backprop",
    "extremum_list",
    "extremum_seed",
    "lesion_boxes",
    "lesion_outlines",
    "load_imagenet_backbone",
    "local_extrema",
    "select_extrema",
    "two_class_logits",
    "visible_polygon",
]

#: Image-level labels [P]: 0 = benign (in practice "not malignant", normal included), 1 = malignant.
CLASSES: tuple[str, ...] = ("benign", "malignant")
LABEL_DEFINITION = "1 = malignant (INbreast BI-RADS >= 4, CBIS-DDSM any malignant ROI), 0 = otherwise"
#: ``ModelSpec.arch`` and the checkpoint's ``architecture``; the backbone is an option.
ARCH = "lem"

#: Backbones of the paper and the prefix of their ImageNet classifier keys.
BACKBONES: dict[str, str] = {
    "resnet18": "fc.",
    "resnet50": "fc.",
    "resnet101": "fc.",
    "densenet121": "classifier.",
    "densenet169": "classifier.",
}

Aggregation = Literal["mean", "sum"]
_AGGREGATIONS = ("mean", "sum")
_EPS = 1e-12


# ---------------------------------------------------------------------------------------------------------
# Local extrema and their pooling (Eqs. 3-5).


def local_extrema(score: Tensor, strict: bool = True) -> tuple[Tensor, Tensor]:
    """Boolean maps of the local maxima and minima of a score map over clipped 3x3 neighbourhoods.

    The window N(i, j) includes (i, j) and is clipped at the border (4 cells at a corner, 6 on an edge, 9
    inside).  ``strict`` [D] needs the cell to beat every neighbour, so flat plateaus (black background) are
    not extrema; the paper's non-strict form only needs it to equal the window's max (min).

    :param score: (B, C, h, w) map; every channel is treated separately.
    :param strict: strict comparison against the neighbours.
    :returns: ``(p_max, p_min)``, bool tensors shaped like ``score``, without gradient.
    """
    if score.dim() != 4:
        raise ValueError(f"score map must be (B, C, h, w), got {tuple(score.shape)}")
    values = score.detach()
    if not strict:
        # max_pool2d pads with -inf, which is exactly the clipped window.
        p_max = values == F.max_pool2d(values, 3, stride=1, padding=1)
        p_min = values == -F.max_pool2d(-values, 3, stride=1, padding=1)
        return p_max, p_min
    batch, channels, height, width = values.shape
    flat = values.reshape(batch * channels, 1, height, width)

    def neighbours(fill: float) -> Tensor:
        padded = F.pad(flat, (1, 1, 1, 1), value=fill)
        windows = F.unfold(padded, kernel_size=3).reshape(batch * channels, 9, height, width)
        return torch.cat([windows[:, :4], windows[:, 5:]], dim=1)

    p_max = flat > neighbours(float("-inf")).amax(dim=1, keepdim=True)
    p_min = flat < neighbours(float("inf")).amin(dim=1, keepdim=True)
    return p_max.reshape_as(values), p_min.reshape_as(values)


def aggregate_extrema(
    score: Tensor, p_max: Tensor, p_min: Tensor, agg: Aggregation = "mean"
) -> tuple[Tensor, Tensor]:
    """``s+`` and ``s-`` of Eq. 5 [D]: the mean (or sum) of the scores at the maxima and at the minima.

    The masks are constants, so the gradient reaches the score map only at extremum cells.  An empty set
    contributes 0.

    :param score: (B, 1, h, w) score map S.
    :param p_max: bool map of local maxima.
    :param p_min: bool map of local minima.
    :param agg: ``mean`` (the sparse counterpart of GAP) or ``sum``.
    :returns: ``(s_plus, s_minus)``, each of shape (B,).
    """
    if agg not in _AGGREGATIONS:
        raise ValueError(f"agg {agg!r} is not one of {_AGGREGATIONS}")
    mask_max = p_max.to(score.dtype)
    mask_min = p_min.to(score.dtype)
    s_plus = (score * mask_max).flatten(1).sum(1)
    s_minus = (score * mask_min).flatten(1).sum(1)
    if agg == "mean":
        s_plus = s_plus / mask_max.flatten(1).sum(1).clamp_min(1.0)
        s_minus = s_minus / mask_min.flatten(1).sum(1).clamp_min(1.0)
    return s_plus, s_minus


# ---------------------------------------------------------------------------------------------------------
# Excitation backprop (Algorithm 2, step d): probabilistic winner-take-all as custom autograd rules.


def _distribute(positive_op: Callable[[Tensor], Tensor], activation: Tensor, p_out: Tensor) -> Tensor:
    """P(a_i) = a_i * sum_j phi(w_ij) P(a_j) / z_j with z_j = sum_i' a_i' phi(w_i'j).

    Mass at units with z_j = 0 is dropped.
    """
    with torch.enable_grad():
        leaf = activation.detach().requires_grad_(True)
        z = positive_op(leaf)
        ratio = torch.where(z > _EPS, p_out / z.clamp_min(_EPS), torch.zeros_like(z))
        (back,) = torch.autograd.grad(z, leaf, ratio)
    return activation * back


class _WinnerTakeAll(torch.autograd.Function):
    """Forward: the layer's real output.  Backward: the excitation-backprop rule with phi(w) = max(w, 0)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        real_op: Callable[[Tensor], Tensor],
        positive_op: Callable[[Tensor], Tensor],
        floor: Tensor | None,
    ) -> Tensor:
        ctx.positive_op = positive_op
        ctx.floor = floor
        ctx.save_for_backward(x)
        return real_op(x)

    @staticmethod
    def backward(ctx: Any, p_out: Tensor) -> tuple[Tensor, None, None, None]:
        (x,) = ctx.saved_tensors
        # Post-ReLU inputs are already >= 0; the image input is shifted by its lowest possible value.
        activation = (x - ctx.floor if ctx.floor is not None else x).clamp_min(0)
        return _distribute(ctx.positive_op, activation, p_out), None, None, None


class _PassThrough(torch.autograd.Function):
    """Forward: the layer's real output.  Backward: P unchanged (BatchNorm in eval, ReLU)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, real_op: Callable[[Tensor], Tensor]) -> Tensor:
        return real_op(x)

    @staticmethod
    def backward(ctx: Any, p_out: Tensor) -> tuple[Tensor, None]:
        return p_out, None


class _ResidualSplit(torch.autograd.Function):
    """y = a + b going forward; P split between a and b in proportion to a+ and b+ going back."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx: Any, p_out: Tensor) -> tuple[Tensor, Tensor]:
        a, b = ctx.saved_tensors
        a_pos, b_pos = a.clamp_min(0), b.clamp_min(0)
        total = a_pos + b_pos
        ratio = torch.where(total > _EPS, p_out / total.clamp_min(_EPS), torch.zeros_like(total))
        return a_pos * ratio, b_pos * ratio


def _call_args(args: tuple[Any, ...], kwargs: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LINEAR_ARGS = ("input", "weight", "bias")
_ADD_FUNCS = {
    torch.add,
    torch.Tensor.add,
    torch.Tensor.add_,
    torch.Tensor.__add__,
    torch.Tensor.__iadd__,
    torch.Tensor.__radd__,
}
_RELU_FUNCS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_AVG_POOL_FUNCS = {F.avg_pool2d, F.adaptive_avg_pool2d}
# Ops whose ordinary gradient already is the EB rule (routing to the arg-max, splitting by channel) or that
# only reshape.
_ROUTING_FUNCS = {
    F.max_pool2d,
    torch.max_pool2d,
    torch.cat,
    torch.flatten,
    F.dropout,
    F.pad,
    torch.Tensor.contiguous,
    torch.Tensor.view,
    torch.Tensor.reshape,
    torch.Tensor.flatten,
    torch.Tensor.permute,
    torch.Tensor.__getitem__,
    torch.Tensor.clone,
}


class ExcitationBackpropMode(TorchFunctionMode):
    """While active, convolutions, linear layers, pools, BatchNorm, ReLU and residual adds record EB rules.

    Run the *forward* pass inside the mode and the backward pass after it.  Rules (Algorithm 2, step d):
    conv/linear distribute P by ``a_i * max(w, 0)`` (bias ignored); BatchNorm and ReLU pass P unchanged;
    max-pool routes P to the arg-max; average pools split it in proportion to the inputs; a residual add
    splits it in proportion to the positive parts of its two operands; concatenation splits it by channel.
    Any other differentiable op raises, so an unsupported backbone fails loudly instead of giving a wrong map.
    """

    def __init__(self, image: Tensor | None = None, image_floor: Tensor | None = None) -> None:
        """:param image: the model input; a conv reading it uses ``image - image_floor`` as its activation.
        :param image_floor: lowest possible input value, broadcastable to ``image`` (e.g. ``-mean / std``).
        """
        super().__init__()
        self._image = image
        self._image_floor = image_floor

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in (torch.conv2d, F.conv2d):
            call = _call_args(args, kwargs, _CONV_ARGS)
            x, weight = call.pop("input"), call.pop("weight")
            bias = call.pop("bias", None)
            floor = self._image_floor if x is self._image else None
            return _WinnerTakeAll.apply(
                x,
                lambda t: F.conv2d(t, weight, bias, **call),
                lambda t: F.conv2d(t, weight.clamp_min(0), None, **call),
                floor,
            )
        if func is F.linear:
            call = _call_args(args, kwargs, _LINEAR_ARGS)
            x, weight, bias = call["input"], call["weight"], call.get("bias")
            return _WinnerTakeAll.apply(
                x, lambda t: F.linear(t, weight, bias), lambda t: F.linear(t, weight.clamp_min(0)), None
            )
        if func in _AVG_POOL_FUNCS:
            x, rest = args[0], args[1:]

            def pool(t: Tensor) -> Tensor:
                return func(t, *rest, **kwargs)

            # Pool weights are positive, so the forward op is also the EB op.
            return _WinnerTakeAll.apply(x, pool, pool, None)
        if func is F.batch_norm:
            x, rest = args[0], args[1:]
            return _PassThrough.apply(x, lambda t: F.batch_norm(t, *rest, **kwargs))
        if func in _RELU_FUNCS:
            # Out of place: the in-place variants' callers all use the return value (nn.ReLU, timm blocks).
            return _PassThrough.apply(args[0], F.relu)
        if func in _ADD_FUNCS and self._is_residual_add(args, kwargs):
            return _ResidualSplit.apply(args[0], args[1])
        result = func(*args, **kwargs)
        if func not in _ROUTING_FUNCS and isinstance(result, Tensor) and result.requires_grad:
            name = getattr(func, "__qualname__", repr(func))
            raise NotImplementedError(f"excitation backprop has no rule for {name}")
        return result

    @staticmethod
    def _is_residual_add(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return (
            len(args) == 2
            and not kwargs
            and isinstance(args[0], Tensor)
            and isinstance(args[1], Tensor)
            and args[0].shape == args[1].shape
        )


def extremum_seed(features: Tensor, score_weight: Tensor, seeds_max: Tensor, seeds_min: Tensor) -> Tensor:
    """Spread each seed's mass over the feature channels at its cell (Algorithm 2, step c).

    At a maximum, channel c gets ``F[c] * max(w_c, 0) / sum_c' F[c'] * max(w_c', 0)``; at a minimum the same
    with ``max(-w_c, 0)``: positive weights build maxima, negative weights build minima.

    :param features: (B, C, h, w) non-negative trunk features F.
    :param score_weight: the (C,) weights w of the 1x1 score conv.
    :param seeds_max: (B, 1, h, w) mass placed on maxima (usually 0/1).
    :param seeds_min: (B, 1, h, w) mass placed on minima.
    :returns: (B, C, h, w) seed P_F.
    """
    weight = score_weight.detach().reshape(1, -1, 1, 1)
    values = features.detach().clamp_min(0)
    seed = torch.zeros_like(values)
    for seeds, channel_weight in ((seeds_max, weight.clamp_min(0)), (seeds_min, (-weight).clamp_min(0))):
        share = values * channel_weight
        total = share.sum(dim=1, keepdim=True)
        spread = torch.where(total > _EPS, share / total.clamp_min(_EPS), torch.zeros_like(share))
        seed = seed + spread * seeds
    return seed


def excitation_backprop(
    features_fn: Callable[[Tensor], Tensor],
    score_weight: Tensor,
    image: Tensor,
    seeds_max: Tensor,
    seeds_min: Tensor,
    image_floor: Tensor | None = None,
) -> Tensor:
    """Marginal winning probability maps of score-map cells, at input resolution (Algorithm 2, steps c-d).

    The rule is linear in the seeds, so the map of a set of extrema is one backward pass of their summed
    seeds (see :func:`extremum_seed`).

    :param features_fn: the conv trunk, image -> (B, C, h, w) non-negative features.
    :param score_weight: the (C,) weights w of the 1x1 score conv.
    :param image: (B, 3, H, W) model input.
    :param seeds_max: (B, 1, h, w) mass placed on maxima (usually 0/1).
    :param seeds_min: (B, 1, h, w) mass placed on minima.
    :param image_floor: lowest possible input value (broadcastable), so the first conv sees inputs >= 0.
    :returns: (B, H, W) non-negative map; each seed's unit of mass sums to 1 over the pixels (less any mass
        dropped at zero-denominator units).
    """
    leaf = image.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        with ExcitationBackpropMode(leaf, image_floor):
            features = features_fn(leaf)
        seed = extremum_seed(features, score_weight, seeds_max, seeds_min)
        (pixel_mass,) = torch.autograd.grad(features, leaf, seed)
    return pixel_mass.sum(dim=1)


# ---------------------------------------------------------------------------------------------------------
# Selection of extrema, points and regions (Algorithm 2, steps b, e, f).


@dataclass(frozen=True)
class Extremum:
    """One local extremum of the score map, with its cell centre in model-input pixel coordinates."""

    row: int
    col: int
    #: Column of the cell centre in the model input.
    x: float
    #: Row of the cell centre in the model input.
    y: float
    score: float
    #: "max" (suspected malignant) or "min" (suspected benign).
    kind: str


def select_extrema(
    score: Tensor,
    p_max: Tensor,
    p_min: Tensor,
    prob: Tensor,
    threshold: float = 0.5,
    top_k: int | None = None,
    force_max: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Which extrema Algorithm 2 back-propagates for each image.

    If ``prob >= threshold`` the maxima with S > 0 are used, otherwise the minima with S < 0 [D].  An empty
    set falls back to the single global max (min).  ``top_k`` optionally keeps the k largest |S| (the paper
    has no cap).

    :param score: (B, 1, h, w) score map.
    :param p_max: bool map of maxima.
    :param p_min: bool map of minima.
    :param prob: (B,) y_LEM.
    :param threshold: decision threshold (0.5 [P]).
    :param top_k: optional cap on the number of extrema per image.
    :param force_max: (B,) bool overriding the branch (tests, or the label at training time).
    :returns: ``(selected, use_max)``: a bool (B, 1, h, w) mask and the (B,) branch.
    """
    use_max = prob >= threshold if force_max is None else force_max.to(torch.bool)
    values = score.detach()
    branch = use_max.view(-1, 1, 1, 1)
    candidates = torch.where(branch, p_max & (values > 0), p_min & (values < 0))
    flat_values = values.flatten(1)
    fallback_index = torch.where(use_max, flat_values.argmax(1), flat_values.argmin(1))
    fallback = torch.zeros_like(flat_values, dtype=torch.bool)
    fallback[torch.arange(len(fallback)), fallback_index] = True
    empty = ~candidates.flatten(1).any(1)
    selected = torch.where(empty.view(-1, 1), fallback, candidates.flatten(1))
    if top_k is not None:
        magnitude = torch.where(selected, flat_values.abs(), torch.full_like(flat_values, -1.0))
        keep = magnitude.topk(min(top_k, magnitude.shape[1]), dim=1).indices
        capped = torch.zeros_like(selected)
        capped.scatter_(1, keep, True)
        selected = selected & capped
    return selected.view_as(values), use_max


def extremum_list(
    score: Tensor, mask: Tensor, kinds: Tensor | str, input_size: tuple[int, int]
) -> list[list[Extremum]]:
    """The cells of ``mask`` as :class:`Extremum` records, cell centres in model-input coordinates.

    Cell (i, j) is the pixel block [s_h i, s_h (i+1)) x [s_w j, s_w (j+1)) of the input, s = input / map size.

    :param score: (B, 1, h, w) score map.
    :param mask: (B, 1, h, w) bool mask of the cells to list.
    :param kinds: "max"/"min" for all images, or a (B,) bool tensor (True = max).
    :param input_size: (H, W) of the model input.
    """
    height, width = score.shape[-2:]
    stride_y, stride_x = input_size[0] / height, input_size[1] / width
    result: list[list[Extremum]] = []
    for b in range(score.shape[0]):
        kind = kinds if isinstance(kinds, str) else ("max" if bool(kinds[b]) else "min")
        cells = mask[b, 0].nonzero().tolist()
        points = [
            Extremum(
                row=i,
                col=j,
                x=stride_x * (j + 0.5),
                y=stride_y * (i + 0.5),
                score=float(score[b, 0, i, j]),
                kind=kind,
            )
            for i, j in cells
        ]
        result.append(sorted(points, key=lambda e: -abs(e.score)))
    return result


def lesion_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1), end-exclusive, of the 8-connected components of a binary mask [D],
    largest component first.

    :param mask: 2-D bool or 0/1 array.
    """
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    # Label 0 is the background.
    components = sorted(stats[1:count].tolist(), key=lambda row: -row[cv2.CC_STAT_AREA])
    return [(x, y, x + w, y + h) for x, y, w, h, _area in components]


@dataclass(frozen=True)
class LesionOutline:
    """One connected area of the smoothed location map, as a polygon in model-input pixel coordinates."""

    #: (N, 2) vertices (x, y), N >= 3, continuous coordinates (pixel (r, c) covers [c, c+1) x [r, r+1)).
    polygon: np.ndarray
    #: The location map's highest value inside the area, in [0, 1].
    score: float
    #: The area's size in model-input pixels.
    area: int


def lesion_outlines(
    location: np.ndarray, threshold: float = 0.5, sigma: float = 16.0, limit: int | None = None
) -> list[LesionOutline]:
    """Outlines of the areas where the smoothed location map reaches *threshold* of its maximum [D], highest
    score first (then largest).

    Excitation backprop gives a speckled map at pixel scale, whose thresholded pixels are specks too small to
    see; a Gaussian of about half a score-map cell merges them into the area around each chosen extremum
    before the threshold.  Each area's outer contour (OpenCV ``findContours``) is simplified to within a
    pixel (``approxPolyDP``); an area too thin to outline (a line of pixels) becomes its bounding box.

    :param location: 2-D non-negative map at model-input resolution.
    :param threshold: fraction of the smoothed map's maximum that belongs to an area.
    :param sigma: standard deviation of the smoothing Gaussian in model-input pixels; 0 = no smoothing.
    :param limit: outline only this many areas (the highest); ``None`` = all.
    """
    values = np.ascontiguousarray(location, dtype=np.float32)
    smoothed = cv2.GaussianBlur(values, (0, 0), sigmaX=sigma, sigmaY=sigma) if sigma > 0 else values
    peak = float(smoothed.max()) if smoothed.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        return []
    mask = (smoothed >= threshold * peak).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    peaks = np.zeros(count, dtype=np.float32)
    np.maximum.at(peaks, np.asarray(labels, dtype=np.intp).ravel(), values.ravel())
    # Label 0 is the background.
    ranked = sorted(range(1, count), key=lambda label: (-peaks[label], -stats[label, cv2.CC_STAT_AREA]))
    outlines = []
    for label in ranked[:limit]:
        component = (labels == label).astype(np.uint8)
        contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contour = max(contours, key=cv2.contourArea)
        # The contour runs through the centres of the area's edge pixels.
        polygon = cv2.approxPolyDP(contour, 1.0, True).reshape(-1, 2).astype(np.float64) + 0.5
        if len(polygon) < 3 or cv2.contourArea(polygon.astype(np.float32)) <= 0.0:
            x, y, w, h = (int(v) for v in stats[label, :4])
            polygon = np.array([(x, y), (x + w, y), (x + w, y + h), (x, y + h)], dtype=np.float64)
        outlines.append(
            LesionOutline(
                polygon=polygon,
                score=float(np.clip(peaks[label], 0.0, 1.0)),
                area=int(stats[label, cv2.CC_STAT_AREA]),
            )
        )
    return outlines


def visible_polygon(
    polygon: np.ndarray, min_size: float, bounds: tuple[float, float, float, float]
) -> np.ndarray:
    """*polygon* stretched about its centre to at least *min_size* along x and along y, then moved (never
    cut) to lie inside *bounds* ``(x0, y0, x1, y1)`` where it fits, clipped where it does not.

    :param polygon: (N, 2) vertices (x, y), with some extent along both axes.
    :param min_size: the smallest extent in each direction.
    :param bounds: the rectangle the polygon must lie in.
    :raises ValueError: for a polygon flat along an axis (no shape to stretch).
    """
    points = np.asarray(polygon, dtype=np.float64).copy()
    if len(points) < 3 or np.any(np.ptp(points, axis=0) <= 0):
        raise ValueError("a polygon needs three vertices and some extent along x and y")
    low = np.array(bounds[:2], dtype=np.float64)
    high = np.array(bounds[2:], dtype=np.float64)
    for axis in (0, 1):
        lo, hi = points[:, axis].min(), points[:, axis].max()
        target = min(min_size, high[axis] - low[axis])
        centre = (lo + hi) / 2
        if hi - lo < target:
            points[:, axis] = centre + (points[:, axis] - centre) * (target / (hi - lo))
        lo, hi = points[:, axis].min(), points[:, axis].max()
        shift = max(low[axis] - lo, 0.0) - max(hi - high[axis], 0.0)
        points[:, axis] += shift
    return np.clip(points, low, high)


@dataclass(frozen=True)
class LEMLocalisation:
    """The localisation outputs of one batch (all tensors on CPU)."""

    score_map: Tensor
    prob: Tensor
    #: (B,) the LEM logit z_LEM.
    z_lem: Tensor
    use_max: Tensor
    selected: Tensor
    #: (B, 1, H, W) in [0, 1] at model-input resolution.
    location_map: Tensor
    #: (B, 1, H, W) bool, ``location_map >= threshold``.
    lesion_mask: Tensor
    extrema: list[list[Extremum]]
    boxes: list[list[tuple[int, int, int, int]]]


# ---------------------------------------------------------------------------------------------------------
# The model.


class LEM(nn.Module):
    """A timm CNN trunk whose GAP + FC head is replaced by a 1x1 score conv and local-extremum pooling.

    ``forward(x)`` returns a dict: ``features`` F (B, C, h, w), ``score_map`` S (B, 1, h, w), ``p_max`` and
    ``p_min`` (bool, same shape), ``s_plus``, ``s_minus``, ``z_gap``, ``z_lem`` (logits) and ``prob_gap``,
    ``prob_lem`` (B,).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        *,
        img_size: tuple[int, int] = (1024, 832),
        strict: bool = True,
        agg: Aggregation = "mean",
        score_bias: bool = True,
        decision_threshold: float = 0.5,
        location_threshold: float = 0.5,
        top_k: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        """:param backbone: timm name of the CNN (one of :data:`BACKBONES`).
        :param img_size: (H, W) of the input [D 1024x832]; both multiples of 32.
        :param strict: strict local extrema [D True].
        :param agg: aggregation of the extremum scores, ``mean`` [D] or ``sum``.
        :param score_bias: give the 1x1 score conv a bias [D True].
        :param decision_threshold: malignant iff y_LEM >= this [P 0.5].
        :param location_threshold: tau of the lesion mask, relative to the map's max [D 0.5].
        :param top_k: optional cap on the extrema back-propagated for the location map [D None].
        :param mean: input normalisation mean (EB uses it to shift the image to non-negative values).
        :param std: input normalisation std.
        """
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone {backbone!r} is not one of {tuple(BACKBONES)}")
        if agg not in _AGGREGATIONS:
            raise ValueError(f"agg {agg!r} is not one of {_AGGREGATIONS}")
        if img_size[0] % 32 or img_size[1] % 32:
            raise ValueError(f"img_size {img_size} sides must be multiples of 32")
        self._config: dict[str, Any] = {
            "backbone": backbone,
            "img_size": list(img_size),
            "strict": strict,
            "agg": agg,
            "score_bias": score_bias,
            "decision_threshold": decision_threshold,
            "location_threshold": location_threshold,
            "top_k": top_k,
            "mean": list(mean),
            "std": list(std),
        }
        self.img_size = tuple(img_size)
        self.strict = strict
        self.agg: Aggregation = agg
        self.decision_threshold = decision_threshold
        self.location_threshold = location_threshold
        self.top_k = top_k
        # A timm model: forward_features and num_features are not part of nn.Module's type.
        self.backbone: Any
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="")
        self.num_features = int(self.backbone.num_features)
        self.score = nn.Conv2d(self.num_features, 1, kernel_size=1, bias=score_bias)
        floor = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1)
        self.image_floor: Tensor
        self.register_buffer("image_floor", floor, persistent=False)

    def config_dict(self) -> dict[str, Any]:
        """The constructor options, JSON-serialisable, for the checkpoint metadata."""
        return json.loads(json.dumps(self._config))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """:param x: (B, 3, H, W) normalised images."""
        features = self.backbone.forward_features(x)
        score = self.score(features)
        return self.pool(features, score)

    def pool(self, features: Tensor, score: Tensor) -> dict[str, Tensor]:
        """GAP and LEM pooling of a score map (Eqs. 1, 5).

        :param features: the trunk's features, passed through to the output.
        :param score: (B, 1, h, w) score map S.
        """
        p_max, p_min = local_extrema(score, self.strict)
        s_plus, s_minus = aggregate_extrema(score, p_max, p_min, self.agg)
        z_gap = score.mean((1, 2, 3))
        z_lem = s_plus + s_minus
        return {
            "features": features,
            "score_map": score,
            "p_max": p_max,
            "p_min": p_min,
            "s_plus": s_plus,
            "s_minus": s_minus,
            "z_gap": z_gap,
            "z_lem": z_lem,
            "prob_gap": torch.sigmoid(z_gap),
            "prob_lem": torch.sigmoid(z_lem),
        }

    def localise(self, x: Tensor, force_max: Tensor | None = None) -> LEMLocalisation:
        """Algorithm 2: classify, choose the extrema, back-propagate them to a pixel-level location map.

        One forward pass (recording the excitation-backprop rules) and one backward pass for the batch.

        :param x: (B, 3, H, W) normalised images.
        :param force_max: (B,) bool overriding the max/min branch.
        """
        was_training = self.training
        self.eval()
        leaf = x.detach().clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                with ExcitationBackpropMode(leaf, self.image_floor):
                    features = self.backbone.forward_features(leaf)
                with torch.no_grad():
                    out = self.pool(features.detach(), self.score(features.detach()))
                selected, use_max = select_extrema(
                    out["score_map"],
                    out["p_max"],
                    out["p_min"],
                    out["prob_lem"],
                    self.decision_threshold,
                    self.top_k,
                    force_max,
                )
                seeds = selected.to(features.dtype)
                branch = use_max.view(-1, 1, 1, 1).to(features.dtype)
                weight = self.score.weight.view(-1)
                seed = extremum_seed(features, weight, seeds * branch, seeds * (1 - branch))
                (pixel_mass,) = torch.autograd.grad(features, leaf, seed)
        finally:
            self.train(was_training)
        mass = pixel_mass.sum(dim=1, keepdim=True)
        peak = mass.flatten(1).amax(1).clamp_min(_EPS).view(-1, 1, 1, 1)
        location = (mass / peak).clamp(0.0, 1.0)
        lesion = (location >= self.location_threshold) & (mass > 0)
        extrema = extremum_list(out["score_map"], selected, use_max, (x.shape[-2], x.shape[-1]))
        boxes = [lesion_boxes(m[0].numpy()) for m in lesion.cpu()]
        return LEMLocalisation(
            score_map=out["score_map"].cpu(),
            prob=out["prob_lem"].cpu(),
            z_lem=out["z_lem"].cpu(),
            use_max=use_max.cpu(),
            selected=selected.cpu(),
            location_map=location.detach().cpu(),
            lesion_mask=lesion.cpu(),
            extrema=extrema,
            boxes=boxes,
        )


# ---------------------------------------------------------------------------------------------------------
# Weights: ImageNet backbones from local files, and what a checkpoint records.


def load_imagenet_backbone(model: LEM, path: str | Path) -> None:
    """Initialise the trunk from a local ImageNet checkpoint of its backbone (timm ``.pth`` or safetensors).

    Only the classifier keys (``fc.*`` or ``classifier.*``) may be left over and nothing may be missing
    (:func:`plugins.weights.load_backbone_weights`); the score conv keeps its default init [D].

    :param model: the LEM model to initialise in place.
    :param path: a full ImageNet checkpoint of the same backbone.
    :raises FileNotFoundError: when *path* does not exist.
    :raises ValueError: when the checkpoint's keys do not match.
    """
    backbone = model.config_dict()["backbone"]
    weights.load_backbone_weights(model.backbone, path, backbone, (BACKBONES[backbone],))


def _model_option_defaults() -> dict[str, Any]:
    # The constructor's defaults, so the plugin's options and the model cannot drift apart; the input size
    # and normalisation come from the ModelSpec (input_size, mean, std) instead.
    params = inspect.signature(LEM.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.name not in ("self", "img_size", "mean", "std")}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}


#: The model's [D] choices as plugin options (``plugins.models.lem.options``).
MODEL_OPTIONS: dict[str, Any] = _model_option_defaults()


def checkpoint_metadata(model: LEM, **fields: Any) -> CheckpointMetadata:
    """The metadata the host needs to rebuild *model*: backbone, input size, normalisation and the other
    options (:func:`plugins.weights.checkpoint_metadata`); the label definition goes into ``training_data``
    unless given.

    :param model: the trained model.
    :param fields: further :class:`~plugins.weights.CheckpointMetadata` fields (version, thresholds,
        training_data...).
    """
    config = model.config_dict()
    fields.setdefault("training_data", f"labels: {LABEL_DEFINITION}")
    spec = dataclasses.replace(
        MODEL_CFGS["lem.v1"],
        input_size=tuple(config["img_size"]),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )
    options = {k: v for k, v in config.items() if k in MODEL_OPTIONS}
    return weights.checkpoint_metadata(spec, options, **fields)


# ---------------------------------------------------------------------------------------------------------
# Plugin.


def _cfg(**kwargs: Any) -> ModelSpec:
    defaults: dict[str, Any] = {
        "name": "lem",
        "display_name": "LEM local extremum mapping (ResNet-18), benign / malignant with lesion localisation",
        "arch": ARCH,
        "classes": CLASSES,
        "positive_classes": ("malignant",),
        "accepts": MAMMOGRAPHY_2D,
        "input_size": (1024, 832),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "thresholds": {"malignant": 0.5},
        # Trained on BI-RADS >= 4 labels (INbreast): a suspicion score even once calibrated.
        "score": ScoreMeaning(
            kind="suspicion_score",
            description="sigmoid of the LEM score for BI-RADS >= 4",
            concept=CERTAINTY_OF_FINDING,
        ),
        "paper": (
            "Zhu et al., Bioengineering 12(4) 325 (2025), doi:10.3390/bioengineering12040325; "
            "docs/models/lem.md"
        ),
        "license": "Apache-2.0",
    }
    return ModelSpec(**{**defaults, **kwargs})


MODEL_CFGS: dict[str, ModelSpec] = {
    "lem.v1": _cfg(model_id="lem.v1", version="1.0"),
}

_KIND_LABELS = {
    "max": "LEM local maximum (suspected malignant)",
    "min": "LEM local minimum (suspected benign)",
}
_REGION_LABELS = {
    "max": "LEM lesion region (suspected malignant)",
    "min": "LEM region (suspected benign)",
}
#: The class each branch of Algorithm 2 stands for.
_BRANCH_CLASS = {"max": "malignant", "min": "benign"}
#: Side of a score-map cell in model-input pixels: the output stride of every trunk in BACKBONES.  A region
#: is never smaller than the unit the model localises in.
CELL_PIXELS = 32


@dataclass(frozen=True, kw_only=True)
class LEMImageOutput(ImageOutput):
    """One image of a :class:`LEMModelOutput`: the maps plus the chosen extrema and lesion boxes."""

    extrema: tuple[Extremum, ...] = ()
    boxes: tuple[tuple[int, int, int, int], ...] = ()


@dataclass(frozen=True, kw_only=True)
class LEMModelOutput(ModelOutput):
    """A :class:`~plugins.base.ModelOutput` that also carries points and boxes in model-input coordinates."""

    extrema: list[list[Extremum]] = dataclasses.field(default_factory=list)
    boxes: list[list[tuple[int, int, int, int]]] = dataclasses.field(default_factory=list)

    def split(self) -> list[ImageOutput]:
        images: list[ImageOutput] = []
        for index, image in enumerate(super().split()):
            fields = {f.name: getattr(image, f.name) for f in dataclasses.fields(ImageOutput)}
            images.append(
                LEMImageOutput(
                    **fields,
                    extrema=tuple(self.extrema[index]) if self.extrema else (),
                    boxes=tuple(self.boxes[index]) if self.boxes else (),
                )
            )
        return images


def two_class_logits(z_lem: Tensor) -> Tensor:
    """(B,) LEM logits as (B, 2) logits whose softmax is (1 - sigmoid(z), sigmoid(z)).

    :param z_lem: the LEM logits.
    """
    return torch.stack([torch.zeros_like(z_lem), z_lem], dim=1)


class LEMPlugin(TorchModelPlugin):
    """The host's view of LEM: breast crop and plain resize to 1024x832, the Algorithm 2 location map as
    heat map, the chosen extrema as points, the outlines of the smoothed location map's high areas as regions,
    and the score map as a second map on request (``score_map``)."""

    # Spec 2: crop to the breast, resize (stretched) to the standard size, no laterality flip.
    default_options: ClassVar[Mapping[str, Any]] = {
        **BASE_OPTIONS,
        "crop": "breast",
        "keep_aspect": False,
        **MODEL_OPTIONS,
        # At most this many outlines of the smoothed location map (highest first) become regions [D].
        "max_regions": 5,
        # Sigma, in model-input pixels, of the Gaussian that merges the pixel-scale specks of the location map
        # into areas before they are outlined: half a score-map cell [D].
        "region_smoothing": 16.0,
        # The smallest extent of a region along x and along y, in source pixels, so a viewer shows it [D].
        "region_min_pixels": 32,
        # The sigmoid of the score map in extra_maps: a by-product of the forward pass, but nothing delivers it
        # unless the site asks (docs/outputs.md, "Heatmaps"), so it is attached only on request.
        "score_map": False,
    }

    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        return LEM(
            img_size=self.spec.input_size,
            mean=self.spec.mean,  # type: ignore[arg-type]
            std=self.spec.std,  # type: ignore[arg-type]
            **{key: options[key] for key in MODEL_OPTIONS},
        )

    def forward(self, model: nn.Module, batch: torch.Tensor, options: Mapping[str, Any]) -> ModelOutput:
        """Classification, and with ``explain`` the localisation of Algorithm 2.

        ``cam_target_class`` forces the branch: ``malignant`` back-propagates the maxima, ``benign`` the
        minima.
        """
        if not isinstance(model, LEM):
            raise TypeError(f"{self!r} runs a LEM model, got {type(model).__name__}")
        if not options["explain"]:
            with torch.inference_mode():
                return LEMModelOutput(logits=two_class_logits(model(batch)["z_lem"]))
        force_max = None
        if options["cam_target_class"]:
            target = options["cam_target_class"]
            if target not in self.spec.classes:
                raise ValueError(f"cam_target_class {target!r} is not one of {self.spec.classes}")
            force_max = torch.full((batch.shape[0],), target == "malignant", device=batch.device)
        localisation = model.localise(batch, force_max)
        extra_maps = (
            {"score_map": torch.sigmoid(localisation.score_map[:, 0])}
            if options.get("score_map", False)
            else {}
        )
        return LEMModelOutput(
            logits=two_class_logits(localisation.z_lem),
            heatmap=localisation.location_map[:, 0],
            heatmap_method="LEM excitation backprop",
            extra_maps=extra_maps,
            extrema=localisation.extrema,
            boxes=localisation.boxes,
        )

    def postprocess(
        self, output: ImageOutput, box: Letterbox, ref: ImageRef, options: Mapping[str, Any]
    ) -> Prediction:
        """The base prediction plus the extrema as points and, when the location map is of the predicted
        branch, the outlines of its high areas as regions (source pixels)."""
        prediction = super().postprocess(output, box, ref, options)
        if not isinstance(output, LEMImageOutput):
            return prediction
        points = []
        for extremum in output.extrema:
            x, y = box.to_source(extremum.x, extremum.y)
            score = 1.0 / (1.0 + float(np.exp(-extremum.score)))
            points.append(LocalisationPoint(x=x, y=y, score=score, label=_KIND_LABELS[extremum.kind]))
        return dataclasses.replace(
            prediction, points=tuple(points), regions=self._regions(output, box, prediction, options)
        )

    @staticmethod
    def _regions(
        output: LEMImageOutput, box: Letterbox, prediction: Prediction, options: Mapping[str, Any]
    ) -> tuple[LocalisationRegion, ...]:
        """The k highest areas of the smoothed location map as polygons on the source, each at least a
        score-map cell and ``region_min_pixels`` across and inside the crop; none when the map is of the
        branch the model did not predict (``cam_target_class`` forcing the other one)."""
        if output.heatmap is None or not output.extrema:
            return ()
        branch = output.extrema[0].kind
        if _BRANCH_CLASS[branch] != prediction.predicted_class:
            return ()
        top, left, height, width = box.crop
        outlines = lesion_outlines(
            output.heatmap,
            float(options["location_threshold"]),
            float(options["region_smoothing"]),
            limit=max(0, int(options["max_regions"])),
        )
        rows, columns = output.heatmap.shape
        regions = []
        for outline in outlines:
            cell_wide = visible_polygon(outline.polygon, CELL_PIXELS, (0, 0, columns, rows))
            source = np.array([box.to_source(float(x), float(y)) for x, y in cell_wide])
            polygon = visible_polygon(
                source, float(options["region_min_pixels"]), (left, top, left + width, top + height)
            )
            regions.append(
                LocalisationRegion(
                    points=tuple((float(x), float(y)) for x, y in polygon),
                    score=outline.score,
                    label=_REGION_LABELS[branch],
                )
            )
        return tuple(regions)


@hookimpl
def pacs_triage_register_models() -> list[ModelPlugin]:
    return [LEMPlugin(spec) for spec in MODEL_CFGS.values()]
