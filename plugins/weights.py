"""Model weights, for every built-in and third-party model: checkpoints, their metadata, ImageNet backbones.

A checkpoint is ``<name>.safetensors`` whose header metadata holds the JSON metadata under the
``pacs_triage`` key, plus an optional sidecar ``<name>.json`` with the same fields and the file's
sha256.  The sidecar wins where both give a field, so a site can retune thresholds without
rewriting the weights; its ``sha256`` must match the file.  Nothing is ever downloaded.

The whole round trip lives here: :func:`checkpoint_metadata` describes a model for its plugin,
:func:`save_checkpoint` writes it, :func:`load_checkpoint` reads it back, :func:`checkpoint_spec` and
:func:`checkpoint_options` say how the plugin serves it (the host uses both), and :func:`load_model`
rebuilds the network.  :func:`load_backbone_weights` initialises a timm backbone from a local
ImageNet file for training.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from gateway.errors import PermanentError
from gateway.settings import Settings
from plugins.types import ModelSpec, OperatingPoint, RiskCalibrator

if TYPE_CHECKING:
    from plugins.base import TorchModelPlugin

METADATA_KEY = "pacs_triage"


def reported_version(plugin_version: str, weights_version: str, sha256: str) -> str:
    """The version a model reports when it runs with a checkpoint: the plugin's code and the weights.

    ``"1.0/w2.1-3f2a9c1e"`` is plugin 1.0 with weights version 2.1 whose file digest starts ``3f2a9c1e``.
    The digest is there because two trainings may both call themselves version 1.0.  At most 64
    characters (a DICOM LO value).

    :param plugin_version: ``ModelSpec.version``.
    :param weights_version: :attr:`CheckpointMetadata.version`.
    :param sha256: the checkpoint file's sha256 (hex).
    """
    weights = f"w{weights_version}" + (f"-{sha256[:8]}" if sha256 else "")
    return f"{plugin_version}/{weights}"[:64]


def check_state_dict_fits(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    allowed_unexpected: tuple[str, ...],
    source: str,
) -> None:
    """Raise unless *state* fills every key of *module* with the right shape, leaving over only keys that
    start with *allowed_unexpected* (a classifier head, say).

    ``load_state_dict(strict=False)`` would skip missing keys silently and fail halfway on a shape
    mismatch; checking first gives one clear message and leaves the module untouched.

    :param source: what the state came from, for the message (a file and the timm model name).
    :raises ValueError: naming the first missing, unexpected and mismatched keys.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(allowed_unexpected)]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source} does not fit: {len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected "
            f"keys {unexpected[:3]}, {len(mismatched)} shape mismatches {mismatched[:3]}"
        )


def load_backbone_weights(
    module: torch.nn.Module,
    path: str | Path,
    timm_name: str,
    allowed_unexpected: tuple[str, ...],
    *,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Initialise a timm backbone in place from a local ImageNet weights file (timm ``.pth``/``.bin`` or
    safetensors, read with ``timm.models.load_state_dict``; an EMA copy is preferred when the file has one).

    Every key of *module* must be filled with the right shape; only keys starting with one of
    *allowed_unexpected* (the classifier the backbone does not have) may be left over.

    :param module: the backbone, possibly ``features_only`` or with its head removed.
    :param path: the weights file; nothing is downloaded.
    :param timm_name: the timm architecture the weights belong to, for the messages.
    :param allowed_unexpected: key prefixes of the file that *module* lacks, e.g. ``("fc.",)``.
    :param convert: applied to the file's state dict first (timm's ``checkpoint_filter_fn`` of the
        architecture, for example, to resize position tables).
    :raises FileNotFoundError: when *path* does not exist.
    :raises ValueError: when the weights do not fit *module*; *module* is left untouched.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet {timm_name} weights not found: {path}")
    state = timm.models.load_state_dict(str(path), use_ema=True, weights_only=True)
    if convert is not None:
        state = convert(state)
    check_state_dict_fits(module, state, allowed_unexpected, f"{path} (timm {timm_name})")
    own = module.state_dict()
    module.load_state_dict({key: value for key, value in state.items() if key in own}, strict=True)


