"""The training loop and the whole ``pacs-triage train`` run: split, train, calibrate, export, evaluate.

:func:`train` takes records from a data-set adapter and a model plugin's name and does, in order:

1. split by patient (the recipe's shares, the data set's official split, or k folds where the paper used
   cross-validation);
2. train with the recipe (:mod:`training.recipes`): seeded, with progress bars and ETAs, mixed
   precision (float16 on a GPU, bfloat16 on request on the CPU) and worker processes, a resumable state
   file written after every epoch;
3. export the best weights as a checkpoint the plugin loads (:func:`plugins.weights.save_checkpoint`),
   run the validation split through the plugin's own inference path and fit the temperature there
   (ECE before and after), and write the checkpoint again with the temperature;
4. evaluate the test split through the plugin (:mod:`training.evaluate`): every metric, the
   confusion matrix and ROC as PNG, a JSON summary, the paper's table beside ours.

Runs are reproducible: the sampler, every sample's augmentation and dropout draw from seeds derived from
``seed``, the epoch and the sample, so an interrupted run resumed with ``resume=True`` ends with the same
weights as an uninterrupted one (on the same device and library versions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import structlog
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gateway.settings import Settings
from plugins.host import ModelHost
from plugins.preprocess import decode_frames, read_image_ref
from plugins.synthetic import Kind, write_dataset_dir
from plugins.types import ImageRef, OperatingPoint, RiskCalibrator
from plugins.weights import CheckpointMetadata, save_checkpoint
from training.calibration import CalibrationReport, choose_operating_points, reliability_at_prevalence
from training.datasets import (
    Record,
    assert_no_patient_leak,
    dataset_fingerprint,
    describe_records,
    kfold_records,
    load_generic_csv,
    official_split,
    split_records,
)
from training.evaluate import (
    Evaluation,
    comparison_text,
    evaluate_checkpoint,
    is_dicom,
    raster_ref,
    read_image,
    summary_lines,
    training_info,
    write_evaluation,
)
from training.metrics import calibrate, mean_std, roc_auc, roc_auc_ovr, softmax, youden_threshold
from training.recipes import Recipe
from training.registry import recipe_class

__all__ = [
    "STATE_FILE",
    "BestTracker",
    "FitResult",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "amp_dtype",
    "deploy_checkpoint",
    "export_checkpoint",
    "held_out_records",
    "load_training_image",
    "record_targets",
    "seed_everything",
    "train",
    "train_demo",
]

log = structlog.get_logger(__name__)

#: The resumable state in the output folder, rewritten after every epoch.
STATE_FILE = "train_state.pt"
_STATE_VERSION = 1
#: Prepared training images are kept in memory below this many bytes (estimated).
_CACHE_BUDGET_BYTES = 2 * 1024**3


class TrainingInterrupted(RuntimeError):
    """Raised when a run stops on purpose after ``stop_after_epochs`` (the state file is saved)."""


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast type of mixed precision on *device*: float16 on CUDA (with a gradient scaler, since its
    range underflows small gradients), bfloat16 on the CPU (the half type CPUs have instructions for, such as
    AVX512-BF16 and AMX; it keeps float32's range, so it needs no scaler).

    :raises ValueError: for a device type without autocast support here.
    """
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    raise ValueError(
        f"AMP (mixed precision) runs on CUDA or the CPU, not on {device}; turn it off (--no-amp)"
    )


def _float32(output: Any) -> Any:
    """*output* (a tensor, or tuples, lists and dicts of them) with floating tensors cast to float32.

    The loss and the probabilities are computed from this, outside autocast, so that a bfloat16 or float16
    forward pass never reaches a softmax or a log at reduced precision.
    """
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a named tuple takes its fields apart
        return type(output)(*(_float32(item) for item in output))
    if isinstance(output, tuple | list):
        return type(output)(_float32(item) for item in output)
    if isinstance(output, Mapping):
        return {key: _float32(value) for key, value in output.items()}
    return output


def _loader_worker_init(_worker_id: int) -> None:
    # Each worker would otherwise start as many torch and OpenCV threads as there are cores, so N workers
    # oversubscribe the machine N times over and slow the main process's training step.
    torch.set_num_threads(1)
    cv2.setNumThreads(0)  # 0: OpenCV runs sequentially in this process


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from *parts*, the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def record_targets(recipe: Recipe, records: Sequence[Record]) -> list[int | None]:
    """Each record's class index (None = left out by the recipe), with errors naming the file and row."""
    targets = []
    for record in records:
        try:
            targets.append(recipe.label_index(record))
        except ValueError as error:
            row = record.extra.get("row")
            where = f"{record.extra.get('table', record.path)}" + (f", row {row}" if row else "")
            raise ValueError(f"{where} ({record.path}): {error}") from None
    return targets


def load_training_image(record: Record, recipe: Recipe) -> tuple[ImageRef, np.ndarray]:
    """The header and the display-ready image of *record*, decoded as the host decodes it.

    DICOM goes through :func:`plugins.preprocess.decode_frames` with the plugin's ``frames`` policy (the
    first frame it returns); PNG/PGM/TIFF through OpenCV.
    """
    if not is_dicom(record.path):
        sop_class = (recipe.spec.accepts.sop_class_uids or ("",))[0]
        return raster_ref(record.path, recipe.modality, sop_class), read_image(record.path)
    ref = read_image_ref(record.path)
    frames = decode_frames(record.path, recipe.options["frames"])
    index, image = frames[0]
    return dataclasses.replace(ref, frame_index=index), image


class TrainingSet(Dataset[tuple[torch.Tensor, int]]):
    """Training images: prepared once (cached in memory when they fit), augmented afresh every epoch.

    :param recipe: the recipe (``prepare`` and ``train_input``).
    :param records: the images.
    :param targets: their class indices.
    :param seed: the run's seed; sample *i* of epoch *e* is augmented with a seed derived from (seed, e, i).
    :param cache: keep prepared images in memory.
    """

    def __init__(
        self, recipe: Recipe, records: Sequence[Record], targets: Sequence[int], seed: int, cache: bool
    ) -> None:
        self.recipe, self.records, self.targets = recipe, list(records), list(targets)
        self.seed, self.epoch = seed, 0
        augment = bool(recipe.hp["augment"])
        # Without augmentation a training image is exactly what the plugin feeds the model at inference, as
        # for validation: a second resize of a prepared image would give other pixels (and, with a letterbox,
        # another placement) than the model is validated and deployed on.
        self.plain: EvalSet | None = None if augment else EvalSet(recipe, records, targets, cache)
        # Prepared images are the augmentation's input, so they are only kept when there is augmentation.
        self.cache: list[np.ndarray | None] | None = [None] * len(records) if cache and augment else None

    def __len__(self) -> int:
        return len(self.records)

    def prepared(self, index: int) -> np.ndarray:
        if self.cache is not None and self.cache[index] is not None:
            return self.cache[index]  # type: ignore[return-value]
        ref, image = load_training_image(self.records[index], self.recipe)
        prepared = self.recipe.prepare(image, ref)
        if self.cache is not None:
            self.cache[index] = prepared
        return prepared

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.plain is not None:
            return self.plain[index]
        sample_seed = derive_seed(self.seed, "augment", self.epoch, index)
        tensor = self.recipe.train_input(self.prepared(index), sample_seed)
        return tensor, self.targets[index]


