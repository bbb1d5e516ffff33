"""ASG-MammoNet training (docs/models/asg-mammonet.md §2, §4): augmentation, class-balanced sampling, the
training-split normalisation and the recipe.

Inference never imports this module; the model is :mod:`plugins.builtin.asg_mammonet`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler, WeightedRandomSampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from plugins import hookimpl
from plugins.base import to_tensor
from plugins.preprocess import letterbox
from training.datasets import Record
from training.recipes import DemoProfile, Hyper, Recipe, Stage, adam_factory, all_trainable, grey_letterbox

__all__ = [
    "ASG_TRAINING",
    "AsgAugment",
    "AsgMammoNetRecipe",
    "AsgTrainingConfig",
    "class_balanced_sampler",
    "normalisation_stats",
    "pacs_triage_training_recipes",
]


@dataclass(frozen=True, kw_only=True)
class AsgTrainingConfig:
    """The augmentation of docs/models/asg-mammonet.md §2; [paper] unless marked.  The optimiser, batch,
    epochs and early stopping are the recipe's hyperparameters."""

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
        weights.tolist(),
        num_samples=len(labels),
        replacement=True,
        generator=generator,
    )


def normalisation_stats(images: Iterable[np.ndarray]) -> tuple[float, float]:
    """One (mean, std) pair on the [0, 1] scale over every pixel of the training images (§2)."""
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


# ---------------------------------------------------------------------------------------------------------
# The recipe


class AsgMammoNetRecipe(Recipe):
    """EfficientNet-B0 + CBAM: letterbox, affine + flip + photometric augmentation, class-balanced sampler,
    plain cross-entropy, Adam 1e-5, early stopping on the validation loss."""

    name = "asg_mammonet"
    modality = "MG"
    summary = "ASG-MammoNet (docs/models/asg-mammonet.md §2, §4): Adam 1e-5, batch 16, <= 50 epochs, balanced sampler"
    HYPERPARAMETERS: ClassVar[dict[str, Hyper]] = {
        "epochs": Hyper(50, "paper", "at most this many epochs"),
        "batch_size": Hyper(16, "paper", "images per batch"),
        "augment": Hyper(True, "paper", "the augmentation below (false: the plugin's preprocessing only)"),
        "lr": Hyper(1e-5, "paper", "Adam learning rate (constant)"),
        "weight_decay": Hyper(0.0, "default", "Adam weight decay"),
        "patience": Hyper(
            5, "default", "early stopping: epochs without improvement of the monitor (0 = off)"
        ),
        "monitor": Hyper(
            "val_loss",
            "paper",
            "val_loss, val_auc, val_accuracy or none: early stopping and the kept weights",
        ),
        "sampler": Hyper("class_balanced", "paper", "class_balanced (w_c = 1/N_c, with replacement) or none"),
        "normalisation": Hyper(
            "train_split", "paper", "train_split (one mean/std of the training images) or imagenet"
        ),
        "normal_as_benign": Hyper(True, "paper", "normal images count as benign (as for MIAS)"),
        "rotation_degrees": Hyper(10.0, "paper", "random rotation range"),
        "translate_px": Hyper(11.0, "paper", "random translation at 224 px (scaled with the input)"),
        "scales": Hyper([0.9, 1.0, 1.1], "paper", "random scale, one of these"),
        "hflip_p": Hyper(0.5, "default", "horizontal flip probability"),
        "photometric_p": Hyper(0.5, "default", "probability of I' = 1.1 I + 10"),
    }
    split: ClassVar[dict[str, float]] = {"train": 0.72, "val": 0.08, "test": 0.2}
    imagenet_backbones: ClassVar[dict[str, tuple[str, str, tuple[str, ...]]]] = {
        "backbone": ("backbone", "efficientnet_b0", ("conv_head.", "bn2.", "classifier."))
    }
    #: Table 3 reports the mean ± std of 10 runs (seeds 42 to 51 by default).
    paper_repeats = 10

    def label_index(self, record: Record) -> int | None:
        if record.label.strip().lower() == "normal" and self.hp["normal_as_benign"]:
            return self.classes.index("benign")
        return super().label_index(record)

    def load_imagenet(self, model: nn.Module, sources: Mapping[str, str]) -> list[str]:
        if self.options["cbam_after"] == "head":
            # The classifier model keeps conv_head/bn2 in this build, so only the classifier is left over.
            self.imagenet_backbones = {"backbone": ("backbone", "efficientnet_b0", ("classifier.",))}  # type: ignore[misc]
        return super().load_imagenet(model, sources)

    def _augmenter(self, seed: int) -> Any:
        height, width = self.input_size
        config = dataclasses.replace(
            ASG_TRAINING,
            rotation_degrees=float(self.hp["rotation_degrees"]),
            translate_px=float(self.hp["translate_px"]) * width / 224.0,
            scales=tuple(float(s) for s in self.hp["scales"]),
            hflip_p=float(self.hp["hflip_p"]),
            photometric_p=float(self.hp["photometric_p"]),
        )
        return AsgAugment(self.spec.mean, self.spec.std, (height, width), config, random.Random(seed))

    def augmented_input(self, prepared: np.ndarray, seed: int) -> torch.Tensor:
        return self._augmenter(seed)(prepared)

    def fit_normalisation(self, prepared_train_images: Sequence[np.ndarray]) -> None:
        if self.hp["normalisation"] == "imagenet":
            return
        if self.hp["normalisation"] != "train_split":
            raise ValueError(f"normalisation {self.hp['normalisation']!r} is not train_split or imagenet")
        boxed = (grey_letterbox(image, self.input_size, True) for image in prepared_train_images)
        mean, std = normalisation_stats(boxed)
        self.set_normalisation((mean,) * 3, (max(std, 1e-3),) * 3)

    def sampler(self, labels: Sequence[int], seed: int) -> Sampler[int] | None:
        if self.hp["sampler"] == "none":
            return None
        if self.hp["sampler"] != "class_balanced":
            raise ValueError(f"sampler {self.hp['sampler']!r} is not class_balanced or none")
        return class_balanced_sampler(labels, torch.Generator().manual_seed(seed))

    def loss(
        self, output: Any, target: torch.Tensor, epoch: int, train_labels: Sequence[int]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        value = F.cross_entropy(output, target)
        return value, {"ce": float(value.detach())}

    def stages(self, steps_per_epoch: int) -> list[Stage]:
        return [
            Stage(
                name="fine-tune",
                epochs=int(self.hp["epochs"]),
                trainable=all_trainable,
                optimizer=adam_factory(float(self.hp["lr"]), float(self.hp["weight_decay"])),
                early_stopping=True,
            )
        ]


AsgMammoNetRecipe.demo_profile = DemoProfile(
    kind="mg",
    classes=("benign", "malignant"),
    images=240,
    input_size=(128, 128),
    options={"crop": "breast"},
    hyperparameters={
        "epochs": 4,
        "lr": 1e-3,
        "batch_size": 8,
        "augment": False,
        # The phantoms are balanced; sampling without replacement sees every image every epoch.
        "sampler": "none",
        "monitor": "val_auc",
    },
)


@hookimpl
def pacs_triage_training_recipes() -> list[type[Recipe]]:
    """Train ``asg_mammonet`` with its paper's recipe."""
    return [AsgMammoNetRecipe]
