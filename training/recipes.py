"""The training recipe's base: what each paper's preprocessing, augmentation, sampler, loss and schedule plug into.

A :class:`Recipe` is what the trainer (:mod:`training.trainer`) needs to train one model plugin the way
its paper did (``docs/models/<model>.md``).  This module holds what every recipe shares: which label means
which class, the plugin's own preprocessing for every image that is not augmented, the hyperparameter
table, the optimisers.  Each model's recipe, with its losses, samplers, augmentations, schedulers and
staged unfreezing, is one module of :mod:`training.models`, and reaches the trainer through the
``pacs_triage_training_recipes`` hook (:mod:`training.registry`), as a third-party plugin's recipe does.

Every choice is a hyperparameter with a default and a tag saying where the default comes from: ``paper``
(stated in the paper), ``inferred`` (derived from it) or ``default`` (ours, where the paper is silent).
``pacs-triage train --set key=value`` overrides any of them; ``--option key=value`` overrides the plugin's
options (the backbone, the loss's λ, the normalisation mode ...), which the exported checkpoint records so
that the plugin serves the model exactly as it was trained.

Training images go through two steps.  :meth:`Recipe.prepare` runs once per image and does what the
plugin's ``preprocess`` does before resizing (the crop, the laterality flip, grey), then shrinks very large
images to a working size.  :meth:`Recipe.train_input` runs every epoch and does the paper's augmentation,
the resize and the normalisation.  Validation and test images go through the plugin's ``preprocess``
itself (:meth:`Recipe.eval_input`), so the numbers hold for the deployed model.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import timm
import torch
import yaml
from torch import nn
from torch.utils.data import Sampler

from plugins import preprocess as pre
from plugins.base import BASE_OPTIONS, TorchModelPlugin
from plugins.types import ImageRef, ModelSpec
from plugins.weights import check_state_dict_fits
from training.datasets import Record

__all__ = [
    "DemoProfile",
    "Hyper",
    "Recipe",
    "Stage",
    "adam",
    "adam_factory",
    "all_trainable",
    "grey_letterbox",
    "load_timm_backbone",
    "parse_value",
    "seeded_torch",
    "sgd_or_adam",
]

Monitor = Literal["val_loss", "val_auc", "val_accuracy", "none"]
_MONITORS: tuple[str, ...] = ("val_loss", "val_auc", "val_accuracy", "none")
SchedulerStep = Literal["epoch", "batch", "plateau", "none"]

#: Plugin options that only change how the host serves a model (explanations, frames of a cine loop are
#: kept), so a checkpoint does not record them.
_RUNTIME_OPTIONS = frozenset(
    {
        "explain",
        "cam_target_class",
        "temperature",
        "amp",
        "accept_for_processing",
        "accept_tomosynthesis_volumes",
    }
)
#: Base options that change the pixels a model sees; a checkpoint always records them.
_PREPROCESSING_OPTIONS = tuple(k for k in BASE_OPTIONS if k not in _RUNTIME_OPTIONS and k != "explain")


@dataclass(frozen=True)
class Hyper:
    """One training hyperparameter: its default, where the default comes from and what it does."""

    default: Any
    #: "paper", "inferred" or "default" (ours).
    tag: str
    help: str


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One phase of training with its own trainable parameters, optimiser and schedule."""

    name: str
    epochs: int
    #: Freezes and unfreezes parts of the model; returns the parameters to optimise.
    trainable: Callable[[nn.Module], list[nn.Parameter]]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    #: Builds the scheduler from the optimiser and the number of batches per epoch; None = constant LR.
    scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None
    #: When the scheduler steps: after every batch, every epoch, or on the validation loss (plateau).
    scheduler_step: SchedulerStep = "none"
    #: Stop this stage after ``patience`` epochs without improvement of the recipe's monitor.
    early_stopping: bool = False


