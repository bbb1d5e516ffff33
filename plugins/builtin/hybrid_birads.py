"""Hybrid ResNet-50 + MHSA with Distance-Aware Learning: ordinal BI-RADS 1-5 on mammograms.

Paper: Singh M, Mohan A, Tripathi U, Pathak S, Gupta R, Kumar B, "A multi-scale hybrid ResNet-transformer with
distance-aware learning for interpretable BI-RADS mammographic classification", Sci Rep 16 (2026),
doi:10.1038/s41598-026-40906-8; ``docs/models/hybrid-birads.md`` describes the model as we build it, where it
differs from the paper and why, and its test oracles.  Backbone: ResNet-50
(He et al. 2016, arXiv:1512.03385); explanation: Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391).

Variants:
* ``hybrid_birads.v1``: ResNet-50 C5 (2048x7x7) -> 1x1 conv to 128-d tokens + learnable positional
  embedding -> one post-norm Transformer encoder layer (2 heads) -> token GAP -> Dense 512 -> Dense 128 ->
  5 classes; 24,041,413 parameters.  Input: 2D "For Presentation" mammogram, plainly resized to 224x224,
  CLAHE, grey copied to 3 channels.  Output: p(BI-RADS 1..5), the argmax BI-RADS category,
  risk = p(BI-RADS 4) + p(BI-RADS 5), Grad-CAM at ``backbone.layer4`` and the CLAHE image.
* ``hybrid_birads_ms.v1`` (not registered): the optional multi-scale tokens, layer3 + layer4.

Every choice the paper leaves open (marked [default]) is a constructor option;
:meth:`HybridBiradsNet.config_dict` returns
them for the checkpoint metadata and :func:`checkpoint_metadata` builds that metadata.  Training-time parts
(DAL loss, oversampling, augmentation, stages) are in ``training.models.hybrid_birads``.

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
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from plugins import hookimpl, weights
from plugins import preprocess as pre
from plugins.base import BASE_OPTIONS, MAMMOGRAPHY_2D, ImageOutput, ModelOutput, ModelPlugin, TorchModelPlugin
from plugins.explain import grad_cam, normalise_minmax
from plugins.types import CERTAINTY_OF_FINDING, ImageRef, Letterbox, ModelSpec, Prediction, ScoreMeaning
from plugins.weights import CheckpointMetadata

__all__ = [
    "CAFFE_MEAN_BGR",
    "CLASS_NAMES",
    "MODEL_CFGS",
    "HybridBiradsNet",
    "HybridBiradsPlugin",
    "checkpoint_metadata",
    "default_cfgs",
    "denormalise_grey",
    "hybrid_birads_resnet50",
    "load_imagenet_backbone",
    "normalise",
    "preprocess",
    "summarise_probabilities",
]

CLASS_NAMES: tuple[str, ...] = ("BI-RADS 1", "BI-RADS 2", "BI-RADS 3", "BI-RADS 4", "BI-RADS 5")
#: Keras "caffe" preprocessing subtracts these from B, G, R (in that order) on the 0-255 scale.
CAFFE_MEAN_BGR: tuple[float, float, float] = (103.939, 116.779, 123.68)

NormMode = Literal["caffe", "imagenet"]
DalMode = Literal["multiplicative", "additive"]
UnfreezeMode = Literal["keras40", "layer3_block"]
CamLayer = Literal["layer4", "proj"]

_SCALE_INDEX: dict[str, int] = {"layer3": 3, "layer4": 4}
_SCALE_STRIDE: dict[str, int] = {"layer3": 16, "layer4": 32}


class HybridBiradsNet(nn.Module):
    """ResNet-50 C5 tokens + positional embedding + post-norm MHSA encoder + GAP + MLP head.

    Structure options change the weights.  The others (``norm_mode``, ``clahe_*``, ``dal_*``, ``unfreeze``,
    ``cam_layer``) do not, but live here so that :meth:`config_dict` is the one record of how a checkpoint
    was trained and must be served.

    :param num_classes: output classes; 5 for BI-RADS 1-5.
    :param input_size: square input side; fixes the token count, (input_size / 32)^2 = 49 at 224.
    :param embed_dim: token width after the 1x1 projection (d_model).
    :param num_heads: attention heads; d_head = embed_dim / num_heads.
    :param num_layers: encoder layers; the paper's ablation picked 1.
    :param ffn_dim: hidden width of the encoder MLP [default 2 * embed_dim].
    :param encoder_dropout: dropout inside attention and the encoder MLP [default].
    :param layer_norm_eps: LayerNorm epsilon [default, Keras style].
    :param pos_embed_std: std of the truncated-normal positional-embedding init [default].
    :param head_dims: widths of the dense head before the classifier.
    :param head_dropouts: dropout after each dense layer of the head.
    :param scales: backbone stages that give tokens; ``("layer4",)`` is the paper, ``("layer3", "layer4")``
        the optional multi-scale variant with a learnable scale embedding.
    :param norm_mode: input normalisation the weights expect: ``"imagenet"`` (timm weights) or ``"caffe"``.
    :param clahe_clip_limit: CLAHE clip limit of the preprocessing [default].
    :param clahe_tile_grid: CLAHE tile grid side of the preprocessing [default].
    :param dal_lambda: λ of the Distance-Aware Learning loss [default].
    :param dal_mode: ``"multiplicative"`` CE·(1+λE) or ``"additive"`` CE+λE.
    :param unfreeze: stage-2 unfreezing: ``"keras40"`` (layer4 + the tail of layer3[5]) or ``"layer3_block"``.
    :param cam_layer: Grad-CAM target: ``"layer4"`` (2048x7x7) or ``"proj"`` (128x7x7).
    :param backbone: timm ResNet of the tokens: ``"resnet50"`` [paper]; a smaller one (``"resnet18"``) for
        training from random weights on a CPU, as the demo profile does.
    """

    def __init__(
        self,
        *,
        num_classes: int = 5,
        input_size: int = 224,
        embed_dim: int = 128,
        num_heads: int = 2,
        num_layers: int = 1,
        ffn_dim: int = 256,
        encoder_dropout: float = 0.1,
        layer_norm_eps: float = 1e-6,
        pos_embed_std: float = 0.02,
        head_dims: Sequence[int] = (512, 128),
        head_dropouts: Sequence[float] = (0.5, 0.3),
        scales: Sequence[str] = ("layer4",),
        norm_mode: NormMode = "imagenet",
        clahe_clip_limit: float = 2.0,
        clahe_tile_grid: int = 8,
        dal_lambda: float = 1.0,
        dal_mode: DalMode = "multiplicative",
        unfreeze: UnfreezeMode = "keras40",
        cam_layer: CamLayer = "layer4",
        backbone: str = "resnet50",
    ) -> None:
        super().__init__()
        scales = tuple(scales)
        if not scales or "layer4" not in scales or any(s not in _SCALE_INDEX for s in scales):
            raise ValueError(f"scales must include 'layer4' and only {sorted(_SCALE_INDEX)}, got {scales}")
        if len(set(scales)) != len(scales):
            raise ValueError(f"scales has duplicates: {scales}")
        scales = tuple(sorted(scales, key=_SCALE_INDEX.__getitem__))
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32 for a fixed token grid, got {input_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if len(head_dims) != len(head_dropouts):
            raise ValueError("head_dims and head_dropouts must have the same length")
        if norm_mode not in ("caffe", "imagenet"):
            raise ValueError(f"norm_mode must be 'caffe' or 'imagenet', got {norm_mode!r}")
        if dal_mode not in ("multiplicative", "additive"):
            raise ValueError(f"dal_mode must be 'multiplicative' or 'additive', got {dal_mode!r}")
        if unfreeze not in ("keras40", "layer3_block"):
            raise ValueError(f"unfreeze must be 'keras40' or 'layer3_block', got {unfreeze!r}")
        if cam_layer not in ("layer4", "proj"):
            raise ValueError(f"cam_layer must be 'layer4' or 'proj', got {cam_layer!r}")

        self._config: dict[str, Any] = {
            "num_classes": num_classes,
            "input_size": input_size,
            "embed_dim": embed_dim,
            "num_heads": num_heads,
            "num_layers": num_layers,
            "ffn_dim": ffn_dim,
            "encoder_dropout": encoder_dropout,
            "layer_norm_eps": layer_norm_eps,
            "pos_embed_std": pos_embed_std,
            "head_dims": list(head_dims),
            "head_dropouts": list(head_dropouts),
            "scales": list(scales),
            "norm_mode": norm_mode,
            "clahe_clip_limit": clahe_clip_limit,
            "clahe_tile_grid": clahe_tile_grid,
            "dal_lambda": dal_lambda,
            "dal_mode": dal_mode,
            "unfreeze": unfreeze,
            "cam_layer": cam_layer,
            "backbone": backbone,
        }
        self.num_classes = num_classes
        self.input_size = input_size
        self.scales = scales
        self.cam_layer = cam_layer

        if not backbone.startswith("resnet"):
            # The stage-2 unfreezing, Grad-CAM's layer4 and the scale names assume ResNet stage names.
            raise ValueError(f"backbone must be a timm ResNet (resnet18, resnet50, ...), got {backbone!r}")
        # A timm feature extractor: feature_info and its stages are not part of nn.Module's type.
        self.backbone: Any
        self.backbone = timm.create_model(
            backbone,
            pretrained=False,
            features_only=True,
            out_indices=tuple(_SCALE_INDEX[s] for s in scales),
        )
        # Channels from the backbone itself: ResNet-50's 1024/2048 (the paper), or a smaller ResNet's.
        channels = dict(zip(scales, self.backbone.feature_info.channels(), strict=True))
        # C5's projection and embedding keep their single-scale names (proj, pos_embed), so a single-scale
        # checkpoint has the same keys with or without the multi-scale code.
        self.proj = nn.Conv2d(channels["layer4"], embed_dim, kernel_size=1, bias=True)
        grid = input_size // _SCALE_STRIDE["layer4"]
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dim))
        if "layer3" in scales:
            self.proj_layer3 = nn.Conv2d(channels["layer3"], embed_dim, kernel_size=1, bias=True)
            grid3 = input_size // _SCALE_STRIDE["layer3"]
            self.pos_embed_layer3 = nn.Parameter(torch.zeros(1, grid3 * grid3, embed_dim))
            self.scale_embed = nn.Parameter(torch.zeros(1, len(scales), embed_dim))

        self.encoder = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(
                    embed_dim,
                    num_heads,
                    ffn_dim,
                    encoder_dropout,
                    activation="gelu",
                    batch_first=True,
                    norm_first=False,
                    layer_norm_eps=layer_norm_eps,
                )
                for _ in range(num_layers)
            ]
        )

        head: list[nn.Module] = []
        width = embed_dim
        for dim, drop in zip(head_dims, head_dropouts, strict=True):
            head += [nn.Linear(width, dim), nn.ReLU(), nn.Dropout(drop)]
            width = dim
        head.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*head)
        self.num_features = width

        for name, param in self.named_parameters():
            if "pos_embed" in name or name == "scale_embed":
                nn.init.trunc_normal_(param, std=pos_embed_std)

    def config_dict(self) -> dict[str, Any]:
        """The constructor options, for the checkpoint metadata; ``HybridBiradsNet(**cfg)`` rebuilds it."""
        return dict(self._config)

    def train(self, mode: bool = True) -> HybridBiradsNet:
        """Switch modes, keeping batch norms whose parameters are all frozen in eval mode (stage 1)."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    params = list(module.parameters())
                    if params and not any(p.requires_grad for p in params):
                        module.eval()
        return self

    def _tokens(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        projected = {"layer4": self.proj(features["layer4"])}
        if "layer3" in self.scales:
            projected["layer3"] = self.proj_layer3(features["layer3"])
        tokens = []
        for i, scale in enumerate(self.scales):
            pos = self.pos_embed if scale == "layer4" else self.pos_embed_layer3
            grid_tokens = projected[scale].flatten(2).transpose(1, 2)  # row-major: token r*W + c is (r, c)
            if grid_tokens.shape[1] != pos.shape[1]:
                raise ValueError(
                    f"{scale} gives {grid_tokens.shape[1]} tokens but the positional embedding has "
                    f"{pos.shape[1]}; the model was built for {self.input_size}x{self.input_size} inputs"
                )
            grid_tokens = grid_tokens + pos
            if len(self.scales) > 1:
                grid_tokens = grid_tokens + self.scale_embed[:, i : i + 1]
            tokens.append(grid_tokens)
        return torch.cat(tokens, dim=1), projected

    def forward_intermediates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every named stage: ``layer4`` (and ``layer3``), ``proj``, ``tokens`` (with positions),
        ``encoded``, ``pooled``, ``embedding`` (penultimate, after the Dense-128 ReLU) and ``logits``.

        :param x: normalised images ``[B, 3, input_size, input_size]``.
        """
        features = dict(zip(self.scales, self.backbone(x), strict=True))
        tokens, projected = self._tokens(features)
        encoded = self.encoder(tokens)
        pooled = encoded.mean(dim=1)
        embedding = self.head[:-1](pooled)
        out = dict(features)
        out.update(proj=projected["layer4"], tokens=tokens, encoded=encoded, pooled=pooled)
        out.update(embedding=embedding, logits=self.head[-1](embedding))
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded tokens ``[B, N, embed_dim]`` (N = 49 at 224, single scale)."""
        features = dict(zip(self.scales, self.backbone(x), strict=True))
        tokens, _ = self._tokens(features)
        return self.encoder(tokens)

    def forward_head(self, encoded: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Token GAP then the MLP head; ``pre_logits`` gives the 128-d penultimate embedding (t-SNE)."""
        pooled = encoded.mean(dim=1)
        return self.head[:-1](pooled) if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``; softmax gives the BI-RADS 1-5 probabilities."""
        return self.forward_head(self.forward_features(x))

    def cam_target_module(self, layer: CamLayer | None = None) -> nn.Module:
        """The module whose output Grad-CAM explains: ``backbone.layer4`` (layer4[-1]'s output) or ``proj``.

        :param layer: override of the model's ``cam_layer``.
        """
        layer = layer or self.cam_layer
        if layer == "layer4":
            return self.backbone.layer4
        if layer == "proj":
            return self.proj
        raise ValueError(f"unknown Grad-CAM layer {layer!r}; use 'layer4' or 'proj'")


def _create_hybrid_birads(variant: str, **kwargs: Any) -> HybridBiradsNet:
    """Build a variant of :data:`default_cfgs` with overrides; random weights, nothing is downloaded."""
    if variant not in default_cfgs:
        raise ValueError(f"unknown hybrid BI-RADS variant {variant!r}; known: {sorted(default_cfgs)}")
    return HybridBiradsNet(**{**default_cfgs[variant], **kwargs})


#: Constructor arguments of each variant, timm's ``model_args``.
default_cfgs: dict[str, dict[str, Any]] = {
    "hybrid_birads.v1": {},
    "hybrid_birads_ms.v1": {"scales": ("layer3", "layer4")},
}


def hybrid_birads_resnet50(**kwargs: Any) -> HybridBiradsNet:
    """The paper's model: ResNet-50 C5, 1 encoder layer, 2 heads, trained with DAL."""
    return _create_hybrid_birads("hybrid_birads.v1", **kwargs)


# -------------------------------------------------------------------------
# Weights
# -------------------------------------------------------------------------


def load_imagenet_backbone(model: HybridBiradsNet, path: str | Path) -> None:
    """Load a stock timm ImageNet state dict (safetensors or timm ``.pth``) of the model's backbone
    (``resnet50`` by default) into it.

    The features-only backbone has every key of the classifier model except ``fc.*``, so a missing
    key, an unexpected key other than ``fc.*`` or a shape mismatch means the file is not that ResNet.

    :param model: the model whose ``backbone`` is loaded in place.
    :param path: a local file; nothing is downloaded.
    :raises FileNotFoundError: when *path* does not exist.
    :raises ValueError: when the file does not fit the backbone.
    """
    backbone = model.config_dict()["backbone"]
    weights.load_backbone_weights(model.backbone, path, backbone, ("fc.",))


def _norm_stats(norm_mode: NormMode) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if norm_mode == "imagenet":
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    # Caffe mode on a grey image copied to 3 channels is (x/255 - m/255) / (1/255) per channel, with the
    # means in RGB order; recorded so the metadata's required mean/std are truthful.
    return tuple(m / 255.0 for m in reversed(CAFFE_MEAN_BGR)), (1 / 255.0,) * 3


def checkpoint_metadata(model: HybridBiradsNet, **fields: Any) -> CheckpointMetadata:
    """The metadata the host needs to rebuild *model* from a checkpoint
    (:func:`plugins.weights.checkpoint_metadata`).

    :param model: the trained model; its :meth:`~HybridBiradsNet.config_dict` becomes the options.
    :param fields: further :class:`~plugins.weights.CheckpointMetadata` fields (version, thresholds,
        training_data...).
    """
    cfg = model.config_dict()
    mean, std = _norm_stats(cfg["norm_mode"])
    spec = dataclasses.replace(
        MODEL_CFGS["hybrid_birads.v1"],
        classes=CLASS_NAMES[: cfg["num_classes"]],
        input_size=(cfg["input_size"], cfg["input_size"]),
        mean=mean,
        std=std,
    )
    options = {k: v for k, v in cfg.items() if k not in ("num_classes", "input_size")}
    return weights.checkpoint_metadata(spec, options, **fields)


# -------------------------------------------------------------------------
# Preprocessing, in the paper's order: resize -> CLAHE -> 3 channels -> normalise
# -------------------------------------------------------------------------


def normalise(
    image: np.ndarray,
    norm_mode: NormMode = "imagenet",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """A grey ``[H, W]`` or RGB ``[H, W, 3]`` image on the 0-255 scale to a normalised ``[3, H, W]`` tensor.

    ``"caffe"`` flips RGB to BGR and subtracts :data:`CAFFE_MEAN_BGR` without scaling (Keras); ``"imagenet"``
    divides by 255 and standardises with *mean* and *std* in RGB order.

    :param image: uint8 or float, 0-255; grey is copied to 3 channels.
    :param norm_mode: which normalisation the weights were trained with.
    :param mean: RGB mean on the 0-1 scale (``"imagenet"`` mode).
    :param std: RGB std on the 0-1 scale (``"imagenet"`` mode).
    """
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W] or [H, W, 3] image, got shape {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    if norm_mode == "caffe":
        return (x.flip(0) - torch.tensor(CAFFE_MEAN_BGR).view(3, 1, 1)).contiguous()
    if norm_mode == "imagenet":
        mean_t = torch.tensor(tuple(mean), dtype=torch.float32).view(3, 1, 1)
        std_t = torch.tensor(tuple(std), dtype=torch.float32).view(3, 1, 1)
        return ((x / 255.0 - mean_t) / std_t).contiguous()
    raise ValueError(f"norm_mode must be 'caffe' or 'imagenet', got {norm_mode!r}")


def denormalise_grey(
    batch: torch.Tensor,
    norm_mode: NormMode = "imagenet",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """Invert :func:`normalise` for grey inputs: ``[B, 3, H, W]`` model input -> ``[B, H, W]`` in [0, 1].

    :param batch: normalised inputs whose three channels hold the same grey image.
    :param norm_mode: the normalisation used.
    :param mean: as given to :func:`normalise`.
    :param std: as given to :func:`normalise`.
    """
    if norm_mode == "caffe":
        # Channel 0 is blue after the RGB -> BGR flip.
        return ((batch[:, 0] + CAFFE_MEAN_BGR[0]) / 255.0).clamp(0, 1)
    return (batch[:, 0] * float(std[0]) + float(mean[0])).clamp(0, 1)


def preprocess(
    image: np.ndarray,
    *,
    size: int = 224,
    norm_mode: NormMode = "imagenet",
    clahe: bool = True,
    clahe_clip_limit: float = 2.0,
    clahe_tile_grid: int = 8,
    keep_aspect: bool = False,
    crop: tuple[int, int, int, int] | None = None,
    flip: bool = False,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> tuple[torch.Tensor, np.ndarray, Letterbox]:
    """Eval-time pipeline: grey, stretch to ``size`` (as in the paper), CLAHE, 3 channels, normalise.

    CLAHE runs on the uint8 image after the resize, in the paper's order.  The resize is the host's
    :func:`plugins.preprocess.letterbox`, so the returned :class:`~plugins.types.Letterbox` maps the Grad-CAM
    back onto the source pixels exactly.

    :param image: display-ready uint8 source image (grey or RGB).
    :param size: model input side.
    :param norm_mode: normalisation of the checkpoint.
    :param clahe: apply CLAHE (the paper always does).
    :param clahe_clip_limit: CLAHE clip limit of the checkpoint.
    :param clahe_tile_grid: CLAHE tile grid of the checkpoint.
    :param keep_aspect: letterbox instead of stretching (not the paper).
    :param crop: (top, left, height, width) taken from the source first; the whole image by default.
    :param flip: mirror left-right (laterality normalisation; off in the paper).
    :param mean: RGB mean for ``"imagenet"`` mode.
    :param std: RGB std for ``"imagenet"`` mode.
    :returns: the ``[3, size, size]`` input, the uint8 CLAHE image and the letterbox.
    """
    grey = pre.to_grey(image)
    resized, box = pre.letterbox(grey, (size, size), crop=crop, flip=flip, keep_aspect=keep_aspect)
    enhanced = pre.apply_clahe(resized, clahe_clip_limit, clahe_tile_grid) if clahe else resized
    return normalise(enhanced, norm_mode, mean, std), enhanced, box


# -------------------------------------------------------------------------
# Outputs
# -------------------------------------------------------------------------


def summarise_probabilities(probabilities: Sequence[float]) -> dict[str, float | int]:
    """The BI-RADS outputs of one softmax row.

    :param probabilities: p(BI-RADS 1) ... p(BI-RADS 5).
    :returns: ``birads`` (argmax category, 1-5), ``risk`` = p(BI-RADS 4) + p(BI-RADS 5) (the decision-curve
        risk of the paper's decision-curve analysis) and ``expected_birads`` = Σ p_k (k+1).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape != (len(CLASS_NAMES),):
        raise ValueError(f"expected {len(CLASS_NAMES)} probabilities, got shape {p.shape}")
    return {
        "birads": int(p.argmax()) + 1,
        "risk": float(np.clip(p[3] + p[4], 0.0, 1.0)),
        "expected_birads": float((p * np.arange(1, len(p) + 1)).sum()),
    }


# -------------------------------------------------------------------------
# Plugin
# -------------------------------------------------------------------------


def _model_option_defaults() -> dict[str, Any]:
    # The constructor's keyword defaults, so the plugin's options and the model cannot drift apart.
    params = inspect.signature(HybridBiradsNet.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for fixed in ("num_classes", "input_size"):  # these come from the ModelSpec (classes, input_size)
        defaults.pop(fixed)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}


_MODEL_OPTIONS = _model_option_defaults()


def _cfg(**kwargs: Any) -> ModelSpec:
    defaults: dict[str, Any] = {
        "name": "hybrid_birads",
        "display_name": "Hybrid ResNet-50 + MHSA, BI-RADS 1-5 (Distance-Aware Learning)",
        "arch": "hybrid_birads_resnet50",
        "classes": CLASS_NAMES,
        "positive_classes": ("BI-RADS 4", "BI-RADS 5"),
        "accepts": MAMMOGRAPHY_2D,
        "input_size": (224, 224),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        # The reported prediction is the argmax, as in the paper; the risk is p(BI-RADS 4) + p(BI-RADS 5).
        "thresholds": {},
        # A BI-RADS suspicion, not a malignancy probability, calibrated or not (its labels are BI-RADS).
        "score": ScoreMeaning(
            kind="suspicion_score", description="p(BI-RADS 4) + p(BI-RADS 5)", concept=CERTAINTY_OF_FINDING
        ),
        "paper": (
            "Singh et al., Sci Rep 16 (2026), doi:10.1038/s41598-026-40906-8; docs/models/hybrid-birads.md"
        ),
        "license": "Apache-2.0",
        "gives_birads": True,
    }
    return ModelSpec(**{**defaults, **kwargs})


MODEL_CFGS: dict[str, ModelSpec] = {
    "hybrid_birads.v1": _cfg(model_id="hybrid_birads.v1", version="1.0"),
}


class HybridBiradsPlugin(TorchModelPlugin):
    """The host's view of the hybrid model: stretched resize + CLAHE, Grad-CAM at ``backbone.layer4``,
    the BI-RADS category and the CLAHE image as outputs."""

    # Full-field image, stretched to 224 with CLAHE after the resize (the paper's order); no crop, no
    # laterality flip.
    default_options: ClassVar[Mapping[str, Any]] = {
        **BASE_OPTIONS,
        "clahe": True,
        "keep_aspect": False,
        **_MODEL_OPTIONS,
    }
    cam_layer = "backbone.layer4"

    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        height, width = self.spec.input_size
        if height != width:
            raise ValueError(f"the hybrid model needs a square input, got {self.spec.input_size}")
        return HybridBiradsNet(
            num_classes=len(self.spec.classes),
            input_size=height,
            **{key: options[key] for key in _MODEL_OPTIONS},
        )

    def preprocess(
        self, image: np.ndarray, ref: ImageRef, options: Mapping[str, Any]
    ) -> tuple[torch.Tensor, Letterbox]:
        """Crop (``crop`` option, default none), grey, stretch to the input size, CLAHE, normalise."""
        crop = pre.crop_box(image, ref, options["crop"])
        flip = bool(options["normalise_laterality"]) and pre.chest_wall_on_right(image, crop)
        tensor, _clahe, box = preprocess(
            image,
            size=self.spec.input_size[0],
            norm_mode=options["norm_mode"],
            clahe=bool(options["clahe"]),
            clahe_clip_limit=float(options["clahe_clip_limit"]),
            clahe_tile_grid=int(options["clahe_tile_grid"]),
            keep_aspect=bool(options["keep_aspect"]),
            crop=crop,
            flip=flip,
            mean=self.spec.mean,
            std=self.spec.std,
        )
        return tensor, box

    def forward(self, model: nn.Module, batch: torch.Tensor, options: Mapping[str, Any]) -> ModelOutput:
        """Logits, Grad-CAM at the model's ``cam_layer``, and the CLAHE image as ``extra_maps["clahe"]``."""
        if not isinstance(model, HybridBiradsNet):
            raise TypeError(f"{self!r} runs a HybridBiradsNet, got {type(model).__name__}")
        if options["explain"]:
            target = None
            if options["cam_target_class"]:
                index = self.spec.classes.index(options["cam_target_class"])
                target = torch.full((batch.shape[0],), index, dtype=torch.long, device=batch.device)
            logits, cam = grad_cam(model, batch, model.cam_target_module(), target)
            heatmap: torch.Tensor | None = normalise_minmax(cam)[:, 0]
        else:
            with torch.inference_mode():
                logits, heatmap = model(batch), None
        clahe = denormalise_grey(batch, options["norm_mode"], self.spec.mean, self.spec.std)
        return ModelOutput(
            logits=logits,
            heatmap=heatmap,
            heatmap_method="Grad-CAM" if heatmap is not None else "",
            extra_maps={"clahe": clahe},
        )

    def postprocess(
        self, output: ImageOutput, box: Letterbox, ref: ImageRef, options: Mapping[str, Any]
    ) -> Prediction:
        """The base prediction plus the BI-RADS category of the predicted class."""
        prediction = super().postprocess(output, box, ref, options)
        # Read from the class name, not the index: a checkpoint may list the classes in another order.
        birads = int(prediction.predicted_class.rsplit(" ", 1)[-1])
        return dataclasses.replace(prediction, birads=birads)


@hookimpl
def pacs_triage_register_models() -> list[ModelPlugin]:
    return [HybridBiradsPlugin(spec) for spec in MODEL_CFGS.values()]
