"""The disk filling past the watermark while the gateway runs: 0xA700 refusals, nothing half-written or lost,
and acceptance again as soon as space returns, without a restart.

The honest simple route on a shared machine with no small file system to fill: the watermark is set
512 MiB below the free space measured at the start, and a 1 GiB file preallocated (``posix_fallocate``)
next to the spool takes the free space 512 MiB below it; deleting the file gives the space back.  Margins of
512 MiB either way keep other processes' disk use from flipping the outcome.  The write-failure path (ENOSPC
after the check passed) is not reached this way; ``docs/reliability.md`` says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.faults_harness import Pipeline, incoming_leftovers, phi_study

pytestmark = [pytest.mark.redis, pytest.mark.peers]
MIB = 1024 * 1024


def _stored_digests(pipeline: Pipeline) -> dict[str, str]:
    with pipeline.journal() as db:
        rows = db.execute("SELECT sop_uid, path FROM instances").fetchall()
    return {
        r["sop_uid"]: hashlib.sha256((pipeline.data_dir / r["path"]).read_bytes()).hexdigest() for r in rows
    }


@pytest.mark.slow
def test_disk_filling_past_the_watermark_refuses_then_recovers(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    if free < 3 * 1024 * MIB:
        pytest.skip(f"needs 3 GiB free to emulate a full disk, {free // MIB} MiB free")
    watermark = {"min_free_bytes": free - 512 * MIB, "min_free_percent": 0}
    with Pipeline(tmp_path, config={"gateway": {"disk_watermark": watermark}}) as pipeline:
        pipeline.start_gateway()
        pipeline.start_worker()
        before = phi_study(50, seed=1)
        assert pipeline.c_store(before) == [0x0000] * 4
        pipeline.wait_settled([str(before[0].StudyInstanceUID)], timeout=60)
        kept = _stored_digests(pipeline)

        filler = tmp_path / "data" / "filler.bin"
        with filler.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, 1024 * MIB)
        full = phi_study(51, seed=2)
        try:
            assert pipeline.c_store(full) == [0xA700] * 4
            # Refused means refused: no half-file, no journal row, and what was stored before is untouched.
            assert incoming_leftovers(pipeline.data_dir) == []
            assert _stored_digests(pipeline) == kept
        finally:
            filler.unlink()

        # Space is back: the modality's retry goes through, and the study flows on to the PACS.
        assert pipeline.c_store(full) == [0x0000] * 4
        uids = [str(before[0].StudyInstanceUID), str(full[0].StudyInstanceUID)]
        pipeline.wait_settled(uids, timeout=60)
        pipeline.check_invariant()
        for sop_uid, digest in kept.items():
            with pipeline.journal() as db:
                (path,) = db.execute("SELECT path FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
            assert dcmread(pipeline.data_dir / path).SOPInstanceUID == sop_uid
            assert hashlib.sha256((pipeline.data_dir / path).read_bytes()).hexdigest() == digest
        with pipeline.journal() as db:
            refused = dict(db.execute("SELECT reason, count FROM refusals").fetchall())
        assert refused == {"out_of_resources": 4}
