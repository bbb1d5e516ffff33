"""A Redis crash and restart while studies are queued: with its append-only file, nothing queued is lost.

Redis here runs with ``appendonly yes`` and ``appendfsync always``: a kill -9 then loses no write Redis
acknowledged.  With persistence off a restart empties the queues, and the studies that were queued (already
marked dispatched in the gateway's journal) would wait for a replay; production must run Redis with the
append-only file on (``docs/reliability.md``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from tests.faults_harness import Pipeline, phi_study
from tests.utils import wait_for

pytestmark = [pytest.mark.redis, pytest.mark.peers]


def _queued(client: redis.Redis) -> int:
    # The priority transport keeps one list per priority step: analysis, analysis:1 ... analysis:9.
    return sum(int(client.llen(key)) for key in client.scan_iter("analysis*") if client.type(key) == b"list")


@pytest.mark.slow
def test_redis_killed_and_restarted_with_studies_queued_loses_nothing(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    with Pipeline(tmp_path, probe_options={"sleep_seconds": 1.0, "marker_dir": str(markers)}) as pipeline:
        pipeline.start_gateway()
        pipeline.start_worker()
        studies = [phi_study(20 + n, seed=n) for n in range(4)]
        pipeline.send([ds for study in studies for ds in study])
        client = redis.Redis(port=pipeline.redis.port)
        # The first study is being analysed and the others wait in Redis.
        wait_for(lambda: any(markers.glob("*.running")) and _queued(client) >= 2, timeout=60, interval=0.1)
        pipeline.redis.kill()

        # A study that arrives while Redis is down is acknowledged; its dispatch waits for Redis.
        late = phi_study(29, seed=9)
        pipeline.send(late)
        time.sleep(3)
        pipeline.redis.start()

        uids = [str(s[0].StudyInstanceUID) for s in (*studies, late)]
        pipeline.wait_settled(uids, timeout=150)
        pipeline.check_invariant(uids)
        assert pipeline.dead_letters() == []
        # Every message was acknowledged over the new connection: nothing waits to run a second time.
        assert client.hlen("unacked") == 0 and _queued(client) == 0
