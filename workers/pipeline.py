"""The analysis of one study: each header read once, each image decoded once, every model on the same images.

:func:`read_sources` reads every instance's header once.  :func:`analyse_study` then asks each
model which images it accepts (its own rules and the site's routing), checks the pixel budget from
the headers, decodes each accepted image once per frame policy into its display image (Modality
LUT, VOI, photometric interpretation), keeps it while the study is analysed, gives it to every
model that accepts it (one batched run per model over the whole study), and renders the heatmap
Secondary Captures from the same display images.  Each source's content digest (for the output
UIDs) is taken once per study.

Nothing here talks to Celery, so the same code serves the tasks, the tests and the benchmarks.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
import pydicom.uid
import structlog
from pydicom.charset import convert_encodings, default_encoding
from pydicom.filewriter import correct_ambiguous_vr

from gateway.inflate import read_header
from gateway.messages import InstanceRef, StudyJob
from gateway.provenance import is_own_output
from gateway.settings import Settings
from plugins.host import ModelHost, PendingRun, RunTimings, pixel_budget_reason
from plugins.preprocess import FramePolicy, decode_frames, image_ref_from_header, to_grey
from plugins.types import ImageFailure, ImageRef, Prediction, SkippedImage, failure_reason
from workers.cad_sr import AlgorithmRun, build_cad_sr
from workers.identity import AlgorithmIdentity
from workers.outputs import (
    ReportedModel,
    build_extra_map_scs,
    build_heatmap_sc,
    map_for_display,
)
from workers.previews import write_preview
from workers.study_report import ModelResults, Triage, build_study_sr, load_records, save_records
from workers.triage import TriageDecision

log = structlog.get_logger(__name__)

#: Why an object we made ourselves (an SR or heatmap SC the PACS sent back) is not analysed.
OWN_OUTPUT_REASON = "an output of pacs-triage (our own SR or heatmap), never analysed"

_hosts: dict[str, ModelHost] = {}


def model_host(settings: Settings, device: str) -> ModelHost:
    """One host per worker process and device: each model is loaded once, not per study."""
    if device not in _hosts:
        _hosts[device] = ModelHost(settings, device=device)
    return _hosts[device]


# -------------------------------------------------------------------------
# Sources: one header read each
# -------------------------------------------------------------------------


@dataclass
class Source:
    """One instance of the study version, its header read once."""

    instance: InstanceRef
    path: Path
    #: What the header says; ``None`` when it could not be read (see ``error``).
    ref: ImageRef | None = None
    header: pydicom.Dataset | None = None
    error: str | None = None
    own_output: bool = False
    _digest: str | None = None

    @property
    def digest(self) -> str:
        """A short SHA-256 of the file, taken once (new bytes under the same UID give new output UIDs)."""
        if self._digest is None:
            # The gateway took it while receiving; only an instance journalled before it did is hashed here.
            self._digest = self.instance.content_digest or file_digest(self.path)
        return self._digest


def read_sources(job: StudyJob, timings: StudyTimings | None = None) -> list[Source]:
    """Read the header of every instance of *job* once; unreadable ones carry a reason, never raise."""
    started = time.perf_counter()
    root = Path(job.storage_root)
    sources = []
    for instance in job.instances:
        source = Source(instance=instance, path=root / instance.path)
        try:
            header = read_header(source.path)  # streamed: a deflated data set is never inflated whole
            source.header = header
            source.own_output = instance.own_output or is_own_output(header)
            if not source.own_output:
                source.ref = replace(image_ref_from_header(header, source.path), calling_ae=job.calling_ae)
        except Exception as exc:  # untrusted bytes: pydicom raises many types, each only this image's problem
            source.error = failure_reason(f"{instance.path} is not a readable DICOM file", exc)
        sources.append(source)
    if timings is not None:
        timings.header_read += time.perf_counter() - started
    return sources


def content_digests(sources: Sequence[Source]) -> dict[str, str]:
    """SOP Instance UID -> the content digest the gateway took while receiving, for the sources it gave
    one (never hashed here)."""
    return {
        s.instance.sop_instance_uid: s.instance.content_digest for s in sources if s.instance.content_digest
    }


def adds_new_source(job: StudyJob, sources: Sequence[Source]) -> bool:
    """Whether this study version holds a source image that no earlier version had.

    A version made only of our own outputs sent back, or of nothing analysable, adds none: its
    models would give the same findings again.  Version 1, and jobs from a gateway that does not
    say which version an instance joined, always count as new.
    """
    if job.study_version <= 1:
        return True
    return any(
        s.ref is not None and not s.own_output and s.instance.study_version in (0, job.study_version)
        for s in sources
    )


# -------------------------------------------------------------------------
# Decoded images, kept while the study is analysed
# -------------------------------------------------------------------------


@dataclass
class StudyTimings:
    """Where one study's analysis time went, in seconds; ``decodes`` counts decoded images."""

    header_read: float = 0.0
    decode: float = 0.0
    digest: float = 0.0
    decodes: int = 0
    #: Display images an earlier stage decoded, read back instead of decoded again: seconds and count.
    read_back: float = 0.0
    read_backs: int = 0
    models: dict[str, RunTimings] = field(default_factory=dict)
    outputs: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "header_read_s": round(self.header_read, 4),
            "decode_s": round(self.decode, 4),
            "digest_s": round(self.digest, 4),
            "decodes": self.decodes,
            "read_back_s": round(self.read_back, 4),
            "read_backs": self.read_backs,
            "models": {
                name: {
                    "preprocess_s": round(t.preprocess, 4),
                    "forward_s": round(t.forward, 4),
                    "postprocess_s": round(t.postprocess, 4),
                    "batches": t.batches,
                    "outputs_s": round(self.outputs.get(name, 0.0), 4),
                }
                for name, t in self.models.items()
            },
        }


