"""CLGB-Net training parts (spec clgb-net.md 2, 3.3, 5): loss, optimiser, schedule, transforms, split.

The training command lives elsewhere; these are the pieces it assembles, each with the spec's [D] value as its
default.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydicom import Dataset
from torch import Tensor, nn
from torchvision.transforms import v2

from plugins import preprocess as pre
from plugins.base import to_tensor
from plugins.builtin.clgb_net import CLASSES, IMAGENET_MEAN, IMAGENET_STD, CLGBNet
from plugins.weights import CheckpointMetadata

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_optimizer",
    "build_scheduler",
    "clgb_loss",
    "dicom_to_uint8",
    "eval_transform",
    "label_map_from_metadata",
    "macro_metrics",
    "set_training_stage",
    "split_by_patient",
    "train_transform",
]

# Stage k trains these top-level modules (train_schedule="staged"): ResNet+CAM, then FPN, then Swin + fusion.
_STAGE_MODULES: dict[int, tuple[str, ...]] = {
    1: ("cnn", "cam_fc"),
    2: ("cnn", "cam_fc", "fpn", "se", "head"),
}


def clgb_loss(
    logits: Tensor,
    cam_logits: Tensor,
    target: Tensor,
    aux_weight: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``CE(logits, y) + aux_weight * CE(z_cam, y)``: the auxiliary term trains the CAM weights [D].

    :param logits: (B, 3) main logits.
    :param cam_logits: (B, 3) logits of the CAM head (``extras["cam_logits"]``).
    :param target: (B,) class indices (0 normal, 1 benign, 2 malignant).
    :param aux_weight: lambda_aux.
    :returns: the total loss and its parts.
    """
    main = F.cross_entropy(logits, target)
    aux = F.cross_entropy(cam_logits, target)
    return main + aux_weight * aux, {"ce": main.detach(), "ce_aux": aux.detach()}


