"""The base class of every model plugin: preprocess, batched forward with explanation, postprocess.

A model plugin subclasses :class:`TorchModelPlugin`, sets ``cam_layer`` (and ``cam_head`` where
the CAM shortcut is valid) and implements :meth:`~TorchModelPlugin.build_model`.  The host
(:mod:`plugins.host`) decodes the DICOM, then calls, per batch::

    tensor, box = plugin.preprocess(image, ref, options)      # per image
    output = plugin.forward(model, batch, options)             # per batch -> ModelOutput
    prediction = plugin.postprocess(image_output, box, ref, options)   # per image

Plugins with their own maps, points or BI-RADS output override ``forward`` or ``postprocess``.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeAlias

import numpy as np
import torch
from torch import nn

from plugins import preprocess as pre
from plugins.explain import grad_cam, linear_cam, normalise_minmax
from plugins.types import AcceptRule, ImageRef, Letterbox, ModelSpec, Prediction

#: Options every plugin understands; ``plugins.models.<name>.options`` overrides them.
BASE_OPTIONS: Mapping[str, Any] = {
    # Which frames of a multi-frame image to run: first, middle, max_variance or all.
    "frames": "middle",
    # none, breast (MG breast bounding box) or ultrasound (the header's US region).
    "crop": "none",
    # Mirror images whose chest wall is on the right, so every breast faces the same way.
    "normalise_laterality": False,
    "clahe": False,
    "clahe_clip_limit": 2.0,
    "clahe_tile_grid": 8,
    # Colour images become grey (BT.601) before the grey -> 3-channel copy.
    "to_grey": True,
    # False stretches the image to the input size instead of letterboxing it.
    "keep_aspect": True,
    "explain": True,
    # Class Grad-CAM explains; "" = the predicted class.
    "cam_target_class": "",
    # Probabilities are softmax(logits / temperature); a checkpoint usually sets it.
    "temperature": None,
    # Mixed precision on CUDA.
    "amp": False,
    # None = as the plugin's AcceptRule says.
    "accept_for_processing": None,
    "accept_tomosynthesis_volumes": None,
}


#: What the 2-D mammography models accept.  The For Processing and tomosynthesis classes are listed so
#: that the config flags accepting them can work; the host skips them by default.
MAMMOGRAPHY_2D = AcceptRule(
    modalities=("MG",),
    sop_class_uids=(
        pre.MG_FOR_PRESENTATION,
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
        pre.BREAST_TOMOSYNTHESIS,
        *pre.BREAST_PROJECTION,
    ),
)


@dataclass(frozen=True, kw_only=True)
class ModelOutput:
    """A batch through a model: logits and explanation maps over the model input."""

    #: ``[B, K]`` pre-softmax scores, K = ``len(spec.classes)``.
    logits: torch.Tensor
    #: ``[B, h, w]`` in [0, 1], covering the whole model input at any resolution.
    heatmap: torch.Tensor | None = None
    heatmap_method: str = ""
    #: Further ``[B, h, w]`` maps by name, same geometry as ``heatmap``.
    extra_maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def split(self) -> list[ImageOutput]:
        """One :class:`ImageOutput` per sample, as float32 numpy on the CPU."""
        logits = self.logits.detach().float().cpu().numpy()
        heatmaps = None if self.heatmap is None else self.heatmap.detach().float().cpu().numpy()
        extras = {name: m.detach().float().cpu().numpy() for name, m in self.extra_maps.items()}
        return [
            ImageOutput(
                logits=logits[i],
                heatmap=None if heatmaps is None else heatmaps[i],
                heatmap_method=self.heatmap_method,
                extra_maps={name: maps[i] for name, maps in extras.items()},
            )
            for i in range(logits.shape[0])
        ]


@dataclass(frozen=True, kw_only=True)
class ImageOutput:
    """One sample of a :class:`ModelOutput`."""

    logits: np.ndarray
    heatmap: np.ndarray | None = None
    heatmap_method: str = ""
    extra_maps: dict[str, np.ndarray] = field(default_factory=dict)


def to_tensor(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``uint8`` HxW (grey, copied to 3 channels) or HxWx3 -> normalised float32 ``[3, H, W]``."""
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32).div_(255.0)
    pixels = pixels.unsqueeze(0).expand(3, -1, -1) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return ((pixels - mean_t) / std_t).contiguous()


