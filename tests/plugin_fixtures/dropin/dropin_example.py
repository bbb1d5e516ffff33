"""A drop-in plugin: copy this file into ``plugins.drop_in_dir`` and it loads as plugin ``dropin_example``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from plugins import hookimpl
from plugins.base import TorchModelPlugin
from plugins.types import AcceptRule, ModelSpec

SPEC = ModelSpec(
    model_id="dropin_example.v1",
    name="dropin_example",
    version="0.2.0",
    display_name="Drop-in example",
    arch="dropin_example",
    classes=("normal", "benign", "malignant"),
    positive_classes=("malignant",),
    accepts=AcceptRule(modalities=("MG",)),
    input_size=(48, 64),
)


class SmallNet(nn.Module):
    """A flattening head: Grad-CAM needs its backward pass here (no CAM shortcut)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, 2, 1), nn.ReLU())
        self.head = nn.Linear(6 * 12 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


class DropInExample(TorchModelPlugin):
    default_options: ClassVar[Mapping[str, Any]] = {
        **TorchModelPlugin.default_options,
        "normalise_laterality": True,
        "crop": "breast",
    }
    cam_layer = "body"

    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        return SmallNet(len(self.spec.classes))


@hookimpl
def pacs_triage_register_models() -> list[TorchModelPlugin]:
    return [DropInExample(SPEC)]