#: The folder, beside the models' ones, where a stage that another follows leaves the display images it
#: decoded, for the later stage (:meth:`DecodedImages.save`); the last stage removes it.
DECODED_DIR = "decoded"
#: The most display-image bytes a stage leaves on disk for the next one, per study: beyond it (a
#: multi-frame object decoded whole) the later stage decodes again rather than fill the disk.
MAX_SAVED_BYTES = 1 << 30


class DecodedImages:
    """Display images of the study's sources, decoded once per frame policy and kept for the study.

    A study analysed in two stages (``triage.first_stage_model``) is two tasks, perhaps in two
    processes: the first stage saves what it decoded (:meth:`save`), and the second, given that folder as
    *saved*, reads each image back instead of decoding it again.  An image is read back only when its
    source's content digest (the gateway's, in *digests*) is the one it was saved with, and its
    geometry is the one its header declares; anything else is decoded.
    """

    def __init__(
        self, timings: StudyTimings, *, saved: Path | None = None, digests: Mapping[str, str] | None = None
    ) -> None:
        self.timings = timings
        self._frames: dict[tuple[str, str], list[tuple[ImageRef, np.ndarray]] | str] = {}
        # Two models' read-ahead threads may reach one image at once: it is still decoded once.
        self._decoding = threading.Lock()
        self._saved = saved
        self._digests = dict(digests or {})

    @staticmethod
    def _key(ref: ImageRef, policy: str) -> tuple[str, str]:
        # Every policy picks the one frame of a single-frame image: one decode serves them all.
        return ref.sop_instance_uid, policy if ref.number_of_frames > 1 else "single"

    def frames(self, ref: ImageRef, policy: str) -> list[tuple[ImageRef, np.ndarray]] | str:
        """The frames *policy* selects as (frame ref, display image), or why they cannot be decoded."""
        key = self._key(ref, policy)
        with self._decoding:
            return self._decoded(ref, policy, key)

    def _decoded(
        self, ref: ImageRef, policy: str, key: tuple[str, str]
    ) -> list[tuple[ImageRef, np.ndarray]] | str:
        if key not in self._frames:
            started = time.perf_counter()
            saved = self._read_saved(ref, key)
            if saved is not None:
                self._frames[key] = saved
                self.timings.read_back += time.perf_counter() - started
                self.timings.read_backs += 1
                return saved
            try:
                self._frames[key] = [
                    (replace(ref, frame_index=i), image)
                    for i, image in decode_frames(ref.path, cast(FramePolicy, policy))
                ]
            except Exception as exc:  # decode_frames names the file; each failure is this image's alone
                self._frames[key] = failure_reason("decoding", exc)
            self.timings.decode += time.perf_counter() - started
            self.timings.decodes += 1
        return self._frames[key]

    @staticmethod
    def _file(directory: Path, key: tuple[str, str]) -> Path:
        # Named by a digest of the key, not by the UID the header gave: no header value becomes a path.
        return directory / f"{hashlib.sha256('|'.join(key).encode()).hexdigest()[:32]}.npy"

    def save(self, directory: Path) -> int:
        """Write the images decoded here, of sources with a known content digest, to *directory* for a later
        stage (at most :data:`MAX_SAVED_BYTES` in all); return how many were written.

        One uncompressed file per image: the digest, the frame indexes and each frame, as consecutive
        ``.npy`` arrays.  A later stage reads a full-field view back in milliseconds, where decoding it
        again takes tens of them from an uncompressed source and far more from JPEG 2000."""
        written, total = 0, 0
        for key, decoded in list(self._frames.items()):
            digest = self._digests.get(key[0])
            if isinstance(decoded, str) or not digest:
                continue
            total += sum(image.nbytes for _, image in decoded)
            if total > MAX_SAVED_BYTES:
                break
            directory.mkdir(parents=True, exist_ok=True)
            path = self._file(directory, key)
            temp = path.with_suffix(".tmp")
            with temp.open("wb") as out:
                np.lib.format.write_array(out, np.array([digest]), allow_pickle=False)
                np.lib.format.write_array(
                    out, np.array([frame_ref.frame_index for frame_ref, _ in decoded]), allow_pickle=False
                )
                for _, image in decoded:
                    np.lib.format.write_array(out, image, allow_pickle=False)
            temp.replace(path)
            written += 1
        return written

    def _read_saved(self, ref: ImageRef, key: tuple[str, str]) -> list[tuple[ImageRef, np.ndarray]] | None:
        """The frames an earlier stage saved for *key*, or ``None`` when there are none it may use."""
        digest = self._digests.get(key[0])
        if self._saved is None or not digest:
            return None
        path = self._file(self._saved, key)
        try:
            with path.open("rb") as saved:
                if np.lib.format.read_array(saved, allow_pickle=False).tolist() != [digest]:
                    return None
                indexes = np.lib.format.read_array(saved, allow_pickle=False).tolist()
                frames = [
                    (
                        replace(ref, frame_index=int(index)),
                        np.lib.format.read_array(saved, allow_pickle=False),
                    )
                    for index in indexes
                ]
        # None saved, or not what save() writes: the image is decoded instead.
        except (OSError, ValueError, TypeError, MemoryError):
            return None
        for frame_ref, image in frames:
            grey_or_rgb = image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
            declared = ref.rows <= 0 or image.shape[:2] == (ref.rows, ref.columns)
            if (
                image.dtype != np.uint8
                or not grey_or_rgb
                or not declared
                or not 0 <= frame_ref.frame_index < max(1, ref.number_of_frames)
            ):
                return None
        return frames or None

    def display(self, ref: ImageRef) -> np.ndarray | None:
        """The grey display image of *ref*'s frame, as decoded for a model; ``None`` if never decoded."""
        # A copy of the items: the outputs thread reads while the next model may decode more.
        for (uid, _), decoded in list(self._frames.items()):
            if uid != ref.sop_instance_uid or isinstance(decoded, str):
                continue
            for frame_ref, image in decoded:
                if frame_ref.frame_index == ref.frame_index:
                    return to_grey(image)
        return None


