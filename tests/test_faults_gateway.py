"""kill -9 of the gateway at random points during a multi-study send, then a restart, with the workers and the
PACS running: every acknowledged instance is analysed and its results reach Orthanc exactly once.

``tests/test_gateway_crash.py`` proves the gateway half (nothing acknowledged is lost from the spool and the
journal, and every study is dispatched after the restart); this test follows the same crashes through the
queue and the workers to the PACS, where a study dispatched twice (a crash between queueing it and
journalling that) or reopened as a new version must still leave each output once.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.faults_harness import Pipeline, phi_study
from tests.test_gateway_crash import _send_until_killed

pytestmark = [pytest.mark.redis, pytest.mark.peers]


@pytest.mark.slow
def test_gateway_killed_mid_send_then_restarted_delivers_every_acknowledged_instance_once(
    tmp_path: Path,
) -> None:
    rng = random.Random(20261126)
    studies = [phi_study(70 + n, rows=128, cols=96, seed=n) for n in range(4)]
    queue = [ds for study in studies for ds in study]
    with Pipeline(tmp_path) as pipeline:
        pipeline.phi |= {str(v) for ds in queue for v in (ds.PatientName, ds.PatientID, ds.PatientBirthDate)}
        pipeline.start_worker()
        acknowledged: set[str] = set()
        for round_ in range(3):
            gateway = pipeline.start_gateway()
            kill = threading.Event()
            delay = rng.uniform(0.05, 0.5)

            def killer(pid: int = gateway.pid, delay: float = delay, kill: threading.Event = kill) -> None:
                time.sleep(delay)
                kill.set()
                os.killpg(pid, signal.SIGKILL)

            threading.Thread(target=killer, daemon=True).start()
            acknowledged |= set(_send_until_killed(pipeline.port, queue, kill))
            gateway.wait(timeout=30)
            assert gateway.returncode == -signal.SIGKILL, (
                f"round {round_}: the gateway was not killed mid-send"
            )

        # The restarted gateway recovers its journal; the modality then sends everything again, as it would.
        pipeline.start_gateway()
        pipeline.send(queue)
        uids = [str(s[0].StudyInstanceUID) for s in studies]
        pipeline.wait_settled(uids, timeout=120)
        stored = pipeline.acknowledged()
        assert acknowledged <= {sop for sops in stored.values() for sop in sops}
        pipeline.check_invariant(uids)
        assert pipeline.dead_letters() == []
