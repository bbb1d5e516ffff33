"""Who made an output, and what it is called: series numbers, descriptions, model names and the AIR identity.

Every object we send back (the study SR, the heatmap Secondary Captures, the CAD SR) takes its labels from
here, so that they agree with each other and with the network that actually ran:

- :func:`series_number` gives each kind of object, and each model's own series, a number of its own
  (the scheme is documented in docs/outputs.md, "Labels and names");
- :func:`series_description` keeps "NOT FOR DIAGNOSTIC USE" in every description by putting it first;
- :func:`network_display_name` names the backbone the loaded options build (the hybrid model's demo
  weights run ResNet-18, not the paper's ResNet-50);
- :func:`weights_notice` says whether demo weights are a random initialisation or trained on synthetic
  phantoms;
- :class:`AlgorithmIdentity` is the IHE AI Results (AIR) identification of a model: the item of the
  Contributing Equipment Sequence (0018,A001) that every SR and SC carries, with a Device UID derived from
  the checkpoint's digest, so a retrained model is a new device.
"""

from __future__ import annotations

import importlib.metadata
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.sr.coding import Code

from gateway import __version__
from gateway.provenance import CREATOR
from plugins.types import ModelSpec, Prediction
from workers import uids

__all__ = [
    "DISCLAIMER_LABEL",
    "MANUFACTURER",
    "PROCESSING_EQUIPMENT",
    "SERIES_KINDS",
    "AlgorithmIdentity",
    "add_contributing_equipment",
    "model_slot",
    "network_display_name",
    "series_description",
    "series_number",
    "short_model_name",
    "software_version",
    "weights_caption",
    "weights_kind",
    "weights_notice",
]

#: Manufacturer (0008,0070) of every object we make; the pipeline also uses it to recognise our own outputs.
MANUFACTURER = CREATOR
#: The words every description and every burned-in caption starts with.
DISCLAIMER_LABEL = "NOT FOR DIAGNOSTIC USE"
#: Purpose of Reference of the AIR Contributing Equipment item: PS3.16 CID 7005 "Contributing Equipment
#: Purpose of Reference" has no "Processing Algorithm" concept (DCM 109104 is "De-identifying Equipment"), so
#: the CID 7005 concept for equipment that processed the data is used.
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")

#: Series number bases, one block of :data:`_SLOTS` numbers per kind of object.  Slot 0 is the study-level
#: series (every model's results together); slots 1 and up are one model's own series (config).
SERIES_KINDS: dict[str, int] = {
    "sr": 9900,  # the study SR (TID 1500)
    "heatmap": 9920,  # heatmap Secondary Captures
    "extra_map": 9940,  # a model's further maps (saliency, SHAP, attention, score map), when delivered
    "cad_sr": 9960,  # the Mammography CAD SR
}
_SLOTS = 20
#: Built-in models keep fixed slots, so their series numbers never move when a plugin is added.
_BUILTIN_SLOTS = {"asg_mammonet": 1, "clgb_net": 2, "hybrid_birads": 3, "lem": 4, "us_fusion": 5}
_FIRST_FREE_SLOT = 6

_LO = 64  # LO value representation: at most 64 characters


def model_slot(model: str | None) -> int:
    """The model's place inside a kind's block: 0 for the study-level series, a fixed slot per built-in
    model, and a stable hash slot (6-19) for any other plugin name."""
    if not model:
        return 0
    if model in _BUILTIN_SLOTS:
        return _BUILTIN_SLOTS[model]
    return _FIRST_FREE_SLOT + zlib.crc32(model.encode()) % (_SLOTS - _FIRST_FREE_SLOT)


def series_number(kind: str, model: str | None = None) -> int:
    """Series Number of the series of *kind* (see :data:`SERIES_KINDS`), study-level or *model*'s own.

    :param kind: ``sr``, ``heatmap``, ``extra_map`` or ``cad_sr``.
    :param model: Plugin name for a per-model series; ``None`` for the study-level series.
    """
    if kind not in SERIES_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; one of {sorted(SERIES_KINDS)}")
    return SERIES_KINDS[kind] + model_slot(model)


