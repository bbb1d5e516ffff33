"""The model host: finds model plugins, loads each once, and runs images through them safely.

Whatever a plugin does wrong (raises, returns NaN or the wrong shape, runs out of memory) becomes
an :class:`~plugins.types.ImageFailure` for the images concerned; the host and the other plugins
carry on.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import numpy as np
import pluggy
import structlog
import torch
from torch import nn

from gateway.errors import PermanentError, PluginError, StartupError
from gateway.settings import RouteRule, Settings
from plugins.base import ModelOutput, ModelPlugin, TorchModelPlugin
from plugins.manager import get_plugin_manager
from plugins.preprocess import (
    BREAST_PROJECTION,
    BREAST_TOMOSYNTHESIS,
    CROP_MODES,
    FOR_PROCESSING_SOP_CLASSES,
    FRAME_POLICIES,
    FramePolicy,
    decode_frames,
)
from plugins.types import (
    ImageFailure,
    ImageRef,
    InvalidPredictionError,
    Letterbox,
    OperatingPoint,
    Prediction,
    RiskCalibrator,
    SkippedImage,
    default_operating_points,
    failure_reason,
)
from plugins.weights import checkpoint_options, checkpoint_spec, load_checkpoint, resolve_weights

log = structlog.get_logger(__name__)

_Item = TypeVar("_Item")

Result = Prediction | ImageFailure | SkippedImage
#: Decodes one image's frames under a frame policy: the frames, or why they cannot be decoded (our
#: words), or it raises (the host words the reason).
_Decoder = Callable[[ImageRef, str], "list[tuple[ImageRef, np.ndarray]] | str"]
_TOMOSYNTHESIS_SOP_CLASSES = frozenset({BREAST_TOMOSYNTHESIS, *BREAST_PROJECTION})
# Seed of demo weights, so that two workers give the same untrained output.
_DEMO_SEED = 0
#: SNOMED CT "Breast" (76752008) as an Anatomic Region code counts as Body Part BREAST.
_BREAST_CODES = frozenset({"BREAST", "76752008"})


@dataclass
class RunTimings:
    """Seconds one model spent on a study's images, by step; the pipeline and benchmarks add them up."""

    preprocess: float = 0.0
    #: The plugin's forward pass, its explanation (Grad-CAM, the model's own maps) included.
    forward: float = 0.0
    #: Probabilities, and the maps resized back onto the source geometry.
    postprocess: float = 0.0
    batches: int = 0


def pixel_budget_reason(ref: ImageRef, max_bytes: int) -> str | None:
    """Why *ref* is too large to decode (its header's rows x columns x frames x bytes per sample
    above *max_bytes*), or ``None``.  Decided from the header alone, before any pixel is read."""
    declared = ref.declared_pixel_bytes
    if declared > max_bytes:
        return (
            f"the header declares {declared / 2**20:.0f} MiB of pixels (rows x columns x frames x "
            f"bytes per sample), above the per-image budget of {max_bytes / 2**20:.0f} MiB"
        )
    return None


def route_matches(rule: RouteRule, ref: ImageRef, breast_unit_aes: Sequence[str]) -> bool:
    """Whether *ref* satisfies every field *rule* sets."""
    anatomy = {ref.body_part, *ref.anatomic_region} - {""}
    if anatomy & _BREAST_CODES or (ref.calling_ae and ref.calling_ae in breast_unit_aes):
        anatomy |= _BREAST_CODES
    return (
        (not rule.calling_aes or ref.calling_ae in rule.calling_aes)
        and (not rule.modalities or ref.modality in rule.modalities)
        and (not rule.sop_class_uids or ref.sop_class_uid in rule.sop_class_uids)
        and (not rule.body_parts or bool(anatomy & {b.upper() for b in rule.body_parts}))
        and (not rule.lateralities or ref.laterality in rule.lateralities)
    )


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A model ready to run: the plugin bound to its checkpoint's spec, the network and its settings."""

    plugin: ModelPlugin
    model: nn.Module
    options: Mapping[str, Any]
    device: torch.device
    batch_size: int
    demo_weights: bool
    weights_path: Path | None
    weights_sha256: str
    #: The checkpoint's calibrator, applied to every prediction's risk; None for weights without one.
    calibrator: RiskCalibrator | None = None
    #: The checkpoint's measured operating points, else the plugin's thresholds (not measured).
    operating_points: tuple[OperatingPoint, ...] = ()


