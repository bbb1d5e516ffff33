"""US-Fusion: MobileNetV2 + DenseNet121 feature fusion with attention, benign vs malignant breast ultrasound.

Paper: Asif S, Yan Y, Feng B, ... Xu D, "Improving Breast Cancer Diagnosis in Ultrasound Images Using Deep
Learning with Feature Fusion and Attention Mechanism", Academic Radiology 32(9):4997-5009 (2025),
doi:10.1016/j.acra.2025.05.007.  Only the abstract is available; everything it does not state is our
reconstruction, described with its reasons in ``docs/models/us-fusion.md``.  Backbones: MobileNetV2 (Sandler
et al. 2018, arXiv:1801.04381) and DenseNet121 (Huang et al. 2017, arXiv:1608.06993); attention: CBAM (Woo et
al. 2018, arXiv:1807.06521, the module of ``asg_mammonet``); explanations: Grad-CAM (arXiv:1610.02391),
saliency (Simonyan et al. 2014, arXiv:1312.6034) and GradientShap / expected gradients (Lundberg & Lee 2017,
arXiv:1705.07874).

Variants:
* ``us_fusion.v1``: both backbones' 7x7 maps, each projected to 256 channels, concatenated (512x7x7), CBAM
  (r = 16), global average pooling, Dropout-Linear(512, 256)-ReLU-Dropout-Linear(256, 2); 9,933,828
  parameters.  Input: the ultrasound image region (Sequence of Ultrasound Regions, else the content box),
  grey, stretched to 224x224, copied to 3 channels, ImageNet normalisation.  Output: p(benign),
  p(malignant); risk = p(malignant); Grad-CAM at the CBAM output, saliency and SHAP maps on request.
* Ablations (not registered): ``us_fusion_pooled.v1`` (pooled-vector fusion with SE gating), ``a_only`` and
  ``b_only`` single-branch builds.

Every reconstructed choice ([default] below) is a constructor option; :meth:`UsFusionNet.config_dict`
gives them for the checkpoint metadata.  Training-time parts are in ``training.models.us_fusion``.

Intended use: research and triage ordering, not diagnosis.  Licence of this code: Apache-2.0.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.transforms.v2 import functional as TF

from plugins import hookimpl, weights
from plugins.base import BASE_OPTIONS, ImageOutput, ModelOutput, ModelPlugin, TorchModelPlugin
from plugins.builtin.asg_mammonet import CBAM
from plugins.explain import grad_cam, normalise_minmax
from plugins.types import (
    CERTAINTY_OF_FINDING,
    AcceptRule,
    ImageRef,
    Letterbox,
    ModelSpec,
    Prediction,
    ScoreMeaning,
    calibrated_probability,
)
from plugins.weights import CheckpointMetadata

__all__ = [
    "CLASS_NAMES",
    "MODEL_CFGS",
    "SEGate",
    "UsFusionNet",
    "UsFusionPlugin",
    "checkpoint_metadata",
    "default_cfgs",
    "default_shap_baselines",
    "gradient_shap",
    "load_imagenet_backbones",
    "saliency",
    "select_frames",
    "signed_map",
    "us_fusion_mnv2_dn121",
]

CLASS_NAMES: tuple[str, ...] = ("benign", "malignant")
#: Ultrasound Image Storage, Ultrasound Multi-frame Image Storage, and their retired predecessors.
US_SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.6.1",
    "1.2.840.10008.5.1.4.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.6",
    "1.2.840.10008.5.1.4.1.1.3",
)

Fusion = Literal["spatial", "pooled_concat", "a_only", "b_only"]
Attention = Literal["cbam", "se", "none"]
BranchAFeatures = Literal["conv_head", "blocks"]
CamLayer = Literal["attention", "branch_a", "branch_b"]
FramePolicy = Literal["first", "middle", "mean_prob_over_frames"]


class SEGate(nn.Module):
    """Squeeze-and-excitation gating ``v ⊗ σ(W_up ReLU(W_down v))`` of a vector, or of a map after GAP.

    :param channels: channels C.
    :param reduction: reduction ratio r.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.down = nn.Linear(channels, hidden)
        self.up = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=(2, 3)) if x.ndim == 4 else x
        gate = torch.sigmoid(self.up(F.relu(self.down(squeezed))))
        return x * (gate[:, :, None, None] if x.ndim == 4 else gate)