# -------------------------------------------------------------------------
# The study's analysis
# -------------------------------------------------------------------------


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
    #: Its maps as kept for the study report (``outputs.report: study``), in memory.
    kept_maps: KeptMaps | None = None

    @property
    def risk(self) -> float | None:
        return max((p.risk for p in self.predictions), default=None)


def study_budget_refusals(host: ModelHost, refs: Sequence[ImageRef], settings: Settings) -> dict[str, str]:
    """Images refused by the pixel budget before any decoding: SOP Instance UID -> reason.

    Each image accepted by some enabled model is held to ``worker.max_image_pixel_bytes``; in the
    job's order they are summed against ``worker.max_study_pixel_bytes``, and those past it are
    refused.  Every enabled model counts, not one stage's, so both stages refuse the same images.
    """
    refusals: dict[str, str] = {}
    total = 0
    limit = settings.worker.max_study_pixel_bytes
    for ref in refs:
        if not any(host.skip_reason(plugin, ref) is None for plugin in host.models):
            continue
        if reason := pixel_budget_reason(ref, settings.worker.max_image_pixel_bytes):
            refusals[ref.sop_instance_uid] = reason
            continue
        total += ref.declared_pixel_bytes
        if total > limit:
            refusals[ref.sop_instance_uid] = (
                f"the study's images declare more pixels than the per-study budget of {limit / 2**20:.0f} MiB "
                "(worker.max_study_pixel_bytes); this image is past it"
            )
            total -= ref.declared_pixel_bytes
    return refusals


def accepting_models(host: ModelHost, refs: Sequence[ImageRef]) -> list[str]:
    """Enabled models that accept at least one of *refs*."""
    return [p.name for p in host.models if any(host.skip_reason(p, ref) is None for ref in refs)]