class EvalSet(Dataset[tuple[torch.Tensor, int]]):
    """Validation images through the plugin's own preprocessing, computed once when they fit in memory."""

    def __init__(
        self, recipe: Recipe, records: Sequence[Record], targets: Sequence[int], cache: bool
    ) -> None:
        self.recipe, self.records, self.targets = recipe, list(records), list(targets)
        self.cache: list[torch.Tensor | None] | None = [None] * len(records) if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.cache is not None and self.cache[index] is not None:
            return self.cache[index], self.targets[index]  # type: ignore[return-value]
        ref, image = load_training_image(self.records[index], self.recipe)
        tensor = self.recipe.eval_input(image, ref)
        if self.cache is not None:
            self.cache[index] = tensor
        return tensor, self.targets[index]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to run the training loop (not what to train: that is the recipe)."""

    out_dir: Path
    seed: int = 42
    #: "auto" (CUDA when available), "cpu", "cuda" or "cuda:1".
    device: str = "auto"
    #: Mixed precision: float16 with a gradient scaler on CUDA, bfloat16 on the CPU; None = on CUDA only.
    amp: bool | None = None
    #: DataLoader worker processes (0 = load in the main process); None = up to 8 on CUDA, 0 on the CPU.
    workers: int | None = None
    #: Progress bars; None = when stderr is a terminal.
    progress: bool | None = None
    resume: bool = False
    #: "auto" (memory when the prepared images fit the budget), "memory" or "none".
    cache: str = "auto"
    #: Backbone key -> ImageNet weights file; empty = random initialisation.
    imagenet: Mapping[str, str] = field(default_factory=dict)
    #: Stop (saving the state) after this many epochs of this invocation; None = run to the end.
    stop_after_epochs: int | None = None
    #: The deployment prevalence of positives: the risk is calibrated at it on the validation split
    #: (training.calibration); None = no calibrator, the risk stays the model's suspicion score.
    prevalence: float | None = None
    #: ``platt`` (with an intercept) or ``isotonic``.
    calibration_method: str = "platt"
    #: The sensitivity of the ``high_sensitivity`` and the specificity of the ``high_specificity`` point.
    target_sensitivity: float = 0.95
    target_specificity: float = 0.90

    def torch_device(self) -> torch.device:
        """The torch device ``device`` names ("auto": CUDA when available)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} was asked for but CUDA is not available")
        return device


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """What one training run produced."""

    model: nn.Module
    history: list[dict[str, Any]]
    #: Best value of the recipe's monitor on the validation split (None without validation or monitor).
    best_monitor: float | None
    epochs: int
    seconds: float
    images_per_second: float