def _projection(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class UsFusionNet(nn.Module):
    """MobileNetV2-1.0 and DenseNet121 on the same image, fused at the 7x7 map, CBAM, GAP, MLP head.

    :param num_classes: 2 (benign, malignant).
    :param input_size: training and serving input side [default 224]; odd sizes are aligned.
    :param fusion: ``"spatial"`` (default: project, concatenate the maps, attend), ``"pooled_concat"`` (GAP
        each branch, concatenate 2304-d, SE gate), ``"a_only"`` / ``"b_only"`` (single-branch ablations).
    :param attention: ``"cbam"``, ``"se"`` or ``"none"``; default CBAM for map fusions, SE for pooled_concat.
    :param branch_a_features: ``"conv_head"`` (1280 channels, default) or ``"blocks"`` (320, no conv_head).
    :param proj_dim: width each branch is projected to before concatenation.
    :param reduction: CBAM / SE reduction ratio.
    :param spatial_kernel: CBAM spatial conv side.
    :param head_hidden: hidden width of the head.
    :param head_dropouts: dropout before the first and before the second linear layer of the head.
    :param cam_layer: Grad-CAM target: ``"attention"`` (the fused map), ``"branch_a"`` or ``"branch_b"``;
        default the fused map, or DenseNet's for pooled_concat (which has no fused map).
    """

    def __init__(
        self,
        *,
        num_classes: int = 2,
        input_size: int = 224,
        fusion: Fusion = "spatial",
        attention: Attention | None = None,
        branch_a_features: BranchAFeatures = "conv_head",
        proj_dim: int = 256,
        reduction: int = 16,
        spatial_kernel: int = 7,
        head_hidden: int = 256,
        head_dropouts: Sequence[float] = (0.5, 0.3),
        cam_layer: CamLayer | None = None,
    ) -> None:
        super().__init__()
        if fusion not in ("spatial", "pooled_concat", "a_only", "b_only"):
            raise ValueError(f"fusion must be spatial, pooled_concat, a_only or b_only, got {fusion!r}")
        if attention is None:
            attention = "se" if fusion == "pooled_concat" else "cbam"
        if attention not in ("cbam", "se", "none"):
            raise ValueError(f"attention must be cbam, se or none, got {attention!r}")
        if fusion == "pooled_concat" and attention == "cbam":
            raise ValueError("pooled_concat fuses vectors, so its attention is 'se' or 'none', not 'cbam'")
        if branch_a_features not in ("conv_head", "blocks"):
            raise ValueError(f"branch_a_features must be conv_head or blocks, got {branch_a_features!r}")
        if len(head_dropouts) != 2:
            raise ValueError(f"head_dropouts needs 2 values, got {head_dropouts}")
        if cam_layer is None:
            cam_layer = "branch_b" if fusion == "pooled_concat" else "attention"
        if cam_layer not in ("attention", "branch_a", "branch_b"):
            raise ValueError(f"cam_layer must be attention, branch_a or branch_b, got {cam_layer!r}")

        self._config: dict[str, Any] = {
            "num_classes": num_classes,
            "input_size": input_size,
            "fusion": fusion,
            "attention": attention,
            "branch_a_features": branch_a_features,
            "proj_dim": proj_dim,
            "reduction": reduction,
            "spatial_kernel": spatial_kernel,
            "head_hidden": head_hidden,
            "head_dropouts": list(head_dropouts),
            "cam_layer": cam_layer,
        }
        self.fusion = fusion
        self.num_classes = num_classes
        self.cam_layer = cam_layer
        uses_a, uses_b = fusion != "b_only", fusion != "a_only"
        # timm models: forward_features and their stages are not part of nn.Module's type.
        self.branch_a: Any
        self.branch_b: Any

        a_channels = b_channels = 0
        if uses_a:
            self.branch_a = timm.create_model(
                "mobilenetv2_100", pretrained=False, num_classes=0, global_pool=""
            )
            a_channels = 1280
            if branch_a_features == "blocks":
                # Dropping conv_head/bn2, rather than skipping them, keeps unused weights out of the model.
                self.branch_a.conv_head = nn.Identity()
                self.branch_a.bn2 = nn.Identity()
                a_channels = 320
        if uses_b:
            self.branch_b = timm.create_model("densenet121", pretrained=False, num_classes=0, global_pool="")
            b_channels = 1024

        if fusion == "pooled_concat":
            width = a_channels + b_channels
        else:
            if uses_a:
                self.proj_a = _projection(a_channels, proj_dim)
            if uses_b:
                self.proj_b = _projection(b_channels, proj_dim)
            width = proj_dim * (int(uses_a) + int(uses_b))

        if attention == "cbam":
            self.attention: nn.Module = CBAM(width, reduction, spatial_kernel)
        elif attention == "se":
            self.attention = SEGate(width, reduction)
        else:
            self.attention = nn.Identity()

        self.head = nn.Sequential(
            nn.Dropout(head_dropouts[0]),
            nn.Linear(width, head_hidden),
            nn.ReLU(),
            nn.Dropout(head_dropouts[1]),
            nn.Linear(head_hidden, num_classes),
        )
        self.num_features = width
        self.cam_target_module()  # a cam_layer the fusion lacks fails here, not on the first study

    def config_dict(self) -> dict[str, Any]:
        """The constructor options, for the checkpoint metadata; ``UsFusionNet(**cfg)`` rebuilds the model."""
        return dict(self._config)

    def forward_intermediates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named stages of the network: ``branch_a``, ``branch_b``, ``proj_a``, ``proj_b``, ``fused``,
        ``attended``, ``pooled`` and ``logits`` (those the fusion mode has).

        :param x: normalised images ``[B, 3, H, W]``.
        """
        out: dict[str, torch.Tensor] = {}
        if self.fusion != "b_only":
            out["branch_a"] = self.branch_a.forward_features(x)
        if self.fusion != "a_only":
            out["branch_b"] = self.branch_b.forward_features(x)
        if self.fusion == "pooled_concat":
            fused = torch.cat([out[k].mean(dim=(2, 3)) for k in ("branch_a", "branch_b")], dim=1)
            out["fused"] = fused
            out["attended"] = out["pooled"] = self.attention(fused)
        else:
            maps = []
            if "branch_a" in out:
                out["proj_a"] = self.proj_a(out["branch_a"])
                maps.append(out["proj_a"])
            if "branch_b" in out:
                proj_b = self.proj_b(out["branch_b"])
                if maps and proj_b.shape[-2:] != maps[0].shape[-2:]:
                    # Odd input sizes give the two backbones different grids (225 -> 8x8 vs 7x7).
                    proj_b = F.interpolate(
                        proj_b, size=maps[0].shape[-2:], mode="bilinear", align_corners=False
                    )
                out["proj_b"] = proj_b
                maps.append(proj_b)
            out["fused"] = torch.cat(maps, dim=1)
            out["attended"] = self.attention(out["fused"])
            out["pooled"] = out["attended"].mean(dim=(2, 3))
        out["logits"] = self.head(out["pooled"])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 2]``; softmax gives p(benign), p(malignant)."""
        return self.forward_intermediates(x)["logits"]

    def cam_target_module(self, layer: CamLayer | None = None) -> nn.Module:
        """The module whose output Grad-CAM explains: ``attention`` (fused, 512x7x7), ``branch_a.bn2``
        (1280x7x7; ``branch_a.blocks`` with ``branch_a_features="blocks"``) or ``branch_b.features.norm5``.

        :param layer: override of the model's ``cam_layer``.
        """
        layer = layer or self.cam_layer
        if layer == "attention" and self.fusion != "pooled_concat":
            return self.attention
        if layer == "branch_a" and self.fusion != "b_only":
            return self.branch_a.blocks if isinstance(self.branch_a.bn2, nn.Identity) else self.branch_a.bn2
        if layer == "branch_b" and self.fusion != "a_only":
            return self.branch_b.features.norm5
        raise ValueError(f"Grad-CAM layer {layer!r} does not exist with fusion {self.fusion!r}")


def _create_us_fusion(variant: str, **kwargs: Any) -> UsFusionNet:
    """Build a variant of :data:`default_cfgs` with overrides; random weights, nothing is downloaded."""
    if variant not in default_cfgs:
        raise ValueError(f"unknown US fusion variant {variant!r}; known: {sorted(default_cfgs)}")
    return UsFusionNet(**{**default_cfgs[variant], **kwargs})


#: Constructor arguments of each variant, timm's ``model_args``.
default_cfgs: dict[str, dict[str, Any]] = {
    "us_fusion.v1": {},
    "us_fusion_pooled.v1": {"fusion": "pooled_concat"},
    "us_fusion_mnv2_only.v1": {"fusion": "a_only"},
    "us_fusion_dn121_only.v1": {"fusion": "b_only"},
}


def us_fusion_mnv2_dn121(**kwargs: Any) -> UsFusionNet:
    """The default build: spatial fusion of the MobileNetV2 and DenseNet121 maps with CBAM."""
    return _create_us_fusion("us_fusion.v1", **kwargs)


# -------------------------------------------------------------------------
# Weights
# -------------------------------------------------------------------------


def load_imagenet_backbones(
    model: UsFusionNet,
    mobilenet_path: str | Path | None = None,
    densenet_path: str | Path | None = None,
) -> None:
    """Load stock timm ImageNet state dicts (safetensors or timm ``.pth``) into the branches.

    Every branch key must be filled; only the file's ``classifier.*`` (and, with
    ``branch_a_features="blocks"``, MobileNetV2's ``conv_head.*``/``bn2.*``) may be left over.

    :param model: the model, loaded in place.
    :param mobilenet_path: a timm ``mobilenetv2_100`` file for ``branch_a``.
    :param densenet_path: a timm ``densenet121`` file for ``branch_b``.
    :raises FileNotFoundError: when a given file does not exist.
    :raises ValueError: when a file does not fit its branch, or the fusion mode has no such branch.
    """
    jobs = [("branch_a", mobilenet_path, "mobilenetv2_100"), ("branch_b", densenet_path, "densenet121")]
    for attr, path, arch in jobs:
        if path is None:
            continue
        if not hasattr(model, attr):
            raise ValueError(f"fusion {model.fusion!r} has no {attr} to load {arch} weights into")
        allowed: tuple[str, ...] = ("classifier.",)
        if attr == "branch_a" and isinstance(model.branch_a.bn2, nn.Identity):
            allowed += ("conv_head.", "bn2.")
        weights.load_backbone_weights(getattr(model, attr), path, arch, allowed)


def checkpoint_metadata(model: UsFusionNet, **fields: Any) -> CheckpointMetadata:
    """The metadata the host needs to rebuild *model* from a checkpoint
    (:func:`plugins.weights.checkpoint_metadata`).

    :param model: the trained model; its :meth:`~UsFusionNet.config_dict` becomes the options.
    :param fields: further :class:`~plugins.weights.CheckpointMetadata` fields; ``options`` entries here (e.g.
        ``frames``, ``shap_background``) are merged over the model's.
    """
    cfg = model.config_dict()
    spec = dataclasses.replace(
        MODEL_CFGS["us_fusion.v1"],
        classes=CLASS_NAMES[: cfg["num_classes"]],
        input_size=(cfg["input_size"], cfg["input_size"]),
    )
    options = {k: v for k, v in cfg.items() if k not in ("num_classes", "input_size")}
    options.update(fields.pop("options", {}))
    return weights.checkpoint_metadata(spec, options, **fields)


def select_frames(n_frames: int, policy: FramePolicy = "first", max_frames: int = 16) -> list[int]:
    """Frame indices a multi-frame ultrasound is read at, for offline evaluation.

    The server follows the host's ``frames`` option instead (``first`` by default for this model);
    ``mean_prob_over_frames`` averages the probabilities of up to ``max_frames`` evenly spaced frames.

    :param n_frames: frames in the object.
    :param policy: ``"first"``, ``"middle"`` or ``"mean_prob_over_frames"``.
    :param max_frames: cap for the averaging policy.
    """
    if n_frames < 1:
        raise ValueError(f"an image has at least one frame, got {n_frames}")
    if policy == "first":
        return [0]
    if policy == "middle":
        return [n_frames // 2]
    if policy == "mean_prob_over_frames":
        return sorted({int(i) for i in np.rint(np.linspace(0, n_frames - 1, min(n_frames, max_frames)))})
    raise ValueError(f"unknown frame policy {policy!r}")


# -------------------------------------------------------------------------
# Explanations: saliency and GradientShap; Grad-CAM is plugins.explain.grad_cam
# -------------------------------------------------------------------------


def _targets(logits: torch.Tensor, target: torch.Tensor | int | None) -> torch.Tensor:
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, int):
        return torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
    return target.to(device=logits.device, dtype=torch.long)


def saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int | None = None) -> torch.Tensor:
    """Vanilla gradient saliency: ``max over channels |∂y_c/∂x|``, min-max scaled per image.

    :param model: classifier in eval mode (frozen parameters are fine).
    :param x: inputs ``[B, 3, H, W]``.
    :param target: class per sample; default the predicted class.
    :returns: ``[B, 1, H, W]`` in [0, 1].
    """
    inputs = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs)
        classes = _targets(logits, target)
        (grads,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), inputs)
    return normalise_minmax(grads.abs().amax(dim=1, keepdim=True)).detach()


