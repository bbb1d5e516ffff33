"""The PACS (Orthanc) down for a while, then back: delivery resumes by itself and nothing is stored twice.

"Several minutes" of outage is scaled down to 25 s with short backoff settings (0.5 s doubling to a 2 s cap,
full jitter, 80 retries).  With the defaults (2 s doubling to 600 s, 8 retries) the same code rides out about
4 minutes on average before dead-lettering (docs/reliability.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults_harness import Pipeline, orthanc_study_instances, phi_study, restart_orthanc
from tests.utils import wait_for

pytestmark = [pytest.mark.redis, pytest.mark.peers]
OUTAGE_SECONDS = 25


@pytest.mark.slow
def test_pacs_down_then_back_delivery_resumes_without_duplicates(tmp_path: Path) -> None:
    config = {"delivery": {"max_retries": 80}}
    with Pipeline(tmp_path, config=config) as pipeline:
        orthanc = pipeline.orthanc
        assert orthanc is not None
        pipeline.start_gateway()
        pipeline.start_worker()
        before = phi_study(30, seed=1)
        pipeline.send(before)
        pipeline.wait_settled([str(before[0].StudyInstanceUID)], timeout=60)
        stored_before = orthanc_study_instances(orthanc, str(before[0].StudyInstanceUID))

        orthanc.stop()
        during = [phi_study(31 + n, seed=2 + n) for n in range(3)]
        pipeline.send([ds for study in during for ds in study])
        uids = [str(s[0].StudyInstanceUID) for s in during]

        def retrying() -> bool:
            with pipeline.results() as db:
                jobs = {
                    r[0]
                    for r in db.execute("SELECT DISTINCT job_id FROM deliveries WHERE status = 'retrying'")
                }
            return len(jobs) == len(during)

        # Analysed, and their deliveries retrying with backoff: none given up, nothing dead-lettered.
        wait_for(retrying, timeout=60, interval=0.5)
        time.sleep(OUTAGE_SECONDS)
        assert pipeline.dead_letters() == []
        assert not pipeline.settled(uids[:1])

        restart_orthanc(orthanc)
        pipeline.wait_settled(uids, timeout=90)
        pipeline.check_invariant()
        assert orthanc_study_instances(orthanc, str(before[0].StudyInstanceUID)) == stored_before
        with pipeline.results() as db:
            tries = [
                r[0]
                for r in db.execute(
                    "SELECT attempts FROM deliveries WHERE job_id IN "
                    "(SELECT job_id FROM worklist WHERE study_uid IN (?, ?, ?))",
                    uids,
                )
            ]
        assert tries and min(tries) >= 2  # each output failed at least once, then went through
        assert pipeline.dead_letters() == []
