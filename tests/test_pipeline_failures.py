"""Failure reasons never carry values from the data set: the exception's type and our own words only."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.errors import PermanentError
from plugins.types import failure_reason
from tests.pipeline_cases import Harness, bright_mammogram, harness, new_study_uid  # noqa: F401

BIRTH_DATE = "1958-11-23"


def test_a_foreign_message_is_reduced_to_its_type() -> None:
    error = ValueError(f"Unable to convert '{BIRTH_DATE}' to 'DA' object")
    reason = failure_reason("building outputs failed", error)
    assert reason == "building outputs failed: ValueError"
    assert "1958" not in reason


def test_our_own_errors_keep_their_message_and_allocation_failures_say_out_of_memory() -> None:
    assert failure_reason("decoding", PermanentError("no pixel data")) == "decoding: PermanentError: no pixel data"
    reason = failure_reason("decoding", MemoryError("Unable to allocate 6.71 GiB for an array with shape (60000, 60000)"))
    assert "out of memory" in reason and "60000" not in reason


def test_a_birth_date_pydicom_cannot_convert_never_reaches_the_journal(harness: Harness) -> None:
    """pydicom raises "Unable to convert '1958-11-23' to 'DA' object" while the SR is built from such a
    source; the study is dead-lettered with a reason that names the error's type only."""
    study_uid = new_study_uid()
    source = bright_mammogram(study_uid)
    source.PatientBirthDate = BIRTH_DATE  # not a DA (YYYYMMDD): the gateway stores it, highdicom chokes
    job = harness.job([source])
    row = harness.run(job)
    assert row["state"] == "dead-lettered"

    store = harness.store
    [letter] = [d for d in store.dead_letters() if d["job_id"] == job.job_id]
    # Where the report is built (a model's outputs or the study report), the reason names the type only.
    assert "failed: ValueError" in letter["error"]
    stored = [letter["error"]]
    stored += [a["failures"] for a in store.analyses(job.job_id)]
    stored += [f"{e['event']} {e['detail']}" for e in store.timeline(job.job_id)]
    stored += [json.dumps(dict(row))]
    assert all("1958" not in text for text in stored), stored

    # The worker carries on: the next study is analysed and finished.
    other = harness.job([bright_mammogram(new_study_uid(), seed=3)])
    assert harness.run(other)["state"] == "done"


def test_an_unreadable_header_is_reported_by_type(harness: Harness, tmp_path: Path) -> None:
    study_uid = new_study_uid()
    good, broken = bright_mammogram(study_uid), bright_mammogram(study_uid, seed=1, view="MLO")
    job = harness.job([good, broken])
    target = Path(job.storage_root) / job.instances[1].path
    target.write_bytes(target.read_bytes()[:200])  # cut inside the header
    row = harness.run(job)
    assert row["state"] == "done"  # the readable image is analysed
    failures = [f for a in harness.store.analyses(job.job_id) for f in json.loads(a["failures"])]
    assert [f["sop_instance_uid"] for f in failures] == [str(broken.SOPInstanceUID)] * 2
    assert all("is not a readable DICOM file" in f["error"] for f in failures)
