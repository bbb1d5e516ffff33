"""Evaluate a checkpoint through the plugin's own inference path: every metric the papers report.

Nothing here re-implements preprocessing or inference.  The checkpoint is configured as
``plugins.models.<name>.weights`` and the images go through :meth:`plugins.host.ModelHost.run` (DICOM) or
:meth:`~plugins.host.ModelHost.run_images` (PNG/PGM/TIFF of the public data sets), exactly as a worker runs
them: decode, the plugin's ``preprocess``, batched ``forward``, ``postprocess`` with the checkpoint's
temperature.  The :class:`~plugins.types.Prediction` probabilities become the metric report of
:mod:`training.metrics`; their logarithms are the logits for temperature scaling (softmax does not
change when a constant is added to every logit of a row).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gateway.settings import ModelSettings, Settings
from plugins.host import ModelHost
from plugins.preprocess import read_image_ref
from plugins.types import ImageFailure, ImageRef, Prediction, SkippedImage
from plugins.weights import METADATA_KEY, CheckpointMetadata, sidecar_path
from training.datasets import Record, read_mask
from training.metrics import (
    Calibration,
    MetricReport,
    classification_report,
    decision_curve,
    dice,
    format_comparison,
    format_report,
    mask_recall,
    paper_results,
    reliability_curves,
    render_confusion_matrix,
    render_decision_curve,
    render_reliability,
    render_roc_curves,
    render_tsne,
    roc_auc,
    tsne_embedding,
    write_summary_json,
)
from training.registry import recipe_class

__all__ = [
    "DATASET_PAPER_NAMES",
    "Evaluation",
    "ImagePrediction",
    "checkpoint_settings",
    "evaluate_checkpoint",
    "is_dicom",
    "plugin_for_architecture",
    "predict",
    "read_image",
    "read_metadata",
    "score_predictions",
    "training_info",
    "write_evaluation",
]

#: ``--dataset`` name -> the data-set name the papers' tables use (for ``--compare-paper``).
DATASET_PAPER_NAMES: dict[str, str] = {
    "cbis-ddsm": "CBIS-DDSM",
    "inbreast": "INbreast",
    "mias": "MIAS",
    "busi": "BUSI",
}
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".tif", ".tiff", ".bmp")
#: Probabilities are floored here before the logarithm, so a saturated softmax gives a finite logit.
_PROBABILITY_FLOOR = 1e-300


def is_dicom(path: Path) -> bool:
    """True unless *path* has a raster-image suffix (DICOM files often have no suffix at all)."""
    return path.suffix.lower() not in _RASTER_SUFFIXES


def read_image(path: Path) -> np.ndarray:
    """Read a PNG/JPEG/PGM/TIFF as a display-ready ``uint8`` image (grey, or RGB), as the host's decoder
    gives for DICOM: 16-bit images are min-max scaled, BGR becomes RGB, alpha is dropped.

    :param path: the image file.
    :raises ValueError: naming the file when OpenCV cannot read it.
    """
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot read image {path}")
    if image.ndim == 3:
        image = image[:, :, :3]
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2RGB)
        if np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(image[:, :, 0], image[:, :, 2]):
            image = image[:, :, 0]  # a grey PNG saved as RGB (BUSI) is grey
    if image.dtype != np.uint8:
        values = image.astype(np.float64)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        image = np.round((values - low) * scale).astype(np.uint8)
    return np.ascontiguousarray(image)


def raster_ref(path: Path, modality: str, sop_class_uid: str) -> ImageRef:
    """An :class:`ImageRef` for an image that has no DICOM header (the public data sets' PNG/PGM files)."""
    uid = "2.25.0"
    return ImageRef(
        path=path,
        study_instance_uid=uid,
        series_instance_uid=uid,
        sop_instance_uid=uid,
        sop_class_uid=sop_class_uid,
        modality=modality,
    )


def plugin_for_architecture(host: Any, architecture: str) -> str:
    """The name of the registered model whose ``spec.arch`` is *architecture*.

    :raises ValueError: when no registered model has that architecture.
    """
    for plugin in host.registered_models:
        if plugin.spec.arch == architecture:
            return str(plugin.name)
    known = ", ".join(sorted(p.spec.arch for p in host.registered_models))
    raise ValueError(f"no registered model plugin has architecture {architecture!r} (known: {known})")


def checkpoint_settings(
    settings: Settings,
    name: str,
    checkpoint: Path,
    *,
    device: str = "cpu",
    batch_size: int = 8,
    options: Mapping[str, Any] | None = None,
) -> Settings:
    """*settings* with model *name* configured to run *checkpoint* and nothing else of the site's config
    for that model, so the checkpoint is evaluated as it is (its own options, thresholds, temperature).

    :param settings: the site's settings (plugin discovery: drop-in folder, entry points).
    :param name: the plugin name.
    :param checkpoint: the ``.safetensors`` file.
    :param device: torch device.
    :param batch_size: images per forward pass.
    :param options: plugin options to set (e.g. ``explain``).
    """
    models = dict(settings.plugins.models)
    models[name] = ModelSettings(
        enabled=True,
        weights=Path(checkpoint),
        device=device,
        batch_size=batch_size,
        options=dict(options or {}),
    )
    plugins = settings.plugins.model_copy(
        update={"models": models, "disabled": tuple(d for d in settings.plugins.disabled if d != name)}
    )
    return settings.model_copy(update={"plugins": plugins})


def read_metadata(checkpoint: Path) -> CheckpointMetadata:
    """A checkpoint's metadata without reading its weights: the safetensors header and the JSON sidecar.

    :raises ValueError: naming the file when it has no readable metadata.
    """
    data: dict[str, Any] = {}
    try:
        if checkpoint.suffix == ".safetensors":
            with checkpoint.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            entry = (header.get("__metadata__") or {}).get(METADATA_KEY)
            if entry:
                data.update(json.loads(entry))
        sidecar = sidecar_path(checkpoint)
        if sidecar.is_file():
            data.update(json.loads(sidecar.read_text()))
    except (OSError, ValueError, struct.error) as error:
        raise ValueError(f"cannot read the metadata of checkpoint {checkpoint}: {error}") from error
    if not data:
        raise ValueError(f"checkpoint {checkpoint} has no metadata")
    return CheckpointMetadata.from_json_dict(data, str(checkpoint))


def training_info(metadata: CheckpointMetadata) -> dict[str, Any]:
    """The JSON the trainer wrote into ``training_data`` (``{"text": ...}`` for free text)."""
    try:
        info = json.loads(metadata.training_data)
    except ValueError:
        return {"text": metadata.training_data}
    return info if isinstance(info, dict) else {"text": metadata.training_data}


@dataclass(frozen=True, kw_only=True)
class ImagePrediction:
    """The host's result for one record (frames averaged), or why there is none."""

    record: Record
    #: Class index of the record's label, or None when the model leaves the label out.
    target: int | None
    probabilities: np.ndarray | None = None
    risk: float | None = None
    #: The risk before the checkpoint's calibrator (equal to ``risk`` without one).
    raw_risk: float | None = None
    heatmap: np.ndarray | None = None
    error: str = ""
    demo_weights: bool = False


def predict(
    host: Any,
    name: str,
    records: Sequence[Record],
    targets: Sequence[int | None],
    *,
    modality: str,
    chunk: int = 64,
    progress: Callable[[int], object] | None = None,
) -> list[ImagePrediction]:
    """Run *records* through ``host`` (``run`` for DICOM, ``run_images`` for raster files), in chunks.

    :param host: a :class:`~plugins.host.ModelHost` configured with the checkpoint.
    :param name: the model's plugin name.
    :param records: the images.
    :param targets: their class indices (None = left out, still predicted for the CSV).
    :param modality: the modality raster images are given (they have no header).
    :param chunk: images per host call.
    :param progress: called with the number of images done after each chunk.
    """
    plugin = host.plugin(name)
    sop_class = (plugin.spec.accepts.sop_class_uids or ("",))[0]
    out: list[ImagePrediction] = []
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        dicom_refs: list[ImageRef] = []
        raster: list[tuple[ImageRef, np.ndarray]] = []
        problems: dict[Path, str] = {}
        for record in part:
            try:
                if is_dicom(record.path):
                    dicom_refs.append(read_image_ref(record.path))
                else:
                    raster.append((raster_ref(record.path, modality, sop_class), read_image(record.path)))
            except Exception as unreadable:  # the reader names the file; a bad image must not stop the run
                problems[record.path] = str(unreadable)
        results = (host.run(name, dicom_refs) if dicom_refs else []) + (
            host.run_images(name, raster) if raster else []
        )
        by_path: dict[Path, list[Any]] = {}
        for result in results:
            by_path.setdefault(Path(result.image.path), []).append(result)
        for record, target in zip(part, targets[start : start + chunk], strict=True):
            found = by_path.get(record.path, [])
            predictions = [r for r in found if isinstance(r, Prediction)]
            if not predictions:
                reasons = [
                    r.error if isinstance(r, ImageFailure) else r.reason
                    for r in found
                    if isinstance(r, ImageFailure | SkippedImage)
                ]
                error = problems.get(record.path) or "; ".join(reasons) or "no result"
                out.append(ImagePrediction(record=record, target=target, error=error))
                continue
            probabilities = np.mean(
                [np.asarray(p.probabilities, dtype=np.float64) for p in predictions], axis=0
            )
            out.append(
                ImagePrediction(
                    record=record,
                    target=target,
                    probabilities=probabilities,
                    risk=float(np.mean([p.risk for p in predictions])),
                    raw_risk=float(
                        np.mean(
                            [
                                p.risk if p.uncalibrated_risk is None else p.uncalibrated_risk
                                for p in predictions
                            ]
                        )
                    ),
                    heatmap=predictions[0].heatmap,
                    demo_weights=any(p.demo_weights for p in predictions),
                )
            )
        if progress is not None:
            progress(len(part))
    return out


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """The metric report of one evaluation and what went with it."""

    report: MetricReport
    classes: tuple[str, ...]
    predictions: list[ImagePrediction]
    #: Records the model leaves out (e.g. normal images for a benign/malignant US model).
    excluded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    dice: float | None = None
    mask_recall: float | None = None
    demo_weights: bool = False
    calibration: Calibration | None = None
    #: Figures beyond the confusion matrix, ROC and reliability curves that the model's paper shows
    #: (``decision_curve``, ``tsne``): the recipe's :attr:`~training.recipes.Recipe.paper_figures`.
    figures: tuple[str, ...] = ()
    #: The classes whose summed probability is the risk (the decision curve's positive outcome).
    positive_classes: tuple[str, ...] = ()

    def flat(self) -> dict[str, float]:
        """Scalar metrics by name, Dice included, for the paper comparison."""
        values = dict(self.report.flat())
        if self.dice is not None:
            values["dice"] = self.dice
        if self.mask_recall is not None:
            values["mask_recall"] = self.mask_recall
        return values

    def risk_targets(self, *, raw: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """Per scored image: 1 when its label is a positive class, and the model's risk (*raw*: before the
        checkpoint's calibrator); None without positive classes or when the labels hold one outcome only."""
        positive = [self.classes.index(c) for c in self.positive_classes if c in self.classes]
        scored = [p for p in self.predictions if p.probabilities is not None and p.target is not None]
        if not positive or not scored:
            return None
        target = np.isin(np.asarray([p.target for p in scored], dtype=np.int64), positive).astype(np.int64)
        if target.all() or not target.any():
            return None
        risks = [p.raw_risk if raw and p.raw_risk is not None else p.risk for p in scored]
        return target, np.asarray(risks, dtype=np.float64)

    def logits(self) -> tuple[np.ndarray, np.ndarray]:
        """Log-probabilities (logits up to a per-row constant) and targets of the scored images."""
        scored = [p for p in self.predictions if p.probabilities is not None and p.target is not None]
        probabilities = np.stack([p.probabilities for p in scored])  # type: ignore[misc]
        return np.log(np.maximum(probabilities, _PROBABILITY_FLOOR)), np.asarray([p.target for p in scored])


def score_predictions(
    predictions: Sequence[ImagePrediction],
    classes: Sequence[str],
    *,
    positive_class: str | None,
    positive_classes: Sequence[str] = (),
    location_threshold: float | None = None,
    decision_threshold: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """The full metric report of host predictions: the papers' metrics, the risk AUC and, for a localising
    model, Dice and pixel recall of its lesion maps against the masks.

    :param predictions: from :func:`predict`.
    :param classes: the model's classes, in logit order.
    :param positive_class: the positive class of binary metrics (None = macro averages).
    :param positive_classes: the classes whose probability is the risk (for the risk AUC).
    :param location_threshold: lesion map threshold for Dice; None = no Dice.
    :param decision_threshold: predict the positive class when its probability is at least this
        (binary models); None = argmax.
    :param n_bootstrap: resamples of the AUC CI.
    :param seed: the bootstrap seed.
    :raises ValueError: when no image could be scored.
    """
    scored = [p for p in predictions if p.probabilities is not None and p.target is not None]
    failures = [(str(p.record.path), p.error) for p in predictions if p.error]
    excluded = sum(1 for p in predictions if p.target is None)
    if not scored:
        detail = f"; first failure: {failures[0][0]}: {failures[0][1]}" if failures else ""
        raise ValueError(f"no image could be scored ({len(failures)} failed, {excluded} left out){detail}")
    y = np.asarray([p.target for p in scored], dtype=np.int64)
    probabilities = np.stack([p.probabilities for p in scored])  # type: ignore[misc]
    report = classification_report(
        y,
        probabilities,
        list(classes),
        positive_class=positive_class,
        threshold=decision_threshold if positive_class is not None else None,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    extra = dict(report.extra)
    positive = [list(classes).index(c) for c in positive_classes if c in classes]
    if positive and len(classes) > 2:
        # What triage sorts by: the summed probability of the positive classes, positive labels vs the rest.
        target = np.isin(y, positive).astype(np.int64)
        if 0 < target.sum() < target.size:
            extra["risk_auc"] = roc_auc(target, [p.risk for p in scored])
    dice_value = recall_value = None
    if location_threshold is not None:
        dice_value, recall_value = _localisation(scored, location_threshold)
        if dice_value is not None:
            extra["dice"] = dice_value
            extra["mask_recall"] = recall_value  # type: ignore[assignment]
    report = dataclasses.replace(report, extra=extra)
    return Evaluation(
        report=report,
        classes=tuple(classes),
        predictions=list(predictions),
        excluded=excluded,
        failures=failures,
        dice=dice_value,
        mask_recall=recall_value,
        demo_weights=any(p.demo_weights for p in scored),
        positive_classes=tuple(c for c in positive_classes if c in classes),
    )


def _localisation(scored: Sequence[ImagePrediction], threshold: float) -> tuple[float | None, float | None]:
    """Mean Dice and pixel recall over the images with a non-empty lesion mask (LEM's DSC and recall)."""
    dices, recalls = [], []
    for prediction in scored:
        if prediction.record.mask_path is None or prediction.heatmap is None:
            continue
        truth = read_mask(prediction.record.mask_path, prediction.heatmap.shape)
        if not truth.any():
            continue
        lesion = prediction.heatmap >= threshold
        dices.append(dice(lesion, truth))
        recalls.append(mask_recall(lesion, truth))
    if not dices:
        return None, None
    return float(np.mean(dices)), float(np.mean(recalls))


def write_evaluation(
    evaluation: Evaluation,
    out_dir: Path,
    *,
    title: str,
    extra: Mapping[str, Any] | None = None,
    architecture: str | None = None,
    dataset: str | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``confusion_matrix.png``, ``roc.png``, ``predictions.csv`` and, with an
    architecture, ``comparison.txt`` (the paper's table beside ours).

    :param evaluation: the evaluation.
    :param out_dir: the folder (created).
    :param title: figure title, e.g. "asg_mammonet, test split".
    :param extra: more top-level JSON fields (checkpoint, data set, calibration ...).
    :param architecture: quote this architecture's paper.
    :param dataset: quote only this data set of the paper (``--dataset`` name or the paper's name).
    :returns: the files written, by kind.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    demo = " [DEMO WEIGHTS]" if evaluation.demo_weights else ""
    body: dict[str, Any] = {
        "title": title,
        "demo_weights": evaluation.demo_weights,
        "images_scored": evaluation.report.n,
        "images_left_out": evaluation.excluded,
        "images_failed": len(evaluation.failures),
        "failures": [{"path": p, "error": e} for p, e in evaluation.failures[:100]],
        **({"calibration": evaluation.calibration.to_dict()} if evaluation.calibration is not None else {}),
        **dict(extra or {}),
    }
    files = {"metrics": write_summary_json(evaluation.report, out_dir / "metrics.json", extra=body)}
    files["confusion_matrix"] = render_confusion_matrix(
        evaluation.report.confusion, evaluation.classes, out_dir / "confusion_matrix.png", title=title + demo
    )
    if evaluation.report.roc:
        files["roc"] = render_roc_curves(evaluation.report.roc, out_dir / "roc.png", title=title + demo)
    log_probabilities, targets = evaluation.logits()
    probabilities = np.exp(log_probabilities)
    curves = reliability_curves(targets, probabilities, evaluation.classes)
    files["reliability"] = render_reliability(curves, out_dir / "reliability.png", title=title + demo)
    figures: dict[str, Any] = {
        "reliability": {
            name: {"predicted": p.tolist(), "observed": o.tolist()} for name, (p, o) in curves.items()
        }
    }
    outcome = evaluation.risk_targets()
    if "decision_curve" in evaluation.figures and outcome is not None:
        curve = decision_curve(*outcome)
        positive = ", ".join(evaluation.positive_classes)
        files["decision_curve"] = render_decision_curve(
            curve, out_dir / "decision_curve.png", title=f"{title}{demo}: decision curve ({positive})"
        )
        figures["decision_curve"] = {"positive_classes": list(evaluation.positive_classes), **curve.to_dict()}
    if "tsne" in evaluation.figures and len(targets) >= 4:
        # The log-probabilities stand in for the penultimate features: the host's inference path
        # returns no features, and the embedding must show what the deployed model computes.
        embedding = tsne_embedding(log_probabilities)
        files["tsne"] = render_tsne(
            embedding, targets, evaluation.classes, out_dir / "tsne.png", title=f"{title}{demo}: t-SNE"
        )
    (out_dir / "curves.json").write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    files["curves"] = out_dir / "curves.json"
    files["predictions"] = out_dir / "predictions.csv"
    with files["predictions"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["path", "label", "target", *[f"p[{c}]" for c in evaluation.classes], "risk", "error"]
        )
        for p in evaluation.predictions:
            probs = (
                [f"{v:.6f}" for v in p.probabilities]
                if p.probabilities is not None
                else [""] * len(evaluation.classes)
            )
            risk = "" if p.risk is None else f"{p.risk:.6f}"
            target = "" if p.target is None else str(p.target)
            writer.writerow([str(p.record.path), p.record.label, target, *probs, risk, p.error])
    if architecture is not None:
        text = comparison_text(evaluation, architecture, dataset)
        if text:
            files["comparison"] = out_dir / "comparison.txt"
            files["comparison"].write_text(text + "\n", encoding="utf-8")
    return files


def comparison_text(evaluation: Evaluation, architecture: str, dataset: str | None = None) -> str:
    """The paper's table beside ours; all the paper's data sets when *dataset* is not one of them."""
    paper_name = DATASET_PAPER_NAMES.get(dataset or "", dataset)
    try:
        paper_results(architecture, paper_name)
    except ValueError:
        paper_name = None
    try:
        table = format_comparison(evaluation.flat(), architecture, paper_name)
    except ValueError:
        return ""
    if evaluation.demo_weights:
        table = "DEMO WEIGHTS (synthetic training data): not comparable with the paper\n" + table
    return table


def summary_lines(evaluation: Evaluation, title: str) -> str:
    """A console summary: the report, Dice, calibration, failures."""
    lines = [
        f"== {title}" + (" [DEMO WEIGHTS]" if evaluation.demo_weights else ""),
        format_report(evaluation.report),
    ]
    if evaluation.report.extra.get("risk_auc") is not None:
        lines.append(f"risk AUC (positive classes vs the rest) {evaluation.report.extra['risk_auc']:.4f}")
    if evaluation.dice is not None:
        lines.append(f"localisation: Dice {evaluation.dice:.4f}, pixel recall {evaluation.mask_recall:.4f}")
    if evaluation.calibration is not None:
        c = evaluation.calibration
        lines.append(
            f"temperature {c.temperature:.4f}: ECE {c.ece_before:.4f} -> {c.ece_after:.4f}, "
            f"NLL {c.nll_before:.4f} -> {c.nll_after:.4f}"
        )
    if evaluation.excluded:
        lines.append(f"{evaluation.excluded} images left out (labels the model does not predict)")
    if evaluation.failures:
        lines.append(f"{len(evaluation.failures)} images failed; first: {evaluation.failures[0]}")
    return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint: Path,
    records: Sequence[Record],
    *,
    settings: Settings | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    localise: bool | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: Callable[[int], object] | None = None,
    temperature_one: bool = False,
) -> Evaluation:
    """Evaluate *checkpoint* on *records* through the plugin's own inference path.

    The labels are mapped to classes by the architecture's training recipe (with the hyperparameters the
    checkpoint was trained with, e.g. ``normal_as_benign``).

    :param checkpoint: a ``.safetensors`` file written by ``pacs-triage train`` (or any checkpoint of a
        plugin that has a recipe).
    :param records: the images and labels.
    :param settings: the site's settings (plugin discovery); defaults otherwise.
    :param device: torch device.
    :param batch_size: images per forward pass.
    :param localise: compute Dice with the model's lesion maps; default: when the model localises and
        some record has a mask.
    :param n_bootstrap: resamples of the AUC CI.
    :param seed: the bootstrap seed.
    :param progress: called with the number of images done.
    :param temperature_one: ignore the checkpoint's temperature (for fitting a new one).
    """
    settings = settings if settings is not None else Settings()
    metadata = read_metadata(checkpoint)
    host = ModelHost(settings, device)
    name = plugin_for_architecture(host, metadata.architecture)
    try:
        recipe_type = recipe_class(name, host.plugin_manager)
    except ValueError as error:
        raise ValueError(f"{error}, so the labels of model {name!r} cannot be mapped") from None
    plugin = host.plugin(name)
    hyper = training_info(metadata).get("hyperparameters", {})
    label_hp = {k: v for k, v in hyper.items() if k in recipe_type.HYPERPARAMETERS}
    options = {k: v for k, v in metadata.options.items() if k in plugin.default_options}
    recipe = recipe_type(plugin, hyperparameters=label_hp, options=options, input_size=metadata.input_size)
    targets = [recipe.label_index(r) for r in records]
    do_localise = recipe.localises and any(r.mask_path for r in records) if localise is None else localise
    run_options: dict[str, Any] = {"explain": bool(do_localise)}
    if temperature_one:
        run_options["temperature"] = 1.0
    configured = checkpoint_settings(
        settings, name, checkpoint, device=device, batch_size=batch_size, options=run_options
    )
    host = ModelHost(configured, device)
    loaded = host.load(name)  # before the clock starts: the per-image time is inference, not loading
    started = time.perf_counter()
    predictions = predict(host, name, records, targets, modality=recipe.modality, progress=progress)
    elapsed = time.perf_counter() - started
    threshold = None
    if do_localise:
        threshold = float(loaded.options.get("location_threshold", 0.5))
    spec = loaded.plugin.spec
    positive_class = spec.classes[1] if len(spec.classes) == 2 else None
    evaluation = score_predictions(
        predictions,
        spec.classes,
        positive_class=positive_class,
        positive_classes=spec.positive_classes,
        location_threshold=threshold,
        # The threshold the plugin serves with (a checkpoint's Youden threshold, a site's override).
        decision_threshold=spec.thresholds.get(positive_class) if positive_class else None,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    # Decoding, preprocessing, the forward pass and postprocessing, as a worker runs them, per image.
    extra = {**evaluation.report.extra, "seconds_per_image": elapsed / max(1, len(records))}
    return dataclasses.replace(
        evaluation,
        report=dataclasses.replace(evaluation.report, extra=extra),
        figures=tuple(recipe.paper_figures),
    )
