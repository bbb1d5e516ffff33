"""Training-time parts of the hybrid BI-RADS model (spec §2, §4): DAL loss, oversampling, augmentation.

The training CLI is built elsewhere; these are the pieces it composes, each unit-tested on its own.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plugins.builtin.hybrid_birads import DalMode, HybridBiradsNet

__all__ = [
    "EarlyStopping",
    "augment",
    "dal_loss",
    "make_optimizer",
    "make_scheduler",
    "ordinal_distance_matrix",
    "oversample_indices",
    "set_training_stage",
    "stratified_split",
]

#: Stage learning rates and stage-1 length [paper].
STAGE_LR: dict[int, float] = {1: 1e-4, 2: 1e-5}
STAGE1_EPOCHS = 4
STAGE2_MAX_EPOCHS = 60
BATCH_SIZE = 8


# ----------------------------------------------------------------------------------------------------
# Distance-Aware Learning loss (spec §4)


def ordinal_distance_matrix(num_classes: int = 5, *, device: torch.device | None = None) -> torch.Tensor:
    """``D_ij = |i - j|``, unnormalised (0 ... K-1) [default].

    :param num_classes: K.
    :param device: where to put the matrix.
    """
    idx = torch.arange(num_classes, device=device, dtype=torch.float32)
    return (idx[:, None] - idx[None, :]).abs()


def dal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    lam: float = 1.0,
    mode: DalMode = "multiplicative",
    distance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance-Aware Learning loss, ``mean_n CE_n · (1 + λ E_n)`` with ``E_n = Σ_j p_nj |y_n - j|``.

    Gradients flow through both CE and E [default].  λ = 0 is plain cross-entropy.

    :param logits: ``[B, K]`` pre-softmax scores.
    :param target: ``[B]`` class indices.
    :param lam: λ [default 1.0].
    :param mode: ``"multiplicative"`` (the spec's reading) or ``"additive"`` (``CE + λE``).
    :param distance: ``[K, K]`` distance matrix; default :func:`ordinal_distance_matrix`.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, K], got shape {tuple(logits.shape)}")
    log_p = F.log_softmax(logits, dim=1)
    if distance is None:
        distance = ordinal_distance_matrix(logits.shape[1], device=logits.device)
    ce = F.nll_loss(log_p, target, reduction="none")
    expected_deviation = (log_p.exp() * distance.to(log_p.dtype)[target]).sum(dim=1)
    if mode == "multiplicative":
        per_sample = ce * (1.0 + lam * expected_deviation)
    elif mode == "additive":
        per_sample = ce + lam * expected_deviation
    else:
        raise ValueError(f"DAL mode must be 'multiplicative' or 'additive', got {mode!r}")
    return per_sample.mean()


# ----------------------------------------------------------------------------------------------------
# Data: split, oversampling, augmentation (spec §2, §4)


def stratified_split(
    labels: Sequence[int],
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    seed: int = 42,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / val / test indices; each class is shuffled and cut by the fractions.

    :param labels: class index per sample.
    :param fractions: train, val, test shares; must sum to 1.
    :param seed: RNG seed [default 42].
    """
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        parts[0] += idx[:n_train].tolist()
        parts[1] += idx[n_train : n_train + n_val].tolist()
        parts[2] += idx[n_train + n_val :].tolist()
    train, val, test = (np.sort(np.asarray(p, dtype=np.int64)) for p in parts)
    return train, val, test


def oversample_indices(labels: Sequence[int], seed: int = 42) -> np.ndarray:
    """Random oversampling of the training split: each class replicated up to the majority count, shuffled.

    Each original sample appears at least once; a class's extra copies are drawn at random from that class.

    :param labels: class index of each training sample (training split only).
    :param seed: RNG seed.
    :returns: indices into ``labels``.
    """
    y = np.asarray(labels)
    if y.size == 0:
        raise ValueError("cannot oversample an empty training set")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    majority = int(counts.max())
    chunks = []
    for cls in classes:
        members = np.flatnonzero(y == cls)
        extra = rng.choice(members, size=majority - len(members), replace=True)
        chunks += [members, extra]
    return rng.permutation(np.concatenate(chunks))