class TorchModelPlugin(abc.ABC):
    """A PyTorch model plugin.  Subclasses implement :meth:`build_model` and set ``cam_layer``."""

    #: Options and their defaults; config keys outside this mapping stop start-up.
    default_options: ClassVar[Mapping[str, Any]] = BASE_OPTIONS
    #: Dotted module name whose output Grad-CAM explains; ``None`` = no heatmap by default.
    cam_layer: ClassVar[str | None] = None
    #: Dotted name of the ``nn.Linear`` head when ``cam_layer`` is followed only by global average
    #: pooling and that head: Grad-CAM is then computed as CAM, without a backward pass.
    cam_head: ClassVar[str | None] = None

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        #: Set by :meth:`bind` from the loaded checkpoint; every Prediction carries them.
        self.demo_weights = False
        self.weights_sha256 = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.model_id!r})"

    def bind(self, spec: ModelSpec, *, demo_weights: bool, weights_sha256: str) -> Self:
        """A copy for one loaded checkpoint: its spec (amended by the checkpoint) and its weights."""
        clone = copy.copy(self)
        clone.spec, clone.demo_weights, clone.weights_sha256 = spec, demo_weights, weights_sha256
        return clone

    @abc.abstractmethod
    def build_model(self, options: Mapping[str, Any]) -> nn.Module:
        """Build the network with random weights (``pretrained=False``: nothing downloads).

        :param options: The resolved options (defaults, then the checkpoint's, then config).
        """

    def preprocess(
        self, image: np.ndarray, ref: ImageRef, options: Mapping[str, Any]
    ) -> tuple[torch.Tensor, Letterbox]:
        """Display-ready ``uint8`` source image -> normalised ``[3, H, W]`` input and its letterbox.

        Default: crop (``crop`` option), laterality flip, grey, CLAHE, letterbox to
        ``spec.input_size``, then ``(x / 255 - spec.mean) / spec.std`` with grey copied to 3 channels.
        """
        crop = pre.crop_box(image, ref, options["crop"])
        flip = bool(options["normalise_laterality"]) and pre.chest_wall_on_right(image, crop)
        if options["to_grey"]:
            image = pre.to_grey(image)
        if options["clahe"]:
            image = pre.apply_clahe(
                image, float(options["clahe_clip_limit"]), int(options["clahe_tile_grid"])
            )
        resized, box = pre.letterbox(
            image, self.spec.input_size, crop=crop, flip=flip, keep_aspect=bool(options["keep_aspect"])
        )
        return to_tensor(resized, self.spec.mean, self.spec.std), box

    def forward(self, model: nn.Module, batch: torch.Tensor, options: Mapping[str, Any]) -> ModelOutput:
        """Run *batch* ``[B, 3, H, W]`` through *model* (in eval mode) and explain it.

        Not called under ``torch.inference_mode`` so that Grad-CAM can take gradients.
        """
        if options["explain"] and self.cam_layer is not None:
            return self.explain(model, batch, options)
        with torch.inference_mode():
            return ModelOutput(logits=model(batch))

    def explain(self, model: nn.Module, batch: torch.Tensor, options: Mapping[str, Any]) -> ModelOutput:
        """Grad-CAM at ``cam_layer`` for the predicted class (or ``cam_target_class``), min-max scaled.

        Uses :func:`~plugins.explain.linear_cam` (no backward pass) when ``cam_head`` is set.
        """
        if self.cam_layer is None:
            raise ValueError(f"{self!r} sets no cam_layer to explain")
        layer = model.get_submodule(self.cam_layer)
        target = None
        if options["cam_target_class"]:
            index = self.spec.classes.index(options["cam_target_class"])
            target = torch.full((batch.shape[0],), index, dtype=torch.long, device=batch.device)
        if self.cam_head is not None:
            head = model.get_submodule(self.cam_head)
            if not isinstance(head, nn.Linear):
                raise TypeError(
                    f"cam_head {self.cam_head!r} of {self!r} is a {type(head).__name__}, not nn.Linear"
                )
            logits, cam = linear_cam(model, batch, layer, head, target)
        else:
            logits, cam = grad_cam(model, batch, layer, target)
        return ModelOutput(logits=logits, heatmap=normalise_minmax(cam)[:, 0], heatmap_method="Grad-CAM")

    def postprocess(
        self, output: ImageOutput, box: Letterbox, ref: ImageRef, options: Mapping[str, Any]
    ) -> Prediction:
        """Logits -> probabilities (temperature-scaled), risk, predicted class; maps -> source geometry.

        The risk is the summed probability of ``spec.positive_classes``.
        """
        logits = output.logits.astype(np.float64) / float(options["temperature"] or 1.0)
        exp = np.exp(logits - logits.max())
        probabilities = exp / exp.sum()
        classes = self.spec.classes
        risk = sum(float(probabilities[classes.index(c)]) for c in self.spec.positive_classes)
        return Prediction(
            model_id=self.spec.model_id,
            model_name=self.spec.name,
            model_version=self.spec.version,
            image=ref,
            classes=classes,
            probabilities=tuple(float(p) for p in probabilities),
            predicted_class=classes[int(np.argmax(probabilities))],
            risk=min(max(risk, 0.0), 1.0),
            heatmap=None if output.heatmap is None else pre.map_to_source(output.heatmap, box),
            heatmap_method=output.heatmap_method,
            extra_maps={name: pre.map_to_source(m, box) for name, m in output.extra_maps.items()},
            demo_weights=self.demo_weights,
            weights_sha256=self.weights_sha256,
            parameters={
                "thresholds": dict(self.spec.thresholds),
                # What makes this model differ from the plugin's stock build (a checkpoint's backbone or
                # fusion branch, its temperature, a site's override) belongs in the report's parameters.
                **({"options": changed} if (changed := self._changed_options(options)) else {}),
            },
        )

    def _changed_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        def plain(value: Any) -> Any:  # a checkpoint's JSON gives lists where the defaults have tuples
            return [plain(v) for v in value] if isinstance(value, list | tuple) else value

        defaults = self.default_options
        return {
            key: value
            for key, value in sorted(options.items())
            if key not in defaults or plain(defaults[key]) != plain(value)
        }


#: What ``pacs_triage_register_models`` returns and the host runs; every model plugin today is a
#: :class:`TorchModelPlugin`.
ModelPlugin: TypeAlias = TorchModelPlugin
