"""ASG-MammoNet training-time parts from the spec: augmentation, class-balanced sampling, DIP, optimiser.

Inference never imports this module.  Spec sections: §2 (augmentation and sampler), §4
(optimisation), §7 (DIP).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import WeightedRandomSampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from plugins.base import to_tensor
from plugins.preprocess import letterbox

__all__ = [
    "ASG_TRAINING",
    "AsgAugment",
    "AsgTrainingConfig",
    "class_balanced_sampler",
    "dip",
    "make_optimizer",
    "normalisation_stats",
]


@dataclass(frozen=True, kw_only=True)
class AsgTrainingConfig:
    """Spec §2 and §4 values; [paper] unless marked."""

    rotation_degrees: float = 10.0
    #: ±11 px at 224 px.
    translate_px: float = 11.0
    #: The paper lists three values: a discrete choice.
    scales: tuple[float, ...] = (0.9, 1.0, 1.1)
    hflip_p: float = 0.5  # p is our default
    contrast_alpha: float = 1.1
    #: On the 0-255 scale.
    brightness_beta: float = 10.0
    photometric_p: float = 0.5  # our default
    learning_rate: float = 1e-5
    batch_size: int = 16
    max_epochs: int = 50
    early_stopping_patience: int = 5  # our default
    seeds: tuple[int, ...] = tuple(range(42, 52))  # our default seed list, from the paper's 42


ASG_TRAINING = AsgTrainingConfig()


class AsgAugment:
    """Training transform: letterbox -> affine + flip -> photometric -> [0, 1] -> normalise.

    :param mean: Training-split mean (scalar or per channel, [0, 1] scale).
    :param std: Training-split std.
    :param size: Model input (height, width).
    :param rng: Source of randomness (seed it for reproducible epochs).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        size: tuple[int, int] = (224, 224),
        config: AsgTrainingConfig = ASG_TRAINING,
        rng: random.Random | None = None,
    ) -> None:
        self.mean, self.std, self.size, self.config = tuple(mean), tuple(std), size, config
        self.rng = rng or random.Random()

    def augment(self, image: np.ndarray) -> np.ndarray:
        """Display-ready ``uint8`` grey image -> augmented ``uint8`` letterboxed image of ``size``."""
        c, rng = self.config, self.rng
        boxed, _ = letterbox(image, self.size)
        pixels = torch.from_numpy(boxed)[None]  # [1, H, W] uint8
        pixels = TF.affine(
            pixels,
            angle=rng.uniform(-c.rotation_degrees, c.rotation_degrees),
            translate=[round(rng.uniform(-c.translate_px, c.translate_px)) for _ in range(2)],
            scale=rng.choice(c.scales),
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
            fill=0,
        )
        if rng.random() < c.hflip_p:
            pixels = pixels.flip(-1)
        result = pixels[0].numpy()
        if rng.random() < c.photometric_p:
            result = np.clip(c.contrast_alpha * result.astype(np.float32) + c.brightness_beta, 0, 255).astype(
                np.uint8
            )
        return result

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return to_tensor(self.augment(image), self.mean, self.std)


def class_balanced_sampler(
    labels: Sequence[int], generator: torch.Generator | None = None
) -> WeightedRandomSampler:
    """Sample each image with weight ``1 / N_c`` of its class c, with replacement, ``len(labels)`` draws.

    Every class is then drawn equally often in expectation; the loss stays unweighted.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    weights = 1.0 / counts[np.asarray(labels)]
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double),
        num_samples=len(labels),
        replacement=True,
        generator=generator,
    )


def normalisation_stats(images: Iterable[np.ndarray]) -> tuple[float, float]:
    """One (mean, std) pair on the [0, 1] scale over every pixel of the training images (spec §2)."""
    total, total_sq, count = 0.0, 0.0, 0
    for image in images:
        values = image.astype(np.float64) / 255.0
        total += float(values.sum())
        total_sq += float(np.square(values).sum())
        count += values.size
    if count == 0:
        raise ValueError("normalisation_stats needs at least one image")
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))


def dip(precision: float, recall: float) -> float:
    """Distance from the Ideal Position: ``1 - sqrt(((1 - P)^2 + (1 - R)^2) / 2)``, higher is better."""
    for name, value in (("precision", precision), ("recall", recall)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return 1.0 - math.sqrt(((1.0 - precision) ** 2 + (1.0 - recall) ** 2) / 2.0)


def make_optimizer(model: nn.Module, config: AsgTrainingConfig = ASG_TRAINING) -> torch.optim.Adam:
    """Adam, lr 1e-5, betas (0.9, 0.999), no weight decay, whole network trainable; no LR schedule."""
    return torch.optim.Adam(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=0.0)
