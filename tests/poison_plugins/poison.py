"""A drop-in test model that kills its worker process on very bright images: a poison study."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from plugins import hookimpl
from plugins.base import TorchModelPlugin
from plugins.types import AcceptRule, ModelSpec


class KillOnBright(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.amax()) > 1.4:  # bright pixels (the spec's normalisation maps 1.0 to 2.0)
            os._exit(1)  # what a segfaulting CUDA kernel or the OOM killer does to a worker
        return self.head(x.mean(dim=(2, 3)))


class PoisonPlugin(TorchModelPlugin):
    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        return KillOnBright()


@hookimpl
def pacs_triage_register_models() -> list[TorchModelPlugin]:
    spec = ModelSpec(model_id="poison.test", name="poison", version="1.0", display_name="poison", arch="poison",
                     classes=("benign", "malignant"), positive_classes=("malignant",),
                     accepts=AcceptRule(modalities=("MG",)), input_size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3)
    return [PoisonPlugin(spec)]
