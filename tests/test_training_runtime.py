"""Mixed precision and worker processes of the training loop, on tiny US-Fusion runs.

The CPU tests show that ``amp=True`` trains with bfloat16 autocast and exports float32 weights, and that
worker processes change nothing in the weights (each sample's augmentation is seeded from the run's seed,
the epoch and the sample, never from the process that loads it).  The CUDA test checks the default there:
float16 autocast with a gradient scaler.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import cv2
import pytest
import torch
from torch.utils.data import Dataset

from gateway.settings import ModelSettings, PluginSettings, Settings
from plugins.host import ModelHost
from plugins.synthetic import write_dataset_dir
from plugins.weights import load_checkpoint
from training.datasets import Record, load_generic_csv
from training.models.us_fusion import UsFusionRecipe
from training.registry import get_recipe
from training.trainer import (
    STATE_FILE,
    BestTracker,
    TrainConfig,
    Trainer,
    TrainingSet,
    derive_seed,
    load_training_image,
    seed_everything,
    train,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 11
NAME = "us_fusion"
#: The demo profile cut down to seconds on one thread: 24 images of 64x64, MobileNetV2 branch only, two
#: epochs with augmentation on, so that each epoch's seeds (and the worker copies of the data) matter.
DEMO_PROFILE = UsFusionRecipe.demo_profile
assert DEMO_PROFILE is not None
PROFILE = dataclasses.replace(
    DEMO_PROFILE,
    images=24,
    input_size=(64, 64),
    options={"fusion": "a_only"},
    hyperparameters={**DEMO_PROFILE.hyperparameters, "epochs": 2, "augment": True},
)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[Record]:
    root = tmp_path_factory.mktemp("us")
    manifest = write_dataset_dir(root, PROFILE.kind, PROFILE.images, SEED, classes=PROFILE.classes)
    return load_generic_csv(manifest)


@pytest.fixture
def forward_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtype of every output of models the recipe builds (what autocast made of the forward pass)."""
    seen: list[torch.dtype] = []
    build = UsFusionRecipe.build_model

    def build_and_watch(self: UsFusionRecipe) -> torch.nn.Module:
        model = build(self)
        model.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))
        return model

    monkeypatch.setattr(UsFusionRecipe, "build_model", build_and_watch)
    return seen


def _train(records: list[Record], config: TrainConfig, **hyperparameters: Any) -> Any:
    return train(
        NAME,
        records,
        config,
        hyperparameters={**PROFILE.hyperparameters, **hyperparameters},
        options=PROFILE.options,
        input_size=PROFILE.input_size,
        dataset="synthetic",
        split=PROFILE.split,
        folds=0,
        n_bootstrap=0,
        log_line=lambda line: None,
    )


