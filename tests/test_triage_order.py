"""Risk-first triage on a real Redis broker with real Celery workers.

Twenty routine studies are queued, then a high-risk one.  The first-stage model runs on every
study at the incoming priority; the high-risk study's heavier model and its delivery then get
STAT priority and overtake the twenty routine studies still waiting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gateway.messages import InstanceRef, Priority, StudyJob
from gateway.settings import load_settings
from tests.peers import running_storescp
from tests.utils import make_instance, wait_for, write

REPO = Path(__file__).resolve().parent.parent
BUILTIN_MODELS = ["asg_mammonet", "clgb_net", "lem", "hybrid_birads", "us_fusion"]


def start_worker(config: Path, queues: str, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", "--config", str(config), "--queues", queues,
             "--concurrency", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def brightness_instance(bright: bool, seed: int):
    ds = make_instance(modality="MG", rows=48, cols=32, seed=seed)
    rng = np.random.default_rng(seed)
    low, high = (3600, 4095) if bright else (0, 400)
    ds.PixelData = rng.integers(low, high, (48, 32), dtype=np.uint16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.BitsStored, ds.HighBit = 12, 11
    return ds


@pytest.mark.redis
@pytest.mark.slow
def test_high_risk_study_overtakes_waiting_routine_studies(tmp_path: Path, redis_url: str) -> None:
    from workers.app import configure_app
    from workers.dispatch import CeleryDispatcher
    from workers.results import ResultsStore

    with running_storescp(tmp_path / "pacs") as pacs:
        config = tmp_path / "triage.yaml"
        config.write_text(yaml.safe_dump({
            "gateway": {"data_dir": str(tmp_path / "data")},
            "broker": {"url": redis_url},
            "dispatch": {"kind": "celery"},
            "logging": {"level": "INFO", "json_output": True},
            "plugins": {"drop_in_dir": str(REPO / "tests" / "triage_plugins"), "load_entrypoints": False,
                        "disabled": BUILTIN_MODELS, "allow_demo_weights": True},
            "triage": {"first_stage_model": "triage_probe", "high_risk_threshold": 0.7},
            "delivery": {"destinations": [{"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}]},
        }))
        settings = load_settings(config, environ={})
        dispatcher = CeleryDispatcher(configure_app(settings))
        store_dir = tmp_path / "store"
        jobs = []
        for index in range(21):
            ds = brightness_instance(bright=index == 20, seed=index)
            path = write(ds, store_dir)
            jobs.append(StudyJob(
                job_id=f"study-{index:02d}", study_instance_uid=str(ds.StudyInstanceUID), study_version=1,
                calling_ae="MODALITY", priority=Priority.ROUTINE, storage_root=str(store_dir),
                instances=(InstanceRef(sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                                       series_instance_uid=str(ds.SeriesInstanceUID), modality="MG",
                                       path=path.name, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID)),),
            ))
        for job in jobs:  # twenty routine studies, then the high-risk one
            dispatcher.dispatch(job)

        results = ResultsStore(tmp_path / "data" / "results.sqlite")
        log = tmp_path / "worker.log"
        analysis = start_worker(config, "analysis", log)
        try:
            wait_for(lambda: sum(r["state"] == "analysed" for r in results.worklist()) == 21, timeout=240,
                     interval=0.5)
        finally:
            stop(analysis)
        delivery = start_worker(config, "delivery", log)
        try:
            wait_for(lambda: sum(r["state"] == "delivered" for r in results.worklist()) == 21, timeout=240,
                     interval=0.5)
        finally:
            stop(delivery)

        def first(job_id: str, event: str) -> float:
            return min(r["at"] for r in results.timeline(job_id) if r["event"] == event)

        high, routine = jobs[20].job_id, [j.job_id for j in jobs[:20]]
        # Stage one ran in arrival order at the incoming priority: the high-risk study came last.
        assert first(high, "analysis_start:first") > max(first(j, "analysis_start:first") for j in routine)
        # Its heavier model then ran before every routine study's heavier model ...
        assert first(high, "analysis_start:rest") < min(first(j, "analysis_start:rest") for j in routine)
        # ... and its results reached the PACS before any routine study's.
        assert first(high, "delivered") < min(first(j, "delivered") for j in routine)
        worklist = results.worklist()
        assert worklist[0]["job_id"] == high and worklist[0]["risk"] > 0.7
        assert all(r["risk"] < 0.7 for r in worklist[1:])
        # Per study (one mammogram): the study SR and the Mammography CAD SR over both models + the heatmap SC
        # of the one heatmap model.
        assert len(pacs.received_files()) == 21 * (2 + 1)
    time.sleep(0)