def augment(image: np.ndarray, rng: np.random.Generator, *, max_degrees: float = 10.0) -> np.ndarray:
    """Training augmentation on the uint8 CLAHE image: horizontal flip (p = 0.5), then rotation U(±10°),
    bilinear with reflect fill (Keras ``RandomFlip("horizontal")`` + ``RandomRotation(10/360)``).

    :param image: ``[H, W]`` uint8 (after resize and CLAHE, before normalisation).
    :param rng: the random generator.
    :param max_degrees: rotation range.
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} with shape {image.shape}")
    out = image[:, ::-1] if rng.random() < 0.5 else image
    angle = float(rng.uniform(-max_degrees, max_degrees))
    h, w = out.shape
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
    # Keras "reflect" mirrors including the edge pixel (d c b a | a b c d), which is OpenCV's BORDER_REFLECT.
    return cv2.warpAffine(
        np.ascontiguousarray(out), matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )


# ----------------------------------------------------------------------------------------------------
# Stages, optimiser, schedule, early stopping (spec §4)


def _stage2_modules(model: HybridBiradsNet) -> list[nn.Module]:
    """The backbone part Keras' ``ResNet50.layers[-40:]`` covers: all of layer4 plus the tail of layer3[5]
    (the last block of layer3, whatever the ResNet's depth)."""
    block = model.backbone.layer3[-1]
    if model.config_dict()["unfreeze"] == "layer3_block":
        return [model.backbone.layer4, block]
    # A bottleneck block ends conv2/bn2/conv3/bn3; a basic block (resnet18/34) has no conv3.
    tail = [getattr(block, name) for name in ("conv2", "bn2", "conv3", "bn3") if hasattr(block, name)]
    return [model.backbone.layer4, *tail]


def set_training_stage(model: HybridBiradsNet, stage: Literal[1, 2]) -> list[nn.Parameter]:
    """Freeze the model for a training stage and return the trainable parameters.

    Stage 1 trains only proj, positional embeddings, encoder and head; stage 2 also unfreezes the end of the
    backbone (see :func:`_stage2_modules`).  Frozen batch norms stay in eval mode
    (:meth:`HybridBiradsNet.train`).

    :param model: the model, changed in place.
    :param stage: 1 or 2.
    """
    if stage not in (1, 2):
        raise ValueError(f"training stage must be 1 or 2, got {stage!r}")
    for param in model.parameters():
        param.requires_grad_(True)
    for param in model.backbone.parameters():
        param.requires_grad_(False)
    if stage == 2:
        for module in _stage2_modules(model):
            for param in module.parameters():
                param.requires_grad_(True)
    model.train(model.training)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: Iterable[nn.Parameter], stage: Literal[1, 2]) -> torch.optim.Adam:
    """A new Adam for the stage: lr 1e-4 (stage 1) or 1e-5 (stage 2), betas (0.9, 0.999), no weight decay.

    :param params: the trainable parameters from :func:`set_training_stage`.
    :param stage: 1 or 2.
    """
    if stage not in STAGE_LR:
        raise ValueError(f"training stage must be 1 or 2, got {stage!r}")
    return torch.optim.Adam(params, lr=STAGE_LR[stage], betas=(0.9, 0.999), weight_decay=0.0)


def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """ReduceLROnPlateau on the validation loss: factor 0.5, patience 2, min_lr 1e-7 [default params].

    :param optimizer: the stage's optimiser.
    """
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.5, patience=2, min_lr=1e-7
    )


class EarlyStopping:
    """Stop after ``patience`` epochs without improvement; keep the best weights (``restore_best_weights``).

    :param patience: epochs without improvement before stopping (5 for this model).
    :param mode: ``"min"`` for a loss, ``"max"`` for a score such as AUC.
    """

    def __init__(self, patience: int = 5, mode: Literal["min", "max"] = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience = patience
        self.mode = mode
        self.best: float | None = None
        self.best_state: dict[str, Any] | None = None
        self.bad_epochs = 0

    def step(self, value: float, model: nn.Module) -> bool:
        """Record one epoch's monitored value; returns True when training should stop.

        :param value: the monitored metric.
        :param model: whose weights are saved on improvement.
        """
        improved = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if improved:
            self.best = value
            self.best_state = copy.deepcopy(model.state_dict())
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best weights seen back into ``model``.

        :param model: the model to restore.
        """
        if self.best_state is None:
            raise RuntimeError("no epoch was recorded, so there are no best weights to restore")
        model.load_state_dict(self.best_state)
