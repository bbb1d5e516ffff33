"""LEM training (docs/models/lem.md §2, §4): the pooled and sparse losses, the alpha schedule, the
step decay, the augmentation and the recipe.

Inference never imports this module; the model is :mod:`plugins.builtin.lem`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch import Tensor, nn
from torchvision.transforms import v2

from plugins import hookimpl
from plugins.builtin.lem import two_class_logits
from training.datasets import Record
from training.recipes import (
    DemoProfile,
    Hyper,
    Recipe,
    Stage,
    all_trainable,
    grey_letterbox,
    seeded_torch,
    sgd_or_adam,
)

__all__ = [
    "LemRecipe",
    "alpha_schedule",
    "build_scheduler",
    "lem_loss",
    "pacs_triage_training_recipes",
    "sparse_loss",
    "train_transform",
]

# ---------------------------------------------------------------------------------------------------------
# Losses (Eqs. 6-8).


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-image mean of ``values`` over ``mask``; 0 for an empty mask.  Shapes (B, 1, h, w) -> (B,)."""
    weights = mask.to(values.dtype)
    return (values * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(1.0)


def sparse_loss(
    score: Tensor,
    p_max: Tensor,
    p_min: Tensor,
    target: Tensor,
    eps: float = 1.0,
    penalty_weight: float = 1e-4,
) -> tuple[Tensor, Tensor, Tensor]:
    """``L_sparse = L_elim + lambda L_pen`` of Eq. 6, in the model doc's reconstructed form [D].

    ``L_pen`` is the L1 excess of non-extremum scores beyond [-eps, eps], so the extrema stand out; ``L_elim``
    penalises extrema whose sign contradicts the image label (positive maxima on a benign image, negative
    minima on a malignant one).

    :param score: (B, 1, h, w) score map S.
    :param p_max: bool map of maxima.
    :param p_min: bool map of minima.
    :param target: (B,) labels in {0, 1}.
    :param eps: sparsity threshold epsilon [D 1.0].
    :param penalty_weight: lambda [D 1e-4].
    :returns: ``(L_sparse, L_elim, L_pen)``, each averaged over the batch.
    """
    t = target.to(score.dtype)
    non_extremum = ~(p_max | p_min)
    penalty = _masked_mean((score.abs() - eps).clamp_min(0), non_extremum)
    eliminate = (1 - t) * _masked_mean(F.relu(score), p_max) + t * _masked_mean(F.relu(-score), p_min)
    elim, pen = eliminate.mean(), penalty.mean()
    return elim + penalty_weight * pen, elim, pen


def lem_loss(
    out: dict[str, Tensor],
    target: Tensor,
    alpha: float,
    *,
    pos_weight: float = 3.0,
    sparsity_factor: float = 1.0,
    sparse_eps: float = 1.0,
    sparse_penalty_weight: float = 1e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``L = (1 - alpha) L_GAP + alpha (L_LEM + gamma L_sparse)`` (Eq. 8 [D] grouping).

    L_GAP and L_LEM are BCE with positive-class weight 3 (the paper's "balanced value 3" of Eq. 7 [I]) on
    the logits.  The ``mu ||theta||^2`` term of Eq. 8 is the optimiser's weight decay, not part of this value.
    Terms whose weight is 0 are left out, so alpha = 0 gives no gradient from the LEM path at all.

    :param out: the LEM model's forward dict.
    :param target: (B,) labels in {0, 1}.
    :param alpha: GAP -> LEM mixing weight in [0, 1] (see :func:`alpha_schedule`).
    :param pos_weight: positive-class weight of the BCE.
    :param sparsity_factor: gamma [D 1.0].
    :param sparse_eps: epsilon of L_pen [D 1.0].
    :param sparse_penalty_weight: lambda of L_pen [D 1e-4].
    :returns: the total loss and its (detached) parts.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} is not in [0, 1]")
    t = target.to(out["z_gap"].dtype)
    weight = torch.tensor(pos_weight, dtype=t.dtype, device=t.device)
    zero = out["z_gap"].new_zeros(())
    parts: dict[str, Tensor] = {}
    total = zero
    if alpha < 1.0:
        gap = F.binary_cross_entropy_with_logits(out["z_gap"], t, pos_weight=weight)
        total = total + (1.0 - alpha) * gap
        parts["gap"] = gap.detach()
    if alpha > 0.0:
        lem = F.binary_cross_entropy_with_logits(out["z_lem"], t, pos_weight=weight)
        sparse, elim, pen = sparse_loss(
            out["score_map"], out["p_max"], out["p_min"], target, sparse_eps, sparse_penalty_weight
        )
        total = total + alpha * (lem + sparsity_factor * sparse)
        parts.update(lem=lem.detach(), sparse=sparse.detach(), elim=elim.detach(), pen=pen.detach())
    return total, parts


def alpha_schedule(epoch: int, alpha0: float = 0.0, ramp_epochs: int = 100) -> float:
    """alpha rises linearly from ``alpha0`` at epoch 0 to 1 at ``ramp_epochs``, then stays at 1.

    The shape is the paper's; the numbers are [D].

    :param epoch: 0-based epoch.
    :param alpha0: starting value [D 0].
    :param ramp_epochs: epochs to reach 1 [D 100].
    """
    if epoch < 0:
        raise ValueError(f"epoch {epoch} is negative")
    if ramp_epochs <= 0:
        return 1.0
    return min(1.0, alpha0 + (1.0 - alpha0) * epoch / ramp_epochs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, step_size: int = 8, gamma: float = 0.9
) -> torch.optim.lr_scheduler.StepLR:
    """Decay every 8 epochs [P] by 0.9 [D]; ``scheduler.step()`` once per epoch.

    :param optimizer: the optimiser.
    :param step_size: epochs between decays.
    :param gamma: decay factor (close to 1: 400 epochs make 50 decays).
    """
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)


# ---------------------------------------------------------------------------------------------------------
# Augmentation (§2).


def _three_channels(image: Tensor) -> Tensor:
    return image.expand(3, -1, -1).contiguous()


def train_transform(
    hflip: float = 0.5,
    contrast: float = 0.2,
    saturation: float = 0.2,
    rotation_degrees: float = 30.0,
    noise_sigma: float = 0.01,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Tensor], Tensor]:
    """Training augmentation of the paper on a preprocessed (1, H, W) image in [0, 1].

    Horizontal flip, contrast and saturation jitter (saturation does nothing on a gray image but is kept for
    fidelity), rotation uniform in [-30, 30] degrees with fill 0, additive Gaussian noise on the [0, 1] scale;
    then 3 channels and ImageNet normalisation.  The noise is added before the channel copy so the three
    channels stay identical.

    :param hflip: horizontal flip probability [D 0.5].
    :param contrast: contrast jitter factor [D 0.2].
    :param saturation: saturation jitter factor [D 0.2].
    :param rotation_degrees: rotation range in degrees [P 30].
    :param noise_sigma: noise std on [0, 1] [D 0.01].
    :param mean: per-channel mean.
    :param std: per-channel std.
    """
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(hflip),
            v2.ColorJitter(contrast=contrast, saturation=saturation),
            v2.RandomRotation(rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR, fill=0),
            v2.GaussianNoise(mean=0.0, sigma=noise_sigma, clip=True),
            v2.Lambda(_three_channels),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


