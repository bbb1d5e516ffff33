"""ASG-MammoNet: EfficientNet-B0 + CBAM + Grad-CAM, benign vs malignant mammograms.

Paper: "ASG-MammoNet: an attention-guided and streamlined deep learning framework for robust,
real-time and explainable mammographic breast cancer classification" (Ahmed & Nandi group); the model
as we build it, where it differs from the paper and why, is ``docs/models/asg-mammonet.md``.  Backbone:
EfficientNet-B0 (Tan & Le 2019,
arXiv:1905.11946); attention: CBAM (Woo et al. 2018, arXiv:1807.06521); explanation: Grad-CAM
(Selvaraju et al. 2017, arXiv:1610.02391).

Variants:
* ``asg_mammonet.v1``: one CBAM (r = 8) on the 320x7x7 output of the last MBConv block, global
  average pooling, Linear(320, 2); 3,622,088 parameters.  Input: full-field 2D "For Presentation"
  mammogram (MG, including DBT synthesized 2D views), letterboxed to 224x224, grey copied to 3
  channels.  Output: p(benign), p(malignant); risk = p(malignant); Grad-CAM at the CBAM output.

Intended use: research and triage ordering, not diagnosis.  Licence of this code: Apache-2.0.
Training-time parts (augmentation, weighted sampler, DIP metric) are in ``training.models.asg_mammonet``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from plugins import hookimpl
from plugins.base import BASE_OPTIONS, MAMMOGRAPHY_2D, ModelPlugin, TorchModelPlugin
from plugins.types import CERTAINTY_OF_FINDING, ModelSpec, ScoreMeaning, calibrated_probability

__all__ = ["CBAM", "MODEL_CFGS", "AsgMammoNet", "AsgMammoNetPlugin", "ChannelAttention", "SpatialAttention"]


class ChannelAttention(nn.Module):
    """CBAM channel stage: ``Mc = sigmoid(MLP(avgpool(F)) + MLP(maxpool(F)))``, shape ``[B, C, 1, 1]``."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        if channels % reduction:
            raise ValueError(f"channels ({channels}) must be divisible by the reduction ratio ({reduction})")
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return torch.sigmoid(scores)[:, :, None, None]


class SpatialAttention(nn.Module):
    """CBAM spatial stage: ``Ms = sigmoid(conv7x7([avg_c(F); max_c(F)]))``, shape ``[B, 1, H, W]``."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: ``F' = Mc(F) * F``, then ``F'' = Ms(F') * F'``."""

    def __init__(self, channels: int, reduction: int = 8, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel(x) * x
        return self.spatial(x) * x


class AsgMammoNet(nn.Module):
    """EfficientNet-B0 features -> CBAM -> global average pooling -> Linear.

    :param num_classes: 2 (benign, malignant).
    :param cbam_reduction: CBAM MLP reduction ratio r (8 gives the paper's ~0.03M parameters).
    :param cbam_after: ``blocks`` (the paper: CBAM on the last MBConv block's 320 channels) or
        ``head`` (a common re-implementation: after ``conv_head``, 1280 channels).
    :param backbone: timm model name; always built with ``pretrained=False``.
    """

    def __init__(
        self,
        num_classes: int = 2,
        cbam_reduction: int = 8,
        cbam_after: Literal["blocks", "head"] = "blocks",
        backbone: str = "efficientnet_b0",
    ) -> None:
        super().__init__()
        # A timm model: its feature_info and forward_features are not part of nn.Module's type.
        self.backbone: Any
        if cbam_after == "blocks":
            self.backbone = timm.create_model(
                backbone, pretrained=False, features_only=True, out_indices=(4,)
            )
            channels = self.backbone.feature_info.channels()[-1]
        elif cbam_after == "head":
            self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="")
            channels = self.backbone.num_features
        else:
            raise ValueError(f"cbam_after must be 'blocks' or 'head', got {cbam_after!r}")
        self.cbam_after = cbam_after
        self.cbam = CBAM(channels, cbam_reduction)
        self.fc = nn.Linear(channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> the CBAM-refined map ``[B, C, H/32, W/32]``."""
        features = self.backbone(x)[-1] if self.cbam_after == "blocks" else self.backbone.forward_features(x)
        return self.cbam(features)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, **kwargs: Any) -> AsgMammoNet:
    """Build *variant* with random weights; the host loads the checkpoint into it."""
    if variant != "asg_mammonet":
        raise ValueError(f"unknown ASG-MammoNet variant {variant!r}")
    return AsgMammoNet(**kwargs)


def _cfg(**kwargs: Any) -> ModelSpec:
    defaults: dict[str, Any] = {
        "name": "asg_mammonet",
        "display_name": "ASG-MammoNet (EfficientNet-B0 + CBAM)",
        "arch": "asg_mammonet",
        "classes": ("benign", "malignant"),
        "positive_classes": ("malignant",),
        "accepts": MAMMOGRAPHY_2D,
        "input_size": (224, 224),
        # ImageNet statistics until a checkpoint brings its training set's mean and std.
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "thresholds": {"malignant": 0.5},
        # Trained with balanced sampling: p(malignant) is a probability only once calibrated at a prevalence.
        "score": ScoreMeaning(
            kind="suspicion_score", description="p(malignant), uncalibrated", concept=CERTAINTY_OF_FINDING
        ),
        "calibrated_score": calibrated_probability(),
        "paper": "ASG-MammoNet (Ahmed & Nandi group); docs/models/asg-mammonet.md",
        "license": "Apache-2.0",
    }
    return ModelSpec(**{**defaults, **kwargs})


MODEL_CFGS: dict[str, ModelSpec] = {
    "asg_mammonet.v1": _cfg(model_id="asg_mammonet.v1", version="1.0"),
}


class AsgMammoNetPlugin(TorchModelPlugin):
    """The host's view of ASG-MammoNet: the default preprocessing, Grad-CAM at ``cbam`` via CAM."""

    # Full-field images as trained in the paper: no breast crop, no laterality flip.
    default_options: ClassVar[Mapping[str, Any]] = {
        **BASE_OPTIONS,
        "cbam_reduction": 8,
        "cbam_after": "blocks",
    }
    cam_layer = "cbam"
    # cbam -> mean over H, W -> fc: Grad-CAM equals CAM, so no backward pass is needed.
    cam_head = "fc"

    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        return _create(
            self.spec.arch,
            num_classes=len(self.spec.classes),
            cbam_reduction=int(options["cbam_reduction"]),
            cbam_after=options["cbam_after"],
        )


@hookimpl
def pacs_triage_register_models() -> list[ModelPlugin]:
    return [AsgMammoNetPlugin(spec) for spec in MODEL_CFGS.values()]
