"""US-Fusion training (docs/models/us-fusion.md §2, §4): class weights, the augmentation, the warm-up and
cosine schedule and the recipe.  The recipe's ``threshold=youden`` stores Youden's threshold on the
validation split in the checkpoint, which the plugin then applies when it serves.

Inference never imports this module; the model is :mod:`plugins.builtin.us_fusion`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torchvision.transforms import v2 as T

from plugins import hookimpl
from training.datasets import Record
from training.recipes import DemoProfile, Hyper, Recipe, Stage, adam_factory, all_trainable, seeded_torch

__all__ = [
    "UsFusionRecipe",
    "class_weights",
    "make_scheduler",
    "pacs_triage_training_recipes",
    "train_transform",
]

EPOCHS = 50
WARMUP_EPOCHS = 2


# ----------------------------------------------------------------------------------------------------
# Class balance and loss


def class_weights(labels: Sequence[int], num_classes: int = 2) -> torch.Tensor:
    """``w_c = N / (K · N_c)``; a balanced set gets all ones.

    :param labels: training labels.
    :param num_classes: K.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    if np.any(counts == 0):
        raise ValueError(f"every class needs at least one training sample, counts are {counts.tolist()}")
    return torch.tensor(counts.sum() / (num_classes * counts), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Augmentation on a uint8 [3, H, W] tensor of the cropped grey frame


def train_transform(size: int = 224) -> T.Compose:
    """RandomResizedCrop(scale 0.8-1, ratio 0.9-1.1), h-flip 0.5, rotation ±15° (fill 0),
    brightness/contrast 0.2, then ImageNet normalisation.  No vertical flip: depth direction matters in
    ultrasound.

    :param size: output side.
    """
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomRotation(15, interpolation=T.InterpolationMode.BILINEAR, fill=0),
            T.ColorJitter(brightness=0.2, contrast=0.2),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# ----------------------------------------------------------------------------------------------------
# Data splits


# ----------------------------------------------------------------------------------------------------
# Optimiser, schedule, early stopping


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int = EPOCHS,
    warmup_epochs: int = WARMUP_EPOCHS,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup_epochs``, then cosine annealing to 0 at ``epochs``; step once per batch.

    :param optimizer: the optimiser.
    :param steps_per_epoch: batches per epoch.
    :param epochs: total epochs.
    :param warmup_epochs: warm-up epochs.
    """
    if steps_per_epoch < 1 or epochs <= warmup_epochs:
        raise ValueError(
            f"need steps_per_epoch >= 1 and epochs > warmup_epochs, got {steps_per_epoch}, {epochs}"
        )
    warmup = warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------------------
# The recipe


class UsFusionRecipe(Recipe):
    """MobileNetV2 + DenseNet121 fusion: US-region crop, resized crop/flip/rotation/jitter, class-weighted
    CE, Adam with warm-up and cosine, early stopping on the validation AUC; 5-fold CV on BUSI."""

    name = "us_fusion"
    modality = "US"
    summary = "US-Fusion (docs/models/us-fusion.md §2, §4): weighted CE, Adam 1e-4, warm-up + cosine, batch 32, 50 epochs"
    HYPERPARAMETERS: ClassVar[dict[str, Hyper]] = {
        "epochs": Hyper(50, "default", "epochs of the cosine schedule"),
        "warmup_epochs": Hyper(2, "default", "linear warm-up epochs"),
        "batch_size": Hyper(32, "default", "images per batch"),
        "augment": Hyper(
            True, "default", "resized crop, flip, rotation, jitter (false: the plugin's preprocessing only)"
        ),
        "lr": Hyper(1e-4, "default", "Adam learning rate"),
        "weight_decay": Hyper(1e-4, "default", "Adam weight decay"),
        "patience": Hyper(10, "default", "early stopping: epochs without improvement of the monitor"),
        "monitor": Hyper("val_auc", "default", "val_auc, val_loss, val_accuracy or none; best weights kept"),
        "class_weighted_loss": Hyper(True, "default", "w_c = N / (K N_c) in the cross-entropy"),
        "normal_as_benign": Hyper(False, "default", "BUSI 'normal' images count as benign (else left out)"),
        "threshold": Hyper(
            "youden",
            "paper",
            "youden (Youden's J on the validation split, stored in the checkpoint; the plugin serves with "
            "it) or argmax",
        ),
    }
    split: ClassVar[dict[str, float]] = {"train": 0.7, "val": 0.1, "test": 0.2}
    kfold_datasets: ClassVar[dict[str, int]] = {"busi": 5}
    runtime_options = frozenset({"saliency", "shap", "shap_samples", "shap_background"})

    @property
    def imagenet_backbones(self) -> dict[str, tuple[str, str, tuple[str, ...]]]:  # type: ignore[override]
        head_a: tuple[str, ...] = ("classifier.",)
        if self.options["branch_a_features"] == "blocks":
            head_a += ("conv_head.", "bn2.")
        backbones = {}
        if self.options["fusion"] != "b_only":
            backbones["mobilenet"] = ("branch_a", "mobilenetv2_100", head_a)
        if self.options["fusion"] != "a_only":
            backbones["densenet"] = ("branch_b", "densenet121", ("classifier.",))
        return backbones

    def configure(self) -> None:
        super().configure()
        if self.input_size[0] != self.input_size[1]:
            raise ValueError(f"US-Fusion needs a square input, got {self.input_size}")
        if int(self.hp["epochs"]) <= int(self.hp["warmup_epochs"]):
            raise ValueError(
                f"epochs ({self.hp['epochs']}) must exceed warmup_epochs ({self.hp['warmup_epochs']})"
            )
        if self.hp["threshold"] not in ("argmax", "youden"):
            raise ValueError(f"threshold {self.hp['threshold']!r} is not argmax or youden")

    def label_index(self, record: Record) -> int | None:
        if record.label.strip().lower() == "normal":
            return 0 if self.hp["normal_as_benign"] else None
        return super().label_index(record)

    def augmented_input(self, prepared: np.ndarray, seed: int) -> torch.Tensor:
        grey = torch.from_numpy(np.ascontiguousarray(prepared)).unsqueeze(0).expand(3, -1, -1).contiguous()
        return seeded_torch(seed, train_transform(self.input_size[0]), grey)

    def loss(
        self, output: Any, target: torch.Tensor, epoch: int, train_labels: Sequence[int]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.hp["class_weighted_loss"]:
            weights = self._weights(tuple(train_labels)).to(output.device, output.dtype)
            value = F.cross_entropy(output, target, weight=weights)
        else:
            value = F.cross_entropy(output, target)
        return value, {"ce": float(value.detach())}

    def _weights(self, labels: tuple[int, ...]) -> torch.Tensor:
        cached = getattr(self, "_weight_cache", None)
        if cached is None or cached[0] != labels:
            cached = (labels, class_weights(labels, len(self.classes)))
            self._weight_cache = cached
        return cached[1]

    def stages(self, steps_per_epoch: int) -> list[Stage]:
        hp = self.hp
        return [
            Stage(
                name="fine-tune",
                epochs=int(hp["epochs"]),
                trainable=all_trainable,
                optimizer=adam_factory(float(hp["lr"]), float(hp["weight_decay"])),
                scheduler=lambda opt, steps: make_scheduler(
                    opt, steps, epochs=int(hp["epochs"]), warmup_epochs=int(hp["warmup_epochs"])
                ),
                scheduler_step="batch",
                early_stopping=True,
            )
        ]


UsFusionRecipe.demo_profile = DemoProfile(
    kind="us",
    classes=("benign", "malignant"),
    images=160,
    input_size=(64, 64),
    hyperparameters={
        "epochs": 2,
        "warmup_epochs": 0,
        "lr": 1e-3,
        "batch_size": 8,
        "patience": 0,
        "augment": False,
    },
)


@hookimpl
def pacs_triage_training_recipes() -> list[type[Recipe]]:
    """Train ``us_fusion`` with its paper's recipe."""
    return [UsFusionRecipe]