def skip_reasons(
    host: ModelHost, sources: Sequence[Source], refusals: dict[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """For each instance, why no model analyses it: SOP Instance UID -> {model or "all": reason}."""
    reasons: dict[str, dict[str, str]] = {}
    for source in sources:
        uid = source.instance.sop_instance_uid
        if source.error is not None:
            reasons[uid] = {"all": source.error}
        elif source.own_output or source.ref is None:
            reasons[uid] = {"all": OWN_OUTPUT_REASON}
        elif refusals and uid in refusals:
            reasons[uid] = {"all": refusals[uid]}
        else:
            reasons[uid] = {p.name: host.skip_reason(p, source.ref) or "accepted" for p in host.models}
    return reasons


def combine_risk(risks: Sequence[float], policy: str) -> float | None:
    if not risks:
        return None
    if policy == "mean":
        return sum(risks) / len(risks)
    return max(risks)


def analyse_study(
    host: ModelHost,
    models: Iterable[str],
    sources: Sequence[Source],
    settings: Settings,
    output_dir: Path,
    timings: StudyTimings | None = None,
    on_model_done: Callable[[ModelRun], None] | None = None,
    images: DecodedImages | None = None,
    maps_on_disk: bool = True,
) -> list[ModelRun]:
    """Run *models* over the study's *sources* and keep each model's predictions and maps under
    ``output_dir / <model>`` (with ``outputs.report: per-model``, also write its SR and heatmap SCs there).

    Each image is decoded at most once per frame policy, whichever models read it; images the
    pixel budget refuses are never decoded.  Nothing raises for a bad image or a failing model.

    A model's SR and SCs are built on a second thread while the next model runs: building them is
    Python and highdicom work, the forward pass is torch's (which leaves the interpreter lock), so
    on a GPU, or with a core to spare, the outputs cost little besides the models.

    :param on_model_done: Called with each model's run, in order, once its outputs are written (the journal).
    :param images: The study's decoded images, to share them with :func:`write_study_report` afterwards.
    :param maps_on_disk: Also write each model's kept maps (:data:`HEATMAPS_FILE`) for a later stage's
        study report.  The last stage's report takes them from memory (:attr:`ModelRun.kept_maps`), so that
        stage need not deflate and write them, nor read them back.
    """
    timings = timings if timings is not None else StudyTimings()
    models = list(models)
    refs = [s.ref for s in sources if s.ref is not None]
    refusals = study_budget_refusals(host, refs, settings)
    by_uid = {s.instance.sop_instance_uid: s for s in sources}
    decoded = images if images is not None else DecodedImages(timings)
    runs: list[ModelRun] = []
    building: list[tuple[ModelRun, Future[None]]] = []

    def build(run: ModelRun) -> None:
        started = time.perf_counter()
        # The last model's outputs are on the study's path (the others are built while the next model runs):
        # with no later stage, its maps are shrunk only if the report asks for them.
        lazily = not maps_on_disk and run.model == models[-1]
        _build_outputs(
            host, run, by_uid, decoded, output_dir / run.model, timings, settings, maps_on_disk, lazily
        )
        run.seconds_outputs = time.perf_counter() - started
        timings.outputs[run.model] = run.seconds_outputs

    def finish(wait: bool) -> None:
        while building and (wait or building[0][1].done()):
            run, future = building.pop(0)
            future.result()
            if on_model_done is not None:
                on_model_done(run)

    def begin(model: str) -> tuple[ModelRun, PendingRun | None]:
        run = ModelRun(model=model)
        timing = timings.models.setdefault(model, RunTimings())
        return run, _start_one(host, model, refs, refusals, decoded, run, timing)

    upcoming: list[tuple[ModelRun, PendingRun | None]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="outputs") as builder:
        try:
            for index, model in enumerate(models):
                run, pending = upcoming.pop() if upcoming else begin(model)
                started = time.perf_counter()
                if host.reads_ahead() and index + 1 < len(models):
                    # The next model's first inputs are decoded and preprocessed while this one runs.
                    upcoming.append(begin(models[index + 1]))
                _finish_one(pending, run)
                run.seconds_inference = time.perf_counter() - started
                runs.append(run)
                building.append((run, builder.submit(build, run) if run.predictions else _done()))
                finish(wait=False)
            finish(wait=True)
        finally:
            for _, abandoned in upcoming:
                if abandoned is not None:
                    abandoned.close()
    return runs


def _done() -> Future[None]:
    future: Future[None] = Future()
    future.set_result(None)
    return future


def _start_one(
    host: ModelHost,
    model: str,
    refs: Sequence[ImageRef],
    refusals: dict[str, str],
    images: DecodedImages,
    run: ModelRun,
    timings: RunTimings,
) -> PendingRun | None:
    """Begin *model*'s run over the images it accepts (the others are *run*'s skipped, with the reason);
    ``None`` when it accepts none."""
    plugin = host.plugin(model)
    accepted = []
    for ref in refs:
        reason = host.skip_reason(plugin, ref) or refusals.get(ref.sop_instance_uid)
        if reason is None:
            accepted.append(ref)
        else:
            run.skipped.append(SkippedImage(model_name=model, image=ref, reason=reason))
    if not accepted:
        return None
    # Each image is decoded when a model first reaches it (once for every model: ``images`` keeps it),
    # on the host's read-ahead thread where it has one, so the decoding overlaps the forward passes.
    return host.start_run(model, accepted, images.frames, timings)


def _finish_one(pending: PendingRun | None, run: ModelRun) -> None:
    for result in pending.finish() if pending is not None else ():
        if isinstance(result, Prediction):
            run.predictions.append(result)
        elif isinstance(result, ImageFailure):
            run.failures.append(result)
        else:
            run.skipped.append(result)


def study_heatmap_model(
    kept: Sequence[str], decision: TriageDecision | None, settings: Settings, accepting: Sequence[str] = ()
) -> str | None:
    """The model whose heatmaps make the study's heatmap series, chosen once every stage is done.

    ``outputs.heatmap_model`` when it predicted on the study, else the model that set the study's triage
    (:attr:`TriageDecision.model`), else the first of *accepting* (the enabled models that read the study,
    in their order) that predicted, else the first model that did.  ``None`` when no model predicted, and
    with ``outputs.report: per-model`` (each model then shows its own heatmaps in its own series).

    :param kept: The models with kept predictions on this study.
    """
    if settings.outputs.report == "per-model":
        return None
    deciding = decision.model if decision is not None else None
    for wanted in (settings.outputs.heatmap_model, deciding, *accepting, *kept):
        if wanted and wanted in kept:
            return wanted
    return None


def _build_outputs(
    host: ModelHost,
    run: ModelRun,
    by_uid: dict[str, Source],
    images: DecodedImages,
    output_dir: Path,
    timings: StudyTimings,
    settings: Settings | None = None,
    maps_on_disk: bool = True,
    lazily: bool = False,
) -> None:
    per_model = settings is None or settings.outputs.report == "per-model"
    extra_maps = settings is not None and settings.outputs.extra_maps != "none"
    try:
        if not per_model:
            # Before the predictions file: a model's kept predictions never lack the maps kept with them.
            frames = str(host.load(run.model).options["frames"])
            run.kept_maps = keep_maps(run.predictions, frames, extra_maps, lazily=lazily)
            if maps_on_disk:
                write_kept_maps(output_dir / HEATMAPS_FILE, run.kept_maps)
        run.outputs = write_outputs(
            host,
            run.model,
            run.predictions,
            by_uid,
            images,
            output_dir,
            timings,
            report=per_model,
            heatmaps=per_model,
            max_points=settings.outputs.max_points if settings else 5,
            extra_maps=extra_maps,
        )
    except Exception as exc:  # a writer bug must fail this model's outputs, not the study
        # The type and our words only: highdicom and pydicom quote the source's patient attributes
        # ("Unable to convert '1958-11-23' to 'DA' object"), here and in the journal alike.
        run.outputs_error = failure_reason("building outputs failed", exc)
        log.error("outputs.failed", model=run.model, error=run.outputs_error)
        run.failures.append(
            ImageFailure(model_name=run.model, image=run.predictions[0].image, error=run.outputs_error)
        )


#: The predictions of one model on one study, kept in its output folder for the study report.
PREDICTIONS_FILE = "predictions.json"
#: The heatmaps (and kept extra maps) of one model on one study, beside its predictions, for the study's
#: heatmap series: which model it shows is known only once every stage is done.
HEATMAPS_FILE = "heatmaps.npz"
#: The folder, beside the models' ones, that holds the study report.
STUDY_REPORT_DIR = "study-report"


def write_outputs(
    host: ModelHost,
    model: str,
    predictions: Sequence[Prediction],
    by_uid: dict[str, Source],
    images: DecodedImages,
    output_dir: Path,
    timings: StudyTimings | None = None,
    *,
    report: bool = True,
    heatmaps: bool = True,
    max_points: int = 5,
    extra_maps: bool = False,
) -> list[Path]:
    """Build the model's heatmap SCs (one per prediction with a heatmap, when *heatmaps*; with *extra_maps*
    also one SC per further map) and, when *report* (``outputs.report: per-model``), its own SR with its
    heatmaps in a series of their own, from the kept headers and display images (no source is read again);
    save them as DICOM files.  The predictions are kept as JSON beside them for the study report
    (:func:`write_study_report`), which is built once every stage is done (the maps it draws the study's
    heatmap series from are kept by :func:`keep_maps`)."""
    # The loaded model's spec: its version names the checkpoint it runs with, as its predictions do.
    plugin = host.load(model).plugin
    sources = {p.image.sop_instance_uid: by_uid[p.image.sop_instance_uid] for p in predictions}
    started = time.perf_counter()
    # A resend with the same UIDs but other bytes (the gateway keeps the new copy as a new study
    # version) must give outputs with new UIDs, or the PACS keeps the stale ones.
    digests = {uid: source.digest for uid, source in sources.items()}
    if timings is not None:
        timings.digest += time.perf_counter() - started
    headers = {uid: source.header for uid, source in sources.items() if source.header is not None}
    reported = ReportedModel.from_spec(plugin.spec, predictions[0].parameters)
    output_dir.mkdir(parents=True, exist_ok=True)
    identity = AlgorithmIdentity.from_loaded(host.load(model))
    written: list[Path] = []
    scs: list[pydicom.Dataset] = []
    for index, prediction in enumerate(p for p in predictions if p.heatmap is not None and heatmaps):
        uid = prediction.image.sop_instance_uid
        sc = build_heatmap_sc(
            headers[uid],
            images.display(prediction.image),
            prediction,
            identity=identity,
            per_model_series=report,
            instance_number=index + 1,
            source_digest=digests[uid],
        )
        scs.append(sc)
        written.append(_save(sc, output_dir))
    for prediction in (p for p in predictions if p.extra_maps and heatmaps and extra_maps):
        uid = prediction.image.sop_instance_uid
        for extra in build_extra_map_scs(
            headers[uid],
            images.display(prediction.image),
            prediction,
            identity=identity,
            source_digest=digests[uid],
        ):
            written.append(_save(extra, output_dir))
    save_records(output_dir / PREDICTIONS_FILE, predictions, reported, None, identity)
    if report:
        results = [ModelResults(model=reported, predictions=predictions, heatmaps=scs, identity=identity)]
        sr = build_study_sr(
            list(headers.values()),
            results,
            max_points=max_points,
            source_digests=digests,
            series_key=(reported.model_id, reported.version),
            model_series=model,
        )
        written.insert(0, _save(sr, output_dir))
    return written


@dataclass(frozen=True)
class KeptMaps:
    """One model's maps on one study as kept for the study report: its frame policy, and each kept
    prediction's heatmap (and further maps) as float16 at the size its SC shows, keyed by the
    prediction's index in the kept predictions (``"<index>:heatmap"``, ``"<index>:extra:<name>"``).

    Each map is kept at the size its SC shows (:func:`workers.outputs.map_for_display`): a full-field
    map is ten times smaller.  float16, in memory as on disk (:data:`HEATMAPS_FILE`), so the SCs drawn
    from maps kept in memory and from maps read back are the same.
    """

    frames: str
    arrays: Mapping[str, np.ndarray]

    def attach(self, predictions: Sequence[Prediction]) -> list[Prediction]:
        """*predictions* (as kept, in order) with their kept maps, widened to float32.

        The maps are widened (and, when kept lazily, shrunk first) side by side, one per core: that is
        NumPy and OpenCV work, which leaves the interpreter lock, and the report waits for it."""
        keys = [key for key in self.arrays if int(key.split(":", 1)[0]) < len(predictions)]
        with ThreadPoolExecutor(max_workers=max(1, min(len(keys), os.cpu_count() or 1))) as pool:
            widened = dict(
                zip(keys, pool.map(lambda key: self.arrays[key].astype(np.float32), keys), strict=True)
            )
        with_maps = []
        for index, prediction in enumerate(predictions):
            prefix = f"{index}:extra:"
            extra = {key[len(prefix) :]: widened[key] for key in keys if key.startswith(prefix)}
            with_maps.append(replace(prediction, heatmap=widened.get(f"{index}:heatmap"), extra_maps=extra))
        return with_maps

    def heatmap_of(self, predictions: Sequence[Prediction]) -> Callable[[Prediction], np.ndarray | None]:
        """A reader of one of *predictions*' (as kept, in order) heatmaps, widened when asked for."""

        def heatmap(prediction: Prediction) -> np.ndarray | None:
            index = next((i for i, each in enumerate(predictions) if each is prediction), None)
            kept = None if index is None else self.arrays.get(f"{index}:heatmap")
            return None if kept is None else kept.astype(np.float32)

        return heatmap


def keep_maps(
    predictions: Sequence[Prediction], frames: str, extra_maps: bool, *, lazily: bool = False
) -> KeptMaps:
    """*predictions*' heatmaps (and, with *extra_maps*, their further maps) as :class:`KeptMaps`, with the
    model's frame policy (*frames*).

    :param lazily: Shrink each map when it is first asked for, not now: the study report of the stage
        that ran the model wants one model's maps for its SCs and few others (the CAD SR's), and the
        predictions hold the full maps until then anyway.
    """
    maps: dict[str, np.ndarray] = {}
    for index, prediction in enumerate(predictions):
        if prediction.heatmap is not None:
            maps[f"{index}:heatmap"] = prediction.heatmap
        for name, extra in sorted(prediction.extra_maps.items()) if extra_maps else ():
            maps[f"{index}:extra:{name}"] = extra
    shrunk = _ShrunkMaps(maps)
    return KeptMaps(frames=frames, arrays=shrunk if lazily else dict(shrunk))


class _ShrunkMaps(Mapping[str, np.ndarray]):
    """Full maps by key, each shrunk as its SC shows it and narrowed to float16 when first read."""

    def __init__(self, maps: Mapping[str, np.ndarray]) -> None:
        self._maps = maps
        self._shrunk: dict[str, np.ndarray] = {}
        # One lock per map: several threads may ask for one map at once (it is shrunk once), and for
        # different maps (shrunk side by side).
        self._locks = {key: threading.Lock() for key in maps}

    def __getitem__(self, key: str) -> np.ndarray:
        with self._locks[key]:
            if key not in self._shrunk:
                self._shrunk[key] = map_for_display(self._maps[key]).astype(np.float16)
            return self._shrunk[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)


def write_kept_maps(path: Path, kept: KeptMaps) -> None:
    """Write *kept* as an uncompressed NumPy archive at *path*, for a later stage's study report.

    Stored, not deflated: the first stage's report step waits for this file, and deflating four
    full-field maps took 0.29 s even at zlib's fastest level (0.02 s stored), longer than the first
    model's forward pass, for half the bytes (float16 maps at the size their SC shows, about 6.4 MB for
    a full-field view).  Reading it back needs no inflating either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp.npz")
    # What np.savez writes (one .npy member per array, which np.load reads), written through a temporary
    # file so a reader never sees half an archive.
    with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in {"frames": np.array(kept.frames), **kept.arrays}.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    temp.replace(path)


def read_kept_maps(path: Path) -> KeptMaps:
    """The :class:`KeptMaps` written at *path*."""
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    return KeptMaps(frames=str(arrays.pop("frames")), arrays=arrays)


def kept_heatmaps(path: Path, predictions: Sequence[Prediction]) -> Callable[[Prediction], np.ndarray | None]:
    """A reader of the heatmaps :func:`write_kept_maps` wrote at *path* for *predictions* (as kept, in order): each
    of these predictions' maps is read alone, when it is asked for (the CAD SR wants few)."""

    def heatmap(prediction: Prediction) -> np.ndarray | None:
        index = next((i for i, each in enumerate(predictions) if each is prediction), None)
        if index is None:
            return None
        with np.load(path) as archive:
            key = f"{index}:heatmap"
            return archive[key].astype(np.float32) if key in archive else None

    return heatmap


def write_study_heatmaps(
    model_dir: Path,
    with_maps: Sequence[Prediction],
    frames: str,
    identity: AlgorithmIdentity | None,
    by_uid: dict[str, Source],
    images: DecodedImages,
    *,
    extra_maps: bool = False,
) -> tuple[list[pydicom.Dataset], list[Path]]:
    """Build and save in *model_dir* the study's heatmap SCs from one model's kept maps, over the display
    images the model saw (decoded once more only where this stage did not decode them).

    :param with_maps: The model's kept predictions with their kept maps (:meth:`KeptMaps.attach`).
    :param frames: The model's frame policy (:attr:`KeptMaps.frames`).
    :returns: The heatmap SCs (for the SR to reference), and the paths of every SC written.
    """
    jobs: list[tuple[Source, pydicom.Dataset, np.ndarray, Prediction, int | None]] = []
    index = 0
    for prediction in with_maps:
        source = by_uid.get(prediction.image.sop_instance_uid)
        if source is None or source.header is None or source.ref is None:
            continue
        if prediction.heatmap is None and not (extra_maps and prediction.extra_maps):
            continue
        decoded = images.frames(source.ref, frames)
        if isinstance(decoded, str):
            raise ValueError(f"a source image of the heatmap series cannot be decoded again: {decoded}")
        display = images.display(prediction.image)
        if display is None:
            raise ValueError("the frame a heatmap belongs to is not among the frames its model reads")
        source.digest  # noqa: B018 - taken here, once, rather than by two threads at a time
        number = None
        if prediction.heatmap is not None:
            index += 1
            number = index
        jobs.append((source, source.header, display, prediction, number))

    def build(
        job: tuple[Source, pydicom.Dataset, np.ndarray, Prediction, int | None],
    ) -> tuple[pydicom.Dataset | None, list[Path]]:
        source, header, display, prediction, number = job
        sc = None
        paths = []
        if number is not None:
            sc = build_heatmap_sc(
                header,
                display,
                prediction,
                identity=identity,
                instance_number=number,
                source_digest=source.digest,
            )
            paths.append(_save(sc, model_dir))
        if extra_maps:
            for extra in build_extra_map_scs(
                header, display, prediction, identity=identity, source_digest=source.digest
            ):
                paths.append(_save(extra, model_dir))
        return sc, paths

    # Drawing, encoding and writing an SC is mostly OpenCV, NumPy and file work, which leave the interpreter
    # lock: the SCs of a study are built side by side, one per core.
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1, 4))) as pool:
        built = list(pool.map(build, jobs))
    heatmaps = [sc for sc, _ in built if sc is not None]
    written = [path for _, paths in built for path in paths]
    return heatmaps, written