class BestTracker:
    """Best-so-far weights of one stage and the epochs since the monitor last improved."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.best: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0

    def step(self, value: float, model: nn.Module) -> bool:
        """Record *value*; True when it improved (and the weights were kept)."""
        improved = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if improved:
            self.best = value
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return improved

    def state(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "best": self.best,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.mode, self.best = state["mode"], state["best"]
        self.best_state, self.bad_epochs = state["best_state"], state["bad_epochs"]


class Trainer:
    """Runs a recipe's stages on a model: epochs, validation, schedulers, early stopping, resumable state.

    :param recipe: what to train and how.
    :param config: the loop's settings.
    :param train_records: the training split.
    :param val_records: the validation split (may be empty: no monitor then).
    :param log_line: where progress lines go (``tqdm.write`` by default).
    """

    def __init__(
        self,
        recipe: Recipe,
        config: TrainConfig,
        train_records: Sequence[Record],
        val_records: Sequence[Record],
        *,
        log_line: Callable[[str], None] | None = None,
    ) -> None:
        self.recipe, self.config = recipe, config
        self.device = config.torch_device()
        self.amp = bool(config.amp if config.amp is not None else self.device.type == "cuda")
        #: The autocast type when :attr:`amp` is on (float32 when off, for the record).
        self.amp_dtype = amp_dtype(self.device) if self.amp else torch.float32
        workers = config.workers
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be 0 (load in the main process) or more, got {workers}")
        self.workers = (
            (min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 0) if workers is None else workers
        )
        self.log_line = log_line or (lambda line: tqdm.write(line, file=sys.stderr))
        train_targets = record_targets(recipe, train_records)
        val_targets = record_targets(recipe, val_records)
        self.train_records = [r for r, t in zip(train_records, train_targets, strict=True) if t is not None]
        self.train_labels = [t for t in train_targets if t is not None]
        self.val_records = [r for r, t in zip(val_records, val_targets, strict=True) if t is not None]
        self.val_labels = [t for t in val_targets if t is not None]
        if not self.train_records:
            raise ValueError("the training split has no image the model can learn from")
        missing = sorted(set(range(len(recipe.classes))) - set(self.train_labels))
        if missing:
            log.warning("train.class_missing", classes=[recipe.classes[i] for i in missing])
        cache = self._cache_decision(len(self.train_records) + len(self.val_records))
        self.train_set = TrainingSet(recipe, self.train_records, self.train_labels, config.seed, cache)
        self.val_set = EvalSet(recipe, self.val_records, self.val_labels, cache)
        self.monitor = recipe.monitor
        if self.monitor == "val_auc" and len(set(self.val_labels)) < 2:
            self.monitor = "val_loss"
            log.warning("train.monitor_fallback", reason="the validation split lacks a class; AUC undefined")
        if not self.val_records:
            self.monitor = "none"
        self.state_path = config.out_dir / STATE_FILE

    def _cache_decision(self, n_images: int) -> bool:
        if self.config.cache in ("memory", "none"):
            return self.config.cache == "memory"
        if self.config.cache != "auto":
            raise ValueError(f"cache {self.config.cache!r} is not auto, memory or none")
        height, width = self.recipe.input_size
        # A prepared image is at most working_scale x the input on its long side; the eval tensors are float.
        per_image = (self.recipe.working_scale**2) * height * width + 12 * height * width
        return n_images * per_image < _CACHE_BUDGET_BYTES

    # -- the run -----------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """What must not change between a run and its resumption."""
        body = {
            "recipe": self.recipe.name,
            "hp": self.recipe.hp,
            "options": self.recipe.options,
            "input_size": self.recipe.input_size,
            "seed": self.config.seed,
            "train": sorted(str(r.path) for r in self.train_records),
            "val": sorted(str(r.path) for r in self.val_records),
            "imagenet": dict(self.config.imagenet),
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()

    def preload(self) -> None:
        """Decode and prepare every image once, filling the caches, and fit the normalisation on the training
        split where the recipe does; with a progress bar.  Without caches only the fitting reads images."""
        fits = type(self.recipe).fit_normalisation is not Recipe.fit_normalisation
        read_train = self.train_set.cache is not None or fits
        read_val = self.val_set.cache is not None
        total = len(self.train_set) * read_train + len(self.val_set) * read_val
        with tqdm(
            total=total, desc="decoding", unit="img", disable=_disable(self.config.progress), leave=False
        ) as bar:
            prepared = []
            for index in range(len(self.train_set) if read_train else 0):
                prepared.append(self.train_set.prepared(index))
                bar.update()
            self.recipe.fit_normalisation(prepared)
            prepared.clear()
            for index in range(len(self.val_set) if read_val else 0):
                self.val_set[index]
                bar.update()

    def prepare(self) -> None:
        """Read the resumable state (when resuming) or decode the images and fit the normalisation.

        Call before building the model, so that it is built with the normalisation it is trained with.
        """
        self._resumed = self._load_state(self.fingerprint()) if self.config.resume else None
        if self._resumed is None:
            self.preload()
        else:
            # The normalisation was fitted before the interruption; the state carries it.
            self.recipe.set_normalisation(self._resumed["mean"], self._resumed["std"])

    @property
    def resuming(self) -> bool:
        """True when :meth:`prepare` found a state file to resume from."""
        return getattr(self, "_resumed", None) is not None

    def fit(self, model: nn.Module) -> FitResult:
        """Train *model* through every stage (from the state file when resuming), restoring the best weights
        of each monitored stage at its end, and return it in eval mode."""
        config, recipe = self.config, self.recipe
        config.out_dir.mkdir(parents=True, exist_ok=True)
        if not hasattr(self, "_resumed"):
            self.prepare()
        resumed: dict[str, Any] | None = self._resumed
        fingerprint = self.fingerprint()
        if resumed is not None:
            model.load_state_dict(resumed["final_model"] if resumed["finished"] else resumed["model"])
        model.to(self.device)
        steps = max(1, math.ceil(self._epoch_length() / int(recipe.hp["batch_size"])))
        stages = recipe.stages(steps)
        history: list[dict[str, Any]] = list(resumed["history"]) if resumed else []
        completed_bests: list[float | None] = list(resumed["completed_bests"]) if resumed else []
        start_stage = resumed["stage"] if resumed else 0
        if resumed and resumed["finished"]:
            start_stage = len(stages)
        global_epoch = len(history)
        scaler = torch.amp.GradScaler("cuda", enabled=self.uses_scaler)
        epochs_this_run, images_seen = 0, 0
        started = time.perf_counter()
        for stage_index in range(start_stage, len(stages)):
            stage = stages[stage_index]
            optimizer = stage.optimizer(stage.trainable(model))
            scheduler = stage.scheduler(optimizer, steps) if stage.scheduler is not None else None
            tracker = BestTracker("min" if self.monitor == "val_loss" else "max")
            first_epoch = 0
            if resumed is not None and stage_index == resumed["stage"]:
                optimizer.load_state_dict(resumed["optimizer"])
                if scheduler is not None and resumed["scheduler"] is not None:
                    scheduler.load_state_dict(resumed["scheduler"])
                if resumed["scaler"]:  # empty when saved without a scaler (AMP off, or bfloat16)
                    scaler.load_state_dict(resumed["scaler"])
                tracker.load(resumed["tracker"])
                first_epoch = resumed["epoch_in_stage"] + 1
            stopped = self._should_stop(stage, tracker)
            for epoch in range(first_epoch, stage.epochs):
                if stopped:
                    break
                if config.stop_after_epochs is not None and epochs_this_run >= config.stop_after_epochs:
                    raise TrainingInterrupted(
                        f"stopped after {epochs_this_run} epochs as asked; resume with the same output folder"
                    )
                row = self._epoch(
                    model, stage, stage_index, epoch, global_epoch, optimizer, scheduler, scaler
                )
                images_seen += row["images"]
                row["best"] = self.monitor != "none" and tracker.step(row[self.monitor], model)
                if scheduler is not None and stage.scheduler_step == "epoch":
                    scheduler.step()
                elif scheduler is not None and stage.scheduler_step == "plateau" and "val_loss" in row:
                    scheduler.step(row["val_loss"])
                history.append(row)
                self.log_line(self._format_row(row, stage.name))
                stopped = self._should_stop(stage, tracker)
                global_epoch += 1
                epochs_this_run += 1
                self._save_state(
                    fingerprint,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    tracker=tracker,
                    stage=stage_index,
                    epoch_in_stage=epoch,
                    history=history,
                    completed_bests=completed_bests,
                )
            if stopped:
                self.log_line(
                    f"{stage.name}: early stop, no better {self.monitor} for {tracker.bad_epochs} epochs"
                )
            if tracker.best_state is not None:
                model.load_state_dict(tracker.best_state)
                self.log_line(
                    f"{stage.name}: kept the weights with the best {self.monitor}, {tracker.best:.4f}"
                )
            completed_bests.append(tracker.best)
        seconds = time.perf_counter() - started
        if not (resumed and resumed["finished"]):
            self._save_final(model, history, completed_bests)
        bests = [b for b in completed_bests if b is not None]
        return FitResult(
            model=model.eval(),
            history=history,
            best_monitor=bests[-1] if bests else None,
            epochs=len(history),
            seconds=seconds,
            images_per_second=images_seen / seconds if images_seen and seconds > 0 else 0.0,
        )

    @property
    def uses_scaler(self) -> bool:
        """True when the loss is scaled: float16 autocast only (bfloat16 has float32's exponent range)."""
        return self.amp and self.amp_dtype == torch.float16

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def _should_stop(self, stage: Any, tracker: BestTracker) -> bool:
        patience = self.recipe.patience
        return bool(
            stage.early_stopping
            and self.monitor != "none"
            and patience > 0
            and tracker.bad_epochs >= patience
        )

    def _epoch_length(self) -> int:
        sampler = self.recipe.sampler(self.train_labels, 0)
        return len(sampler) if sampler is not None else len(self.train_set)  # type: ignore[arg-type]

    def _loader(self, dataset: Dataset[Any], *, epoch_seed: int, train: bool) -> DataLoader[Any]:
        batch_size = int(self.recipe.hp["batch_size"])
        sampler = self.recipe.sampler(self.train_labels, epoch_seed) if train else None
        length = len(sampler) if sampler is not None else len(dataset)  # type: ignore[arg-type]
        workers = self.workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            generator=torch.Generator().manual_seed(epoch_seed),
            num_workers=workers,
            worker_init_fn=_loader_worker_init if workers > 0 else None,
            # Spawned, not forked: a process that has run threads (tqdm's monitor, a host's output builder,
            # a test suite's servers) can hand a forked worker a lock held for ever; seen as a loader that
            # waited on its workers for good.
            multiprocessing_context="spawn" if workers > 0 else None,
            pin_memory=self.device.type == "cuda",
            # Not persistent: a loader serves one epoch (its sampler is that epoch's), and a worker keeps the
            # copy of the data set it started with, so a persistent one would augment with a stale epoch.
            persistent_workers=False,
            # A last batch of one image breaks batch norm in training mode.
            drop_last=train and length % batch_size == 1 and length > 1,
        )

    def _epoch(
        self,
        model: nn.Module,
        stage: Any,
        stage_index: int,
        epoch: int,
        global_epoch: int,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
    ) -> dict[str, Any]:
        recipe, device = self.recipe, self.device
        self.train_set.epoch = global_epoch
        # Dropout and any other draw inside the model follow the epoch, so a resumed run matches.
        torch.manual_seed(derive_seed(self.config.seed, "model", global_epoch))
        loader = self._loader(
            self.train_set, epoch_seed=derive_seed(self.config.seed, "order", global_epoch), train=True
        )
        model.train()
        started = time.perf_counter()
        total, count = 0.0, 0
        parts: dict[str, float] = {}
        description = f"{recipe.name} {stage.name} epoch {epoch + 1}/{stage.epochs}"
        with tqdm(
            total=len(loader),
            desc=description,
            unit="batch",
            disable=_disable(self.config.progress),
            leave=False,
        ) as bar:
            for inputs, targets in loader:
                inputs = inputs.to(device, non_blocking=True)
                targets = torch.as_tensor(targets, dtype=torch.long).to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with self._autocast():
                    output = model(inputs)
                loss, loss_parts = recipe.loss(_float32(output), targets, global_epoch, self.train_labels)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the training loss became {float(loss)} in {description}; lower the learning rate"
                    )
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if scheduler is not None and stage.scheduler_step == "batch":
                    scheduler.step()
                n = inputs.shape[0]
                total += float(loss.detach()) * n
                count += n
                for key, value in loss_parts.items():
                    parts[key] = parts.get(key, 0.0) + value * n
                bar.set_postfix(loss=f"{total / count:.4f}")
                bar.update()
        seconds = time.perf_counter() - started
        row: dict[str, Any] = {
            "stage": stage_index,
            "stage_name": stage.name,
            "epoch": global_epoch,
            "train_loss": total / max(1, count),
            **{f"train_{k}": v / max(1, count) for k, v in parts.items()},
            "lr": float(optimizer.param_groups[0]["lr"]),
            "images": count,
            "seconds": seconds,
            "images_per_second": count / seconds if seconds > 0 else 0.0,
        }
        if self.val_records:
            row.update(self.validate(model, global_epoch))
        return row

    @torch.no_grad()
    def validate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Loss, accuracy and AUC of the validation split (in-process, for monitoring only)."""
        recipe, device = self.recipe, self.device
        model.eval()
        loader = self._loader(self.val_set, epoch_seed=0, train=False)
        losses, logits_all, targets_all = [], [], []
        for inputs, targets in loader:
            inputs = inputs.to(device, non_blocking=True)
            targets = torch.as_tensor(targets, dtype=torch.long).to(device, non_blocking=True)
            with self._autocast():
                output = _float32(model(inputs))
            loss, _ = recipe.loss(output, targets, epoch, self.train_labels)
            losses.append(float(loss) * inputs.shape[0])
            logits_all.append(recipe.logits(output).float().cpu().numpy())
            targets_all.append(targets.cpu().numpy())
        logits = np.concatenate(logits_all)
        targets_np = np.concatenate(targets_all)
        probabilities = softmax(logits)
        row = {
            "val_loss": float(sum(losses) / len(targets_np)),
            "val_accuracy": float(np.mean(probabilities.argmax(axis=1) == targets_np)),
        }
        present = np.unique(targets_np)
        if present.size >= 2:
            if probabilities.shape[1] == 2:
                row["val_auc"] = roc_auc(targets_np, probabilities[:, 1])
            else:
                row["val_auc"] = roc_auc_ovr(targets_np, probabilities)[0]
        return row

    @staticmethod
    def _format_row(row: Mapping[str, Any], stage: str) -> str:
        text = f"epoch {row['epoch'] + 1} ({stage}): train loss {row['train_loss']:.4f}"
        for key in ("val_loss", "val_accuracy", "val_auc"):
            if key in row:
                text += f", {key.replace('_', ' ')} {row[key]:.4f}"
        text += f", lr {row['lr']:.2e}, {row['images_per_second']:.1f} img/s"
        return text + (" *" if row.get("best") else "")

    # -- state -------------------------------------------------------------------------------------

    def _save_state(
        self,
        fingerprint: str,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
        tracker: BestTracker,
        **fields: Any,
    ) -> None:
        self._write_state(
            {
                "version": _STATE_VERSION,
                "fingerprint": fingerprint,
                "finished": False,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "tracker": tracker.state(),
                "mean": list(self.recipe.spec.mean),
                "std": list(self.recipe.spec.std),
                **fields,
            }
        )

    def _save_final(self, model: nn.Module, history: list[dict[str, Any]], bests: list[float | None]) -> None:
        """Mark the state finished, with the final weights, so a resumed run goes straight to the export."""
        if not self.state_path.is_file():
            return
        state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        state.update(
            finished=True,
            history=history,
            completed_bests=bests,
            final_model={k: v.detach().cpu() for k, v in model.state_dict().items()},
        )
        self._write_state(state)

    def _write_state(self, state: dict[str, Any]) -> None:
        temporary = self.state_path.with_suffix(".tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.state_path)  # atomic: an interruption leaves the old state or the new one

    def _load_state(self, fingerprint: str) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            self.log_line(f"no {self.state_path} to resume from; starting afresh")
            return None
        # The file holds optimiser and scheduler state dicts (plain Python objects) written by this trainer.
        state: dict[str, Any] = torch.load(self.state_path, map_location="cpu", weights_only=False)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"{self.state_path} was written by another version of the trainer; start afresh")
        if state.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{self.state_path} belongs to a different run (recipe, data, seed or split changed); "
                "use another output folder or start without --resume"
            )
        done = (
            "finished"
            if state["finished"]
            else f"stage {state['stage'] + 1}, epoch {state['epoch_in_stage'] + 1} done"
        )
        self.log_line(f"resuming from {self.state_path}: {done}")
        if not state["finished"] and self.train_set.cache is not None:
            with tqdm(
                total=len(self.train_set),
                desc="decoding",
                unit="img",
                disable=_disable(self.config.progress),
                leave=False,
            ) as bar:
                for index in range(len(self.train_set)):
                    self.train_set.prepared(index)
                    bar.update()
        return state


# ---------------------------------------------------------------------------------------------------------
# Export and deployment


def export_checkpoint(
    recipe: Recipe,
    model: nn.Module,
    path: Path,
    *,
    training_data: Mapping[str, Any],
    temperature: float | None = None,
    thresholds: Mapping[str, float] | None = None,
    version: str = "1.0",
    demo: bool = False,
    calibrator: RiskCalibrator | None = None,
    operating_points: Sequence[OperatingPoint] = (),
) -> CheckpointMetadata:
    """Write *model* as the checkpoint its plugin loads: architecture, version, classes, normalisation,
    input size, thresholds, temperature, options and the training data (description and sha256).

    :param recipe: the recipe it was trained with (spec and options as trained).
    :param model: the trained network.
    :param path: the ``.safetensors`` file (a JSON sidecar is written beside it).
    :param training_data: JSON-ready description of the data, the splits and the recipe.
    :param temperature: the calibration temperature, if fitted.
    :param thresholds: decision thresholds over the spec's.
    :param version: the weights' version.
    :param demo: label the weights as demo (every prediction made with them says so).
    :param calibrator: the prior-shift calibrator of the risk, if fitted.
    :param operating_points: thresholds on the served risk measured on a held-out split.
    """
    spec = recipe.spec
    metadata = CheckpointMetadata(
        architecture=spec.arch,
        model_id=spec.model_id,
        version=version,
        class_names=tuple(spec.classes),
        norm_mean=tuple(float(v) for v in spec.mean),
        norm_std=tuple(float(v) for v in spec.std),
        input_size=tuple(spec.input_size),  # type: ignore[arg-type]
        thresholds={**spec.thresholds, **dict(thresholds or {})},
        temperature=temperature,
        options=json.loads(json.dumps(recipe.checkpoint_options(), default=list)),
        training_data=json.dumps(training_data, sort_keys=True, default=str),
        demo=demo,
        calibrator=calibrator,
        operating_points=tuple(operating_points),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(model.cpu(), path, metadata)


def deploy_checkpoint(checkpoint: Path, name: str, config_path: Path) -> Path:
    """Point ``plugins.models.<name>.weights`` of the YAML config at *checkpoint* (created if missing).

    The file is validated with the new value before it is written; the previous version is kept as
    ``<file>.bak``.  Comments in the file are not kept (PyYAML).

    :param checkpoint: the exported ``.safetensors`` file.
    :param name: the plugin name.
    :param config_path: the YAML configuration the workers load.
    :returns: the config file written.
    """
    data: dict[str, Any] = {}
    if config_path.is_file():
        loaded = yaml.safe_load(config_path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path} does not hold a mapping at the top level")
        data = loaded
    plugins = data.setdefault("plugins", {}) or {}
    data["plugins"] = plugins
    models = plugins.setdefault("models", {}) or {}
    plugins["models"] = models
    model = models.setdefault(name, {}) or {}
    models[name] = model
    model["weights"] = str(checkpoint.resolve())
    Settings.model_validate(data)
    if config_path.is_file():
        shutil.copy2(config_path, config_path.with_name(config_path.name + ".bak"))
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return config_path


# ---------------------------------------------------------------------------------------------------------
# The whole run


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """Everything a ``train`` run produced."""

    checkpoint: Path
    metadata: CheckpointMetadata
    calibration: Any
    test: Evaluation | None
    history: list[dict[str, Any]]
    folds: list[dict[str, Any]] = field(default_factory=list)
    summary_path: Path | None = None


def _split_parts(
    recipe: Recipe, records: Sequence[Record], split: str | Mapping[str, float], seed: int
) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """The parts of one split and the description that re-makes it (:func:`held_out_records`)."""
    if split == "official":
        share = recipe.split["val"] / (recipe.split["train"] + recipe.split["val"])
        how: dict[str, Any] = {"method": "official", "val_share": share, "seed": seed}
    else:
        fractions = dict(recipe.split if split == "paper" else split)  # type: ignore[arg-type]
        for key in ("train", "val", "test"):
            fractions.setdefault(key, 0.0)
        how = {"method": "fractions", "fractions": fractions, "seed": seed, "recipe_split": split == "paper"}
    return remake_split(records, how), how


def remake_split(records: Sequence[Record], how: Mapping[str, Any]) -> dict[str, list[Record]]:
    """Re-make the split a description from :func:`_split_parts` (or the k-fold loop) gives, by patient.

    :param records: the whole data set.
    :param how: ``{"method": "fractions"|"official"|"kfold", ...}`` as recorded in a checkpoint.
    """
    method, seed = how["method"], int(how["seed"])
    if method == "fractions":
        # split_records breaks ties by part order, and JSON may have sorted the keys: fix the order.
        given = dict(how["fractions"])
        order = [k for k in ("train", "val", "test") if k in given] + sorted(
            set(given) - {"train", "val", "test"}
        )
        parts = split_records(records, {k: float(given[k]) for k in order}, seed=seed)
    elif method == "official":
        official = official_split(records)
        if "train" not in official or "test" not in official:
            raise ValueError(f"the official split has parts {sorted(official)}, not train and test")
        share = float(how["val_share"])
        inner = split_records(official["train"], {"train": 1 - share, "val": share}, seed=seed)
        parts = {"train": inner["train"], "val": inner["val"], "test": official["test"]}
    elif method == "kfold":
        k, fold, share = int(how["k"]), int(how["fold"]), float(how["val_share"])
        rest, test = kfold_records(records, k, seed=seed)[fold - 1]
        inner = split_records(rest, {"train": 1 - share, "val": share}, seed=seed + fold - 1)
        parts = {"train": inner["train"], "val": inner["val"], "test": test}
    else:
        raise ValueError(f"unknown split method {method!r}")
    assert_no_patient_leak(parts)
    return parts


def held_out_records(records: Sequence[Record], metadata: CheckpointMetadata, part: str) -> list[Record]:
    """One part (train, val or test) of the split *metadata*'s checkpoint was trained with, re-made.

    :param records: the same data set the checkpoint was trained on.
    :param metadata: the checkpoint's metadata (its ``training_data`` records the split).
    :param part: "train", "val" or "test".
    :raises ValueError: when the checkpoint records no split, or the data set differs from the one it was
        trained on (the split would then differ too, and could put training images in the test part).
    """
    info = training_info(metadata)
    how = info.get("split")
    if not isinstance(how, dict) or "method" not in how:
        raise ValueError("the checkpoint does not record its split; evaluate with --split all")
    recorded = info.get("sha256")
    actual = dataset_fingerprint(records)
    if recorded and recorded != actual:
        raise ValueError(
            f"these records (sha256 {actual[:12]}...) are not the data set the checkpoint was trained on "
            f"(sha256 {str(recorded)[:12]}...), so its {part} part cannot be re-made; use --split all"
        )
    parts = remake_split(records, how)
    if part not in parts:
        raise ValueError(f"the split has no {part!r} part (parts: {', '.join(parts)})")
    return parts[part]


def _training_description(
    records: Sequence[Record],
    parts: Mapping[str, Sequence[Record]],
    *,
    dataset: str,
    data: str,
    recipe: Recipe,
    how: Mapping[str, Any],
    imagenet: Mapping[str, str],
    fit: FitResult,
) -> dict[str, Any]:
    description: dict[str, Any] = {
        "dataset": dataset,
        "data": data,
        "sha256": dataset_fingerprint(records),
        "images": describe_records(records),
        "split": dict(how),
        "parts": {name: describe_records(part) for name, part in parts.items() if part},
        "hyperparameters": recipe.hp,
        "input_size": list(recipe.input_size),
        "initialisation": {k: str(v) for k, v in imagenet.items()} or "random (no ImageNet weights)",
        "epochs_trained": fit.epochs,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    generator = _synthetic_description(records)
    if generator:
        description["generator"] = generator
    return description


def _synthetic_description(records: Sequence[Record]) -> dict[str, Any] | None:
    """The ``dataset.json`` that :func:`plugins.synthetic.write_dataset_dir` writes, when the data is one."""
    if not records:
        return None
    folder = Path(os.path.commonpath([str(r.path.resolve()) for r in records]))
    for candidate in (folder, *folder.parents[:3]):
        path = candidate / "dataset.json"
        if path.is_file():
            try:
                loaded = json.loads(path.read_text())
            except ValueError:
                return None
            return loaded if isinstance(loaded, dict) else None
    return None


def train(
    plugin_name: str,
    records: Sequence[Record],
    config: TrainConfig,
    *,
    settings: Settings | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    input_size: tuple[int, int] | None = None,
    dataset: str = "csv",
    data: str = "",
    split: str | Mapping[str, float] = "paper",
    folds: int | None = None,
    version: str = "1.0",
    demo: bool = False,
    compare_paper: bool = False,
    n_bootstrap: int = 1000,
    repeats: int = 1,
    log_line: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train *plugin_name* on *records* with its paper's recipe; export, calibrate and evaluate it.

    :param plugin_name: the model (``asg_mammonet``, ``clgb_net``, ``lem``, ``hybrid_birads``,
        ``us_fusion``, or any plugin with a recipe).
    :param records: from a data-set adapter.
    :param config: device, seed, resume, output folder ...
    :param settings: the site's settings (plugin discovery); defaults otherwise.
    :param hyperparameters: recipe overrides (``--set``).
    :param options: plugin option overrides (``--option``); the checkpoint records them.
    :param input_size: model input (height, width).
    :param dataset: the adapter's name (for the description and the paper comparison).
    :param data: where the data came from (for the description).
    :param split: "paper" (the recipe's shares), "official" (the data set's own split) or shares.
    :param folds: k-fold cross-validation with k folds; None = the paper's choice for this data set,
        0 = one split.
    :param version: the weights' version.
    :param demo: label the checkpoint as demo weights.
    :param compare_paper: print the paper's table beside the test metrics.
    :param n_bootstrap: resamples of the AUC CI.
    :param repeats: train this many times with seeds ``seed``, ``seed + 1`` ... (a new split and
        initialisation each) and report the test metrics as mean ± std, as ASG-MammoNet's paper does
        over 10 runs; the run with the best validation monitor is exported.
    :param log_line: where progress lines go.
    """
    settings = settings if settings is not None else Settings()
    say = log_line or (lambda line: tqdm.write(line, file=sys.stderr))
    host = ModelHost(settings, "cpu")
    plugin = host.plugin(plugin_name)
    recipe_type = recipe_class(plugin.name, host.plugin_manager)
    probe = recipe_type(plugin, hyperparameters=hyperparameters, options=options, input_size=input_size)
    k = probe.kfold_datasets.get(dataset, 0) if folds is None else folds
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if repeats > 1 and k and k > 1:
        raise ValueError("repeated runs and k-fold cross-validation do not combine; choose one")
    out_dir = config.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if (k and k > 1) or repeats > 1:
        return _train_runs(
            plugin,
            recipe_type,
            records,
            config,
            k if k and k > 1 else 0,
            repeats,
            split=split,
            settings=settings,
            hyperparameters=hyperparameters,
            options=options,
            input_size=input_size,
            dataset=dataset,
            data=data,
            version=version,
            demo=demo,
            compare_paper=compare_paper,
            n_bootstrap=n_bootstrap,
            say=say,
        )
    parts, how = _split_parts(probe, records, split, config.seed)
    say(
        f"{plugin_name}: {len(records)} images; split by patient: "
        + ", ".join(f"{name} {len(part)}" for name, part in parts.items())
    )
    return _train_one(
        plugin,
        recipe_type,
        records,
        parts,
        config,
        settings=settings,
        hyperparameters=hyperparameters,
        options=options,
        input_size=input_size,
        dataset=dataset,
        data=data,
        how=how,
        version=version,
        demo=demo,
        compare_paper=compare_paper,
        n_bootstrap=n_bootstrap,
        say=say,
    )


