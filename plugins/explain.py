"""Grad-CAM for any CNN, and the CAM shortcut that gives the same map without a backward pass.

Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391) weights a layer's activations A by the
spatially averaged gradient of the class score y^c: ``L^c = ReLU(sum_k alpha_k^c A^k)`` with
``alpha_k^c = mean_ij dy^c/dA^k_ij``.  When A is followed only by global average pooling and a
linear layer W, ``dy^c/dA^k_ij = W_ck / Z`` (Z = H*W), so ``alpha_k^c = W_ck / Z`` and Grad-CAM
equals CAM (Zhou et al. 2016) divided by Z: one forward pass, no gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@contextmanager
def capture_output(layer: nn.Module, *, requires_grad: bool = False) -> Iterator[list[torch.Tensor]]:
    """Collect *layer*'s outputs during the forward passes run inside the block.

    :param requires_grad: Make the output a leaf that requires grad when it does not already.
        Gradients can then be taken with respect to it even when the model's parameters are
        frozen, and autograd records only the part of the network after the layer.
    """
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if requires_grad and not output.requires_grad:
            output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    handle = layer.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _single(captured: list[torch.Tensor], layer: nn.Module) -> torch.Tensor:
    if len(captured) != 1:
        raise ValueError(
            f"layer {type(layer).__name__} ran {len(captured)} times in one forward; CAM needs exactly 1"
        )
    activations = captured[0]
    if activations.ndim != 4:
        raise ValueError(f"CAM needs a [B, C, H, W] layer output, got shape {tuple(activations.shape)}")
    return activations


def grad_cam(
    model: nn.Module, inputs: torch.Tensor, layer: nn.Module, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of the target-class logit at *layer*'s output.

    Do not call it under :func:`torch.inference_mode`, which no ``enable_grad`` can undo.

    :param model: Returns logits ``[B, K]``; in eval mode, so samples do not interact.
    :param inputs: ``[B, 3, H, W]``.
    :param layer: A module of *model* whose output is ``[B, C, h, w]``.
    :param target: Class index per sample; the predicted class by default.
    :returns: (logits ``[B, K]``, map ``[B, 1, h, w]`` >= 0), both detached.
    """
    with torch.enable_grad(), capture_output(layer, requires_grad=True) as captured:
        logits = model(inputs)
    activations = _single(captured, layer)
    if target is None:
        target = logits.argmax(dim=1)
    score = logits.gather(1, target.view(-1, 1)).sum()
    (gradients,) = torch.autograd.grad(score, activations)
    alpha = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * activations).sum(dim=1, keepdim=True))
    return logits.detach(), cam.detach()


def linear_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: nn.Module,
    head: nn.Linear,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM computed as CAM, valid only when *layer* is followed by global average pooling and *head*.

    Same arguments and result as :func:`grad_cam`, equal to it up to float rounding.
    """
    with torch.inference_mode(), capture_output(layer) as captured:
        logits = model(inputs)
        activations = _single(captured, layer)
        if target is None:
            target = logits.argmax(dim=1)
        weights = head.weight[target].to(activations.dtype)
        area = activations.shape[2] * activations.shape[3]
        cam = F.relu(torch.einsum("bc,bchw->bhw", weights, activations)).unsqueeze(1) / area
    return logits, cam


def upsample(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``[B, 1, h, w]`` maps to *size* (as captum's ``interpolate``)."""
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)


def normalise_minmax(cam: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1]; a constant map (e.g. all zero) becomes all zero, never NaN."""
    flat = cam.flatten(start_dim=1)
    low = flat.min(dim=1).values.view(-1, *([1] * (cam.ndim - 1)))
    span = flat.max(dim=1).values.view(-1, *([1] * (cam.ndim - 1))) - low
    return torch.where(
        span > 0, (cam - low) / span.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam)
    )