def write_study_report(
    sources: Sequence[Source],
    output_root: Path,
    decision: TriageDecision | None,
    settings: Settings,
    triage: Triage | None = None,
    *,
    images: DecodedImages | None = None,
    accepting: Sequence[str] = (),
    failed_images: Mapping[str, Sequence[str]] | None = None,
    on_problem: Callable[[str], None] | None = None,
    kept_maps: Mapping[str, KeptMaps] | None = None,
) -> list[Path]:
    """Build and save the study's heatmap series, its SR and, for a mammography study, its Mammography CAD SR
    (``outputs.cad_sr``) from every model's kept predictions and maps under *output_root*; return their
    paths, the SCs first.

    Called once the last stage is done, so the heatmap series can show the model that set the study's
    triage (:func:`study_heatmap_model`); the SR references those SCs.  Empty when no model predicted.

    :param decision: The study's triage decision, stated in the study conclusion.
    :param triage: The same policy for one breast's images (the breast conclusions' triage category).
    :param images: The last stage's decoded images (their display images are the heatmaps' underlay);
        by default the study's images are decoded here.
    :param accepting: The enabled models that read the study, in order (the heatmap model's last fallback; a
        model among them without kept predictions is a failed algorithm of the CAD SR).
    :param failed_images: Plugin name -> SOP Instance UIDs the model failed on (the journalled failures), for
        the CAD SR's summaries; without it a model with predictions counts as having succeeded on its images.
    :param on_problem: Told, in our words, why the CAD SR could not be built.  The study SR and heatmaps
        still go out: a mark-up a workstation may draw is not worth the results the PACS needs.
    :param kept_maps: Plugin name -> its kept maps in memory (this stage's models,
        :attr:`ModelRun.kept_maps`); the other models' are read from their :data:`HEATMAPS_FILE`.
    """
    by_uid = {s.instance.sop_instance_uid: s for s in sources if s.header is not None}
    kept: dict[str, tuple[Path, ModelResults, list[Prediction]]] = {}
    for path in sorted(output_root.glob(f"*/{PREDICTIONS_FILE}")):
        reported, score, identity, as_kept = load_records(path)
        predictions = [p for p in as_kept if p.image.sop_instance_uid in by_uid]
        if predictions:
            results = ModelResults(model=reported, predictions=predictions, score=score, identity=identity)
            kept[path.parent.name] = (path.parent, results, as_kept)
    if not kept:
        return []
    in_memory = kept_maps or {}

    def maps_of(name: str) -> KeptMaps | None:
        """The model's kept maps: from memory, else read from its folder (none when it kept none)."""
        if name in in_memory:
            return in_memory[name]
        path = kept[name][0] / HEATMAPS_FILE
        return read_kept_maps(path) if path.exists() else None

    written: list[Path] = []
    shown = study_heatmap_model(list(kept), decision, settings, accepting)
    read: dict[str, list[Prediction]] = {}
    shown_maps = maps_of(shown) if shown is not None else None
    if shown is not None and shown_maps is not None:
        read[shown] = shown_maps.attach(kept[shown][2])
    directory = output_root / STUDY_REPORT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    # The CAD SR is Python and pydicom work, the heatmap SCs mostly OpenCV, zlib and file work (which leave
    # the interpreter lock): the CAD SR is built on a thread of its own while the SCs are drawn.  The study
    # SR, Python too, comes after the SCs: built beside them as well, it only fought the CAD SR for the
    # interpreter lock (0.68 s for the report instead of 0.62 s, four views, four models).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cad-sr") as beside:
        cad_sr: Future[Path | None] | None = None
        if settings.outputs.cad_sr.enabled:
            others = {name: maps for name in kept if name not in read and (maps := in_memory.get(name))}
            cad_sr = beside.submit(
                write_cad_sr,
                by_uid,
                dict(kept),  # this thread replaces the shown model's entry (its SCs) meanwhile
                decision,
                settings,
                directory,
                accepting,
                failed_images or {},
                read=read,
                kept_maps=others,
            )
        if shown is not None:
            model_dir, results, as_kept = kept[shown]
            scs: list[pydicom.Dataset] = []
            if shown_maps is not None:
                scs, written = write_study_heatmaps(
                    model_dir,
                    read[shown],
                    shown_maps.frames,
                    results.identity,
                    by_uid,
                    images if images is not None else DecodedImages(StudyTimings()),
                    extra_maps=settings.outputs.extra_maps != "none",
                )
            kept[shown] = (model_dir, replace(results, heatmaps=scs), as_kept)
        reports = [results for _, results, _ in kept.values()]
        used = sorted({p.image.sop_instance_uid for r in reports for p in r.predictions})
        evidence = [header for uid in used if (header := by_uid[uid].header) is not None]
        sr = build_study_sr(
            evidence,
            reports,
            decision=decision,
            triage=triage,
            max_points=settings.outputs.max_points,
            source_digests={uid: by_uid[uid].digest for uid in used},
        )
        written = [*written, _save(sr, directory)]
        try:
            cad = cad_sr.result() if cad_sr is not None else None
        except Exception as exc:  # our words and the type only: a header value may be in the message
            reason = failure_reason("building the Mammography CAD SR failed", exc)
            log.error("cad_sr.failed", reason=reason)
            if on_problem is not None:
                on_problem(reason)
            cad = None
    if cad is not None:
        written.append(cad)
    return written


