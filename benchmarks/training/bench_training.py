"""Training throughput (images/s) of each architecture's recipe: the augmentation and the optimiser step.

Two numbers per architecture, on synthetic phantoms (``plugins.synthetic``):

* ``step``: one optimiser step of the recipe (forward, the recipe's loss, backward, step; AMP on CUDA) on a
  batch of already augmented images, median over the timed steps;
* ``augment``: the recipe's per-image training transform (``Recipe.train_input``) on prepared images,
  the work each data-loading worker does.

An epoch runs at about the smaller of ``step`` and ``augment x workers``.

Run: ``.venv/bin/python benchmarks/training/bench_training.py`` (``--help`` for options).  The default
input sizes are the demo profiles' (small, for CPUs); ``--input-size paper`` uses each paper's size.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gateway.settings import PluginSettings, Settings
from plugins.host import ModelHost
from plugins.synthetic import write_dataset_dir
from training.datasets import load_generic_csv
from training.recipes import Recipe
from training.registry import demo_profiles, get_recipe
from training.trainer import derive_seed, load_training_image

ARCHITECTURES = ("asg_mammonet", "clgb_net", "lem", "hybrid_birads", "us_fusion")
DEMO_PROFILES = demo_profiles()


def build_recipe(name: str, input_size: str | None) -> Recipe:
    plugin = ModelHost(Settings(plugins=PluginSettings(load_entrypoints=False))).plugin(name)
    profile = DEMO_PROFILES[name]
    if input_size == "paper":
        # The paper's build (e.g. clgb_net with ResNet-50), at the paper's input size.
        return get_recipe(plugin)
    if input_size:
        height, _, width = input_size.partition("x")
        size = (int(height), int(width or height))
    else:
        size = profile.input_size
    # Otherwise the demo profile's build (e.g. clgb_net with ResNet-18), at the size asked for.
    return get_recipe(plugin, options=profile.options, input_size=size)  # type: ignore[arg-type]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def augment_rate(recipe: Recipe, prepared: list[np.ndarray], repeats: int) -> float:
    started = time.perf_counter()
    count = 0
    for round_ in range(repeats):
        for index, image in enumerate(prepared):
            recipe.train_input(image, derive_seed(0, round_, index))
            count += 1
    return count / (time.perf_counter() - started)


def step_rate(
    recipe: Recipe, batch: torch.Tensor, targets: torch.Tensor, device: torch.device, steps: int
) -> tuple[float, float]:
    """Images/s of the recipe's last stage (its optimiser and trainable parameters), and millions trained."""
    model = recipe.build_model().to(device)
    stage = recipe.stages(steps_per_epoch=max(1, steps))[-1]
    trainable = stage.trainable(model)
    optimizer = stage.optimizer(trainable)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    model.train()
    labels = targets.tolist()
    times = []
    for index in range(steps + 2):  # two warm-up steps: allocations, oneDNN/cuDNN kernel choice
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss, _ = recipe.loss(model(batch), targets, 1000, labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= 2:
            times.append(time.perf_counter() - started)
    return batch.shape[0] / statistics.median(times), sum(p.numel() for p in trainable) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=ARCHITECTURES, help="repeatable; default all")
    parser.add_argument("--input-size", help="N, HxW or 'paper' (default: each demo profile's size)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed optimiser steps")
    parser.add_argument("--images", type=int, default=16, help="phantoms for the augmentation timing")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"# {where}, torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}")
    print("| architecture | input | trained params (M) | optimiser | step (img/s) | augment (img/s) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.arch or ARCHITECTURES:
            recipe = build_recipe(name, args.input_size)
            profile = DEMO_PROFILES[name]
            manifest = write_dataset_dir(
                Path(folder) / name, profile.kind, args.images, 0, classes=profile.classes
            )
            records = load_generic_csv(manifest)
            prepared = []
            for record in records:
                ref, image = load_training_image(record, recipe)
                prepared.append(recipe.prepare(image, ref))
            augment = augment_rate(recipe, prepared, repeats=2)
            inputs = [recipe.train_input(prepared[i % len(prepared)], i) for i in range(args.batch_size)]
            batch = torch.stack(inputs).to(device)
            targets = torch.tensor([i % len(recipe.classes) for i in range(args.batch_size)], device=device)
            step, trained = step_rate(recipe, batch, targets, device, args.steps)
            size = "x".join(str(v) for v in recipe.input_size)
            optimiser = recipe.hp.get("optimizer", "adam")
            print(
                f"| {name} | {size} | {trained:.1f} | {optimiser} | {step:.1f} | {augment:.0f} |", flush=True
            )


if __name__ == "__main__":
    main()
