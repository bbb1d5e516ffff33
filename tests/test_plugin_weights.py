"""Checkpoints (safetensors + JSON metadata) and where a model's weights come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gateway.errors import PermanentError
from gateway.settings import ModelSettings, PluginSettings, Settings
from plugins.weights import (
    CheckpointMetadata,
    describe_weights,
    file_sha256,
    load_checkpoint,
    reported_version,
    resolve_weights,
    save_checkpoint,
    sidecar_path,
)

METADATA = CheckpointMetadata(
    architecture="tiny",
    model_id="tiny.v1",
    version="1",
    class_names=("benign", "malignant"),
    norm_mean=(0.4,),
    norm_std=(0.2,),
    input_size=(32, 48),
    thresholds={"malignant": 0.3},
    temperature=2.0,
    options={"width": 4},
    training_data="none",
)


def test_round_trip_keeps_tensors_and_metadata(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "tiny.safetensors"
    saved = save_checkpoint(model, path, METADATA)
    assert saved.sha256 == file_sha256(path) and sidecar_path(path) == tmp_path / "tiny.json"
    state, metadata = load_checkpoint(path)
    assert metadata == saved
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)


def test_header_metadata_is_enough_without_the_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_checkpoint({"w": torch.ones(2)}, path, METADATA)
    sidecar_path(path).unlink()
    _, metadata = load_checkpoint(path)
    assert metadata.input_size == (32, 48) and metadata.sha256 == file_sha256(path)


def test_the_sidecar_can_retune_thresholds(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_checkpoint({"w": torch.ones(2)}, path, METADATA)
    data = json.loads(sidecar_path(path).read_text())
    data["thresholds"] = {"malignant": 0.6}
    sidecar_path(path).write_text(json.dumps(data))
    assert load_checkpoint(path)[1].thresholds == {"malignant": 0.6}


def test_changed_weights_fail_the_sha256_check(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_checkpoint({"w": torch.ones(2)}, path, METADATA)
    save_file({"w": torch.zeros(2)}, str(path))  # swapped behind the sidecar's back
    with pytest.raises(PermanentError, match="sha256"):
        load_checkpoint(path)


def test_a_checkpoint_without_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(PermanentError, match="has no metadata"):
        load_checkpoint(path)


def test_corrupt_and_missing_files_are_named(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(PermanentError, match=r"corrupt\.safetensors"):
        load_checkpoint(corrupt)
    with pytest.raises(PermanentError, match=r"absent\.safetensors"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_metadata_validation_names_the_problem() -> None:
    with pytest.raises(PermanentError, match="lacks class_names"):
        CheckpointMetadata.from_json_dict(
            {k: v for k, v in METADATA.to_json_dict().items() if k != "class_names"}, "x"
        )
    with pytest.raises(PermanentError, match="unknown keys colour"):
        CheckpointMetadata.from_json_dict({**METADATA.to_json_dict(), "colour": "red"}, "x")
    square = CheckpointMetadata.from_json_dict({**METADATA.to_json_dict(), "input_size": 224}, "x")
    assert square.input_size == (224, 224)


def test_a_pt_state_dict_with_a_sidecar_loads(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(3.0)}, path)
    sidecar_path(path).write_text(json.dumps(METADATA.to_json_dict()))
    state, metadata = load_checkpoint(path)
    assert torch.equal(state["w"], torch.arange(3.0)) and metadata.model_id == "tiny.v1"


def test_resolve_weights(tmp_path: Path) -> None:
    configured = Settings(
        plugins=PluginSettings(models={"m": ModelSettings(weights=tmp_path / "m.safetensors")})
    )
    assert resolve_weights("m", configured).path == tmp_path / "m.safetensors"
    assert not resolve_weights("m", configured).demo
    with pytest.raises(PermanentError, match="allow_demo_weights"):
        resolve_weights("m", Settings())
    demo = Settings(plugins=PluginSettings(allow_demo_weights=True, demo_weights_dir=tmp_path))
    assert resolve_weights("m", demo).path is None and resolve_weights("m", demo).demo
    save_checkpoint({"w": torch.ones(1)}, tmp_path / "m.safetensors", METADATA)
    assert resolve_weights("m", demo).path == tmp_path / "m.safetensors"
    assert describe_weights("m", demo).startswith(f"demo {tmp_path / 'm.safetensors'} sha256:")
    assert describe_weights("m", Settings()) == "missing"


def test_reported_version_names_the_weights() -> None:
    first, second = "3f2a9c1e" + "0" * 56, "77aa01bc" + "0" * 56
    # Two trainings that both call themselves 1.0 still report different versions (and so new output UIDs).
    assert reported_version("1.0", "1.0", first) != reported_version("1.0", "1.0", second)
    assert reported_version("1.0", "2.1", first) == "1.0/w2.1-3f2a9c1e"
    assert len(reported_version("1.0", "x" * 100, first)) == 64  # a DICOM LO value