def write_cad_sr(
    by_uid: Mapping[str, Source],
    kept: Mapping[str, tuple[Path, ModelResults, list[Prediction]]],
    decision: TriageDecision | None,
    settings: Settings,
    directory: Path,
    accepting: Sequence[str],
    failed_images: Mapping[str, Sequence[str]],
    *,
    read: Mapping[str, Sequence[Prediction]] | None = None,
    kept_maps: Mapping[str, KeptMaps] | None = None,
) -> Path | None:
    """Build and save the study's Mammography CAD SR in *directory* when the study holds MG For Presentation
    images; ``None`` when it holds none.

    Every kept model's MG predictions get their kept heatmaps back for the peaks: those of a model in *read*
    (its kept predictions with their maps, as :meth:`KeptMaps.attach` gave them to the heatmap series), else
    each map the CAD SR wants, from *kept_maps* (in memory) or read alone (:func:`kept_heatmaps`).  A model
    of *accepting* without kept predictions is listed as failed.
    """
    mg = {
        uid: source.header
        for uid, source in by_uid.items()
        if source.header is not None
        and not source.own_output
        and source.ref is not None
        and source.ref.modality == "MG"
        and source.ref.presentation_intent.upper() != "FOR PROCESSING"
        and source.ref.number_of_frames <= 1
    }
    if not mg:
        return None
    runs: list[AlgorithmRun] = []
    for name, (model_dir, results, as_kept) in kept.items():
        maps = model_dir / HEATMAPS_FILE
        with_maps = (read or {}).get(name, as_kept)
        heatmap_of = None
        if name not in (read or {}) and kept_maps and name in kept_maps:
            heatmap_of = kept_maps[name].heatmap_of(as_kept)
        elif name not in (read or {}) and maps.exists():
            heatmap_of = kept_heatmaps(maps, as_kept)
        predictions = [p for p in with_maps if p.image.sop_instance_uid in mg]
        if predictions:
            failed = [uid for uid in failed_images.get(name, ()) if uid in mg]
            runs.append(
                AlgorithmRun(
                    results=replace(results, predictions=predictions),
                    failed_images=failed,
                    heatmap_of=heatmap_of,
                )
            )
    for name in accepting:
        if name not in kept and any(uid in mg for uid in failed_images.get(name, mg)):
            reported = ReportedModel(model_id=name, name=name, version="", display_name=name)
            failed = [uid for uid in failed_images.get(name, ()) if uid in mg]
            runs.append(
                AlgorithmRun(results=ModelResults(model=reported, predictions=[]), failed_images=failed)
            )
    if not runs:
        return None
    cad = settings.outputs.cad_sr
    document = build_cad_sr(
        [mg[uid] for uid in sorted(mg)],
        runs,
        decision=decision,
        high_point=settings.triage.high_operating_point,
        fallback_threshold=settings.triage.high_risk_threshold,
        max_points=settings.outputs.max_points,
        max_peaks=cad.max_peaks,
        manufacturer=cad.manufacturer,
        model_name=cad.model_name,
        source_digests={uid: by_uid[uid].digest for uid in mg},
    )
    return _save(document, directory)


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
    settle_ambiguous_vrs(dataset)
    dataset.save_as(temp, enforce_file_format=True)
    temp.replace(path)
    write_preview(dataset, path)  # what the web service shows, so that it never decodes pixel data
    return path