def parse_value(text: str, default: Any) -> Any:
    """Parse a ``--set``/``--option`` value given as text, to the type of *default*.

    :param text: the value as typed, e.g. ``1e-3``, ``true``, ``0.8,1.0`` or ``null``.
    :param default: the current value; its type decides the parse (lists from commas).
    :raises ValueError: when the text does not parse to that type.
    """
    stripped = text.strip()
    if stripped.lower() in ("null", "none", "~"):
        return None
    if isinstance(default, bool):
        lowered = stripped.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    if isinstance(default, int):
        number = float(stripped)
        if not number.is_integer():
            raise ValueError(f"{text!r} is not a whole number")
        return int(number)
    if isinstance(default, float):
        return float(stripped)
    if isinstance(default, list | tuple):
        items = [item for item in re.split(r"[,\s]+", stripped.strip("[]()")) if item]
        sample = default[0] if default else ""
        return [parse_value(item, sample) for item in items]
    if isinstance(default, str):
        return stripped
    return yaml.safe_load(stripped)


def _coerce(name: str, value: Any, default: Any) -> Any:
    """*value* (from Python or the command line) as the type of *default*, naming *name* in errors."""
    try:
        if isinstance(value, str) and not isinstance(default, str):
            return parse_value(value, default)
        if isinstance(default, bool) or value is None or default is None:
            return value
        if isinstance(default, float) and isinstance(value, int | float):
            return float(value)
        if isinstance(default, int) and isinstance(value, int | float) and float(value).is_integer():
            return int(value)
        return value
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def load_timm_backbone(
    module: nn.Module, source: str | Path, timm_name: str, allowed_unexpected: tuple[str, ...]
) -> None:
    """Load ImageNet weights into a timm backbone from a local file (never from a hub).

    The file is read with timm's own loader (``timm.models.load_state_dict``: ``.pth``, ``.bin`` or
    safetensors, EMA unwrapped).  Every backbone key must be filled; only keys starting with one of
    *allowed_unexpected* (the classifier) may be left over.

    :param module: the backbone (a timm model, possibly ``features_only``), loaded in place.
    :param source: a weights file.
    :param timm_name: the timm architecture the weights belong to.
    :param allowed_unexpected: key prefixes the backbone does not have (e.g. ``("classifier.",)``).
    :raises FileNotFoundError: when the file does not exist.
    :raises ValueError: when the weights do not fit the backbone.
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights for {timm_name} not found: {path}")
    state = timm.models.load_state_dict(str(path), use_ema=True)
    check_state_dict_fits(module, state, allowed_unexpected, f"{source} (the {timm_name} backbone)")
    own = module.state_dict()
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)


def seeded_torch(
    seed: int, transform: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Run a torchvision transform (which draws from torch's global RNG) under its own seed.

    Each sample then gets the same augmentation whatever worker or order it is loaded in.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(x)


def grey_letterbox(image: np.ndarray, size: tuple[int, int], keep_aspect: bool) -> np.ndarray:
    resized, _ = pre.letterbox(image, size, keep_aspect=keep_aspect)
    return resized


@dataclass(frozen=True, kw_only=True)
class DemoProfile:
    """Settings that train one architecture from random weights on synthetic phantoms in under a minute of
    one CPU core (10-50 s on the CI machine): what ``pacs-triage demo-weights`` and the tests use.

    The papers' recipes assume ImageNet weights and hours on a GPU; these keep each recipe's loss, sampler
    and schedule but use a small input, a higher learning rate and no geometric augmentation (the phantoms
    vary enough), so that random weights learn within a few epochs.
    """

    #: :func:`plugins.synthetic.write_dataset_dir` kind and classes.
    kind: str
    classes: tuple[str, ...] | None
    images: int
    input_size: tuple[int, int]
    hyperparameters: dict[str, Any]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    split: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"train": 0.6, "val": 0.2, "test": 0.2}
    )


class Recipe(abc.ABC):
    """How to train one model plugin: the paper's protocol, with every choice overridable.

    :param plugin: the registered plugin (its spec gives the classes, input size and normalisation).
    :param hyperparameters: overrides of :attr:`HYPERPARAMETERS` (values or command-line text).
    :param options: overrides of the plugin's options (command-line text is parsed).
    :param input_size: model input (height, width); the spec's by default.
    :raises ValueError: naming the key, for an unknown hyperparameter or option or a bad value.
    """

    #: The plugin's name (``plugins.models.<name>``).
    name: ClassVar[str]
    #: Modality of the images (for images that are not DICOM and so have no header).
    modality: ClassVar[str]
    #: One line on where the protocol comes from.
    summary: ClassVar[str]
    #: Hyperparameters and their defaults.
    HYPERPARAMETERS: ClassVar[dict[str, Hyper]]
    #: Train / validation / test shares of images, split by patient.
    split: ClassVar[dict[str, float]]
    #: Data sets on which the paper used k-fold cross-validation, and k.
    kfold_datasets: ClassVar[dict[str, int]] = {}
    #: Share of each fold's training part held out for validation.
    kfold_val_share: ClassVar[float] = 0.1
    #: Named backbones that ``--imagenet KEY=PATH`` can initialise; the first is the default key.
    imagenet_backbones: ClassVar[dict[str, tuple[str, str, tuple[str, ...]]]] = {}
    #: The model localises lesions (evaluation reports Dice where masks exist).
    localises: ClassVar[bool] = False
    #: Largest side of a prepared training image, as a multiple of the input's largest side.
    working_scale: ClassVar[float] = 1.25
    #: Whether the plugin's CLAHE runs before the resize (the base plugin) or after (hybrid BI-RADS).
    clahe_before_resize: ClassVar[bool] = True
    #: Plugin-specific options that only change what is explained, never what is predicted.
    runtime_options: ClassVar[frozenset[str]] = frozenset()
    #: How ``pacs-triage demo-weights`` trains this model on phantoms; None = no demo weights.
    demo_profile: ClassVar[DemoProfile | None] = None
    #: Figures the model's paper shows beyond the confusion matrix, ROC and reliability curves that
    #: every evaluation draws: ``decision_curve`` and ``tsne``.
    paper_figures: ClassVar[tuple[str, ...]] = ()
    #: Runs of the paper's protocol with different seeds, reported as mean ± std (``train --repeats``).
    paper_repeats: ClassVar[int] = 1

    def __init__(
        self,
        plugin: TorchModelPlugin,
        *,
        hyperparameters: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        if plugin.name != self.name:
            raise ValueError(f"{type(self).__name__} trains {self.name!r}, not {plugin.name!r}")
        self.hp = self._resolve(
            "hyperparameter", {k: h.default for k, h in self.HYPERPARAMETERS.items()}, hyperparameters or {}
        )
        self.options = self._resolve("option", dict(plugin.default_options), options or {})
        spec = plugin.spec
        if input_size is not None:
            spec = dataclasses.replace(spec, input_size=(int(input_size[0]), int(input_size[1])))
        self.plugin = plugin.bind(spec, demo_weights=False, weights_sha256="")
        self.configure()

    @staticmethod
    def _resolve(kind: str, defaults: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise ValueError(f"unknown {kind} {', '.join(unknown)}; known: {', '.join(sorted(defaults))}")
        resolved = dict(defaults)
        for key, value in overrides.items():
            resolved[key] = _coerce(f"{kind} {key}", value, defaults[key])
        return resolved

    def configure(self) -> None:
        """Check the settings (``ValueError`` before any data is read) and derive what follows from them."""
        for key in ("epochs", "batch_size"):
            if int(self.hp[key]) < 1:
                raise ValueError(f"hyperparameter {key} must be at least 1, got {self.hp[key]}")
        if self.hp["monitor"] not in _MONITORS:
            raise ValueError(f"monitor {self.hp['monitor']!r} is not one of {', '.join(_MONITORS)}")
        if self.hp.get("optimizer", "sgd") not in ("sgd", "adam"):
            raise ValueError(f"optimizer {self.hp['optimizer']!r} is not sgd or adam")

    # -- what the model is -------------------------------------------------------------------------

    @property
    def spec(self) -> ModelSpec:
        """The plugin's spec as trained (input size and normalisation included)."""
        return self.plugin.spec

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names in logit order."""
        return tuple(self.plugin.spec.classes)

    @property
    def input_size(self) -> tuple[int, int]:
        """Model input (height, width)."""
        return tuple(self.plugin.spec.input_size)  # type: ignore[return-value]

    @property
    def positive_class(self) -> str | None:
        """The positive class of binary metrics; None for multi-class (macro) reports."""
        return self.classes[1] if len(self.classes) == 2 else None

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Train and serve with this mean/std (the exported checkpoint records it)."""
        spec = dataclasses.replace(self.plugin.spec, mean=tuple(mean), std=tuple(std))
        self.plugin = self.plugin.bind(spec, demo_weights=False, weights_sha256="")

    def build_model(self) -> nn.Module:
        """The network with random weights, built by the plugin from the recipe's options."""
        return self.plugin.build_model(self.options)

    def load_imagenet(self, model: nn.Module, sources: Mapping[str, str]) -> list[str]:
        """Initialise backbones from ImageNet weights (local files) with timm's own loader.

        :param model: the model from :meth:`build_model`.
        :param sources: backbone key (see :attr:`imagenet_backbones`) -> file path.
        :returns: one line per backbone loaded.
        """
        if not self.imagenet_backbones:
            raise ValueError(f"{self.name} has no ImageNet backbone to initialise")
        done = []
        for key, source in sources.items():
            if key not in self.imagenet_backbones:
                raise ValueError(
                    f"{self.name} has no backbone {key!r}; "
                    f"--imagenet takes {', '.join(self.imagenet_backbones)}"
                )
            attribute, timm_name, allowed = self.imagenet_backbones[key]
            module = model.get_submodule(attribute) if attribute else model
            if module is None:
                raise ValueError(f"the model has no {attribute} (options {self.options})")
            load_timm_backbone(module, source, timm_name, allowed)
            done.append(f"{key}: {timm_name} from {source}")
        return done

    # -- labels ------------------------------------------------------------------------------------

    def label_index(self, record: Record) -> int | None:
        """The class index of *record*, or None to leave it out (e.g. "normal" for a benign/malignant model).

        :raises ValueError: for a label the model cannot learn.
        """
        label = record.label.strip().lower()
        lowered = [c.lower() for c in self.classes]
        if label in lowered:
            return lowered.index(label)
        raise ValueError(f"label {record.label!r} is not one of {', '.join(self.classes)}")

    # -- images ------------------------------------------------------------------------------------

    def prepare(self, image: np.ndarray, ref: ImageRef) -> np.ndarray:
        """What the plugin's preprocessing does before resizing (crop, laterality flip, grey, CLAHE),
        then a shrink of images much larger than the input; runs once per training image.

        :param image: the display-ready uint8 source image.
        :param ref: its header.
        """
        options = self.options
        top, left, height, width = pre.crop_box(image, ref, options["crop"])
        flip = bool(options["normalise_laterality"]) and pre.chest_wall_on_right(
            image, (top, left, height, width)
        )
        region = image[top : top + height, left : left + width]
        if flip:
            region = region[:, ::-1]
        if options["to_grey"]:
            region = pre.to_grey(np.ascontiguousarray(region))
        if options["clahe"] and self.clahe_before_resize:
            region = pre.apply_clahe(
                np.ascontiguousarray(region),
                float(options["clahe_clip_limit"]),
                int(options["clahe_tile_grid"]),
            )
        limit = self.working_scale * max(self.input_size)
        longest = max(region.shape[:2])
        if longest > limit:
            factor = limit / longest
            size = (max(1, round(region.shape[1] * factor)), max(1, round(region.shape[0] * factor)))
            region = cv2.resize(np.ascontiguousarray(region), size, interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(region)

    def eval_input(self, image: np.ndarray, ref: ImageRef) -> torch.Tensor:
        """The plugin's own preprocessing of a validation or test image (no augmentation)."""
        tensor, _box = self.plugin.preprocess(image, ref, self.options)
        return tensor

    def train_input(self, prepared: np.ndarray, seed: int) -> torch.Tensor:
        """A prepared image as a training input ``[3, H, W]``: the paper's augmentation, resize and
        normalisation, or (hyperparameter ``augment`` false) the plugin's own preprocessing only.

        :param prepared: from :meth:`prepare`.
        :param seed: this sample's seed for this epoch (same seed, same augmentation).
        """
        if self.hp["augment"]:
            return self.augmented_input(prepared, seed)
        return self.plain_input(prepared)

    def plain_input(self, prepared: np.ndarray) -> torch.Tensor:
        """The plugin's ``preprocess`` of a prepared image, whose crop, flip, grey (and CLAHE where the
        plugin applies it before resizing) are done already."""
        options = {
            **self.options,
            "crop": "none",
            "normalise_laterality": False,
            "clahe": bool(self.options["clahe"]) and not self.clahe_before_resize,
        }
        ref = ImageRef(
            path=Path("prepared"),
            study_instance_uid="2.25.0",
            series_instance_uid="2.25.0",
            sop_instance_uid="2.25.0",
            sop_class_uid="",
            modality=self.modality,
        )
        tensor, _box = self.plugin.preprocess(prepared, ref, options)
        return tensor

    @abc.abstractmethod
    def augmented_input(self, prepared: np.ndarray, seed: int) -> torch.Tensor:
        """The paper's augmentation, resize and normalisation of a prepared image -> ``[3, H, W]``.

        :param prepared: from :meth:`prepare`.
        :param seed: this sample's seed for this epoch.
        """

    def fit_normalisation(self, prepared_train_images: Sequence[np.ndarray]) -> None:  # noqa: B027
        """Fit normalisation statistics on the training split, where the paper does (default: none)."""

    # -- optimisation ------------------------------------------------------------------------------

    def sampler(self, labels: Sequence[int], seed: int) -> Sampler[int] | None:
        """The training sampler (with ``set_epoch`` where it reshuffles); None = plain shuffling."""
        return None

    @abc.abstractmethod
    def loss(
        self, output: Any, target: torch.Tensor, epoch: int, train_labels: Sequence[int]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of one batch and its parts (for the log).

        :param output: what the model returned.
        :param target: class indices.
        :param epoch: 0-based epoch over all stages (LEM's alpha schedule).
        :param train_labels: the training split's labels (class weights).
        """

    def logits(self, output: Any) -> torch.Tensor:
        """``[B, K]`` class logits from the model's output."""
        return output

    @abc.abstractmethod
    def stages(self, steps_per_epoch: int) -> list[Stage]:
        """The training phases in order."""

    @property
    def patience(self) -> int:
        """Early-stopping patience in epochs (0 = no early stopping)."""
        return int(self.hp.get("patience", 0) or 0)

    @property
    def monitor(self) -> Monitor:
        """What early stopping and best-model selection watch; "none" keeps the last epoch's weights."""
        return self.hp["monitor"]

    # -- checkpoint --------------------------------------------------------------------------------

    def checkpoint_options(self) -> dict[str, Any]:
        """The options the exported checkpoint records: everything that changes the pixels or the network.

        Explanation and runtime switches are left to the site's configuration.
        """
        model_keys = set(self.options) - set(BASE_OPTIONS)
        keys = [k for k in self.options if k in _PREPROCESSING_OPTIONS or k in model_keys]
        return {k: self.options[k] for k in keys if k not in self.runtime_options}

    def describe(self) -> str:
        """The hyperparameters as a table: name, value, tag, help."""
        lines = [f"{self.name}: {self.summary}", f"split {self.split}, monitor {self.monitor}"]
        if self.kfold_datasets:
            lines.append(f"k-fold on {', '.join(f'{k} (k={v})' for k, v in self.kfold_datasets.items())}")
        width = max(len(k) for k in self.HYPERPARAMETERS)
        for key, hyper in self.HYPERPARAMETERS.items():
            value = self.hp[key]
            mark = "" if value == hyper.default else f" (default {hyper.default})"
            lines.append(f"  {key:<{width}}  {value!s:<12} [{hyper.tag}] {hyper.help}{mark}")
        options = self.checkpoint_options()
        lines.append("plugin options (--option KEY=VALUE; the checkpoint records them):")
        lines.extend(f"  {key} = {value!r}" for key, value in options.items())
        lines.append(f"input size {self.input_size[0]}x{self.input_size[1]} (--input-size)")
        return "\n".join(lines)


def adam(params: list[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with betas (0.9, 0.999), fused where the device supports it (3x faster steps on a CPU)."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)


def adam_factory(
    lr: float, weight_decay: float = 0.0
) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    return lambda params: adam(params, lr, weight_decay)


def sgd_or_adam(hp: Mapping[str, Any], params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum (the papers that name SGD), or Adam with the same learning rate and weight decay."""
    if hp["optimizer"] == "sgd":
        return torch.optim.SGD(
            params, lr=float(hp["lr"]), momentum=float(hp["momentum"]), weight_decay=float(hp["weight_decay"])
        )
    if hp["optimizer"] == "adam":
        return adam(params, float(hp["lr"]), float(hp["weight_decay"]))
    raise ValueError(f"optimizer {hp['optimizer']!r} is not sgd or adam")


def all_trainable(model: nn.Module) -> list[nn.Parameter]:
    for param in model.parameters():
        param.requires_grad_(True)
    return list(model.parameters())