def series_description(what: str, model_name: str = "") -> str:
    """A Series Description that always keeps the disclaimer: it comes first, and only the model's name is
    shortened to fit the 64 characters of an LO.

    :param what: The kind of object in our words, e.g. ``"AI heatmap"``.
    :param model_name: The model's (short) human name, if the series is one model's.
    """
    text = f"{DISCLAIMER_LABEL} - {what}"
    if model_name:
        text = f"{text} {model_name}"
    if len(text) > _LO:
        text = text[: _LO - 3].rstrip() + "..."
    return text


_TIMM_NAMES = (
    (re.compile(r"^resnet(\d+)[a-z]?$"), "ResNet-{}"),
    (re.compile(r"^efficientnet_b(\d)$"), "EfficientNet-B{}"),
    (re.compile(r"^densenet(\d+)$"), "DenseNet{}"),
    (re.compile(r"^mobilenetv2_\d+$"), "MobileNetV2"),
    (re.compile(r"^swin_tiny_patch4_window7_\d+$"), "Swin-T"),
)
#: Plugin options that name the network a model builds.
_BACKBONE_OPTIONS = ("backbone", "cnn_name", "swin_name")


def _human_network_name(timm_name: str) -> str:
    for pattern, template in _TIMM_NAMES:
        match = pattern.match(timm_name)
        if match:
            return template.format(*match.groups())
    return timm_name