def _train_one(
    plugin: Any,
    recipe_type: type[Recipe],
    records: Sequence[Record],
    parts: Mapping[str, Sequence[Record]],
    config: TrainConfig,
    *,
    settings: Settings,
    hyperparameters: Mapping[str, Any] | None,
    options: Mapping[str, Any] | None,
    input_size: tuple[int, int] | None,
    dataset: str,
    data: str,
    how: Mapping[str, Any],
    version: str,
    demo: bool,
    compare_paper: bool,
    n_bootstrap: int,
    say: Callable[[str], None],
) -> TrainResult:
    recipe = recipe_type(plugin, hyperparameters=hyperparameters, options=options, input_size=input_size)
    out_dir = config.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "splits.json").write_text(
        json.dumps({name: [str(r.path) for r in part] for name, part in parts.items()}, indent=1) + "\n"
    )
    trainer = Trainer(recipe, config, parts["train"], parts.get("val", []), log_line=say)
    trainer.prepare()
    seed_everything(derive_seed(config.seed, "init"))
    model = recipe.build_model()
    if config.imagenet and not trainer.resuming:
        for line in recipe.load_imagenet(model, config.imagenet):
            say(f"ImageNet initialisation: {line}")
    fit = trainer.fit(model)
    (out_dir / "history.json").write_text(json.dumps(fit.history, indent=1) + "\n")
    say(
        f"trained {fit.epochs} epochs in {fit.seconds:.1f} s ({fit.images_per_second:.1f} img/s)"
        if fit.seconds
        else f"training already finished ({fit.epochs} epochs)"
    )
    description = _training_description(
        records, parts, dataset=dataset, data=data, recipe=recipe, how=how, imagenet=config.imagenet, fit=fit
    )
    checkpoint = out_dir / f"{plugin.name}.safetensors"
    metadata = export_checkpoint(
        recipe, fit.model, checkpoint, training_data=description, version=version, demo=demo
    )
    device = str(trainer.device)
    evaluate_kwargs: dict[str, Any] = {"settings": settings, "device": device, "n_bootstrap": n_bootstrap}
    calibration = None
    thresholds: dict[str, float] = {}
    val_records = list(parts.get("val", []))
    if val_records:
        validation = evaluate_checkpoint(checkpoint, val_records, localise=False, **evaluate_kwargs)
        logits, targets = validation.logits()
        if len(np.unique(targets)) < 2:
            say("the validation split holds one class only: neither temperature nor threshold is fitted")
        else:
            calibration = calibrate(logits, targets)
            say(
                f"temperature scaling on the validation split: T = {calibration.temperature:.4f}, "
                f"ECE {calibration.ece_before:.4f} -> {calibration.ece_after:.4f}"
            )
            if recipe.hp.get("threshold") == "youden" and recipe.positive_class is not None:
                # On the calibrated probabilities, which are what the plugin serves and thresholds.
                positive = recipe.classes.index(recipe.positive_class)
                scores = softmax(logits, calibration.temperature)[:, positive]
                thresholds[recipe.positive_class] = youden_threshold(
                    scores.tolist(), (targets == positive).tolist()
                )
                say(
                    f"Youden's threshold on the validation split: p({recipe.positive_class}) >= "
                    f"{thresholds[recipe.positive_class]:.4f}"
                )
        write_evaluation(
            dataclasses.replace(validation, calibration=calibration),
            out_dir / "val",
            title=f"{plugin.name}, validation split (temperature 1)",
        )
    else:
        say("no validation split: the temperature is not fitted")
    metadata = export_checkpoint(
        recipe,
        fit.model,
        checkpoint,
        training_data=description,
        temperature=calibration.temperature if calibration else None,
        thresholds=thresholds,
        version=version,
        demo=demo,
    )
    risk_calibration = None
    if val_records:
        # The risk as served (temperature included) is what the calibrator maps and the points threshold.
        served = evaluate_checkpoint(checkpoint, val_records, localise=False, **evaluate_kwargs)
        risk_calibration = _calibrate_risk(served, config, say)
    if risk_calibration is not None:
        metadata = export_checkpoint(
            recipe,
            fit.model,
            checkpoint,
            training_data=description,
            temperature=calibration.temperature if calibration else None,
            thresholds=thresholds,
            version=version,
            demo=demo,
            calibrator=risk_calibration.calibrator,
            operating_points=risk_calibration.operating_points,
        )
    say(f"checkpoint {checkpoint} sha256 {metadata.sha256}" + (" (DEMO WEIGHTS)" if demo else ""))
    test = None
    test_records = list(parts.get("test", []))
    if test_records:
        test = evaluate_checkpoint(checkpoint, test_records, **evaluate_kwargs)
        test = dataclasses.replace(test, calibration=calibration)
        extra = {
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": metadata.sha256,
            "dataset": dataset,
            "data_sha256": description["sha256"],
            "split": "test",
        }
        write_evaluation(
            test,
            out_dir / "test",
            title=f"{plugin.name}, test split",
            extra=extra,
            architecture=plugin.name,
            dataset=dataset,
        )
        say(summary_lines(test, f"{plugin.name}: test split ({len(test_records)} images)"))
        if compare_paper:
            say(comparison_text(test, plugin.name, dataset) or f"no reported results for {plugin.name}")
    summary = {
        "checkpoint": str(checkpoint),
        "sha256": metadata.sha256,
        "demo": demo,
        "calibration": calibration.to_dict() if calibration else None,
        "risk_calibration": risk_calibration.to_dict() if risk_calibration else None,
        "test_reliability": risk_reliability(test, config.prevalence, metadata) if test else None,
        "best_validation": fit.best_monitor,
        "monitor": trainer.monitor,
        "epochs": fit.epochs,
        "images_per_second": fit.images_per_second,
        "test": test.flat() if test else None,
    }
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    return TrainResult(
        checkpoint=checkpoint,
        metadata=metadata,
        calibration=calibration,
        test=test,
        history=fit.history,
        summary_path=summary_path,
    )


