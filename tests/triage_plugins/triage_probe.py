"""Two drop-in test models whose risk is the image's mean brightness, so a test can choose the risk.

``triage_probe`` plays the fast first-stage model, ``triage_probe_heavy`` the heavier model of stage two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from plugins import hookimpl
from plugins.base import TorchModelPlugin
from plugins.types import AcceptRule, ModelSpec


class BrightnessNet(nn.Module):
    """logits = [0, k * (mean intensity - 0.5)]: brighter images score as more malignant."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 1)
        nn.init.constant_(self.features.weight, 1.0 / 3)
        nn.init.zeros_(self.features.bias)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0] * 4, [5.0] * 4]))
            self.head.bias.copy_(torch.tensor([0.0, -10.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unit = x * 0.25 + 0.5  # the spec's mean/std below map [0, 1] pixels to [-2, 2]
        return self.head(self.features(unit).mean(dim=(2, 3)))


class BrightnessPlugin(TorchModelPlugin):
    cam_layer = "features"
    cam_head = "head"

    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        return BrightnessNet()


def _spec(name: str) -> ModelSpec:
    return ModelSpec(model_id=f"{name}.test", name=name, version="1.0", display_name=name.replace("_", " "),
                     arch="brightness", classes=("benign", "malignant"), positive_classes=("malignant",),
                     accepts=AcceptRule(modalities=("MG",)), input_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)


@hookimpl
def pacs_triage_register_models() -> list[TorchModelPlugin]:
    return [BrightnessPlugin(_spec("triage_probe")), BrightnessPlugin(_spec("triage_probe_heavy"))]