class ModelHost:
    """Discovers model plugins and runs them; each model is loaded lazily, once per process.

    :param settings: The validated configuration (``plugins`` section).
    :param device: Default torch device; ``plugins.models.<name>.device`` overrides it.
    :param plugin_manager: A ready manager; :func:`~plugins.manager.get_plugin_manager` by default.
    :raises StartupError: on duplicate model names or unknown config options.
    """

    def __init__(
        self, settings: Settings, device: str = "cpu", *, plugin_manager: pluggy.PluginManager | None = None
    ) -> None:
        self.settings = settings
        self.device = device
        self.plugin_manager = plugin_manager if plugin_manager is not None else get_plugin_manager(settings)
        self._plugins = self._discover()
        # Options are checked now so a typo in config stops start-up, not the first study.
        self._options = {name: self._config_options(plugin) for name, plugin in self._plugins.items()}
        self._loaded: dict[str, LoadedModel] = {}
        self._load_lock = threading.Lock()

    # -- discovery --------------------------------------------------------------------------

    def _discover(self) -> dict[str, ModelPlugin]:
        plugins: dict[str, ModelPlugin] = {}
        # pluggy calls the most recently registered plugin first; reversed gives registration order.
        for returned in reversed(self.plugin_manager.hook.pacs_triage_register_models()):
            for plugin in returned or ():
                if not isinstance(plugin, TorchModelPlugin):
                    raise StartupError(
                        f"pacs_triage_register_models returned {plugin!r}, not a TorchModelPlugin"
                    )
                if plugin.name in plugins:
                    raise StartupError(
                        f"two plugins register a model named {plugin.name!r}: "
                        f"{plugins[plugin.name]!r} and {plugin!r}"
                    )
                plugins[plugin.name] = plugin
        for name in self.settings.plugins.models:
            if name not in plugins:
                log.warning("plugin.config_for_unknown_model", model=name)
        return plugins

    def _config_options(self, plugin: ModelPlugin) -> dict[str, Any]:
        configured = self.settings.plugin_config(plugin.name).options
        unknown = sorted(set(configured) - set(plugin.default_options))
        if unknown:
            raise StartupError(
                f"plugins.models.{plugin.name}.options has unknown keys {', '.join(unknown)}; "
                f"known: {', '.join(sorted(plugin.default_options))}"
            )
        options = {**plugin.default_options, **configured}
        for key, allowed in (("frames", FRAME_POLICIES), ("crop", CROP_MODES)):
            if options[key] not in allowed:
                raise StartupError(
                    f"plugins.models.{plugin.name}.options.{key} is {options[key]!r}, "
                    f"not one of {', '.join(allowed)}"
                )
        return options

    @property
    def registered_models(self) -> list[ModelPlugin]:
        """Every model a plugin registered, enabled or not."""
        return list(self._plugins.values())

    @property
    def models(self) -> list[ModelPlugin]:
        """The enabled models: not in ``plugins.disabled`` and not ``enabled: false``."""
        return [p for p in self._plugins.values() if self.is_enabled(p.name)]

    def is_enabled(self, name: str) -> bool:
        return name not in self.settings.plugins.disabled and self.settings.plugin_config(name).enabled

    def plugin(self, name: str) -> ModelPlugin:
        """The registered model called *name*.

        :raises PluginError: when no plugin registers it.
        """
        try:
            return self._plugins[name]
        except KeyError:
            raise PluginError(
                name, f"no such model; registered: {', '.join(sorted(self._plugins)) or 'none'}"
            ) from None

    # -- accept rules -----------------------------------------------------------------------

    def skip_reason(self, plugin: ModelPlugin, ref: ImageRef) -> str | None:
        """Why *plugin* declines *ref* (modality, For Processing, tomosynthesis, SOP class, view,
        laterality, then the site's ``routing`` rules for it), or ``None`` when it accepts it."""
        rule = plugin.spec.accepts
        options = self._options[plugin.name]
        accept_for_processing = (
            rule.accept_for_processing
            if options["accept_for_processing"] is None
            else options["accept_for_processing"]
        )
        accept_tomo = (
            rule.accept_tomosynthesis_volumes
            if options["accept_tomosynthesis_volumes"] is None
            else options["accept_tomosynthesis_volumes"]
        )
        if rule.modalities and ref.modality not in rule.modalities:
            return f"modality {ref.modality or '(none)'} is not one of {', '.join(rule.modalities)}"
        for_processing = (
            ref.presentation_intent == "FOR PROCESSING" or ref.sop_class_uid in FOR_PROCESSING_SOP_CLASSES
        )
        if for_processing and not accept_for_processing:
            return "For Processing image (raw detector data); only For Presentation images are read"
        if ref.sop_class_uid in _TOMOSYNTHESIS_SOP_CLASSES and not accept_tomo:
            return "tomosynthesis volume or projection set; 2D and synthesized 2D views are read"
        if rule.sop_class_uids and ref.sop_class_uid not in rule.sop_class_uids:
            return f"SOP class {ref.sop_class_uid} is not accepted"
        if rule.views and ref.view not in rule.views:
            return f"view {ref.view or '(none)'} is not one of {', '.join(rule.views)}"
        if rule.lateralities and ref.laterality not in rule.lateralities:
            return f"laterality {ref.laterality or '(none)'} is not one of {', '.join(rule.lateralities)}"
        routes = self.settings.routing.rules_for(plugin.name)
        if routes and not any(route_matches(r, ref, self.settings.routing.breast_unit_aes) for r in routes):
            # Our words only: the header's body part is not repeated (it is free text a site fills in).
            return (
                f"no routing rule of routing.models.{plugin.name} matches this image (modality, "
                "body part or anatomic region, calling AE, SOP class, laterality)"
            )
        return None

    # -- loading ----------------------------------------------------------------------------

    def load(self, name: str) -> LoadedModel:
        """Build and load model *name* on first use; later calls return the same model.

        :raises PluginError: when it is disabled, has no usable weights, or cannot be built.
        """
        loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded
        with self._load_lock:
            if name not in self._loaded:
                self._loaded[name] = self._load(self.plugin(name))
            return self._loaded[name]

    def _load(self, plugin: ModelPlugin) -> LoadedModel:
        name = plugin.name
        if not self.is_enabled(name):
            raise PluginError(name, "is disabled in the configuration")
        config = self.settings.plugin_config(name)
        started = time.perf_counter()
        try:
            source = resolve_weights(name, self.settings)
            spec, options, state, sha256, demo = plugin.spec, dict(self._options[name]), None, "", source.demo
            calibrator: RiskCalibrator | None = None
            points: tuple[OperatingPoint, ...] = ()
            if source.path is not None:
                state, meta = load_checkpoint(source.path)
                spec = checkpoint_spec(spec, meta, source.path)
                options = checkpoint_options(plugin.default_options, meta, config.options)
                sha256, demo = meta.sha256, demo or meta.demo
                calibrator, points = meta.calibrator, meta.operating_points
            spec = dataclasses.replace(spec, thresholds={**spec.thresholds, **config.thresholds})
            points = points or default_operating_points(spec)
            if options["cam_target_class"] and options["cam_target_class"] not in spec.classes:
                raise PermanentError(
                    f"cam_target_class {options['cam_target_class']!r} is not one of {spec.classes}"
                )
            device = torch.device(config.device or self.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise PermanentError(f"device {device} was asked for but CUDA is not available")
            bound = plugin.bind(spec, demo_weights=demo, weights_sha256=sha256)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_DEMO_SEED)
                model = bound.build_model(options)
            if state is not None:
                model.load_state_dict(state, strict=True)
            model.to(device).eval().requires_grad_(False)
        except PluginError:
            raise
        except Exception as exc:  # building or loading a third-party model can raise anything
            raise PluginError(name, f"cannot be loaded: {exc}") from exc
        log.info(
            "model.loaded",
            model=spec.model_id,
            weights=str(source.path) if source.path else "random",
            demo_weights=demo,
            device=str(device),
            seconds=round(time.perf_counter() - started, 3),
        )
        return LoadedModel(
            plugin=bound,
            model=model,
            options=options,
            device=device,
            batch_size=config.batch_size,
            demo_weights=demo,
            weights_path=source.path,
            weights_sha256=sha256,
            calibrator=calibrator,
            operating_points=tuple(points),
        )

    # -- running ----------------------------------------------------------------------------

    def run(
        self, plugin_name: str, refs: Sequence[ImageRef], timings: RunTimings | None = None
    ) -> list[Result]:
        """Decode, preprocess, run (batched), explain and postprocess *refs* with one model.

        Images whose header declares more pixels than ``worker.max_image_pixel_bytes`` fail
        without being decoded.  :mod:`workers.pipeline` decodes once for every model instead and
        calls :meth:`run_images`.

        :returns: One result per image, in order; a multi-frame image run with ``frames: all``
            gives one per frame.  Nothing raises for a bad image or a failing model.
        :raises PluginError: only for a model name no plugin registers.
        """

        def decode(ref: ImageRef, frames: str) -> list[tuple[ImageRef, np.ndarray]]:
            if reason := pixel_budget_reason(ref, self.settings.worker.max_image_pixel_bytes):
                raise PermanentError(reason)
            return [
                (dataclasses.replace(ref, frame_index=i), image)
                for i, image in decode_frames(ref.path, cast(FramePolicy, frames))
            ]

        return self._run(self.plugin(plugin_name), [(ref, decode) for ref in refs], timings)

    def run_images(
        self,
        plugin_name: str,
        images: Sequence[tuple[ImageRef, np.ndarray]],
        timings: RunTimings | None = None,
    ) -> list[Result]:
        """As :meth:`run`, for images already decoded to display-ready ``uint8`` (one per ref or frame).

        :param timings: Where the seconds of each step are added, when given.
        """
        jobs = [(ref, lambda ref, _frames, image=image: [(ref, image)]) for ref, image in images]
        return self._run(self.plugin(plugin_name), jobs, timings)

    def start_run(
        self, plugin_name: str, refs: Sequence[ImageRef], decode: _Decoder, timings: RunTimings | None = None
    ) -> PendingRun:
        """Begin :meth:`run` with the caller's decoder; :meth:`PendingRun.finish` runs the model.

        ``decode(ref, frame_policy)`` gives the frames the policy selects as (frame ref, display-ready
        ``uint8``), or why they cannot be decoded, in our words: the study pipeline passes one that decodes
        each image once for every model.  With read-ahead (:meth:`reads_ahead`) the first inputs are decoded
        and preprocessed on a thread of their own from now on, while the caller runs another model.  *refs*
        are not checked against the pixel budget here: the caller did.
        """
        return PendingRun(self, self.plugin(plugin_name), [(ref, decode) for ref in refs], timings)

    def reads_ahead(self) -> bool:
        """Whether images are decoded and preprocessed on a thread of their own while the model runs
        (``worker.read_ahead``; ``auto``: on a CUDA device, where the forward pass leaves the CPU idle).

        On the CPU the forward pass already has every core, and reading ahead only takes them from it.
        """
        mode = self.settings.worker.read_ahead
        return mode == "on" or (mode == "auto" and self.device.startswith("cuda"))

    def _run(
        self,
        plugin: ModelPlugin,
        jobs: Sequence[tuple[ImageRef, _Decoder]],
        timings: RunTimings | None = None,
    ) -> list[Result]:
        return PendingRun(self, plugin, jobs, timings).finish()

    def _prepared(
        self,
        plugin: ModelPlugin,
        jobs: Sequence[tuple[ImageRef, _Decoder]],
        results: list[Result | None],
        timings: RunTimings,
    ) -> Iterator[tuple[LoadedModel, int, ImageRef, torch.Tensor, Letterbox]]:
        """Decode and preprocess each job's frames in order, yielding each model input with its position
        in *results*; a skipped image, or one that fails to load, decode or preprocess, gets its result
        there instead (a ``None`` placeholder marks each input yielded)."""
        loaded: LoadedModel | None = None
        load_error = ""
        for ref, decode in jobs:
            reason = self.skip_reason(plugin, ref)
            if reason is not None:  # decided from the header: skipped images are never decoded
                results.append(SkippedImage(model_name=plugin.name, image=ref, reason=reason))
                continue
            if loaded is None and not load_error:
                try:
                    loaded = self.load(plugin.name)
                except PluginError as exc:
                    load_error = str(exc)
            if loaded is None:
                results.append(ImageFailure(model_name=plugin.name, image=ref, error=load_error))
                continue
            try:
                frames = decode(ref, loaded.options["frames"])
            except Exception as exc:  # decode_frames names the file; anything else is still this image's
                frames = failure_reason("decoding", exc)
            if isinstance(frames, str):
                results.append(ImageFailure(model_name=plugin.name, image=ref, error=frames))
                continue
            for frame_ref, image in frames:
                step = time.perf_counter()
                prepared = self._preprocess(loaded, frame_ref, image)
                timings.preprocess += time.perf_counter() - step
                results.append(prepared if isinstance(prepared, ImageFailure) else None)
                if not isinstance(prepared, ImageFailure):
                    yield (loaded, len(results) - 1, *prepared)

    def _infer_into(
        self,
        loaded: LoadedModel,
        batch: list[tuple[int, ImageRef, torch.Tensor, Letterbox]],
        results: list[Result | None],
        timings: RunTimings,
    ) -> None:
        outcomes = self._infer(loaded, [(ref, tensor, box) for _, ref, tensor, box in batch], timings)
        for (position, *_), outcome in zip(batch, outcomes, strict=True):
            results[position] = outcome

    def _preprocess(
        self, loaded: LoadedModel, ref: ImageRef, image: np.ndarray
    ) -> tuple[ImageRef, torch.Tensor, Letterbox] | ImageFailure:
        try:
            tensor, box = loaded.plugin.preprocess(image, ref, loaded.options)
        except Exception as exc:  # a plugin's preprocessing can raise anything
            return ImageFailure(
                model_name=loaded.plugin.name, image=ref, error=failure_reason("preprocessing failed", exc)
            )
        expected = (3, *loaded.plugin.spec.input_size)
        if tuple(tensor.shape) != expected:
            return ImageFailure(
                model_name=loaded.plugin.name,
                image=ref,
                error=f"preprocessing returned shape {tuple(tensor.shape)}, expected {expected}",
            )
        return ref, tensor, box

    def _infer(
        self, loaded: LoadedModel, batch: list[tuple[ImageRef, torch.Tensor, Letterbox]], timings: RunTimings
    ) -> list[Result]:
        plugin = loaded.plugin
        step = time.perf_counter()
        try:
            inputs = torch.stack([tensor for _, tensor, _ in batch]).to(loaded.device)
            amp = bool(loaded.options["amp"]) and loaded.device.type == "cuda"
            with torch.autocast(loaded.device.type, enabled=amp):
                output = plugin.forward(loaded.model, inputs, loaded.options)
            if loaded.device.type == "cuda":
                torch.cuda.synchronize(loaded.device)  # the forward's time, not the next copy's
        except (torch.OutOfMemoryError, MemoryError) as exc:
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) > 1:  # a smaller batch may fit
                return [result for item in batch for result in self._infer(loaded, [item], timings)]
            return self._fail(plugin.name, batch, failure_reason(f"forward on {loaded.device}", exc))
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:
            return self._fail(plugin.name, batch, failure_reason("forward failed", exc))
        finally:
            timings.forward += time.perf_counter() - step
            timings.batches += 1
        step = time.perf_counter()
        try:
            return self._postprocess(loaded, batch, output)
        finally:
            timings.postprocess += time.perf_counter() - step

    def _postprocess(
        self, loaded: LoadedModel, batch: list[tuple[ImageRef, torch.Tensor, Letterbox]], output: ModelOutput
    ) -> list[Result]:
        plugin = loaded.plugin
        problem = _check_output(output, len(batch), len(plugin.spec.classes))
        if problem:
            return self._fail(plugin.name, batch, problem)
        results: list[Result] = []
        for (ref, _, box), image_output in zip(batch, output.split(), strict=True):
            if not np.all(np.isfinite(image_output.logits)):
                results.append(
                    ImageFailure(model_name=plugin.name, image=ref, error="model returned non-finite logits")
                )
                continue
            try:
                prediction = plugin.postprocess(image_output, box, ref, loaded.options)
                if not isinstance(prediction, Prediction):
                    raise InvalidPredictionError(
                        f"postprocess returned {type(prediction).__name__}, not Prediction"
                    )
                # The host has the last word on which weights made it, so demo output cannot pass as real.
                weights = (loaded.demo_weights, loaded.weights_sha256)
                if (prediction.demo_weights, prediction.weights_sha256) != weights:
                    prediction = dataclasses.replace(
                        prediction, demo_weights=weights[0], weights_sha256=weights[1]
                    )
                prediction = _calibrated(prediction, loaded)
            except Exception as exc:  # includes Prediction's own validation (NaN maps, bad risk)
                results.append(
                    ImageFailure(
                        model_name=plugin.name, image=ref, error=failure_reason("postprocessing failed", exc)
                    )
                )
                continue
            results.append(prediction)
        return results

    @staticmethod
    def _fail(name: str, batch: list[tuple[ImageRef, torch.Tensor, Letterbox]], error: str) -> list[Result]:
        log.error("model.failed", model=name, images=len(batch), error=error)
        return [ImageFailure(model_name=name, image=ref, error=error) for ref, _, _ in batch]


