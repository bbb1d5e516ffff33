"""The soak, scaled down for CI: mixed studies over parallel associations through the real models; nothing
lost, nothing duplicated, and the worker's memory flat.

The full run (50 studies at full resolution over 4 associations) is ``benchmarks/soak/soak.py``; its figures
are in ``benchmarks/soak/README.md``.  Memory, not time, is asserted here: timings on a shared CI machine are
noise, a worker that keeps what it analysed is not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults_harness import MemorySampler, Pipeline, mixed_studies, send_studies

pytestmark = [pytest.mark.redis, pytest.mark.peers]
MODELS = ("asg_mammonet", "us_fusion")
#: RSS of the worker's pool process after the run, at most this times its RSS after warm-up.
MAX_GROWTH = 1.5


@pytest.mark.slow
def test_soak_scaled_down_delivers_everything_once_with_flat_worker_memory(tmp_path: Path) -> None:
    config = {"worker": {"soft_time_limit_seconds": 300, "time_limit_seconds": 360}}
    with Pipeline(tmp_path, models=MODELS, config=config) as pipeline:
        sampler = MemorySampler(pipeline, interval=1.0)
        pipeline.start_gateway()
        pipeline.start_worker()
        # Warm-up: one study of each kind loads both models; the memory baseline is taken after it.
        warm_up = mixed_studies(1, 1, (256, 208), (96, 128), 2, seed=9000)
        pipeline.send([ds for study in warm_up for ds in study])
        pipeline.wait_settled([str(s[0].StudyInstanceUID) for s in warm_up], timeout=240)
        warm = sampler.sample()

        studies = mixed_studies(4, 2, (256, 208), (96, 128), 3)
        send_studies(pipeline, studies, associations=2)
        uids = [str(s[0].StudyInstanceUID) for s in studies]
        pipeline.wait_settled(uids, timeout=240)
        end = sampler.sample()

        in_pacs = pipeline.check_invariant(uids)
        assert pipeline.dead_letters() == []
        # Per MG study one SR and four heatmaps; per US study one SR and a heatmap per evaluated image.
        assert all(len(found) >= 2 for found in in_pacs.values())
        pool = "worker-pool"
        assert pool in warm and pool in end, f"no pool process measured: {warm} / {end}"
        assert end[pool] <= MAX_GROWTH * warm[pool], (
            f"the worker grew from {warm[pool] // 1024} MiB after warm-up to {end[pool] // 1024} MiB"
        )
