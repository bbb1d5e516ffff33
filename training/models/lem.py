"""LEM training parts (spec lem.md sections 2, 3.2, 5, 6.5): losses, alpha schedule, optimiser, augmentation.

The training command lives elsewhere; these are the pieces it assembles, each with the spec's [D] value as
its default.  The preprocessing here is the plugin's inference preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from plugins import preprocess as pre
from plugins.builtin.lem import IMAGENET_MEAN, IMAGENET_STD
from plugins.types import Letterbox

__all__ = [
    "alpha_schedule",
    "build_optimizer",
    "build_scheduler",
    "cbis_ddsm_label",
    "dice",
    "eval_transform",
    "inbreast_label",
    "lem_loss",
    "pixel_recall",
    "preprocess_mammogram",
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
    """``L_sparse = L_elim + lambda L_pen`` of Eq. 6, in the spec's reconstructed form [D].

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


def build_optimizer(
    model: nn.Module, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 1e-4
) -> torch.optim.SGD:
    """Mini-batch SGD [P] with momentum 0.9, lr 1e-3 and weight decay mu = 1e-4 [D].

    :param model: the model whose trainable parameters are optimised.
    :param lr: initial learning rate.
    :param momentum: SGD momentum.
    :param weight_decay: mu of Eq. 8.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


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
# Labels (spec 2).


def inbreast_label(birads: str | int, threshold: int = 4) -> int:
    """INbreast image label: BI-RADS >= 4 (4a-c, 5, 6) is malignant [D threshold].

    :param birads: the BI-RADS assessment, e.g. "4c", "2", 5.
    :param threshold: lowest malignant category.
    """
    text = str(birads).strip().lower()
    digits = "".join(ch for ch in text if ch.isdigit())
    if not digits or int(digits) > 6:
        raise ValueError(f"BI-RADS value {birads!r} is not a category 0-6")
    return int(int(digits) >= threshold)


def cbis_ddsm_label(pathologies: Sequence[str]) -> int:
    """CBIS-DDSM image label: 1 if any ROI is MALIGNANT; BENIGN and BENIGN_WITHOUT_CALLBACK are 0 [D].

    :param pathologies: the ``pathology`` of every ROI of the image.
    """
    known = {"MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"}
    values = [p.strip().upper() for p in pathologies]
    unknown = [p for p in values if p not in known]
    if not values or unknown:
        raise ValueError(f"pathologies {list(pathologies)} are empty or not CBIS-DDSM values")
    return int("MALIGNANT" in values)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing and geometry (spec 2 [D]): breast crop, then a letterbox to the input size.


def preprocess_mammogram(
    image: np.ndarray,
    size: tuple[int, int] = (1024, 832),
    crop_to_breast: bool = True,
) -> tuple[Tensor, Letterbox]:
    """Crop to the breast and resize to the standard size; intensities to [0, 1] (spec 2 [D]).

    The plugin's own inference preprocessing (the host's :func:`~plugins.preprocess.breast_bbox` and
    stretched :func:`~plugins.preprocess.letterbox`), so that training and inference see the same geometry
    and ``Letterbox.to_source`` maps points back to the source pixels.

    :param image: display-ready uint8 grayscale image (VOI LUT applied, MONOCHROME1 inverted).
    :param size: (H, W) of the model input.
    :param crop_to_breast: crop to the breast's bounding box first.
    :returns: a float32 (1, H, W) tensor in [0, 1] and the geometry.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise TypeError(f"expected a uint8 (H, W) image, got {image.dtype} {image.shape}")
    crop = pre.breast_bbox(image) if crop_to_breast else None
    resized, box = pre.letterbox(image, size, crop=crop, keep_aspect=False)
    return torch.from_numpy(resized.astype(np.float32) / 255.0).unsqueeze(0), box


# ---------------------------------------------------------------------------------------------------------
# Augmentation (spec 2).


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


def eval_transform(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable[[Tensor], Tensor]:
    """Test-time transform: 3 channels and normalisation only.

    :param mean: per-channel mean.
    :param std: per-channel std.
    """
    return v2.Compose([v2.Lambda(_three_channels), v2.Normalize(mean=list(mean), std=list(std))])


# ---------------------------------------------------------------------------------------------------------
# Localisation metrics (spec 6.5 [D]).


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """DSC = 2 |A n B| / (|A| + |B|); 1.0 when both masks are empty.

    :param prediction: binary mask A.
    :param truth: binary mask B.
    """
    a, b = prediction.astype(bool), truth.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def pixel_recall(prediction: np.ndarray, truth: np.ndarray) -> float:
    """|A n B| / |B|: the fraction of lesion pixels covered by the predicted mask.

    :param prediction: binary mask A.
    :param truth: binary lesion mask B (must not be empty).
    """
    a, b = prediction.astype(bool), truth.astype(bool)
    if not b.any():
        raise ValueError("the ground-truth mask is empty")
    return int((a & b).sum()) / int(b.sum())
