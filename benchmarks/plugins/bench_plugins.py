"""Latency, throughput, parameters and MACs of each model plugin's path against its bare timm backbones.

The plugin path is what a worker runs per image once it is decoded: ``ModelHost.run_images``, that is
preprocess (crop, resize, normalise) -> batched forward with the explanations (CAM, Grad-CAM, saliency, LEM's
excitation backprop) -> postprocess (the maps mapped back onto the source rows x columns, points, the
Prediction).  The baseline is the model's bare timm backbone(s), built as the model builds them, called on the
same preprocessed batch under ``torch.inference_mode``.  The time of each stage of the plugin path is taken
inside the same runs by wrapping the bound plugin's three hooks.  DICOM decoding is timed on its own.  Inputs
are synthetic full-field mammograms and ultrasound images from ``plugins.synthetic``.

Run: ``.venv/bin/python benchmarks/plugins/bench_plugins.py`` (``--help`` for options).  A model is added by
adding a row to ``MODEL_BENCHES``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import structlog
import timm
import torch
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from gateway.settings import ModelSettings, PluginSettings, Settings
from plugins.base import TorchModelPlugin
from plugins.host import LoadedModel, ModelHost
from plugins.preprocess import decode_frames, read_image_ref
from plugins.synthetic import make_mg_image, make_us_image
from plugins.types import Prediction

Modality = Literal["MG", "US"]
STAGES: tuple[str, ...] = ("preprocess", "forward", "postprocess")
MAC_KEYS: tuple[str, ...] = ("backbone_macs", "network_macs", "plugin_macs")


def _timm(name: str, **kwargs: Any) -> nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs)


def _asg_backbones(options: Mapping[str, Any]) -> dict[str, nn.Module]:
    # As AsgMammoNet builds it: the paper's CBAM sits on the last MBConv block, before conv_head.
    if options["cbam_after"] == "blocks":
        trunk = _timm("efficientnet_b0", features_only=True, out_indices=(4,))
        return {"efficientnet_b0 (to blocks.6)": trunk}
    return {"efficientnet_b0": _timm("efficientnet_b0", num_classes=0, global_pool="")}


def _clgb_backbones(options: Mapping[str, Any]) -> dict[str, nn.Module]:
    return {
        options["cnn_name"]: _timm(options["cnn_name"], features_only=True, out_indices=(1, 2, 3, 4)),
        # Swin's own forward (patch embedding, stages, norm, pool) on the image; CLGB-Net feeds the same
        # stages image + CNN tokens instead.
        options["swin_name"]: _timm(options["swin_name"], num_classes=0, img_size=224),
    }


def _lem_backbones(options: Mapping[str, Any]) -> dict[str, nn.Module]:
    return {options["backbone"]: _timm(options["backbone"], num_classes=0, global_pool="")}


def _hybrid_backbones(options: Mapping[str, Any]) -> dict[str, nn.Module]:
    return {"resnet50": _timm("resnet50", num_classes=0, global_pool="")}


def _us_backbones(options: Mapping[str, Any]) -> dict[str, nn.Module]:
    mobilenet = _timm("mobilenetv2_100", num_classes=0, global_pool="")
    if options["branch_a_features"] == "blocks":
        mobilenet.conv_head, mobilenet.bn2 = nn.Identity(), nn.Identity()
    return {"mobilenetv2_100": mobilenet, "densenet121": _timm("densenet121", num_classes=0, global_pool="")}


@dataclass(frozen=True, kw_only=True)
class ModelBench:
    """How to benchmark one model plugin, and what its model page and paper say it costs."""

    modality: Modality
    #: The plugin's options -> its bare timm backbones (name -> module), built as the model builds them.
    backbones: Callable[[Mapping[str, Any]], dict[str, nn.Module]]
    #: Parameters and MACs of our build, as its docs/models/ page states them.
    spec_cost: str
    #: What the paper reports about cost (size, compute, time).
    paper_cost: str
    #: Where our build differs from the paper's reported cost, or why there is nothing to compare.
    note: str


#: Plugin name -> its benchmark.  The notes are about the default build of each model, as its page in
#: docs/models/ describes it; ``spec_cost`` is the cost that page states (our measurement).
MODEL_BENCHES: dict[str, ModelBench] = {
    "asg_mammonet": ModelBench(
        modality="MG",
        backbones=_asg_backbones,
        spec_cost="3,622,088 params, 0.36 GMACs at 224",
        paper_cost="5.3 M params, 0.39 'GFLOPs'; 8.9-13.7 ms/img on an RTX 4090 Laptop GPU",
        note=(
            "paper's 5.3 M / 0.39 G is the stock ImageNet B0 (1000-class head, and GMACs, not GFLOPs); our "
            "build stops at blocks.6: 3.62 M. Its ms/img are GPU times, not comparable with CPU"
        ),
    ),
    "clgb_net": ModelBench(
        modality="MG",
        backbones=_clgb_backbones,
        spec_cost="57.7 M params, 11.7 GMACs at 224",
        paper_cost="none; calls the model 'lightweight', structured report within 5-10 s of acquisition",
        note=(
            "not lightweight as built: more parameters and MACs than ResNet-50 + Swin-T together (FPN, "
            "cross-attention, head are our choices); the 5-10 s is end to end and untimed in the paper"
        ),
    ),
    "lem": ModelBench(
        modality="MG",
        backbones=_lem_backbones,
        spec_cost="ResNet-18 11.2 M params, 30.8 GMACs at 1024x832",
        paper_cost="none; 'little computational overhead' over the CNN",
        note=(
            "true for classification (the head adds C+1 = 513 params, ~0 MACs); the localisation map "
            "(Algorithm 2, excitation backprop) adds a backward pass the claim does not count"
        ),
    ),
    "hybrid_birads": ModelBench(
        modality="MG",
        backbones=_hybrid_backbones,
        spec_cost="24,041,413 params, 4.10 GMACs at 224",
        paper_cost="none (params, FLOPs and time not reported; trained on a Tesla T4)",
        note="nothing to compare; the MHSA encoder and head add 0.53 M params and 0.02 GMACs to ResNet-50",
    ),
    "us_fusion": ModelBench(
        modality="US",
        backbones=_us_backbones,
        spec_cost="9,933,828 params, 3.16 GMACs at 224 (MobileNetV2 0.30 + DenseNet121 2.83)",
        paper_cost="none (abstract only: no params, FLOPs, time or hardware)",
        note=(
            "nothing to compare; plugin path = Grad-CAM + saliency (two backward passes); SHAP is off by "
            "default (50 backward passes per image when on)"
        ),
    ),
}


class Backbones(nn.Module):
    """Several bare backbones run one after the other on the same input, as a fused model would."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        """:param modules: name -> backbone."""
        super().__init__()
        self.names = list(modules)
        self.backbones = nn.ModuleList(modules.values())

    def forward(self, x: torch.Tensor) -> list[Any]:
        return [backbone(x) for backbone in self.backbones]


class StageClock:
    """Adds up the seconds a bound plugin spends in preprocess, forward and postprocess.

    The host calls these hooks on the bound plugin, so wrapping them on that instance times each stage inside
    the plugin path itself, with no extra run.
    """

    def __init__(self, plugin: TorchModelPlugin, device: torch.device) -> None:
        """:param plugin: the bound plugin of a loaded model (its hooks are wrapped in place).
        :param device: the model's device; CUDA work is synchronised before the forward stage stops its clock.
        """
        self.device = device
        self.seconds = dict.fromkeys(STAGES, 0.0)
        for stage in STAGES:
            setattr(plugin, stage, self._timed(stage, getattr(plugin, stage)))

    def _timed(self, stage: str, hook: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = hook(*args, **kwargs)
            if stage == "forward" and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[stage] += time.perf_counter() - started
            return result

        return timed

    def take(self) -> dict[str, float]:
        """The seconds since the last call, per stage."""
        taken, self.seconds = self.seconds, dict.fromkeys(STAGES, 0.0)
        return taken


def seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first-call allocations, oneDNN primitive creation
    return statistics.median(seconds(run) for _ in range(repeats))


class MacCounter(TorchDispatchMode):
    """Adds up the multiply-accumulates (FLOPs / 2) of every op that has a FLOP formula in PyTorch's registry:
    convolutions, matmuls, attention, forward and backward alike."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    @property
    def macs(self) -> int:
        return self.flops // 2

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        formula = flop_registry.get(func._overloadpacket)
        if formula is None and isinstance(func, torch._ops.OpOverload):
            # Under inference_mode composite ops (conv2d, linear, einsum) arrive whole; their parts have
            # formulas.
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def count_macs(run: Callable[[], object]) -> int:
    """Multiply-accumulates of the convolutions, matmuls and attention *run* executes.

    Backward passes (Grad-CAM, saliency, excitation backprop) are counted too.  ``FlopCounterMode`` itself
    is not used: its per-module backward hooks break ``torch.autograd.grad`` on captured activations, which
    Grad-CAM relies on.  PyTorch's fused attention fast path has no FLOP formula, so it is switched off while
    counting.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    counter = MacCounter()
    try:
        with counter:
            run()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.macs


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def write_phantom(
    directory: Path,
    modality: Modality,
    shape: tuple[int, int],
    transfer_syntax: UID = ExplicitVRLittleEndian,
) -> Path:
    """A synthetic mammogram or ultrasound image of *shape* (rows, cols) written in *transfer_syntax*."""
    if modality == "MG":
        dataset = make_mg_image(seed=7, label="malignant", size=shape).dataset
    else:
        dataset = make_us_image(seed=7, label="malignant", size=shape).dataset
    if transfer_syntax != ExplicitVRLittleEndian:
        dataset.compress(transfer_syntax)
    path = directory / f"{modality.lower()}_{shape[0]}x{shape[1]}_{transfer_syntax.keyword}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


@contextmanager
def loaded_model(
    name: str, batch_size: int, device: str, amp: bool
) -> Iterator[tuple[ModelHost, LoadedModel]]:
    """A host with model *name* loaded (demo weights), dropped on exit so the next model has the memory."""
    settings = Settings(
        plugins=PluginSettings(
            allow_demo_weights=True,
            load_entrypoints=False,
            models={name: ModelSettings(batch_size=batch_size, options={"amp": amp})},
        )
    )
    host = ModelHost(settings, device=device)
    yield host, host.load(name)


def bench_model(
    name: str,
    path: Path,
    batches: list[int],
    repeats: tuple[int, int],
    cell_budget_s: float,
    device: str,
    amp: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time the bare backbones and the plugin path of model *name* on the image at *path*.

    :param repeats: (fewest, most) timed pairs per batch size; between them, as many as fit *cell_budget_s*
        judging by the warm-up pair.
    :returns: one timing row per batch size, and the model's cost row (parameters, MACs per image).
    """
    bench = MODEL_BENCHES[name]
    with loaded_model(name, max(batches), device, amp) as (host, loaded):
        plugin, options = loaded.plugin, loaded.options
        backbones = Backbones(bench.backbones(options)).to(loaded.device).eval().requires_grad_(False)
        ref = read_image_ref(path)
        [(_, image)] = decode_frames(path, options["frames"])
        tensor, _box = plugin.preprocess(image, ref, options)

        def plugin_path(batch: int) -> None:
            results = host.run_images(name, [(ref, image)] * batch)
            if not all(isinstance(r, Prediction) and r.heatmap is not None for r in results):
                raise RuntimeError(f"the plugin path failed: {results}")

        one = tensor.unsqueeze(0).to(loaded.device)
        with torch.inference_mode():
            network_macs = count_macs(lambda: loaded.model(one))
            backbone_macs = count_macs(lambda: backbones(one))
        cost = {
            "model": name,
            "input": "x".join(str(side) for side in tensor.shape[-2:]),
            "backbones": " + ".join(backbones.names),
            "backbone_params": parameter_count(backbones),
            "network_params": parameter_count(loaded.model),
            "backbone_macs": backbone_macs,
            "network_macs": network_macs,
            "plugin_macs": count_macs(lambda: plugin_path(1)),
        }

        clock = StageClock(plugin, loaded.device)
        rows: list[dict[str, Any]] = []
        for batch in batches:
            inputs = tensor.unsqueeze(0).repeat(batch, 1, 1, 1).to(loaded.device)

            def bare_forward(inputs: torch.Tensor = inputs) -> None:
                with (
                    torch.inference_mode(),
                    torch.autocast(loaded.device.type, enabled=amp and loaded.device.type == "cuda"),
                ):
                    backbones(inputs)
                if loaded.device.type == "cuda":
                    torch.cuda.synchronize(loaded.device)

            # Bare and plugin runs alternate, so load from other processes on a shared machine hits both
            # alike.
            warm_up_s = seconds(bare_forward) + seconds(lambda batch=batch: plugin_path(batch))
            fewest, most = repeats
            count = max(fewest, min(most, int(cell_budget_s / warm_up_s)))
            clock.take()
            pairs, stages = [], []
            for _ in range(count):
                pairs.append((seconds(bare_forward), seconds(lambda batch=batch: plugin_path(batch))))
                stages.append(clock.take())
            bare_s = statistics.median(b for b, _ in pairs)
            plugin_s = statistics.median(p for _, p in pairs)
            rows.append(
                {
                    "model": name,
                    "source": f"{image.shape[0]}x{image.shape[1]}",
                    "batch": batch,
                    "repeats": count,
                    "bare_ms": 1000 * bare_s / batch,
                    "plugin_ms": 1000 * plugin_s / batch,
                    "bare_ips": batch / bare_s,
                    "plugin_ips": batch / plugin_s,
                    "ratio": statistics.median(p / b for b, p in pairs),
                    "stages_ms": " / ".join(
                        f"{1000 * statistics.median(s[stage] for s in stages) / batch:.1f}"
                        for stage in STAGES
                    ),
                }
            )
    return rows, cost


