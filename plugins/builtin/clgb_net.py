"""CLGB-Net: ResNet-50 + Swin-T + FPN + CAM for three-class mammogram classification.

Paper: "CLGB-Net: ResNet-50 + Swin Transformer + FPN + CAM for mammography".  The paper names its blocks
but gives few of their details; every choice it leaves open is a constructor option here
(``CLGBNet.config_dict()`` lists them for the checkpoint metadata).  ``[D]`` marks such a default of ours,
``[P]`` what the paper states.  ``docs/models/clgb-net.md`` describes the build, where it differs from the
paper and why, and its test oracles.

Variants: the one registered model, ``clgb_net.v1``, is the default build at 224x224 (57.7 M parameters); a
checkpoint may bring another input size (``img_size``, e.g. 448, with Swin built for it).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork

from plugins import hookimpl, weights
from plugins.base import BASE_OPTIONS, MAMMOGRAPHY_2D, ModelOutput, ModelPlugin, TorchModelPlugin
from plugins.types import CERTAINTY_OF_FINDING, ModelSpec, ScoreMeaning, calibrated_probability
from plugins.weights import CheckpointMetadata

__all__ = [
    "CLASSES",
    "MODEL_CFGS",
    "MODEL_OPTIONS",
    "CLGBNet",
    "CLGBNetPlugin",
    "GradScale",
    "SEBlock",
    "attention_heatmap",
    "cam_heatmap",
    "checkpoint_metadata",
    "grad_scale",
    "load_imagenet_backbones",
    "minmax_per_image",
]

#: Class index order [D]: the ROC text of the paper says 0 = normal, 1 = benign, 2 = malignant.
CLASSES: tuple[str, ...] = ("normal", "benign", "malignant")
#: ``ModelSpec.arch`` and the checkpoint's ``architecture``.
ARCH = "clgb_net"

CamMode = Literal["spatial", "channel"]
SwinInput = Literal["sum", "resnet_only", "image_only"]
TrainSchedule = Literal["joint", "staged"]

_CAM_MODES = ("spatial", "channel")
_SWIN_INPUTS = ("sum", "resnet_only", "image_only")
_TRAIN_SCHEDULES = ("joint", "staged")


class GradScale(torch.autograd.Function):
    """Identity going forward; multiplies the incoming gradient by ``g`` going back.

    The paper puts "weak gradient weights" on the shallow FPN levels to damp local noise.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, g: float) -> Tensor:
        ctx.g = float(g)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output * ctx.g, None


def grad_scale(x: Tensor, g: float) -> Tensor:
    """Return ``x`` unchanged, with its gradient scaled by ``g`` on the way back.

    :param x: any tensor.
    :param g: the gradient factor; 1.0 is a no-op.
    """
    if g == 1.0:
        return x
    return GradScale.apply(x, g)


