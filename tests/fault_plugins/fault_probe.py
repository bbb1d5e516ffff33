"""A drop-in test model for the fault suite: tiny, cheap, and optionally slow enough to kill mid-inference.

Options (``plugins.models.fault_probe.options``):

- ``sleep_seconds``: how long each classifying forward pass sleeps, so a test can kill the worker while
  it runs;
- ``marker_dir``: a directory where each classifying pass first writes ``<pid>.running``, so the test
  knows inference has started, and in which process;
- ``panic_above_mean``: when above 0, a batch whose mean intensity (0..1) exceeds it raises
  :class:`SimulatedPanic`, a ``BaseException`` as a Rust extension's panic is, so a test can choose the
  study that does it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plugins import hookimpl
from plugins.base import BASE_OPTIONS, TorchModelPlugin
from plugins.types import AcceptRule, ModelSpec


class SimulatedPanic(BaseException):  # noqa: N818 - named after pyo3's PanicException, which it stands for
    """What pyo3 raises when Rust code panics: not an ``Exception``, so ``except Exception`` misses it."""


class SlowBrightnessNet(nn.Module):
    """logits = [0, k * (mean intensity - 0.5)], after an optional sleep."""

    def __init__(self, sleep_seconds: float, marker_dir: str | None, panic_above_mean: float = 0.0) -> None:
        super().__init__()
        self.sleep_seconds = sleep_seconds
        self.panic_above_mean = panic_above_mean
        self.marker_dir = Path(marker_dir) if marker_dir else None
        self.features = nn.Conv2d(3, 4, 1)
        nn.init.constant_(self.features.weight, 1.0 / 3)
        nn.init.zeros_(self.features.bias)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0] * 4, [5.0] * 4]))
            self.head.bias.copy_(torch.tensor([0.0, -10.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The classifying pass runs under inference mode; the Grad-CAM passes after it do not sleep.
        if torch.is_inference_mode_enabled():
            self._mark_and_sleep()
        unit = x * 0.25 + 0.5
        if self.panic_above_mean > 0 and float(unit.mean()) > self.panic_above_mean:
            raise SimulatedPanic("index out of bounds: the len is 32 but the index is 33")
        return self.head(self.features(unit).mean(dim=(2, 3)))

    def _mark_and_sleep(self) -> None:
        if self.marker_dir is not None:
            self.marker_dir.mkdir(parents=True, exist_ok=True)
            (self.marker_dir / f"{os.getpid()}.running").write_text(str(time.time()))
        if self.sleep_seconds > 0:
            time.sleep(self.sleep_seconds)


class FaultProbePlugin(TorchModelPlugin):
    default_options = {**BASE_OPTIONS, "sleep_seconds": 0.0, "marker_dir": "", "panic_above_mean": 0.0}
    cam_layer = "features"
    cam_head = "head"

    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        return SlowBrightnessNet(
            float(options["sleep_seconds"]),
            str(options["marker_dir"]) or None,
            float(options["panic_above_mean"]),
        )


@hookimpl
def pacs_triage_register_models() -> list[TorchModelPlugin]:
    spec = ModelSpec(
        model_id="fault_probe.test",
        name="fault_probe",
        version="1.0",
        display_name="fault probe",
        arch="brightness",
        classes=("benign", "malignant"),
        positive_classes=("malignant",),
        accepts=AcceptRule(modalities=("MG",)),
        input_size=(32, 32),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    return [FaultProbePlugin(spec)]