def network_display_name(display_name: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """*display_name* with the backbone the loaded *options* build in place of the one the plugin's defaults
    name, e.g. "Hybrid ResNet-50 + MHSA" -> "Hybrid ResNet-18 + MHSA" for a checkpoint with ``backbone:
    resnet18``.  A backbone the name does not mention is added in brackets.

    :param display_name: The plugin's display name (written for its default options).
    :param options: The options the model was built with (defaults, then checkpoint, then config).
    :param defaults: The plugin's default options.
    """
    name = display_name
    for key in _BACKBONE_OPTIONS:
        actual, default = options.get(key), defaults.get(key)
        if not isinstance(actual, str) or actual == default:
            continue
        new = _human_network_name(actual)
        old = _human_network_name(default) if isinstance(default, str) else ""
        if old and old in name:
            name = name.replace(old, new)
        elif new not in name:
            name = f"{name} [{new}]"
    return name


def short_model_name(display_name: str) -> str:
    """The part of a display name before its first comma: "Hybrid ResNet-18 + MHSA, BI-RADS 1-5 (...)" ->
    "Hybrid ResNet-18 + MHSA"."""
    return display_name.split(",", 1)[0].strip() or display_name


def weights_kind(demo_weights: bool, weights_sha256: str) -> str:
    """``trained`` (a site's checkpoint), ``phantoms`` (demo weights trained on synthetic phantoms by
    ``pacs-triage demo-weights``) or ``random`` (demo weights from a seeded random initialisation, which
    have no file and so no digest)."""
    if not demo_weights:
        return "trained"
    return "phantoms" if weights_sha256 else "random"


def weights_notice(kind: str) -> str:
    """The sentence every output carries about demo weights; empty for a site's trained checkpoint."""
    if kind == "random":
        return "UNTRAINED DEMO WEIGHTS (random initialisation): the outputs are meaningless."
    if kind == "phantoms":
        return (
            "DEMO WEIGHTS trained only on synthetic phantoms (pacs-triage demo-weights): "
            "not validated on any patient image."
        )
    return ""


def weights_caption(kind: str) -> str:
    """The short form of :func:`weights_notice` burned into an image; empty for trained weights."""
    return {"random": "UNTRAINED DEMO WEIGHTS (random)", "phantoms": "DEMO WEIGHTS (synthetic phantoms)"}.get(
        kind, ""
    )


def software_version() -> str:
    """This software's version, as installed (the package metadata), else the source's."""
    try:
        return importlib.metadata.version("pacs-triage")
    except importlib.metadata.PackageNotFoundError:
        return __version__


@dataclass(frozen=True, kw_only=True)
class AlgorithmIdentity:
    """One model as IHE AI Results identifies it: the same in the SR (TID 4019 and the device observer) and
    in every SC (Contributing Equipment Sequence)."""

    #: Plugin name (config, CLI) and stable model id (``arch.tag``).
    model: str
    model_id: str
    #: The reported version: plugin version, weights version and digest prefix.
    version: str
    #: The network that runs, in words (:func:`network_display_name`).
    display_name: str
    #: ``trained``, ``phantoms`` or ``random`` (:func:`weights_kind`).
    weights: str
    weights_sha256: str = ""
    manufacturer: str = MANUFACTURER

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        *,
        options: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
        demo_weights: bool,
        weights_sha256: str,
    ) -> AlgorithmIdentity:
        """The identity of a loaded model (``plugins.host.LoadedModel``: its bound spec, options and weights).

        :param spec: The spec as the checkpoint amended it (its version names the checkpoint).
        :param options: The options the network was built with; ``None`` keeps the display name.
        :param defaults: The plugin's default options, which the display name was written for.
        :param demo_weights: The model runs demo weights.
        :param weights_sha256: The checkpoint's sha256; empty for a random initialisation.
        """
        display = spec.display_name
        if options is not None:
            display = network_display_name(display, options, defaults or {})
        return cls(
            model=spec.name,
            model_id=spec.model_id,
            version=spec.version,
            display_name=display,
            weights=weights_kind(demo_weights, weights_sha256),
            weights_sha256=weights_sha256,
        )

    @classmethod
    def from_loaded(cls, loaded: Any) -> AlgorithmIdentity:
        """The identity of a ``plugins.host.LoadedModel``: its bound spec, the options it was built with, the
        plugin's defaults and its weights."""
        plugin = loaded.plugin
        return cls.from_spec(
            plugin.spec,
            options=loaded.options,
            defaults=getattr(plugin, "default_options", {}),
            demo_weights=bool(loaded.demo_weights),
            weights_sha256=str(loaded.weights_sha256 or ""),
        )

    @classmethod
    def from_prediction(cls, prediction: Prediction, display_name: str = "") -> AlgorithmIdentity:
        """The identity as far as a prediction tells it (no options: the display name is taken as given)."""
        return cls(
            model=prediction.model_name,
            model_id=prediction.model_id,
            version=prediction.model_version,
            display_name=display_name or prediction.model_name,
            weights=weights_kind(prediction.demo_weights, prediction.weights_sha256),
            weights_sha256=prediction.weights_sha256,
        )

    @property
    def short_name(self) -> str:
        return short_model_name(self.display_name)

    @property
    def device_uid(self) -> str:
        """Device UID (0018,1002): one per checkpoint, so retraining (a new digest) makes a new device.  A
        random initialisation has no file; its model id and version stand for it."""
        if self.weights_sha256:
            return str(uids.derive_uid("algorithm-device", self.model_id, "sha256", self.weights_sha256))
        return str(uids.derive_uid("algorithm-device", self.model_id, "version", self.version))

    @property
    def model_name(self) -> str:
        """Manufacturer's Model Name (0008,1090), an LO: the network's short name and the model id."""
        return f"{self.short_name} ({self.model_id})"[:_LO]

    @property
    def software_versions(self) -> list[str]:
        """Software Versions (0018,1020): the model's version (with its weights) and this software's."""
        return [self.version[:_LO], f"pacs-triage {software_version()}"[:_LO]]

    @property
    def notice(self) -> str:
        return weights_notice(self.weights)

    def contributing_equipment_item(self) -> pydicom.Dataset:
        """The item of the Contributing Equipment Sequence (0018,A001) that AIR asks for."""
        purpose = pydicom.Dataset()
        purpose.CodeValue = PROCESSING_EQUIPMENT.value
        purpose.CodingSchemeDesignator = PROCESSING_EQUIPMENT.scheme_designator
        purpose.CodeMeaning = PROCESSING_EQUIPMENT.meaning
        item = pydicom.Dataset()
        item.PurposeOfReferenceCodeSequence = [purpose]
        item.Manufacturer = self.manufacturer
        item.ManufacturerModelName = self.model_name
        item.SoftwareVersions = self.software_versions
        item.DeviceUID = self.device_uid
        item.ContributionDescription = f"{self.display_name} {self.version}"[:_LO]
        return item


def add_contributing_equipment(dataset: pydicom.Dataset, *identities: AlgorithmIdentity) -> None:
    """Append one Contributing Equipment item per model to *dataset* (an SR or SC we built), once each."""
    if "ContributingEquipmentSequence" not in dataset:
        dataset.ContributingEquipmentSequence = []
    present = {str(item.get("DeviceUID", "")) for item in dataset.ContributingEquipmentSequence}
    for identity in identities:
        if identity.device_uid not in present:
            dataset.ContributingEquipmentSequence.append(identity.contributing_equipment_item())
            present.add(identity.device_uid)
