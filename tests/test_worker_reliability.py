"""Worker reliability on a real Redis: redelivery after a killed worker process is capped, and a
delivery that keeps failing is dead-lettered, listed by the CLI and replayed by one command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.messages import InstanceRef, Priority, StudyJob
from gateway.settings import load_settings
from tests.peers import running_storescp
from tests.test_triage_order import BUILTIN_MODELS, brightness_instance, start_worker, stop
from tests.utils import get_port, wait_for, write

REPO = Path(__file__).resolve().parent.parent


def _job(tmp_path: Path, bright: bool, name: str) -> StudyJob:
    ds = brightness_instance(bright=bright, seed=7)
    path = write(ds, tmp_path / "store")
    return StudyJob(
        job_id=name, study_instance_uid=str(ds.StudyInstanceUID), study_version=1, calling_ae="MODALITY",
        priority=Priority.ROUTINE, storage_root=str(tmp_path / "store"),
        instances=(InstanceRef(sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                               series_instance_uid=str(ds.SeriesInstanceUID), modality="MG", path=path.name,
                               transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID)),),
    )


def _config(tmp_path: Path, broker_url: str, **extra: object) -> Path:
    data = {
        "gateway": {"data_dir": str(tmp_path / "data")},
        "broker": {"url": broker_url},
        "logging": {"level": "INFO", "json_output": True},
        "plugins": {"load_entrypoints": False, "disabled": BUILTIN_MODELS, "allow_demo_weights": True},
        "worker": {"max_redeliveries": 2},
        **extra,
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.redis
@pytest.mark.slow
def test_a_poison_study_is_dead_lettered_after_capped_redeliveries(tmp_path: Path, redis_url: str) -> None:
    from workers.app import configure_app
    from workers.dispatch import CeleryDispatcher
    from workers.results import ResultsStore

    config = _config(tmp_path, redis_url, plugins={"drop_in_dir": str(REPO / "tests" / "poison_plugins"),
                                        "load_entrypoints": False, "disabled": BUILTIN_MODELS,
                                        "allow_demo_weights": True},
                     triage={"first_stage_model": "poison"})
    settings = load_settings(config, environ={})
    dispatcher = CeleryDispatcher(configure_app(settings))
    dispatcher.dispatch(_job(tmp_path, bright=True, name="poison-study"))
    dispatcher.dispatch(_job(tmp_path, bright=False, name="healthy-study"))
    results = ResultsStore(tmp_path / "data" / "results.sqlite")
    worker = start_worker(config, "analysis,delivery", tmp_path / "worker.log")
    try:
        wait_for(lambda: results.dead_letters(), timeout=180, interval=0.5)
        wait_for(lambda: any(r["job_id"] == "healthy-study" and r["state"] == "done" for r in results.worklist()),
                 timeout=120, interval=0.5)
        assert worker.poll() is None, "the worker itself must survive its children being killed"
    finally:
        stop(worker)
    (letter,) = results.dead_letters()
    assert letter["job_id"] == "poison-study" and "started 3 times" in letter["error"]
    starts = [e for e in results.timeline("poison-study") if e["event"] == "analysis_start:first"]
    assert len(starts) == 2  # two real attempts; the third start is refused and dead-lettered
    listing = _cli(config, "deadletters")
    assert "poison-study" in listing.stdout and listing.returncode == 0


@pytest.mark.redis
@pytest.mark.peers
@pytest.mark.slow
def test_failing_delivery_is_dead_lettered_then_replayed(tmp_path: Path, redis_url: str) -> None:
    from workers.app import configure_app
    from workers.dispatch import CeleryDispatcher
    from workers.results import ResultsStore

    dead_port = get_port()
    config = _config(tmp_path, redis_url, plugins={"drop_in_dir": str(REPO / "tests" / "triage_plugins"),
                                        "load_entrypoints": False, "disabled": BUILTIN_MODELS,
                                        "allow_demo_weights": True, "models": {"triage_probe_heavy": {"enabled": False}}},
                     triage={"first_stage_model": "triage_probe"},
                     delivery={"destinations": [{"ae_title": "STORESCP", "host": "127.0.0.1", "port": dead_port}],
                               "max_retries": 2, "backoff_base_seconds": 0.2, "backoff_max_seconds": 0.5})
    settings = load_settings(config, environ={})
    CeleryDispatcher(configure_app(settings)).dispatch(_job(tmp_path, bright=False, name="pacs-down"))
    results = ResultsStore(tmp_path / "data" / "results.sqlite")
    worker = start_worker(config, "analysis,delivery", tmp_path / "worker.log")
    try:
        wait_for(lambda: results.dead_letters(), timeout=120, interval=0.5)
        (letter,) = results.dead_letters()
        assert letter["task"] == "deliver" and "gave up after 3 tries" in letter["error"]
        assert {d["status"] for d in results.deliveries("pacs-down")} == {"retrying"}
        listing = _cli(config, "deadletters")
        assert f"{letter['id']:>5}" in listing.stdout
        # The PACS comes back on the same port; one command replays the dead letter.
        with running_storescp(tmp_path / "pacs", port=dead_port) as pacs:
            replay = _cli(config, "deadletters", "--replay", str(letter["id"]))
            assert replay.returncode == 0, replay.stderr
            # The study SR, the Mammography CAD SR and the heatmap of the one view.
            wait_for(lambda: len(pacs.received_files()) == 3, timeout=60, interval=0.5)
            wait_for(lambda: {d["status"] for d in results.deliveries("pacs-down")} == {"stored"}, timeout=30)
    finally:
        stop(worker)
    assert results.dead_letters() == []
