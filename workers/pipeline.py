"""One analysis stage of one study: run models through the host, build the SR and SCs, write them to storage.

Nothing here talks to Celery, so the same code serves the tasks, the tests and the benchmarks.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import structlog

from gateway.errors import PermanentError
from gateway.messages import StudyJob
from gateway.settings import Settings
from plugins.host import ModelHost
from plugins.preprocess import read_image_ref
from plugins.types import ImageFailure, ImageRef, Prediction, SkippedImage
from workers.outputs import ReportedModel, build_heatmap_sc, build_sr

log = structlog.get_logger(__name__)


_hosts: dict[str, ModelHost] = {}


def model_host(settings: Settings, device: str) -> ModelHost:
    """One host per worker process and device: each model is loaded once, not per study."""
    if device not in _hosts:
        _hosts[device] = ModelHost(settings, device=device)
    return _hosts[device]


@dataclass
class ModelRun:
    """What one model produced on one study."""

    model: str
    predictions: list[Prediction] = field(default_factory=list)
    failures: list[ImageFailure] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    seconds_inference: float = 0.0
    seconds_outputs: float = 0.0
    #: Why the SR and SCs could not be built, when the model predicted but its outputs failed.
    outputs_error: str | None = None

    @property
    def risk(self) -> float | None:
        return max((p.risk for p in self.predictions), default=None)


def study_refs(job: StudyJob) -> tuple[list[ImageRef], list[dict[str, str]]]:
    """Headers of the job's instances; unreadable ones are reported, never raised."""
    root = Path(job.storage_root)
    refs, unreadable = [], []
    for instance in job.instances:
        try:
            refs.append(read_image_ref(root / instance.path))
        except PermanentError as exc:
            unreadable.append({"sop_instance_uid": instance.sop_instance_uid, "error": str(exc)})
        except Exception as exc:  # pydicom raises more than read_image_ref names (NotImplementedError...)
            error = f"{instance.path} is not a readable DICOM file: {type(exc).__name__}"
            unreadable.append({"sop_instance_uid": instance.sop_instance_uid, "error": error})
    return refs, unreadable


def accepting_models(host: ModelHost, refs: Sequence[ImageRef]) -> list[str]:
    """Enabled models that accept at least one of *refs*."""
    return [p.name for p in host.models if any(host.skip_reason(p, ref) is None for ref in refs)]


def combine_risk(risks: Sequence[float], policy: str) -> float | None:
    if not risks:
        return None
    if policy == "mean":
        return sum(risks) / len(risks)
    return max(risks)


def run_model(host: ModelHost, model: str, refs: Sequence[ImageRef], job: StudyJob, output_dir: Path) -> ModelRun:
    """Run one model on the study and write its SR and heatmap SCs under *output_dir*."""
    run = ModelRun(model=model)
    started = time.perf_counter()
    for result in host.run(model, refs):
        if isinstance(result, Prediction):
            run.predictions.append(result)
        elif isinstance(result, ImageFailure):
            run.failures.append(result)
        else:
            run.skipped.append(result)
    run.seconds_inference = time.perf_counter() - started
    if not run.predictions:
        return run
    started = time.perf_counter()
    try:
        run.outputs = write_outputs(host, model, run.predictions, output_dir)
    except Exception as exc:  # a writer bug must fail this model's outputs, not the study
        # No traceback and no message in the log: both carry the source's patient attributes when one
        # of them is what failed (pydicom: "Unable to convert '1971-03-04' to 'DA' object", and the
        # frame locals of highdicom's constructor).  The journal, next to the images, keeps the message.
        log.error("outputs.failed", model=model, job_id=job.job_id, error=type(exc).__name__)
        run.outputs_error = f"building outputs failed: {type(exc).__name__}: {exc}"
        run.failures.append(ImageFailure(model_name=model, image=run.predictions[0].image,
                                         error=run.outputs_error))
    run.seconds_outputs = time.perf_counter() - started
    return run


def write_outputs(host: ModelHost, model: str, predictions: Sequence[Prediction], output_dir: Path) -> list[Path]:
    """Build the SR and one SC per prediction with a heatmap; save them as DICOM files."""
    # The loaded model's spec: its version names the checkpoint it runs with, as its predictions do.
    plugin = host.load(model).plugin
    sources = {p.image.sop_instance_uid: pydicom.dcmread(p.image.path) for p in predictions}
    # A resend with the same UIDs but other bytes (the gateway keeps the new copy as a new study
    # version) must give outputs with new UIDs, or the PACS keeps the stale ones.
    digests = {p.image.sop_instance_uid: file_digest(p.image.path) for p in predictions}
    reported = ReportedModel.from_spec(plugin.spec, predictions[0].parameters)
    demo = any(p.demo_weights for p in predictions)
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sr = build_sr(list(sources.values()), predictions, model=reported, demo_weights=demo,
                  source_digests=digests)
    written.append(_save(sr, output_dir))
    for index, prediction in enumerate(p for p in predictions if p.heatmap is not None):
        sc = build_heatmap_sc(sources[prediction.image.sop_instance_uid], None, prediction,
                              instance_number=index + 1, display_name=plugin.spec.display_name,
                              source_digest=digests[prediction.image.sop_instance_uid])
        written.append(_save(sc, output_dir))
    return written


def file_digest(path: str | Path) -> str:
    """A short SHA-256 of a file's bytes: what a source's content is, for the output UIDs."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def _save(dataset: pydicom.Dataset, directory: Path) -> Path:
    path = directory / f"{dataset.SOPInstanceUID}.dcm"
    temp = path.with_suffix(".tmp")
    dataset.save_as(temp, enforce_file_format=True)
    temp.replace(path)
    return path


def prediction_summary(prediction: Prediction) -> dict[str, Any]:
    """A JSON-safe summary of a prediction for the journal and the worklist."""
    return {
        "model": prediction.model_name,
        "model_version": prediction.model_version,
        "sop_instance_uid": prediction.image.sop_instance_uid,
        "frame": prediction.image.frame_index,
        "laterality": prediction.image.laterality,
        "view": prediction.image.view,
        "predicted_class": prediction.predicted_class,
        "probabilities": dict(zip(prediction.classes, map(float, prediction.probabilities), strict=True)),
        "risk": float(prediction.risk),
        "birads": prediction.birads,
        "points": len(prediction.points),
        "demo_weights": prediction.demo_weights,
    }


def output_dir_for(settings: Settings, job: StudyJob, model: str) -> Path:
    return Path(settings.gateway.data_dir).resolve() / "outputs" / job.job_id / model