def _calibrate_risk(served: Any, config: TrainConfig, say: Callable[[str], None]) -> CalibrationReport | None:
    """The prior-shift calibrator (with ``--prevalence``) and the operating points, fitted on the
    validation split's served risk; None when the split lacks positives or negatives."""
    pairs = served.risk_targets()
    if pairs is None:
        say("the validation split lacks positives or negatives: no calibrator, no measured operating points")
        return None
    labels, risk = pairs
    if config.prevalence is None:
        # Operating points only, on the risk as served: sensitivity and specificity do not need a prevalence.
        points = choose_operating_points(
            risk, labels, sensitivity=config.target_sensitivity, specificity=config.target_specificity
        )
        report = CalibrationReport(
            calibrator=None,
            operating_points=points,
            ece_before=None,
            ece_after=None,
            n_positive=int(labels.sum()),
            n_negative=int((1 - labels).sum()),
        )
        say(
            "no --prevalence: the risk is not calibrated (a suspicion score); "
            "operating points on the served risk"
        )
        for point in points:
            say(
                f"operating point {point.name}: risk >= {point.threshold:.4f} (validation sensitivity "
                f"{point.sensitivity:.3f}, specificity {point.specificity:.3f})"
            )
        return report
    report = CalibrationReport.fit(
        risk,
        labels,
        config.prevalence,
        method=config.calibration_method,
        sensitivity=config.target_sensitivity,
        specificity=config.target_specificity,
    )
    for line in report.lines():
        say(f"validation split: {line}")
    return report