@dataclass(frozen=True, kw_only=True)
class CheckpointMetadata:
    """What a checkpoint says about itself; the model is rebuilt from this and nothing else."""

    #: The plugin's ``spec.arch``; a checkpoint for another architecture is refused.
    architecture: str
    model_id: str
    version: str
    #: Class names in logit order.
    class_names: tuple[str, ...]
    norm_mean: tuple[float, ...]
    norm_std: tuple[float, ...]
    #: Model input (height, width).
    input_size: tuple[int, int]
    thresholds: dict[str, float] = field(default_factory=dict)
    #: Temperature-scaling calibration: probabilities are ``softmax(logits / temperature)``.
    temperature: float | None = None
    #: Plugin options the weights were trained with (e.g. ``cbam_reduction``); extra keys are kept.
    options: dict[str, Any] = field(default_factory=dict)
    #: Free text: datasets, splits, dates.
    training_data: str = ""
    #: True for untrained demo weights; every prediction made with them says so.
    demo: bool = False
    #: Maps the risk to a calibrated one at a stated prevalence (fitted on a held-out split).
    calibrator: RiskCalibrator | None = None
    #: Thresholds on the (calibrated) risk at a stated sensitivity or specificity, from a held-out split.
    operating_points: tuple[OperatingPoint, ...] = ()
    #: sha256 of the weights file, filled in when it is saved or loaded.
    sha256: str = ""

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("class_names", "norm_mean", "norm_std", "input_size"):
            data[key] = list(data[key])
        data["calibrator"] = None if self.calibrator is None else self.calibrator.to_json_dict()
        data["operating_points"] = [point.to_json_dict() for point in self.operating_points]
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], source: str) -> CheckpointMetadata:
        """Validate *data* (read from *source*, named in errors)."""
        required = (
            "architecture",
            "model_id",
            "version",
            "class_names",
            "norm_mean",
            "norm_std",
            "input_size",
        )
        missing = [key for key in required if key not in data]
        if missing:
            raise PermanentError(f"checkpoint metadata in {source} lacks {', '.join(missing)}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise PermanentError(f"checkpoint metadata in {source} has unknown keys {', '.join(unknown)}")
        size = data["input_size"]
        input_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        temperature = data.get("temperature")
        if temperature is not None and not float(temperature) > 0:
            raise PermanentError(
                f"checkpoint metadata in {source}: temperature must be > 0, got {temperature}"
            )
        return cls(
            architecture=str(data["architecture"]),
            model_id=str(data["model_id"]),
            version=str(data["version"]),
            class_names=tuple(str(c) for c in data["class_names"]),
            norm_mean=tuple(float(v) for v in data["norm_mean"]),
            norm_std=tuple(float(v) for v in data["norm_std"]),
            input_size=input_size,
            thresholds={str(k): float(v) for k, v in dict(data.get("thresholds") or {}).items()},
            temperature=None if temperature is None else float(temperature),
            options=dict(data.get("options") or {}),
            training_data=str(data.get("training_data", "")),
            demo=bool(data.get("demo", False)),
            sha256=str(data.get("sha256", "")),
            calibrator=_calibrator(data.get("calibrator"), source),
            operating_points=_operating_points(data.get("operating_points"), source),
        )


def _calibrator(data: Any, source: str) -> RiskCalibrator | None:
    if data is None:
        return None
    try:
        return RiskCalibrator.from_json_dict(dict(data))
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentError(
            f"checkpoint metadata in {source}: calibrator is invalid ({type(exc).__name__})"
        ) from exc


def _operating_points(data: Any, source: str) -> tuple[OperatingPoint, ...]:
    try:
        return tuple(OperatingPoint.from_json_dict(dict(point)) for point in data or ())
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentError(
            f"checkpoint metadata in {source}: operating_points are invalid ({type(exc).__name__})"
        ) from exc


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar of a weights file: ``x.safetensors`` -> ``x.json``."""
    return path.with_suffix(".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    model: torch.nn.Module | dict[str, torch.Tensor], path: str | Path, metadata: CheckpointMetadata
) -> CheckpointMetadata:
    """Write *model*'s weights as safetensors with *metadata* in the header and in a JSON sidecar.

    :param model: A module or a state dict.
    :param path: The ``.safetensors`` file to write; the sidecar goes next to it.
    :param metadata: What the checkpoint says about itself (``sha256`` is filled in here).
    :returns: *metadata* with the written file's sha256.
    """
    path = Path(path)
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    header = metadata.to_json_dict()
    del header["sha256"]  # a file cannot hold its own hash; the sidecar carries it
    save_file(tensors, str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(header)})
    metadata = replace(metadata, sha256=file_sha256(path))
    sidecar_path(path).write_text(json.dumps(metadata.to_json_dict(), indent=2) + "\n")
    return metadata


def _safetensors_header_metadata(blob: bytes) -> dict[str, str]:
    # safetensors layout: an 8-byte little-endian header length, then the JSON header.
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    return dict(header.get("__metadata__") or {})


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointMetadata]:
    """Read a checkpoint written by :func:`save_checkpoint` (or a ``.pt`` state dict with a sidecar).

    :raises PermanentError: naming the file when it is missing, unreadable, has no metadata, or
        its sha256 differs from the sidecar's.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise PermanentError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    sha256 = hashlib.sha256(blob).hexdigest()
    data: dict[str, Any] = {}
    try:
        if path.suffix == ".safetensors":
            state = load_safetensors_bytes(blob)
            header = _safetensors_header_metadata(blob).get(METADATA_KEY)
            if header:
                data.update(json.loads(header))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # every reader raises its own types on corrupt files
        raise PermanentError(f"weights file {path} is corrupt or not a checkpoint: {exc}") from exc
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        try:
            data.update(json.loads(sidecar.read_text()))
        except (OSError, ValueError) as exc:
            raise PermanentError(f"cannot read checkpoint metadata {sidecar}: {exc}") from exc
    if not data:
        raise PermanentError(
            f"weights file {path} has no metadata: "
            f"neither a '{METADATA_KEY}' safetensors header entry nor {sidecar}"
        )
    if data.get("sha256") and data["sha256"] != sha256:
        raise PermanentError(f"weights file {path} has sha256 {sha256}, but {sidecar} says {data['sha256']}")
    data["sha256"] = sha256
    if not isinstance(state, dict):
        raise PermanentError(f"weights file {path} does not hold a state dict")
    return state, CheckpointMetadata.from_json_dict(data, str(path))


def checkpoint_metadata(spec: ModelSpec, options: Mapping[str, Any], **fields: Any) -> CheckpointMetadata:
    """What a checkpoint of *spec*'s model says about itself, ready for :func:`save_checkpoint`.

    The architecture, model id, classes, normalisation, input size and thresholds come from *spec* (the
    spec as the model was trained, e.g. with its own input size); *options* are the plugin options the
    network was built and trained with, which the host passes back to ``build_model``.

    :param spec: the plugin's spec, amended to describe the trained model.
    :param options: the build and training options; tuples are stored as JSON lists.
    :param fields: further :class:`CheckpointMetadata` fields (``version``, ``temperature``,
        ``training_data``, ``demo``, ...); ``thresholds`` are merged over the spec's.
    """
    thresholds = {**spec.thresholds, **dict(fields.pop("thresholds", None) or {})}
    defaults: dict[str, Any] = {
        "architecture": spec.arch,
        "model_id": spec.model_id,
        "version": "1.0",
        "class_names": tuple(spec.classes),
        "norm_mean": tuple(float(v) for v in spec.mean),
        "norm_std": tuple(float(v) for v in spec.std),
        "input_size": (int(spec.input_size[0]), int(spec.input_size[1])),
        "options": json.loads(json.dumps(dict(options), default=list)),
    }
    return CheckpointMetadata(**{**defaults, **fields, "thresholds": thresholds})


def checkpoint_spec(spec: ModelSpec, metadata: CheckpointMetadata, source: str | Path) -> ModelSpec:
    """*spec* as it serves the checkpoint *metadata* describes: the checkpoint's classes (in its logit
    order), input size, normalisation and thresholds, and a version naming both the plugin and the weights.

    :param source: where the checkpoint came from, for the messages.
    :raises PermanentError: when the checkpoint holds another architecture or other classes.
    """
    if metadata.architecture != spec.arch:
        raise PermanentError(f"{source} holds a {metadata.architecture!r} model, not {spec.arch!r}")
    if set(metadata.class_names) != set(spec.classes):
        raise PermanentError(f"{source} has classes {metadata.class_names}, expected {spec.classes}")
    return replace(
        spec,
        classes=metadata.class_names,
        input_size=metadata.input_size,
        mean=metadata.norm_mean,
        std=metadata.norm_std,
        thresholds={**spec.thresholds, **metadata.thresholds},
        # A calibrator fitted at a stated prevalence makes a binary benign/malignant risk a probability of
        # malignancy; the plugin says which meaning its calibrated risk has (calibrated_score).
        score=(spec.calibrated_score or spec.score) if metadata.calibrator is not None else spec.score,
        # Outputs carry this version (SR, device UID, output UIDs): retrained weights must give new
        # objects, or a PACS keeps the report of the old ones under the same UIDs.
        version=reported_version(spec.version, metadata.version, metadata.sha256),
    )


def checkpoint_options(
    default_options: Mapping[str, Any],
    metadata: CheckpointMetadata,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The plugin options a checkpoint is served with: the plugin's defaults, then the checkpoint's options
    and temperature, then *overrides* (a site's ``plugins.models.<name>.options``)."""
    options = {**default_options, **metadata.options}
    if metadata.temperature is not None:
        options["temperature"] = metadata.temperature
    return {**options, **dict(overrides or {})}


def load_model(plugin: TorchModelPlugin, path: str | Path) -> tuple[torch.nn.Module, CheckpointMetadata]:
    """Rebuild *plugin*'s network from a checkpoint the way the host does, and load its weights strictly.

    :param plugin: the model plugin the checkpoint belongs to.
    :param path: the checkpoint file.
    :returns: the network (eval mode, on the CPU) and the checkpoint's metadata.
    :raises PermanentError: when the file is unreadable or belongs to another model.
    """
    state, metadata = load_checkpoint(path)
    spec = checkpoint_spec(plugin.spec, metadata, path)
    bound = plugin.bind(spec, demo_weights=metadata.demo, weights_sha256=metadata.sha256)
    model = bound.build_model(checkpoint_options(plugin.default_options, metadata))
    model.load_state_dict(state, strict=True)
    return model.eval(), metadata


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from: a file, or (demo only) a seeded random initialisation."""

    path: Path | None
    demo: bool


def resolve_weights(name: str, settings: Settings) -> WeightsSource:
    """Choose the weights of model *name*: the configured file, else demo weights if allowed.

    Demo weights are ``plugins.demo_weights_dir/<name>.safetensors`` when that file exists, else a
    seeded random initialisation.

    :raises PermanentError: when no weights are configured and demo weights are not allowed.
    """
    configured = settings.plugin_config(name).weights
    if configured is not None:
        return WeightsSource(Path(configured), demo=False)
    if not settings.plugins.allow_demo_weights:
        raise PermanentError(
            f"model {name!r} has no weights: set plugins.models.{name}.weights to a checkpoint, "
            "or set plugins.allow_demo_weights for untrained demo output"
        )
    demo_dir = settings.plugins.demo_weights_dir
    if demo_dir is not None and (Path(demo_dir) / f"{name}.safetensors").is_file():
        return WeightsSource(Path(demo_dir) / f"{name}.safetensors", demo=True)
    return WeightsSource(None, demo=True)


def describe_weights(name: str, settings: Settings) -> str:
    """One line for ``plugins list``: ``<path> sha256:<hex>``, ``missing ...`` or ``demo ...``."""
    try:
        source = resolve_weights(name, settings)
    except PermanentError:
        return "missing"
    if source.path is None:
        return "demo (random init)"
    if not source.path.is_file():
        return f"missing ({source.path})"
    described = f"{source.path} sha256:{file_sha256(source.path)}"
    return f"demo {described}" if source.demo else described