class SEBlock(nn.Module):
    """Squeeze-and-excitation channel attention: ``x * sigmoid(W2 relu(W1 gap(x)))``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        """:param channels: input (= output) channels.
        :param reduction: bottleneck reduction ratio r.
        """
        super().__init__()
        if channels % reduction:
            raise ValueError(f"SE channels {channels} are not divisible by reduction {reduction}")
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1)

    def gates(self, x: Tensor) -> Tensor:
        """The per-channel gates s in (0, 1), shape (B, C, 1, 1).

        :param x: (B, C, H, W) features.
        """
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gates(x)


def minmax_per_image(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Min-max normalise each image of a (B, ...) tensor to [0, 1]; a constant image gives zeros.

    The range is floored at ``eps`` rather than offset by it, so that a map with a small range (an untrained
    CAM) still reaches exactly 1.

    :param x: (B, ...) tensor.
    :param eps: floor of the range, so a constant map does not divide by zero.
    """
    flat = x.flatten(1)
    low = flat.min(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    high = flat.max(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    return (x - low) / (high - low).clamp_min(eps)


def cam_heatmap(
    cam: Tensor,
    class_index: Tensor | int,
    size: tuple[int, int],
    eps: float = 1e-6,
) -> Tensor:
    """The CAM heat map H_k of the paper: bilinear upsampling of M_k, then min-max to [0, 1].

    :param cam: class activation maps M, shape (B, K, h, w).
    :param class_index: the class k per image, an int or a (B,) tensor (usually the predicted class).
    :param size: output (height, width): the model input size, or the source Rows x Columns.
    :param eps: range epsilon of the min-max step.
    :returns: (B, 1, height, width) float map in [0, 1].
    """
    batch = cam.shape[0]
    if isinstance(class_index, int):
        index = torch.full((batch,), class_index, dtype=torch.long, device=cam.device)
    else:
        index = class_index.to(device=cam.device, dtype=torch.long).reshape(batch)
    if bool((index < 0).any()) or bool((index >= cam.shape[1]).any()):
        raise ValueError(f"class_index {index.tolist()} out of range for {cam.shape[1]} CAM classes")
    chosen = cam[torch.arange(batch, device=cam.device), index].unsqueeze(1)
    upsampled = F.interpolate(chosen, size=size, mode="bilinear", align_corners=False)
    return minmax_per_image(upsampled, eps)


def attention_heatmap(attention: Tensor, size: tuple[int, int]) -> Tensor:
    """Upsample the fusion attention A (already in [0, 1]) to ``size``.

    :param attention: (B, 1, h, w) map from the forward extras.
    :param size: output (height, width).
    """
    upsampled = F.interpolate(attention, size=size, mode="bilinear", align_corners=False)
    return upsampled.clamp(0.0, 1.0)


class CLGBNet(nn.Module):
    """CLGB-Net as built by default (``docs/models/clgb-net.md``, "What the network is").

    ``forward(x)`` returns ``(logits, extras)``: logits (B, 3) and a dict with the auxiliary CAM logits
    ``cam_logits`` (B, 3), the class activation maps ``cam`` (B, 3, h, w) and the fusion attention
    ``attention`` (B, 1, h, w).  ``return_intermediates=True`` adds every intermediate.
    """

    def __init__(
        self,
        num_classes: int = 3,
        img_size: int = 224,
        *,
        cnn_name: str = "resnet50",
        swin_name: str = "swin_tiny_patch4_window7_224",
        fpn_channels: int = 256,
        se_reduction: int = 16,
        fpn_grad_scales: tuple[float, float, float, float] = (0.25, 0.5, 1.0, 1.0),
        cross_attn_heads: int = 8,
        drop_rate: float = 0.0,
        cam_mode: CamMode = "spatial",
        swin_input: SwinInput = "sum",
        cam_detach: bool = True,
        attention_eps: float = 1e-6,
        aux_loss_weight: float = 0.5,
        train_schedule: TrainSchedule = "joint",
    ) -> None:
        """:param num_classes: output classes; 3 = normal / benign / malignant.
        :param img_size: square input side; a multiple of 32 whose Swin grids divide by the window (224, 448).
        :param cnn_name: timm name of the local CNN (4 feature stages, strides 4-32).
        :param swin_name: timm name of the Swin transformer.
        :param fpn_channels: FPN width [D 256].
        :param se_reduction: SE reduction ratio r [D 16].
        :param fpn_grad_scales: backward gradient factors on P2..P5 [D 0.25, 0.5, 1, 1].
        :param cross_attn_heads: heads of the global-local cross-attention [D 8].
        :param drop_rate: dropout before the classifier [D 0.0].
        :param cam_mode: ``spatial`` re-weights C5 by the attention map; ``channel`` by the CAM weights.
        :param swin_input: what the Swin patch grid receives: image + CAM-weighted C2 (``sum``), one of them.
        :param cam_detach: stop gradients through the attention map A.
        :param attention_eps: epsilon of A's min-max normalisation.
        :param aux_loss_weight: weight lambda_aux of the auxiliary CAM cross-entropy [D 0.5]; training only.
        :param train_schedule: ``joint`` [D] or ``staged`` (three sequential stages); training only.
        """
        super().__init__()
        if cam_mode not in _CAM_MODES:
            raise ValueError(f"cam_mode {cam_mode!r} is not one of {_CAM_MODES}")
        if swin_input not in _SWIN_INPUTS:
            raise ValueError(f"swin_input {swin_input!r} is not one of {_SWIN_INPUTS}")
        if train_schedule not in _TRAIN_SCHEDULES:
            raise ValueError(f"train_schedule {train_schedule!r} is not one of {_TRAIN_SCHEDULES}")
        if img_size % 32:
            raise ValueError(f"img_size {img_size} is not a multiple of 32")
        if len(fpn_grad_scales) != 4:
            raise ValueError(f"fpn_grad_scales needs 4 factors (P2..P5), got {fpn_grad_scales}")
        self._config: dict[str, Any] = {
            "num_classes": num_classes,
            "img_size": img_size,
            "cnn_name": cnn_name,
            "swin_name": swin_name,
            "fpn_channels": fpn_channels,
            "se_reduction": se_reduction,
            "fpn_grad_scales": list(fpn_grad_scales),
            "cross_attn_heads": cross_attn_heads,
            "drop_rate": drop_rate,
            "cam_mode": cam_mode,
            "swin_input": swin_input,
            "cam_detach": cam_detach,
            "attention_eps": attention_eps,
            "aux_loss_weight": aux_loss_weight,
            "train_schedule": train_schedule,
        }
        self.num_classes = num_classes
        self.img_size = img_size
        self.cam_mode = cam_mode
        self.swin_input = swin_input
        self.cam_detach = cam_detach
        self.attention_eps = attention_eps
        self.fpn_grad_scales = tuple(float(g) for g in fpn_grad_scales)

        # Out index 0 of a timm ResNet is the stride-2 stem, so the four stages are indices 1..4.
        # timm models: feature_info, patch_embed, layers and norm are not part of nn.Module's type.
        self.cnn: Any
        self.swin: Any
        self.cnn = timm.create_model(cnn_name, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        cnn_channels = list(self.cnn.feature_info.channels())
        if list(self.cnn.feature_info.reduction()) != [4, 8, 16, 32]:
            raise ValueError(f"{cnn_name} stages must have strides 4, 8, 16, 32")
        self.swin = timm.create_model(swin_name, pretrained=False, num_classes=0, img_size=img_size)
        embed_dim = int(self.swin.embed_dim)
        swin_dim = int(self.swin.num_features)

        self.cam_fc = nn.Linear(cnn_channels[-1], num_classes)
        self.fpn = FeaturePyramidNetwork(cnn_channels, fpn_channels)
        pyramid_channels = 4 * fpn_channels
        self.se = SEBlock(pyramid_channels, se_reduction)
        # C2's stride-4 grid matches Swin's 4x4 patch grid, so it can be added token for token.
        self.cnn_to_swin = (
            nn.Conv2d(cnn_channels[0], embed_dim, kernel_size=1) if swin_input != "image_only" else None
        )
        self.kv_proj = nn.Conv2d(pyramid_channels, swin_dim, kernel_size=1)
        self.q_norm = nn.LayerNorm(swin_dim)
        self.kv_norm = nn.LayerNorm(swin_dim)
        self.cross_attn = nn.MultiheadAttention(swin_dim, cross_attn_heads, batch_first=True)
        self.fusion_logits = nn.Parameter(torch.zeros(2))
        self.num_features = cnn_channels[-1] + pyramid_channels + swin_dim
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)

    def config_dict(self) -> dict[str, Any]:
        """The constructor options, JSON-serialisable, for the checkpoint metadata."""
        return json.loads(json.dumps(self._config))

    def fusion_weights(self) -> Tensor:
        """beta = softmax(b): how much the cross-attended Swin tokens and the pyramid tokens contribute."""
        return torch.softmax(self.fusion_logits, dim=0)

    def _attention(self, cam: Tensor, cam_logits: Tensor) -> Tensor:
        # The predicted-class mixture stands in for the label, which does not exist at inference.
        probs = torch.softmax(cam_logits, dim=1)
        mixed = F.relu(torch.einsum("bk,bkhw->bhw", probs, cam)).unsqueeze(1)
        attention = minmax_per_image(mixed, self.attention_eps)
        return attention.detach() if self.cam_detach else attention

    def forward(self, x: Tensor, *, return_intermediates: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """:param x: (B, 3, img_size, img_size) normalised images.
        :param return_intermediates: also return C2..C5, P2..P5, F_P, Swin tokens, fused tokens and f.
        :returns: logits (B, num_classes) and the extras dict.
        """
        c2, c3, c4, c5 = self.cnn(x)

        # CAM head (steps 6-8): z_cam = W gap(C5) + b and M_k = sum_c W[k, c] C5_c, so mean(M_k) + b_k = z_k.
        cam_logits = self.cam_fc(c5.mean((2, 3)))
        cam = torch.einsum("kc,bchw->bkhw", self.cam_fc.weight, c5)
        attention = self._attention(cam, cam_logits)

        if self.cam_mode == "spatial":
            # Residual weighting (1 + A) so no feature is ever zeroed.
            f_local = (c5 * (1.0 + attention)).mean((2, 3))
        else:
            channel_weights = self.cam_fc.weight[cam_logits.argmax(dim=1)]
            if self.cam_detach:
                channel_weights = channel_weights.detach()
            f_local = c5.mean((2, 3)) * channel_weights

        # Swin branch (steps 15-17), NHWC throughout.
        tokens = self._swin_input_tokens(x, c2, attention)
        swin_tokens = self.swin.norm(self.swin.layers(tokens))
        grid = (swin_tokens.shape[1], swin_tokens.shape[2])

        # Pyramid branch (steps 10-14).
        pyramid = self.fpn(OrderedDict((f"c{i + 2}", c) for i, c in enumerate((c2, c3, c4, c5))))
        levels = [grad_scale(p, g) for p, g in zip(pyramid.values(), self.fpn_grad_scales, strict=True)]
        resized = [F.interpolate(p, size=grid, mode="bilinear", align_corners=False) for p in levels]
        stacked = torch.cat(resized, dim=1)
        se_gates = self.se.gates(stacked)
        pyramid_fused = stacked * se_gates
        f_pyramid = pyramid_fused.mean((2, 3))

        # Global-local fusion (steps 18-21).
        query = swin_tokens.flatten(1, 2)
        kv = self.kv_proj(pyramid_fused).flatten(2).transpose(1, 2)
        kv_normed = self.kv_norm(kv)
        attended, _ = self.cross_attn(self.q_norm(query), kv_normed, kv_normed, need_weights=False)
        crossed = query + attended
        beta = self.fusion_weights()
        fused = beta[0] * crossed + beta[1] * kv
        f_global = fused.mean(dim=1)

        pooled = torch.cat([f_local, f_pyramid, f_global], dim=1)
        logits = self.head(self.head_drop(pooled))

        extras: dict[str, Tensor] = {"cam_logits": cam_logits, "cam": cam, "attention": attention}
        if return_intermediates:
            extras.update(
                {
                    "c2": c2,
                    "c3": c3,
                    "c4": c4,
                    "c5": c5,
                    **{f"p{i + 2}": p for i, p in enumerate(pyramid.values())},
                    "pyramid_fused": pyramid_fused,
                    "se_gates": se_gates,
                    "swin_tokens": swin_tokens,
                    "fused_tokens": fused,
                    "fusion_weights": beta,
                    "pooled": pooled,
                }
            )
        return logits, extras

    def _swin_input_tokens(self, x: Tensor, c2: Tensor, attention: Tensor) -> Tensor:
        parts: list[Tensor] = []
        if self.swin_input in ("sum", "image_only"):
            parts.append(self.swin.patch_embed(x))
        if self.cnn_to_swin is not None:
            attention_c2 = F.interpolate(attention, size=c2.shape[-2:], mode="bilinear", align_corners=False)
            parts.append(self.cnn_to_swin(c2 * (1.0 + attention_c2)).permute(0, 2, 3, 1))
        tokens = parts[0]
        for part in parts[1:]:
            tokens = tokens + part
        return tokens


# ---------------------------------------------------------------------------------------------------------
# Weights: ImageNet backbones from local files, and what a checkpoint records.


def load_imagenet_backbones(
    model: CLGBNet,
    *,
    cnn_path: str | Path | None = None,
    swin_path: str | Path | None = None,
) -> None:
    """Initialise the ResNet-50 and/or Swin-T from local ImageNet checkpoints (timm ``.pth`` or safetensors).

    No backbone key may be missing; only the classifier heads (``fc.*`` for the ResNet, ``head.*`` for Swin)
    may be left over (:func:`plugins.weights.load_backbone_weights`).

    :param model: the CLGB-Net to initialise in place.
    :param cnn_path: a full ``resnet50`` ImageNet checkpoint.
    :param swin_path: a full ``swin_tiny_patch4_window7_224`` ImageNet checkpoint.
    :raises ValueError: when a checkpoint's keys do not match the backbone.
    """
    config = model.config_dict()
    if cnn_path is not None:
        weights.load_backbone_weights(model.cnn, cnn_path, config["cnn_name"], ("fc.",))
    if swin_path is not None:
        from timm.models.swin_transformer import checkpoint_filter_fn

        # The filter converts the original Microsoft key layout and resizes position tables for other sizes.
        weights.load_backbone_weights(
            model.swin,
            swin_path,
            config["swin_name"],
            ("head.",),
            convert=lambda state: checkpoint_filter_fn(state, model.swin),
        )


def _model_option_defaults() -> dict[str, Any]:
    # The constructor's keyword-only defaults, so the plugin's options and the model cannot drift apart;
    # num_classes and img_size come from the ModelSpec (classes, input_size) instead.
    params = inspect.signature(CLGBNet.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}


#: The model's [D] choices as plugin options (``plugins.models.clgb_net.options``).
MODEL_OPTIONS: dict[str, Any] = _model_option_defaults()


def checkpoint_metadata(model: CLGBNet, **fields: Any) -> CheckpointMetadata:
    """The metadata the host needs to rebuild *model* from a checkpoint: class order, input size,
    normalisation and the model's options (:func:`plugins.weights.checkpoint_metadata`).

    :param model: the trained model.
    :param fields: further :class:`~plugins.weights.CheckpointMetadata` fields (version, thresholds,
        training_data...).
    """
    config = model.config_dict()
    spec = dataclasses.replace(
        MODEL_CFGS["clgb_net.v1"],
        classes=CLASSES[: model.num_classes],
        input_size=(model.img_size, model.img_size),
    )
    options = {k: v for k, v in config.items() if k in MODEL_OPTIONS}
    return weights.checkpoint_metadata(spec, options, **fields)


# ---------------------------------------------------------------------------------------------------------
# Plugin.


def _cfg(**kwargs: Any) -> ModelSpec:
    defaults: dict[str, Any] = {
        "name": "clgb_net",
        "display_name": "CLGB-Net (ResNet-50 + Swin-T + FPN + CAM), normal / benign / malignant",
        "arch": ARCH,
        "classes": CLASSES,
        "positive_classes": ("malignant",),
        "accepts": MAMMOGRAPHY_2D,
        "input_size": (224, 224),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "thresholds": {"malignant": 0.5},
        # Labels are pathology (malignant vs benign or normal), so calibrated p(malignant) is a probability.
        "score": ScoreMeaning(
            kind="suspicion_score",
            description="p(malignant) of normal/benign/malignant, uncalibrated",
            concept=CERTAINTY_OF_FINDING,
        ),
        "calibrated_score": calibrated_probability("calibrated p(malignant) of normal/benign/malignant"),
        "paper": (
            "CLGB-Net: ResNet-50 + Swin Transformer + FPN + CAM for mammography; docs/models/clgb-net.md"
        ),
        "license": "Apache-2.0",
    }
    return ModelSpec(**{**defaults, **kwargs})


MODEL_CFGS: dict[str, ModelSpec] = {
    "clgb_net.v1": _cfg(model_id="clgb_net.v1", version="1.0"),
}


class CLGBNetPlugin(TorchModelPlugin):
    """The host's view of CLGB-Net: plain resize to 224, the model's own CAM as heat map, the fusion attention
    as a second map on request (``attention_map``)."""

    # Full-field image stretched to 224x224 (the paper's eval transform keeps no aspect ratio); no crop, no
    # laterality flip, no CLAHE.
    default_options: ClassVar[Mapping[str, Any]] = {
        **BASE_OPTIONS,
        "keep_aspect": False,
        **MODEL_OPTIONS,
        # The fusion attention A in extra_maps: a by-product of the forward pass, but nothing delivers it unless
        # the site asks (docs/outputs.md, "Heatmaps"), so it is attached only on request.
        "attention_map": False,
    }

    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        height, width = self.spec.input_size
        if height != width:
            raise ValueError(f"CLGB-Net needs a square input, got {self.spec.input_size}")
        return CLGBNet(
            num_classes=len(self.spec.classes),
            img_size=height,
            **{key: options[key] for key in MODEL_OPTIONS},
        )

    def forward(self, model: nn.Module, batch: torch.Tensor, options: Mapping[str, Any]) -> ModelOutput:
        """Logits, the CAM heat map of the predicted class (or ``cam_target_class``) and, with
        ``attention_map``, the attention A as an extra map."""
        if not isinstance(model, CLGBNet):
            raise TypeError(f"{self!r} runs a CLGBNet, got {type(model).__name__}")
        with torch.inference_mode():
            logits, extras = model(batch)
            if not options["explain"]:
                return ModelOutput(logits=logits)
            if options["cam_target_class"]:
                target: Tensor | int = self.spec.classes.index(options["cam_target_class"])
            else:
                target = logits.argmax(dim=1)
            size = (batch.shape[-2], batch.shape[-1])
            heatmap = cam_heatmap(extras["cam"], target, size)[:, 0]
            extra_maps = (
                {"attention": attention_heatmap(extras["attention"], size)[:, 0]}
                if options.get("attention_map", False)
                else {}
            )
        return ModelOutput(logits=logits, heatmap=heatmap, heatmap_method="CAM", extra_maps=extra_maps)


@hookimpl
def pacs_triage_register_models() -> list[ModelPlugin]:
    return [CLGBNetPlugin(spec) for spec in MODEL_CFGS.values()]