def risk_reliability(
    test: Any, prevalence: float | None, metadata: CheckpointMetadata
) -> dict[str, Any] | None:
    """ECE at the stated prevalence of the raw and the served (calibrated) risk on the test split, and the
    sensitivity and specificity each stored operating point gives there."""
    served, raw = test.risk_targets(), test.risk_targets(raw=True)
    if served is None or raw is None:
        return None
    labels, risk = served
    out: dict[str, Any] = {}
    if prevalence is not None:
        out["ece_raw_at_prevalence"] = reliability_at_prevalence(raw[1], labels, prevalence)
        out["ece_calibrated_at_prevalence"] = reliability_at_prevalence(risk, labels, prevalence)
    positive = labels.astype(bool)
    out["operating_points"] = {
        p.name: {
            "sensitivity": float((risk[positive] >= p.threshold).mean()),
            "specificity": float((risk[~positive] < p.threshold).mean()),
        }
        for p in metadata.operating_points
    }
    return out


def _train_runs(
    plugin: Any,
    recipe_type: type[Recipe],
    records: Sequence[Record],
    config: TrainConfig,
    k: int,
    repeats: int,
    *,
    split: str | Mapping[str, float],
    say: Callable[[str], None],
    **kwargs: Any,
) -> TrainResult:
    """k-fold cross-validation (``k`` > 0: k models, each tested on its fold) or ``repeats`` runs with
    seeds ``seed + i`` (each its own split): the test metrics as mean ± std; the run with the best
    validation monitor is exported as the run's checkpoint."""
    probe = recipe_type(
        plugin,
        hyperparameters=kwargs["hyperparameters"],
        options=kwargs["options"],
        input_size=kwargs["input_size"],
    )
    kind, count = ("fold", k) if k else ("run", repeats)
    results: list[TrainResult] = []
    rows: list[dict[str, Any]] = []
    for index in range(1, count + 1):
        if k:
            how: dict[str, Any] = {
                "method": "kfold",
                "k": k,
                "fold": index,
                "val_share": probe.kfold_val_share,
                "seed": config.seed,
            }
            parts = remake_split(records, how)
            run_config = dataclasses.replace(config, out_dir=config.out_dir / f"fold{index}")
        else:
            run_config = dataclasses.replace(
                config, out_dir=config.out_dir / f"run{index}", seed=config.seed + index - 1
            )
            parts, how = _split_parts(probe, records, split, run_config.seed)
        say(f"{kind} {index}/{count}: " + ", ".join(f"{name} {len(part)}" for name, part in parts.items()))
        result = _train_one(plugin, recipe_type, records, parts, run_config, how=how, say=say, **kwargs)
        results.append(result)
        summary = json.loads(result.summary_path.read_text()) if result.summary_path else {}
        rows.append(
            {
                kind: index,
                "seed": run_config.seed,
                "best_validation": summary.get("best_validation"),
                **(result.test.flat() if result.test else {}),
            }
        )
    names = sorted({key for row in rows for key in row if key not in (kind, "seed", "best_validation")})
    stats = {}
    for name in names:
        values = [
            row[name] for row in rows if isinstance(row.get(name), int | float) and math.isfinite(row[name])
        ]
        if values:
            mean, std = mean_std(values)
            stats[name] = {"mean": mean, "std": std}
    label = f"{k}-fold" if k else f"{repeats} runs,"
    for name in (
        "accuracy",
        "precision",
        "recall",
        "specificity",
        "f1",
        "auc",
        "mcc",
        "dip",
        "seconds_per_image",
    ):
        if name in stats:
            say(f"{label} {name}: {stats[name]['mean']:.4f} ± {stats[name]['std']:.4f}")
    monitored = [
        (row["best_validation"], i) for i, row in enumerate(rows) if row["best_validation"] is not None
    ]
    loss_like = probe.monitor == "val_loss"
    chosen = (min(monitored) if loss_like else max(monitored))[1] if monitored else 0
    checkpoint = config.out_dir / f"{plugin.name}.safetensors"
    for suffix in (".safetensors", ".json"):
        shutil.copy2(results[chosen].checkpoint.with_suffix(suffix), checkpoint.with_suffix(suffix))
    say(f"exported {kind} {chosen + 1} (best validation {probe.monitor}) as {checkpoint}")
    summary_path = config.out_dir / "summary.json"
    summary_path.write_text(
        json.dumps(
            _json_safe(
                {
                    f"{kind}s": rows,
                    "mean_std": stats,
                    f"exported_{kind}": chosen + 1,
                    "checkpoint": str(checkpoint),
                }
            ),
            indent=2,
        )
        + "\n"
    )
    best = results[chosen]
    return TrainResult(
        checkpoint=checkpoint,
        metadata=best.metadata,
        calibration=best.calibration,
        test=best.test,
        history=best.history,
        folds=rows,
        summary_path=summary_path,
    )


