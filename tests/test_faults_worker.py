"""kill -9 of a worker mid-inference: the study comes back (Redis, acks_late + reject_on_worker_lost) and its
results reach the PACS exactly once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.faults_harness import Pipeline, children_of, orthanc_study_instances, phi_study, wait_until
from tests.utils import wait_for

pytestmark = [pytest.mark.redis, pytest.mark.peers]


def _analysis_starts(pipeline: Pipeline, study_uid: str) -> int:
    with pipeline.results() as db:
        (job,) = db.execute("SELECT job_id FROM worklist WHERE study_uid = ?", (study_uid,)).fetchone()
        return int(
            db.execute(
                "SELECT COUNT(*) FROM timeline WHERE job_id = ? AND event = 'analysis_start:first'", (job,)
            ).fetchone()[0]
        )


def _first_marker(markers: Path) -> Path:
    found = wait_for(lambda: sorted(markers.glob("*.running")), timeout=90, interval=0.1)
    return found[0]  # type: ignore[index]


@pytest.mark.slow
def test_worker_node_killed_mid_inference_is_recovered_by_another_worker(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    with Pipeline(tmp_path, probe_options={"sleep_seconds": 4.0, "marker_dir": str(markers)}) as pipeline:
        pipeline.start_gateway()
        pipeline.start_worker("worker-a")
        study = phi_study(11)
        study_uid = str(study[0].StudyInstanceUID)
        pipeline.send(study)
        marker = _first_marker(markers)
        fetched_by = float(
            marker.read_text()
        )  # Redis stamped the message when worker-a fetched it, before this
        pipeline.kill_worker("worker-a")  # main process and pool child: the whole node, mid-inference
        assert orthanc_study_instances(pipeline.orthanc, study_uid) == []  # type: ignore[arg-type]

        # Redis hands unacknowledged work back once the visibility timeout has passed since it was fetched;
        # a worker restores such messages when it starts (and, while it runs, on kombu's periodic sweep).
        wait_until(fetched_by + pipeline.visibility_timeout + 1)
        pipeline.start_worker("worker-b")
        pipeline.wait_settled([study_uid], timeout=90)
        pipeline.check_invariant()
        assert _analysis_starts(pipeline, study_uid) == 2  # worker-a's start, and worker-b's
        assert pipeline.dead_letters() == []


def test_pool_process_killed_mid_inference_is_requeued_at_once(tmp_path: Path) -> None:
    """What the OOM killer does: the pool child dies, the node's main process requeues the study at once."""
    markers = tmp_path / "markers"
    with Pipeline(tmp_path, probe_options={"sleep_seconds": 3.0, "marker_dir": str(markers)}) as pipeline:
        pipeline.start_gateway()
        worker = pipeline.start_worker()
        study = phi_study(12)
        study_uid = str(study[0].StudyInstanceUID)
        pipeline.send(study)
        child = int(_first_marker(markers).stem)
        assert child in children_of(worker.pid), "inference should run in the worker's pool process"
        started = time.time()
        os.kill(child, signal.SIGKILL)
        pipeline.wait_settled([study_uid], timeout=60)
        # Requeued by reject_on_worker_lost, not after the visibility timeout.
        assert time.time() - started < pipeline.visibility_timeout
        assert worker.poll() is None
        pipeline.check_invariant()
        assert _analysis_starts(pipeline, study_uid) == 2
        assert pipeline.dead_letters() == []


@pytest.mark.slow
def test_a_panic_fails_only_its_image_or_visibly_its_study(tmp_path: Path) -> None:
    """pyo3's PanicException (a Rust extension's panic) is a BaseException, not an Exception.

    Study A holds an RLE image whose Rows understate its data: pylibjpeg-rle panics while decoding it, and
    only that image may fail.  Study B is bright, and the probe model itself raises such a panic on it: no
    ``except Exception`` catches it, and the study must still end visibly dead-lettered, never stay
    "analysing" with its message acknowledged (what happened before workers/tasks.py caught it).
    """
    import numpy as np
    from pydicom.uid import RLELossless

    decoder_panic = phi_study(13, rows=24, cols=16)
    broken = decoder_panic[0]
    # These pixels (make_instance's seed 3) make an RLE stream the decoder over-reads once Rows says 1.
    broken.PixelData = np.random.default_rng(3).integers(0, 4096, (24, 16), dtype=np.uint16).tobytes()
    broken.compress(RLELossless)
    broken.Rows = 1
    model_panic = phi_study(14, rows=24, cols=16)
    # Bright in its window: mean intensity about 0.94 on the image, 0.6 with the letterbox's padding; study
    # A's images, min-max scaled, about 0.3.
    for index, ds in enumerate(model_panic):
        ds.PixelData = np.random.default_rng(index).integers(3600, 4096, (24, 16), dtype=np.uint16).tobytes()
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    with Pipeline(tmp_path, probe_options={"panic_above_mean": 0.5}) as pipeline:
        pipeline.start_gateway()
        pipeline.start_worker()
        # The gateway reads headers only: it accepts both studies.
        assert pipeline.c_store(decoder_panic + model_panic) == [0x0000] * 8
        uids = [str(decoder_panic[0].StudyInstanceUID), str(model_panic[0].StudyInstanceUID)]
        pipeline.wait_settled(uids, timeout=60)
        pipeline.check_invariant(uids)
        with pipeline.results() as db:
            states = dict(db.execute("SELECT study_uid, state FROM worklist").fetchall())
            (job,) = db.execute("SELECT job_id FROM worklist WHERE study_uid = ?", (uids[0],)).fetchone()
            (failures,) = db.execute("SELECT failures FROM analyses WHERE job_id = ?", (job,)).fetchone()
        assert states == {uids[0]: "delivered", uids[1]: "dead-lettered"}
        assert [f["sop_instance_uid"] for f in json.loads(failures)] == [str(broken.SOPInstanceUID)]
        (letter,) = pipeline.dead_letters()
        assert letter["task"] == "analyse" and "SimulatedPanic" in letter["error"]
        assert pipeline.workers["worker"].poll() is None
