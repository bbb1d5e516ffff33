"""An example pacs-triage model plugin: timm's tiny test EfficientNet scoring mammograms (a template)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
from torch import nn

from plugins import hookimpl
from plugins.base import TorchModelPlugin
from plugins.types import AcceptRule, ModelSpec

SPEC = ModelSpec(
    model_id="tiny_example.v1",
    name="tiny_example",
    version="0.1.0",
    display_name="Tiny example CNN",
    arch="test_efficientnet",
    classes=("normal", "suspicious"),
    positive_classes=("suspicious",),
    accepts=AcceptRule(modalities=("MG",), views=("CC", "MLO")),
    input_size=(64, 64),
    mean=(0.5,),
    std=(0.25,),
)


class TinyExample(TorchModelPlugin):
    cam_layer = "bn2"  # Grad-CAM of the last feature map...
    cam_head = "classifier"  # ...computed as CAM: only average pooling and this Linear follow it

    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        return timm.create_model(self.spec.arch, pretrained=False, num_classes=len(self.spec.classes))


@hookimpl
def pacs_triage_register_models() -> list[TorchModelPlugin]:
    return [TinyExample(SPEC)]