def _fit(records: list[Record], config: TrainConfig) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Train only (no export or evaluation): the final weights and the history."""
    plugin = ModelHost(Settings(), "cpu").plugin(NAME)
    recipe = get_recipe(
        plugin,
        hyperparameters=PROFILE.hyperparameters,
        options=PROFILE.options,
        input_size=PROFILE.input_size,
    )
    trainer = Trainer(recipe, config, records[:18], records[18:], log_line=lambda line: None)
    trainer.prepare()
    seed_everything(derive_seed(config.seed, "init"))
    fit = trainer.fit(recipe.build_model())
    return {k: v.detach().clone() for k, v in fit.model.state_dict().items()}, fit.history


def test_amp_on_the_cpu_trains_in_bfloat16_and_exports_float32(
    records: list[Record], forward_dtypes: list[torch.dtype], tmp_path: Path
) -> None:
    config = TrainConfig(out_dir=tmp_path / "run", seed=SEED, progress=False, device="cpu", amp=True)
    result = _train(records, config, epochs=1)
    assert len(result.history) == 1
    assert set(forward_dtypes) == {torch.bfloat16}  # training and validation passes alike
    row = result.history[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    # bfloat16 has float32's range: no loss scaling, so the state holds no scaler.
    assert torch.load(tmp_path / "run" / STATE_FILE, weights_only=False)["scaler"] == {}
    state, metadata = load_checkpoint(result.checkpoint)
    assert state and all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert metadata.sha256 == result.metadata.sha256
    host = ModelHost(
        Settings(
            plugins=PluginSettings(
                load_entrypoints=False, models={NAME: ModelSettings(weights=result.checkpoint)}
            )
        )
    )
    assert host.load(NAME).plugin.name == NAME


class _ThreadCounts(Dataset[tuple[int, int]]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[int, int]:
        return torch.get_num_threads(), cv2.getNumThreads()


def test_worker_processes_give_the_same_weights(records: list[Record], tmp_path: Path) -> None:
    main_weights, main_history = _fit(
        records, TrainConfig(out_dir=tmp_path / "main", seed=SEED, progress=False, device="cpu", workers=0)
    )
    # Uncached, so that the workers decode and prepare the DICOMs themselves.
    workers = TrainConfig(
        out_dir=tmp_path / "workers", seed=SEED, progress=False, device="cpu", workers=2, cache="none"
    )
    worker_weights, worker_history = _fit(records, workers)
    assert len(main_history) == len(worker_history) == 2
    assert [r["train_loss"] for r in main_history] == [r["train_loss"] for r in worker_history]
    assert [r["val_loss"] for r in main_history] == [r["val_loss"] for r in worker_history]
    assert main_weights.keys() == worker_weights.keys()
    for key, value in main_weights.items():
        assert torch.equal(value, worker_weights[key]), key


def test_workers_run_one_thread_each(records: list[Record], tmp_path: Path) -> None:
    plugin = ModelHost(Settings(), "cpu").plugin(NAME)
    recipe = get_recipe(plugin, hyperparameters={"batch_size": 1}, input_size=PROFILE.input_size)
    config = TrainConfig(out_dir=tmp_path, seed=SEED, progress=False, device="cpu", workers=2)
    trainer = Trainer(recipe, config, records[:4], [], log_line=lambda line: None)
    loader = trainer._loader(_ThreadCounts(), epoch_seed=0, train=False)
    counts = {(int(torch_threads), int(cv_threads)) for torch_threads, cv_threads in loader}
    assert counts == {(1, 1)}
    with pytest.raises(ValueError, match="workers must be 0"):
        Trainer(recipe, dataclasses.replace(config, workers=-1), records[:4], [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_is_float16_with_a_gradient_scaler(
    records: list[Record], forward_dtypes: list[torch.dtype], tmp_path: Path
) -> None:
    config = TrainConfig(out_dir=tmp_path / "run", seed=SEED, progress=False, device="cuda")
    result = _train(records, config)
    assert set(forward_dtypes) == {torch.float16}
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    scaler = torch.load(tmp_path / "run" / STATE_FILE, weights_only=False)["scaler"]
    assert scaler and scaler["scale"] > 0  # a scaler that was used records its scale
    state, _ = load_checkpoint(result.checkpoint)
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())


@pytest.mark.parametrize("cache", [True, False])
def test_without_augmentation_training_sees_what_inference_sees(records: list[Record], cache: bool) -> None:
    # A hybrid recipe (stretch resize + CLAHE after it) on mammograms: the path where a second resize of a
    # prepared image used to differ from the plugin's own preprocessing.
    mammograms = load_generic_csv(
        write_dataset_dir(records[0].path.parent.parent / f"mg-{cache}", "mg-birads", 5, SEED)
    )
    plugin = ModelHost(Settings(), "cpu").plugin("hybrid_birads")
    recipe = get_recipe(plugin, hyperparameters={"augment": False}, input_size=(64, 64))
    training = TrainingSet(recipe, mammograms, [0] * len(mammograms), SEED, cache=cache)
    for index, record in enumerate(mammograms):
        ref, image = load_training_image(record, recipe)
        tensor, _ = training[index]
        assert torch.equal(tensor, recipe.eval_input(image, ref))


def test_hybrid_cosine_schedule_anneals_to_zero_over_the_stage() -> None:
    plugin = ModelHost(Settings(), "cpu").plugin("hybrid_birads")
    hyperparameters = {"schedule": "cosine", "stage1_epochs": 0, "epochs": 3, "lr": 1e-3}
    (stage,) = get_recipe(plugin, hyperparameters=hyperparameters, input_size=(64, 64)).stages(5)
    assert stage.scheduler is not None and stage.scheduler_step == "batch"
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = stage.scheduler(optimizer, 5)
    for _ in range(3 * 5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    (paper,) = get_recipe(plugin, hyperparameters={"stage1_epochs": 0}, input_size=(64, 64)).stages(5)
    assert paper.scheduler_step == "plateau"  # the paper's ReduceLROnPlateau stays the default
    with pytest.raises(ValueError, match="schedule 'linear' is not plateau or cosine"):
        get_recipe(plugin, hyperparameters={"schedule": "linear"}, input_size=(64, 64))


def test_best_tracker_keeps_the_best_weights_and_counts_epochs_without_improvement() -> None:
    """The early stopping every recipe's stage runs: a monitor that stops improving, then the best restored."""
    net = torch.nn.Linear(2, 1)
    tracker = BestTracker("min")
    improved = []
    for epoch, loss in enumerate([1.0, 0.5, 0.7, 0.8, 0.9, 0.6, 0.55]):
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        improved.append(tracker.step(loss, net))
    assert improved == [True, True, False, False, False, False, False]
    assert tracker.best == 0.5 and tracker.bad_epochs == 5
    assert tracker.best_state is not None and torch.all(tracker.best_state["weight"] == 1.0)
    auc = BestTracker("max")
    assert [auc.step(v, net) for v in (0.6, 0.7, 0.65)] == [True, True, False] and auc.best == 0.7
