"""Shared set-up of the study-pipeline tests: small studies, hostile ones, and the tasks run in process.

The analysis and delivery tasks run here with ``Task.apply`` (in this process, no broker): each
task a stage queues is captured and run next, so a test sees a study through to its final state.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

from gateway.messages import InstanceRef, Priority, StudyJob
from gateway.settings import Settings, load_settings
from tests.utils import make_instance, write

REPO = Path(__file__).resolve().parent.parent
BUILTIN_MG_MODELS = ["asg_mammonet", "clgb_net", "lem", "hybrid_birads"]
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_IMAGE = "1.2.840.10008.5.1.4.1.1.3.1"


def bright_mammogram(study_uid: str, *, seed: int = 0, laterality: str = "L", view: str = "CC") -> Dataset:
    """A 48 x 32 MG view; the triage probe models score its brightness."""
    ds = make_instance(study_uid=study_uid, modality="MG", rows=48, cols=32, seed=seed, laterality=laterality,
                       view=view)
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(1800, 2600, (48, 32), dtype=np.uint16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.BitsStored, ds.HighBit = 12, 11
    return ds


def ultrasound(study_uid: str, *, body_part: str = "", anatomic_region: tuple[str, str] | None = None) -> Dataset:
    """A small grey US image with the body part (or anatomic region) a site's modality would fill in."""
    ds = make_instance(study_uid=study_uid, modality="US", rows=40, cols=40, sop_class_uid=US_IMAGE)
    if body_part:
        ds.BodyPartExamined = body_part
    if anatomic_region is not None:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = anatomic_region[0], "SCT", anatomic_region[1]
        ds.AnatomicRegionSequence = [item]
    return ds


def rle_pixel_bomb(study_uid: str, rows: int = 60000, columns: int = 60000) -> Dataset:
    """An RLE Lossless MG image whose header declares *rows* x *columns* 16-bit pixels, in about 1 KB.

    Its one fragment holds a valid RLE header and two one-byte segments: a decoder that trusts the
    header allocates rows x columns x 2 bytes (7.2 GB at 60000 x 60000) before it finds out.
    """
    ds = make_instance(study_uid=study_uid, modality="MG", rows=8, cols=8)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows, ds.Columns = rows, columns
    header = struct.pack("<16L", 2, 64, 66, *([0] * 13))
    ds.PixelData = encapsulate([header + b"\x00\x00\x00\x00"])
    ds["PixelData"].VR = "OB"
    return ds


def frame_bomb(study_uid: str, frames: int = 5000, rows: int = 512, columns: int = 512) -> Dataset:
    """A multi-frame MG image declaring *frames* frames of 16-bit pixels (2.6 GB by default) over
    a few bytes of pixel data."""
    ds = make_instance(study_uid=study_uid, modality="MG", rows=rows, cols=columns)
    ds.NumberOfFrames = frames
    ds.PixelData = b"\x00" * 16
    return ds


@dataclass
class Harness:
    """Runs studies through the real analysis and delivery tasks, in this process."""

    settings: Settings
    store_dir: Path
    queued: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def job(self, datasets: list[Dataset], *, version: int = 1, job_id: str | None = None,
            calling_ae: str = "MODALITY", versions: dict[str, int] | None = None) -> StudyJob:
        """A job over *datasets*, written to the store; *versions* says which version each SOP UID joined."""
        instances = []
        for ds in datasets:
            path = write(ds, self.store_dir)
            uid = str(ds.SOPInstanceUID)
            instances.append(InstanceRef(
                sop_instance_uid=uid, sop_class_uid=str(ds.SOPClassUID), series_instance_uid=str(ds.SeriesInstanceUID),
                modality=str(ds.Modality), path=path.name, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                study_version=(versions or {}).get(uid, version)))
        study_uid = str(datasets[0].StudyInstanceUID)
        return StudyJob(job_id=job_id or f"{study_uid[-12:]}-v{version}", study_instance_uid=study_uid,
                        study_version=version, calling_ae=calling_ae, priority=Priority.ROUTINE,
                        storage_root=str(self.store_dir), instances=tuple(instances))

    def run(self, job: StudyJob) -> Any:
        """Analyse *job* and run every task it queues until none is left; return the study's worklist row."""
        import workers.tasks as tasks

        self.queued.append(("workers.tasks.analyse", {"job": job.to_json_dict()}))
        while self.queued:
            name, kwargs = self.queued.pop(0)
            task = tasks.analyse if name.endswith("analyse") else tasks.deliver
            task.apply(kwargs=kwargs, throw=True)
        return self.store.study(job.study_instance_uid)

    @property
    def store(self) -> Any:
        import workers.tasks as tasks

        return tasks.results_store(self.settings)

    def timeline(self, job: StudyJob) -> dict[str, str]:
        return {row["event"]: row["detail"] for row in self.store.timeline(job.job_id)}


def harness_settings(tmp_path: Path, **extra: Any) -> Settings:
    worker = {"max_redeliveries": 2, **extra.pop("worker", {})}
    data = {
        "gateway": {"data_dir": str(tmp_path / "data")},
        "logging": {"level": "WARNING"},
        "plugins": {"drop_in_dir": str(REPO / "tests" / "triage_plugins"), "load_entrypoints": False,
                    "disabled": BUILTIN_MG_MODELS, "allow_demo_weights": True},
        "triage": {"first_stage_model": "triage_probe", "high_risk_threshold": 0.99},
        "worker": worker,
        **extra,
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_settings(path, environ={})


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from _harness(tmp_path, monkeypatch, harness_settings(tmp_path))


def _harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Iterator[Harness]:
    import workers.pipeline
    import workers.tasks as tasks
    from workers.app import configure_app

    configure_app(settings)
    # Hosts and stores are cached per process: another test's plugins or journal must not leak in.
    workers.pipeline._hosts.clear()
    tasks._stores.clear()
    harness = Harness(settings=settings, store_dir=tmp_path / "store")

    def send_task(name: str, kwargs: dict[str, Any] | None = None, **_options: Any) -> None:
        harness.queued.append((name, kwargs or {}))

    monkeypatch.setattr(tasks.app, "send_task", send_task)
    yield harness
    workers.pipeline._hosts.clear()
    tasks._stores.clear()


def new_study_uid() -> str:
    return str(generate_uid())