def build_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
) -> torch.optim.SGD:
    """SGD over the trainable parameters [P], lr 0.001 [P], momentum and L2 value [D].

    :param model: the model whose ``requires_grad`` parameters are optimised.
    :param lr: initial learning rate.
    :param momentum: SGD momentum.
    :param weight_decay: L2 weight decay.
    :param nesterov: Nesterov momentum.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    t_0: int = 25,
    t_mult: int = 1,
    eta_min: float = 1e-6,
) -> torch.optim.lr_scheduler.CosineAnnealingWarmRestarts:
    """Cosine annealing with periodic restarts [P]; ``scheduler.step()`` once per epoch.

    :param optimizer: the optimiser.
    :param t_0: epochs of the first cycle [D 25].
    :param t_mult: cycle length multiplier [D 1].
    :param eta_min: floor of the learning rate [D 1e-6].
    """
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=t_0, T_mult=t_mult, eta_min=eta_min
    )


def set_training_stage(model: CLGBNet, stage: int) -> list[str]:
    """Freeze everything but stage ``stage``'s modules (the ``staged`` reading of the paper's three stages).

    Stage 1 trains ResNet-50 and the CAM head, stage 2 adds the FPN, SE and the classifier, stage 3 trains
    everything (the whole model, as the ``joint`` schedule does from the start).

    :param model: the model, changed in place.
    :param stage: 1, 2 or 3.
    :returns: the names of the top-level modules left trainable.
    """
    if stage not in (1, 2, 3):
        raise ValueError(f"training stage {stage} is not 1, 2 or 3")
    names = [name for name, _ in model.named_children()] + ["fusion_logits"]
    trainable = names if stage == 3 else list(_STAGE_MODULES[stage])
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".", 1)[0] in trainable)
    return trainable


def dicom_to_uint8(ds: Dataset) -> np.ndarray:
    """DICOM to 8-bit grayscale [D], standing in for the paper's MicroDicom JPG export.

    The host's conversion (:func:`plugins.preprocess.to_display`: Modality LUT, VOI LUT or window,
    MONOCHROME1 inverted), so that training sees what inference sees.

    :param ds: a single-frame grayscale dataset with pixel data.
    """
    return pre.to_display(ds.pixel_array, ds)


def _gray_uint8_to_tensor(image: np.ndarray | Tensor) -> Tensor:
    tensor = torch.as_tensor(image)
    if tensor.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image, got {tensor.dtype}")
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3 or tensor.shape[0] != 1:
        raise ValueError(f"expected an (H, W) or (1, H, W) grayscale image, got {tuple(tensor.shape)}")
    return tensor


def _to_three_channels(image: Tensor) -> Tensor:
    return image.expand(3, -1, -1).contiguous()


def eval_transform(
    input_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[np.ndarray], Tensor]:
    """The fixed val/test transform: plain resize (aspect not kept), 3 channels, ImageNet normalisation.

    It is the plugin's own inference preprocessing (the host's stretched :func:`~plugins.preprocess.letterbox`
    and :func:`~plugins.base.to_tensor`), so validation numbers hold for the deployed model.

    :param input_size: square output side.
    :param mean: per-channel mean.
    :param std: per-channel std.
    :returns: a function from a uint8 (H, W) image to a float32 (3, size, size) tensor.
    """

    def transform(image: np.ndarray) -> Tensor:
        if image.dtype != np.uint8 or image.ndim != 2:
            raise TypeError(f"expected a uint8 (H, W) image, got {image.dtype} {image.shape}")
        resized, _box = pre.letterbox(image, (input_size, input_size), keep_aspect=False)
        return to_tensor(resized, tuple(mean), tuple(std))

    return transform


def train_transform(
    input_size: int = 224,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    vflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[np.ndarray | Tensor], Tensor]:
    """The training transform of spec 2: random resized crop, horizontal and vertical flips, normalisation.

    No CLAHE, rotation or colour jitter: the paper applies only scaling, cropping and flipping.

    :param input_size: square output side.
    :param scale: RandomResizedCrop area range [D].
    :param ratio: RandomResizedCrop aspect range [D].
    :param hflip: horizontal flip probability [D 0.5].
    :param vflip: vertical flip probability [D 0.5].
    :param mean: per-channel mean.
    :param std: per-channel std.
    """
    pipeline = v2.Compose(
        [
            v2.RandomResizedCrop(
                input_size,
                scale=scale,
                ratio=ratio,
                interpolation=v2.InterpolationMode.BILINEAR,
                antialias=True,
            ),
            v2.RandomHorizontalFlip(hflip),
            v2.RandomVerticalFlip(vflip),
            v2.ToDtype(torch.float32, scale=True),
            v2.Lambda(_to_three_channels),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
    return lambda image: pipeline(_gray_uint8_to_tensor(image))


def split_by_patient(
    patient_ids: Sequence[Hashable],
    labels: Sequence[int],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Split images into train/val/test per patient, stratified by class, with a fixed seed [D].

    A patient's stratum is the highest label among their images (malignant > benign > normal), so the CC
    and MLO views of one woman always land in the same split.

    :param patient_ids: one id per image.
    :param labels: one class index per image.
    :param fractions: train / val / test fractions (80/10/10 [P]).
    :param seed: shuffling seed.
    :returns: image indices of the train, val and test splits.
    """
    if len(patient_ids) != len(labels):
        raise ValueError("patient_ids and labels differ in length")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions {fractions} do not sum to 1")
    images_of: dict[Hashable, list[int]] = defaultdict(list)
    for index, patient in enumerate(patient_ids):
        images_of[patient].append(index)
    by_stratum: dict[int, list[Hashable]] = defaultdict(list)
    for patient, indices in images_of.items():
        by_stratum[max(labels[i] for i in indices)].append(patient)
    rng = random.Random(seed)
    splits: tuple[list[int], list[int], list[int]] = ([], [], [])
    for stratum in sorted(by_stratum):
        patients = sorted(by_stratum[stratum], key=str)
        rng.shuffle(patients)
        n_train = round(fractions[0] * len(patients))
        n_val = round(fractions[1] * len(patients))
        groups = (patients[:n_train], patients[n_train : n_train + n_val], patients[n_train + n_val :])
        for split, group in zip(splits, groups, strict=True):
            split.extend(i for p in group for i in images_of[p])
    return tuple(sorted(s) for s in splits)  # type: ignore[return-value]


def macro_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int = 3) -> dict[str, float]:
    """Accuracy and one-vs-rest macro precision, recall and F1 (Eqs. 8-11 are lost; standard definitions [D]).

    :param y_true: true class indices.
    :param y_pred: predicted class indices.
    :param num_classes: number of classes.
    """
    truth = np.asarray(y_true)
    pred = np.asarray(y_pred)
    if truth.shape != pred.shape or truth.size == 0:
        raise ValueError("y_true and y_pred must be non-empty and of equal length")
    precisions, recalls, f1s = [], [], []
    for k in range(num_classes):
        tp = float(np.sum((pred == k) & (truth == k)))
        fp = float(np.sum((pred == k) & (truth != k)))
        fn = float(np.sum((pred != k) & (truth == k)))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        precisions.append(precision)
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {
        "accuracy": float(np.mean(truth == pred)),
        "precision": float(np.mean(precisions)),
        "recall": float(np.mean(recalls)),
        "f1": float(np.mean(f1s)),
    }


def label_map_from_metadata(metadata: CheckpointMetadata) -> dict[int, str]:
    """Index -> class name from a checkpoint's metadata, checked against the order this code assumes.

    :param metadata: as returned by ``load_clgb_checkpoint``.
    :raises ValueError: when the checkpoint uses another class order.
    """
    if tuple(metadata.class_names) != CLASSES:
        raise ValueError(f"checkpoint class order {metadata.class_names} differs from {CLASSES}")
    return dict(enumerate(metadata.class_names))
