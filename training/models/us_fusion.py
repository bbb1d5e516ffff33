"""Training-time parts of US-Fusion (spec us-fusion.md §2, §4): weighted loss, augmentation, splits, schedule.

The training CLI is built elsewhere; these are the pieces it composes, each unit-tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2 as T

from plugins.builtin.hybrid_birads_training import EarlyStopping
from plugins.builtin.us_fusion import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "EarlyStopping",
    "busi_label",
    "class_weights",
    "eval_transform",
    "make_loss",
    "make_optimizer",
    "make_scheduler",
    "make_early_stopping",
    "patient_split",
    "stratified_kfold",
    "train_transform",
    "youden_threshold",
]

LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-4
BATCH_SIZE = 32
EPOCHS = 50
WARMUP_EPOCHS = 2
EARLY_STOP_PATIENCE = 10


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


def make_loss(labels: Sequence[int], num_classes: int = 2) -> nn.CrossEntropyLoss:
    """Class-weighted cross-entropy, no label smoothing (no sampler).

    :param labels: training labels, for :func:`class_weights`.
    :param num_classes: K.
    """
    return nn.CrossEntropyLoss(weight=class_weights(labels, num_classes))


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


def eval_transform(size: int = 224) -> T.Compose:
    """Plain bilinear resize and ImageNet normalisation (the crop happens before, as at serving time).

    :param size: output side.
    """
    return T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=False),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# ----------------------------------------------------------------------------------------------------
# Data splits


def busi_label(folder: str, *, normal_as_benign: bool = False) -> int | None:
    """BUSI folder name to a class index; "normal" is dropped (None) unless ``normal_as_benign``.

    :param folder: ``benign``, ``malignant`` or ``normal``.
    :param normal_as_benign: the spec's off-by-default flag.
    """
    name = folder.strip().lower()
    if name == "benign":
        return 0
    if name == "malignant":
        return 1
    if name == "normal":
        return 0 if normal_as_benign else None
    raise ValueError(f"unknown BUSI class folder {folder!r}")


def patient_split(
    patient_ids: Sequence[str],
    labels: Sequence[int],
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 42,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient-level stratified train / val / test image indices: a patient's images never cross splits.

    Patients are stratified by their most severe label (malignant if any image is).

    :param patient_ids: patient of each image.
    :param labels: label of each image.
    :param fractions: train, val, test shares of patients.
    :param seed: RNG seed.
    """
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    ids = np.asarray(patient_ids)
    y = np.asarray(labels)
    patients = np.unique(ids)
    patient_label = np.array([y[ids == p].max() for p in patients])
    rng = np.random.default_rng(seed)
    assignment: dict[str, int] = {}
    for cls in np.unique(patient_label):
        members = rng.permutation(patients[patient_label == cls])
        n_train = round(fractions[0] * len(members))
        n_val = round(fractions[1] * len(members))
        for j, patient in enumerate(members):
            assignment[str(patient)] = 0 if j < n_train else 1 if j < n_train + n_val else 2
    split = np.array([assignment[str(p)] for p in ids])
    return tuple(np.flatnonzero(split == k) for k in range(3))  # type: ignore[return-value]


def stratified_kfold(
    labels: Sequence[int], k: int = 5, seed: int = 42, val_fraction: float = 0.1
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stratified k-fold; within each fold a stratified ``val_fraction`` of the training part is validation.

    :param labels: label of each image.
    :param k: folds.
    :param seed: RNG seed (the validation cut uses seed + fold index).
    :param val_fraction: validation share of each fold's training part.
    :returns: (train, val, test) index arrays per fold.
    """
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        fold_of[members] = np.arange(len(members)) % k
    folds = []
    for fold in range(k):
        test = np.flatnonzero(fold_of == fold)
        rest = np.flatnonzero(fold_of != fold)
        fold_rng = np.random.default_rng(seed + fold)
        val_parts = []
        for cls in np.unique(y[rest]):
            members = fold_rng.permutation(rest[y[rest] == cls])
            val_parts.append(members[: round(val_fraction * len(members))])
        val = np.sort(np.concatenate(val_parts))
        train = np.setdiff1d(rest, val)
        folds.append((train, val, test))
    return folds


def youden_threshold(scores: Sequence[float], labels: Sequence[int]) -> float:
    """The p(malignant) threshold maximising sensitivity + specificity − 1 on validation data.

    :param scores: p(malignant) per image.
    :param labels: 1 for malignant.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    positives, negatives = (y == 1).sum(), (y == 0).sum()
    if positives == 0 or negatives == 0:
        raise ValueError("Youden's J needs both classes in the validation labels")
    best_j, best_t = -1.0, 0.5
    for threshold in np.unique(s):
        predicted = s >= threshold
        j = (predicted & (y == 1)).sum() / positives + (~predicted & (y == 0)).sum() / negatives - 1
        if j > best_j:
            best_j, best_t = j, float(threshold)
    return best_t


# ----------------------------------------------------------------------------------------------------
# Optimiser, schedule, early stopping


def make_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Adam:
    """Adam, lr 1e-4, weight decay 1e-4; end-to-end fine-tuning, nothing frozen.

    :param params: all model parameters.
    """
    return torch.optim.Adam(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)


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


def make_early_stopping() -> EarlyStopping:
    """Patience 10 on validation AUC (higher is better), keeping the best-AUC weights."""
    return EarlyStopping(patience=EARLY_STOP_PATIENCE, mode="max")
