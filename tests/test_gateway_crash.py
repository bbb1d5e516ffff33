"""kill -9 of the gateway in the middle of multi-instance transfers, then restart: nothing acknowledged is lost."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pynetdicom import AE, build_context

from tests.utils import get_port, make_instance, wait_for


def _start_gateway(config: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "gateway", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc


def _wait_listening(port: int, proc: subprocess.Popen) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {proc.stderr.read() if proc.stderr else ''}")
        ae = AE(ae_title="PROBE")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TRIAGE")
        if assoc.is_established:
            assoc.release()
            return True
        return False

    wait_for(ready, timeout=60, interval=0.3)


def _send_until_killed(port: int, datasets: list, kill: threading.Event) -> list[str]:
    """C-STORE *datasets* in order and return the SOP UIDs the gateway acknowledged with 0x0000."""
    acked: list[str] = []
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.requested_contexts = [build_context(datasets[0].SOPClassUID, [datasets[0].file_meta.TransferSyntaxUID])]
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TRIAGE")
    if not assoc.is_established:
        return acked
    for ds in datasets:
        if kill.is_set() and not assoc.is_established:
            break
        try:
            status = assoc.send_c_store(ds)
        except (RuntimeError, OSError):
            break
        if getattr(status, "Status", None) == 0x0000:
            acked.append(str(ds.SOPInstanceUID))
        elif not assoc.is_established:
            break
    if assoc.is_established:
        assoc.release()
    return acked


@pytest.mark.slow
def test_kill_9_at_random_points_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    port = get_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "gateway": {"port": port, "host": "127.0.0.1", "data_dir": str(tmp_path / "data")},
        "assembly": {"quiet_seconds": 1.0, "tick_seconds": 0.1},
        "dispatch": {"kind": "logging"},
    }))
    rng = random.Random(20261126)
    studies = [[make_instance(modality="CT", study_uid=f"1.2.826.0.1.3680043.10.1.{s}", rows=256, cols=256, seed=i)
                for i in range(12)] for s in range(4)]
    queue = [ds for study in studies for ds in study]
    acked_all: set[str] = set()
    for round_ in range(3):
        proc = _start_gateway(config)
        _wait_listening(port, proc)
        kill = threading.Event()
        delay = rng.uniform(0.05, 0.6)

        def killer() -> None:
            time.sleep(delay)
            kill.set()
            os.kill(proc.pid, signal.SIGKILL)

        threading.Thread(target=killer, daemon=True).start()
        acked_all.update(_send_until_killed(port, queue, kill))
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"round {round_}: gateway was not killed mid-transfer"

    # Restart: every acknowledged instance is there, readable, and its study completes and is queued.
    proc = _start_gateway(config)
    try:
        _wait_listening(port, proc)
        journal = sqlite3.connect(tmp_path / "data" / "journal.sqlite")

        def all_dispatched() -> bool:
            states = {row[0] for row in journal.execute("SELECT state FROM studies")}
            return states == {"dispatched"}

        wait_for(all_dispatched, timeout=60, interval=0.3)
        stored = dict(journal.execute("SELECT sop_uid, path FROM instances"))
        assert acked_all, "the sender never got an acknowledgement"
        assert acked_all <= set(stored), f"lost: {acked_all - set(stored)}"
        for sop_uid in acked_all:
            assert dcmread(tmp_path / "data" / stored[sop_uid]).SOPInstanceUID == sop_uid
        assert list((tmp_path / "data" / "incoming").iterdir()) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