# ---------------------------------------------------------------------------------------------------------
# The recipe


class LemRecipe(Recipe):
    """Local extremum mapping: breast crop and resize, flip/jitter/rotation/noise, the pooled GAP and LEM
    losses mixed by the alpha schedule plus the sparse loss, SGD with step decay, 400 fixed epochs."""

    name = "lem"
    modality = "MG"
    summary = "LEM (docs/models/lem.md §2, §4): SGD 1e-3, StepLR(8, 0.9), batch 32, 400 epochs, alpha 0 -> 1 over 100"
    HYPERPARAMETERS: ClassVar[dict[str, Hyper]] = {
        "epochs": Hyper(400, "paper", "fixed number of epochs (no early stopping)"),
        "batch_size": Hyper(32, "paper", "images per batch"),
        "augment": Hyper(True, "paper", "the augmentation below (false: the plugin's preprocessing only)"),
        "optimizer": Hyper("sgd", "paper", "sgd (mini-batch gradient descent, momentum) or adam"),
        "lr": Hyper(1e-3, "default", "initial learning rate"),
        "momentum": Hyper(0.9, "default", "SGD momentum"),
        "weight_decay": Hyper(1e-4, "default", "mu of Eq. 8"),
        "monitor": Hyper("none", "paper", "none keeps the last epoch (the paper has no validation set)"),
        "lr_step_epochs": Hyper(8, "paper", "decay the learning rate every this many epochs"),
        "lr_gamma": Hyper(0.9, "default", "learning-rate decay factor"),
        "alpha0": Hyper(0.0, "default", "alpha (GAP -> LEM weight) at epoch 0"),
        "alpha_ramp_epochs": Hyper(100, "default", "epochs for alpha to reach 1"),
        "pos_weight": Hyper(3.0, "inferred", "positive-class weight of the BCE (Eq. 7's 'balanced value 3')"),
        "sparsity_factor": Hyper(1.0, "default", "gamma: weight of the sparse loss"),
        "sparse_eps": Hyper(1.0, "default", "epsilon of the sparse penalty"),
        "sparse_penalty": Hyper(1e-4, "paper", "lambda: 'a very small value'"),
        "hflip_p": Hyper(0.5, "default", "horizontal flip probability"),
        "contrast": Hyper(0.2, "default", "contrast jitter"),
        "saturation": Hyper(0.2, "default", "saturation jitter (no effect on grey images)"),
        "rotation_degrees": Hyper(30.0, "paper", "random rotation range"),
        "noise_sigma": Hyper(0.01, "default", "Gaussian noise std on the [0, 1] scale"),
    }
    # The paper has no validation set; 10 % of the training part calibrates the temperature only.
    split: ClassVar[dict[str, float]] = {"train": 0.72, "val": 0.08, "test": 0.2}
    localises = True
    runtime_options = frozenset({"max_regions", "region_smoothing", "region_min_pixels", "score_map"})

    @property
    def imagenet_backbones(self) -> dict[str, tuple[str, str, tuple[str, ...]]]:  # type: ignore[override]
        backbone = str(self.options["backbone"])
        head = "classifier." if backbone.startswith("densenet") else "fc."
        return {"backbone": ("backbone", backbone, (head,))}

    def configure(self) -> None:
        super().configure()
        if self.input_size[0] % 32 or self.input_size[1] % 32:
            raise ValueError(f"LEM needs input sides that are multiples of 32, got {self.input_size}")

    def label_index(self, record: Record) -> int | None:
        # docs/models/lem.md §2: 0 = "not malignant", normal images included.
        return 1 if record.label.strip().lower() == "malignant" else 0

    def augmented_input(self, prepared: np.ndarray, seed: int) -> torch.Tensor:
        resized = grey_letterbox(prepared, self.input_size, bool(self.options["keep_aspect"]))
        unit = torch.from_numpy(resized.astype(np.float32) / 255.0).unsqueeze(0)
        transform = train_transform(
            hflip=float(self.hp["hflip_p"]),
            contrast=float(self.hp["contrast"]),
            saturation=float(self.hp["saturation"]),
            rotation_degrees=float(self.hp["rotation_degrees"]),
            noise_sigma=float(self.hp["noise_sigma"]),
            mean=self.spec.mean,
            std=self.spec.std,
        )
        return seeded_torch(seed, transform, unit)

    def alpha(self, epoch: int) -> float:
        return alpha_schedule(epoch, float(self.hp["alpha0"]), int(self.hp["alpha_ramp_epochs"]))

    def loss(
        self, output: Any, target: torch.Tensor, epoch: int, train_labels: Sequence[int]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        alpha = self.alpha(epoch)
        value, parts = lem_loss(
            output,
            target,
            alpha,
            pos_weight=float(self.hp["pos_weight"]),
            sparsity_factor=float(self.hp["sparsity_factor"]),
            sparse_eps=float(self.hp["sparse_eps"]),
            sparse_penalty_weight=float(self.hp["sparse_penalty"]),
        )
        return value, {"alpha": alpha, **{k: float(v) for k, v in parts.items()}}

    def logits(self, output: Any) -> torch.Tensor:
        return two_class_logits(output["z_lem"])

    def stages(self, steps_per_epoch: int) -> list[Stage]:
        hp = self.hp

        def optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            return sgd_or_adam(hp, params)

        return [
            Stage(
                name="train",
                epochs=int(hp["epochs"]),
                trainable=all_trainable,
                optimizer=optimizer,
                scheduler=lambda opt, _steps: build_scheduler(
                    opt, step_size=int(hp["lr_step_epochs"]), gamma=float(hp["lr_gamma"])
                ),
                scheduler_step="epoch",
            )
        ]


LemRecipe.demo_profile = DemoProfile(
    kind="mg",
    classes=("benign", "malignant"),
    images=240,
    input_size=(128, 96),
    hyperparameters={
        "optimizer": "adam",
        "lr": 1e-3,
        # Halved every epoch: at a constant rate the validation loss swung from epoch to epoch, and
        # one seed in three ended below 0.9 once the crop kept the whole breast.
        "lr_step_epochs": 1,
        "lr_gamma": 0.5,
        "epochs": 4,
        "batch_size": 8,
        "alpha_ramp_epochs": 2,
        "augment": False,
        "monitor": "val_auc",
    },
)


@hookimpl
def pacs_triage_training_recipes() -> list[type[Recipe]]:
    """Train ``lem`` with its paper's recipe."""
    return [LemRecipe]