class PendingRun:
    """One model's run over a list of images, begun: its inputs are decoded and preprocessed on a thread of
    their own from the start with read-ahead (:meth:`ModelHost.reads_ahead`), else as :meth:`finish` needs
    them.  :meth:`finish` runs the model in batches and gives one result per image, in order."""

    def __init__(
        self,
        host: ModelHost,
        plugin: ModelPlugin,
        jobs: Sequence[tuple[ImageRef, _Decoder]],
        timings: RunTimings | None = None,
    ) -> None:
        self.host, self.plugin, self.images = host, plugin, len(jobs)
        self.timings = timings if timings is not None else RunTimings()
        # Results are placed by position because batching finishes images out of order.
        self.results: list[Result | None] = []
        prepared = host._prepared(plugin, jobs, self.results, self.timings)
        self._ahead: ReadAhead[tuple[LoadedModel, int, ImageRef, torch.Tensor, Letterbox]] | None = None
        if host.reads_ahead():
            depth = 2 * host.settings.plugin_config(plugin.name).batch_size
            self._ahead = ReadAhead(prepared, depth=depth, name=f"read-ahead-{plugin.name}")
        self._prepared: Iterable[tuple[LoadedModel, int, ImageRef, torch.Tensor, Letterbox]] = (
            self._ahead if self._ahead is not None else prepared
        )

    def finish(self) -> list[Result]:
        """Run the model over the prepared inputs, batch by batch; the results, one per image (per frame)."""
        started = time.perf_counter()
        batch: list[tuple[int, ImageRef, torch.Tensor, Letterbox]] = []
        loaded: LoadedModel | None = None
        try:
            for loaded, *item in self._prepared:
                batch.append(cast(tuple[int, ImageRef, torch.Tensor, Letterbox], tuple(item)))
                if len(batch) == loaded.batch_size:
                    self.host._infer_into(loaded, batch, self.results, self.timings)
                    batch = []
        finally:
            self.close()
        if batch and loaded is not None:
            self.host._infer_into(loaded, batch, self.results, self.timings)
        done = [r for r in self.results if r is not None]
        log.info(
            "model.run",
            model=self.plugin.spec.model_id,
            images=self.images,
            predictions=sum(isinstance(r, Prediction) for r in done),
            failures=sum(isinstance(r, ImageFailure) for r in done),
            skipped=sum(isinstance(r, SkippedImage) for r in done),
            seconds=round(time.perf_counter() - started, 3),
        )
        return done

    def close(self) -> None:
        """Stop preparing inputs (a run abandoned before :meth:`finish`, or once it is done)."""
        if self._ahead is not None:
            self._ahead.close()