def default_shap_baselines(x: torch.Tensor, sigma: float = 10.0) -> torch.Tensor:
    """The SHAP background when a model ships none: a black image and a Gaussian-blurred copy of each input.

    :param x: normalised inputs ``[B, 3, H, W]``.
    :param sigma: blur σ in pixels.
    :returns: per-input baselines ``[B, 2, 3, H, W]``.
    """
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    black = ((0.0 - mean) / std).expand_as(x)
    # Blurring is linear, so blurring the normalised input equals normalising the blurred pixels.  The kernel
    # must stay below the image side for the reflect padding.
    kernel = min(2 * int(np.ceil(3 * sigma)) + 1, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
    blurred = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    return torch.stack([black, blurred], dim=1)


def gradient_shap(
    model: nn.Module,
    x: torch.Tensor,
    baselines: torch.Tensor,
    target: torch.Tensor | int | None = None,
    *,
    n_samples: int = 50,
    stdevs: float = 0.0,
    internal_batch_size: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """GradientShap (expected gradients), the algorithm of ``captum.attr.GradientShap``, in plain torch.

    For each input, ``n_samples`` times: draw a baseline b from the background, α ~ U(0, 1) and Gaussian input
    noise (std ``stdevs``) giving x'; accumulate ``∇f_c(b + α(x' − b)) ⊙ (x' − b)``; average.  For a linear
    model the attributions sum exactly to ``f(x) − E_b[f(b)]`` (completeness).

    :param model: classifier in eval mode.
    :param x: inputs ``[B, 3, H, W]``.
    :param baselines: a shared background ``[N, 3, H, W]`` or per-input backgrounds ``[B, N, 3, H, W]``.
    :param target: class per sample; default the predicted class.
    :param n_samples: samples per input [default 50].
    :param stdevs: std of the input noise [default 0].
    :param internal_batch_size: samples per forward pass.
    :param generator: CPU RNG for reproducible attributions.
    :returns: attributions with the shape of ``x``; the channel sum is the signed map.
    """
    if baselines.ndim == x.ndim:
        baselines = baselines.unsqueeze(0).expand(x.shape[0], *baselines.shape)
    if baselines.shape[0] != x.shape[0] or baselines.shape[2:] != x.shape[1:]:
        raise ValueError(f"baselines {tuple(baselines.shape)} do not fit inputs {tuple(x.shape)}")
    x = x.detach()
    if target is None or isinstance(target, int):
        with torch.no_grad():
            target = _targets(model(x), target)
    attributions = torch.zeros_like(x)
    for i in range(x.shape[0]):
        picks = torch.randint(0, baselines.shape[1], (n_samples,), generator=generator).to(x.device)
        alphas = torch.rand(n_samples, generator=generator).to(x.device, x.dtype)
        noise = torch.randn((n_samples, *x.shape[1:]), generator=generator).to(x.device, x.dtype) * stdevs
        total = torch.zeros_like(x[i])
        for start in range(0, n_samples, internal_batch_size):
            chunk = slice(start, start + internal_batch_size)
            inputs = x[i].unsqueeze(0) + noise[chunk]
            base = baselines[i, picks[chunk]].to(x.dtype)
            alpha = alphas[chunk].view(-1, *([1] * (x.ndim - 1)))
            points = (base + alpha * (inputs - base)).requires_grad_(True)
            with torch.enable_grad():
                score = model(points)[:, int(target[i])].sum()
                (grads,) = torch.autograd.grad(score, points)
            total += (grads * (inputs - base)).sum(dim=0)
        attributions[i] = total / n_samples
    return attributions


def signed_map(attributions: torch.Tensor) -> torch.Tensor:
    """Channel-summed attributions ``[B, H, W]`` scaled by their largest magnitude to [-1, 1].

    Positive values push toward the explained class (red), negative away from it (blue).

    :param attributions: ``[B, 3, H, W]`` from :func:`gradient_shap`.
    """
    summed = attributions.sum(dim=1)
    peak = summed.abs().flatten(1).amax(dim=1).view(-1, 1, 1)
    scaled = summed / peak.clamp_min(torch.finfo(summed.dtype).tiny)
    return torch.where(peak > 0, scaled, torch.zeros_like(summed))


# -------------------------------------------------------------------------
# Plugin
# -------------------------------------------------------------------------


def _model_option_defaults() -> dict[str, Any]:
    # The constructor's keyword defaults, so the plugin's options and the model cannot drift apart.
    params = inspect.signature(UsFusionNet.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for fixed in ("num_classes", "input_size"):  # these come from the ModelSpec (classes, input_size)
        defaults.pop(fixed)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}


_MODEL_OPTIONS = _model_option_defaults()

#: Explanation options of this plugin, beside the base options and the model's.
_EXPLAIN_OPTIONS: dict[str, Any] = {
    # Extra maps are computed only when asked for: nothing delivers them unless the site configures it
    # (docs/outputs.md, "Heatmaps"), and saliency costs a backward pass per image.
    "saliency": False,
    # SHAP costs shap_samples backward passes per image, so it runs only when asked for.
    "shap": False,
    "shap_samples": 50,
    # A [N, 3, H, W] tensor of normalised training images (torch.save); "" = black + blurred input.
    "shap_background": "",
}


def _cfg(**kwargs: Any) -> ModelSpec:
    defaults: dict[str, Any] = {
        "name": "us_fusion",
        "display_name": "US-Fusion (MobileNetV2 + DenseNet121 + CBAM)",
        "arch": "us_fusion_mnv2_dn121",
        "classes": CLASS_NAMES,
        "positive_classes": ("malignant",),
        "accepts": AcceptRule(modalities=("US",), sop_class_uids=US_SOP_CLASSES),
        "input_size": (224, 224),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "thresholds": {"malignant": 0.5},
        "score": ScoreMeaning(
            kind="suspicion_score", description="p(malignant), uncalibrated", concept=CERTAINTY_OF_FINDING
        ),
        "calibrated_score": calibrated_probability(),
        "paper": (
            "Asif et al., Acad Radiol 32(9) 2025, doi:10.1016/j.acra.2025.05.007; docs/models/us-fusion.md"
        ),
        "license": "Apache-2.0",
    }
    return ModelSpec(**{**defaults, **kwargs})


MODEL_CFGS: dict[str, ModelSpec] = {
    "us_fusion.v1": _cfg(model_id="us_fusion.v1", version="1.0"),
}


class UsFusionPlugin(TorchModelPlugin):
    """The host's view of US-Fusion: the US region, stretched to 224; Grad-CAM (saliency, SHAP on request)."""

    # Spec §2: crop to the ultrasound region (else the content box), grey, stretch (no letterbox), frame 0.
    default_options: ClassVar[Mapping[str, Any]] = {
        **BASE_OPTIONS,
        "frames": "first",
        "crop": "ultrasound",
        "keep_aspect": False,
        "to_grey": True,
        "clahe": False,
        **_EXPLAIN_OPTIONS,
        **_MODEL_OPTIONS,
    }
    cam_layer = "attention"

    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        height, width = self.spec.input_size
        if height != width:
            raise ValueError(f"US-Fusion needs a square input, got {self.spec.input_size}")
        return UsFusionNet(
            num_classes=len(self.spec.classes),
            input_size=height,
            **{key: options[key] for key in _MODEL_OPTIONS},
        )

    def postprocess(
        self, output: ImageOutput, box: Letterbox, ref: ImageRef, options: Mapping[str, Any]
    ) -> Prediction:
        """The base postprocessing, then the class by the malignant threshold rather than the argmax.

        ``pacs-triage train`` stores Youden's threshold on the validation split in the checkpoint's
        ``thresholds`` (docs/models/us-fusion.md); a site's ``thresholds`` setting overrides it.
        """
        prediction = super().postprocess(output, box, ref, options)
        threshold = self.spec.thresholds.get("malignant")
        if threshold is None:
            return prediction
        malignant = prediction.probabilities[self.spec.classes.index("malignant")] >= threshold
        return dataclasses.replace(prediction, predicted_class="malignant" if malignant else "benign")

    def forward(self, model: nn.Module, batch: torch.Tensor, options: Mapping[str, Any]) -> ModelOutput:
        """Logits; with ``explain``, Grad-CAM at the model's ``cam_layer`` as the heatmap, and ``saliency``
        and ``shap`` (signed, [-1, 1]) in ``extra_maps`` when their options are on."""
        if not isinstance(model, UsFusionNet):
            raise TypeError(f"{self!r} runs a UsFusionNet, got {type(model).__name__}")
        if not options["explain"]:
            with torch.inference_mode():
                return ModelOutput(logits=model(batch))
        target = None
        if options["cam_target_class"]:
            index = self.spec.classes.index(options["cam_target_class"])
            target = torch.full((batch.shape[0],), index, dtype=torch.long, device=batch.device)
        logits, cam = grad_cam(model, batch, model.cam_target_module(), target)
        classes = logits.argmax(dim=1) if target is None else target
        extra: dict[str, torch.Tensor] = {}
        if options["saliency"]:
            extra["saliency"] = saliency(model, batch, classes)[:, 0]
        if options["shap"]:
            background = self._shap_background(batch, str(options["shap_background"] or ""))
            samples = int(options["shap_samples"])
            attributions = gradient_shap(model, batch, background, classes, n_samples=samples)
            extra["shap"] = signed_map(attributions)
        return ModelOutput(
            logits=logits, heatmap=normalise_minmax(cam)[:, 0], heatmap_method="Grad-CAM", extra_maps=extra
        )

    @staticmethod
    def _shap_background(batch: torch.Tensor, path: str) -> torch.Tensor:
        if not path:
            return default_shap_baselines(batch)
        background = torch.load(path, map_location=batch.device, weights_only=True)
        if not isinstance(background, torch.Tensor) or background.ndim != 4:
            raise ValueError(f"SHAP background {path} must hold one [N, 3, H, W] tensor")
        if tuple(background.shape[1:]) != tuple(batch.shape[1:]):
            size = tuple(batch.shape[-2:])
            background = F.interpolate(background.float(), size=size, mode="bilinear", align_corners=False)
        return background.to(batch.dtype)


@hookimpl
def pacs_triage_register_models() -> list[ModelPlugin]:
    return [UsFusionPlugin(spec) for spec in MODEL_CFGS.values()]