def settle_ambiguous_vrs(dataset: pydicom.Dataset) -> None:
    """Settle the ambiguous VRs of *dataset*, a data set built here, once over its whole tree, so that
    pydicom writes it without settling them again for each nested data set.

    pydicom (3.0) runs ``correct_ambiguous_vr`` on each data set whose original encoding or character
    set differs from the file's, and for a nested one that pass walks the data set's whole subtree:
    a data set built from scratch has neither, so a study SR's 2600 nested items were walked once per
    level of nesting (a quarter of its write).  Here the pass runs once (it recurses into every
    sequence), then each data set built from scratch is given, through the public
    ``Dataset.set_original_encoding``, the encoding the file is written in and the character set
    pydicom gives it, which tells the writer it is settled.  A data set read from a file keeps its own
    original encoding and is settled by pydicom as before; the bytes written are the same either
    way (``tests/test_study_report.py`` compares them).
    """
    syntax = pydicom.uid.UID(dataset.file_meta.TransferSyntaxUID)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    correct_ambiguous_vr(dataset, little)
    pending = [dataset]
    while pending:
        each = pending.pop()
        if each.original_encoding == (None, None):
            # The character set pydicom gives a data set built here: its own, else the default (the
            # writer passes a nested one its parent's for the text itself).
            charset = each.get((0x0008, 0x0005))
            each.set_original_encoding(
                implicit,
                little,
                convert_encodings(charset.value) if charset is not None else default_encoding,
            )
        for element in each.elements():
            if element.VR == "SQ":
                pending.extend(each[element.tag].value)


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