class ReadAhead(Generic[_Item]):
    """The items of *items*, produced on a thread of their own, started at once, at most *depth* ahead of
    the consumer.

    What the producer raises is raised to the consumer after the items it produced.  :meth:`close` (or a
    consumer that stops iterating) stops the producer at its next item.
    """

    def __init__(self, items: Iterator[_Item], depth: int, name: str = "read-ahead") -> None:
        self._ready: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._items = items
        self._producer = threading.Thread(target=self._produce, name=name, daemon=True)
        self._producer.start()

    def _offer(self, entry: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._offer((True, item)):
                    return
            outcome: tuple[bool, Any] = (False, None)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            outcome = (False, exc)
        self._offer(outcome)

    def __iter__(self) -> Iterator[_Item]:
        try:
            while True:
                more, item = self._ready.get()
                if not more:
                    if item is not None:
                        raise item
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._producer is not threading.current_thread():
            self._producer.join()


def _calibrated(prediction: Prediction, loaded: LoadedModel) -> Prediction:
    """*prediction* with the checkpoint's calibrator applied to its risk, the meaning of that risk and the
    model's operating points: done by the host, so that a plugin's own postprocess cannot skip it."""
    raw = prediction.risk
    calibrated = raw if loaded.calibrator is None else float(loaded.calibrator.apply(raw))
    return dataclasses.replace(
        prediction,
        risk=calibrated,
        uncalibrated_risk=None if loaded.calibrator is None else raw,
        score=loaded.plugin.spec.score,
        operating_points=loaded.operating_points,
    )


def _check_output(output: object, batch_size: int, num_classes: int) -> str | None:
    """What is wrong with a plugin's batch output, or ``None``."""
    if not isinstance(output, ModelOutput):
        return f"forward returned {type(output).__name__}, not ModelOutput"
    if tuple(output.logits.shape) != (batch_size, num_classes):
        return f"logits have shape {tuple(output.logits.shape)}, expected ({batch_size}, {num_classes})"
    maps = {"heatmap": output.heatmap, **output.extra_maps}
    for map_name, tensor in maps.items():
        if tensor is not None and (tensor.ndim != 3 or tensor.shape[0] != batch_size):
            return f"{map_name} has shape {tuple(tensor.shape)}, expected ({batch_size}, h, w)"
    return None