def train_demo(
    name: str,
    out_dir: Path,
    *,
    settings: Settings | None = None,
    seed: int = 42,
    epochs: int | None = None,
    images: int | None = None,
    device: str = "auto",
    progress: bool | None = None,
    work_dir: Path | None = None,
    n_bootstrap: int = 200,
    log_line: Callable[[str], None] | None = None,
    prevalence: float | None = None,
) -> TrainResult:
    """Train *name* on generated phantoms with its demo profile and write ``out_dir/<name>.safetensors``,
    labelled demo weights.

    :param name: the architecture.
    :param out_dir: where the checkpoint (and its JSON sidecar) goes.
    :param settings: the site's settings (plugin discovery).
    :param seed: seed of the phantoms and the training.
    :param epochs: override the profile's epochs (the main stage's).
    :param images: override the profile's number of phantoms.
    :param device: torch device.
    :param progress: progress bars (None: when stderr is a terminal).
    :param work_dir: keep the phantoms and the run's outputs here (default: a temporary folder).
    :param n_bootstrap: resamples of the AUC CI.
    :param log_line: where progress lines go.
    :param prevalence: calibrate the risk at this prevalence of positives (None: no calibrator).
    :returns: the run, with ``checkpoint`` the file in *out_dir*.
    """
    profile = recipe_class(name, ModelHost(settings or Settings(), "cpu").plugin_manager).demo_profile
    if profile is None:
        raise ValueError(f"the recipe of {name!r} has no demo profile")
    hyper = dict(profile.hyperparameters)
    if epochs is not None:
        hyper["epochs"] = epochs
        if "warmup_epochs" in hyper:
            hyper["warmup_epochs"] = min(int(hyper["warmup_epochs"]), max(0, epochs - 1))
    with tempfile.TemporaryDirectory(prefix=f"pacs-triage-demo-{name}-") as temporary:
        work = Path(work_dir) if work_dir is not None else Path(temporary)
        manifest = write_dataset_dir(
            work / "phantoms",
            cast(Kind, profile.kind),
            images or profile.images,
            seed,
            classes=profile.classes,
        )
        records = load_generic_csv(manifest)
        result = train(
            name,
            records,
            TrainConfig(
                out_dir=work / "run", seed=seed, device=device, progress=progress, prevalence=prevalence
            ),
            settings=settings,
            hyperparameters=hyper,
            options=profile.options,
            input_size=profile.input_size,
            dataset="synthetic",
            data=f"plugins.synthetic.write_dataset_dir(kind={profile.kind!r}, seed={seed})",
            split=profile.split,
            folds=0,
            version="demo",
            demo=True,
            n_bootstrap=n_bootstrap,
            log_line=log_line,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        destination = out_dir / f"{name}.safetensors"
        for suffix in (".safetensors", ".json"):
            shutil.copy2(result.checkpoint.with_suffix(suffix), destination.with_suffix(suffix))
    return dataclasses.replace(result, checkpoint=destination, summary_path=None)


def _disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None lets tqdm decide (off when the stream is not a terminal)."""
    return None if progress is None else not progress


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value