def table_row(*cells: object) -> None:
    print("| " + " | ".join(str(cell) for cell in cells) + " |")


def parse_sizes(sizes: list[str]) -> list[tuple[int, int]]:
    return [(int(rows), int(cols)) for rows, cols in (size.split("x") for size in sizes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_BENCHES), choices=list(MODEL_BENCHES))
    parser.add_argument("--sizes", nargs="+", default=["3328x2560"], help="mammogram sources, rows x cols")
    parser.add_argument("--us-sizes", nargs="+", default=["768x1024"], help="ultrasound sources, rows x cols")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=11, help="most timed pairs per (model, source, batch)")
    parser.add_argument("--min-repeats", type=int, default=2, help="fewest timed pairs, whatever they cost")
    parser.add_argument(
        "--cell-budget-s",
        type=float,
        default=20.0,
        help="seconds of timed pairs aimed at per (model, source, batch), between the two repeat bounds",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch and OpenCV threads (default: torch's own choice); 1 on a machine whose cores are busy",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only) for both")
    parser.add_argument("--no-decode", action="store_true", help="skip the DICOM decode table")
    args = parser.parse_args(argv)
    if not 1 <= args.min_repeats <= args.repeats:
        parser.error("need 1 <= --min-repeats <= --repeats")
    if args.threads is not None:
        # Threads that wait on each other at every op's barrier are what an oversubscribed machine punishes.
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    # Warnings only, so the output is the tables.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sizes: dict[Modality, list[tuple[int, int]]] = {
        "MG": parse_sizes(args.sizes),
        "US": parse_sizes(args.us_sizes),
    }
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, threads: {torch.get_num_threads()}, "
        f"{args.device}{' + AMP' if args.amp else ''}, median of n timed pairs "
        f"(n in {args.min_repeats}..{args.repeats}, aiming at {args.cell_budget_s:g} s per row)\n"
    )
    started = time.perf_counter()
    costs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        modalities = {MODEL_BENCHES[name].modality for name in args.models}
        phantoms = {
            (modality, size): write_phantom(Path(tmp), modality, size)
            for modality in sorted(modalities)
            for size in sizes[modality]
        }
        table_row(
            "model",
            "source",
            "batch",
            "n",
            "backbone ms/img",
            "plugin ms/img",
            "backbone img/s",
            "plugin img/s",
            "plugin / backbone",
            "pre / forward+explain / post ms/img",
        )
        table_row(*["---"] * 10)
        for name in args.models:
            modality = MODEL_BENCHES[name].modality
            for size in sizes[modality]:
                repeats = (args.min_repeats, args.repeats)
                rows, cost = bench_model(
                    name,
                    phantoms[modality, size],
                    args.batches,
                    repeats,
                    args.cell_budget_s,
                    args.device,
                    args.amp,
                )
                for row in rows:
                    table_row(
                        row["model"],
                        row["source"],
                        row["batch"],
                        row["repeats"],
                        *(f"{row[key]:.1f}" for key in ("bare_ms", "plugin_ms", "bare_ips", "plugin_ips")),
                        f"{row['ratio']:.2f}",
                        row["stages_ms"],
                    )
            costs.append(cost)

        print()
        table_row(
            "model",
            "input",
            "backbone(s)",
            "params backbone / network",
            "GMACs/img backbone / network / plugin path",
            "model page (our measurement)",
            "paper reports",
            "note",
        )
        table_row(*["---"] * 8)
        for cost in costs:
            bench = MODEL_BENCHES[cost["model"]]
            table_row(
                cost["model"],
                cost["input"],
                cost["backbones"],
                f"{cost['backbone_params']:,} / {cost['network_params']:,}",
                " / ".join(f"{cost[key] / 1e9:.2f}" for key in MAC_KEYS),
                bench.spec_cost,
                bench.paper_cost,
                bench.note,
            )

        if not args.no_decode:
            print()
            table_row("source", "transfer syntax", "file MB", "decode ms")
            table_row(*["---"] * 4)
            for modality, size in phantoms:
                for syntax in (ExplicitVRLittleEndian, JPEG2000Lossless):
                    path = write_phantom(Path(tmp), modality, size, syntax)
                    decode_s = median_seconds(lambda path=path: decode_frames(path), min(args.repeats, 5))
                    megabytes = path.stat().st_size / 1e6
                    source = f"{modality} {size[0]}x{size[1]}"
                    table_row(source, syntax.name, f"{megabytes:.1f}", f"{1000 * decode_s:.1f}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
