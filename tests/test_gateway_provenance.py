"""The gateway's side of our own outputs and content digests, over real C-STORE associations.

Our SR and SC are made by a real analysis (the in-process study pipeline with the triage probe
models); they are sent back to a running gateway the way a PACS forwarding a whole study would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, _config

from gateway.journal import InstanceRecord, Journal, StoreOutcome
from gateway.messages import StudyJob
from gateway.provenance import CREATOR, ORG_ROOT, is_own_output
from gateway.service import GatewayService
from tests.conftest import gateway_settings
from tests.dispatchers import RecordingDispatcher
from tests.pipeline_cases import _harness, bright_mammogram, harness_settings, new_study_uid
from tests.utils import make_instance, write
from workers import pipeline, uids

FOREIGN_ROOT = "1.2.3.4.5."


@pytest.fixture(scope="module")
def our_outputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, list[Dataset]]:
    """A source mammogram and the SR and SC a real analysis of it made."""
    tmp = tmp_path_factory.mktemp("analysis")
    source = bright_mammogram(new_study_uid())
    with pytest.MonkeyPatch.context() as patch:
        run = _harness(tmp, patch, harness_settings(tmp))
        harness = next(run)
        try:
            job = harness.job([source])
            assert harness.run(job)["state"] == "done"
            paths = [p for a in harness.store.analyses(job.job_id) for p in json.loads(a["outputs"])]
        finally:
            run.close()
    outputs = [pydicom.dcmread(p) for p in paths]
    assert {ds.SOPClassUID.name for ds in outputs} >= {"Secondary Capture Image Storage"}
    return source, outputs


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator:
    started: list[GatewayService] = []

    def factory(name: str = "gw") -> tuple[GatewayService, RecordingDispatcher]:
        dispatcher = RecordingDispatcher()
        service = GatewayService(gateway_settings(tmp_path / name), dispatcher)
        service.start()
        started.append(service)
        return service, dispatcher

    yield factory
    for service in started:
        service.stop()


def _store(service: GatewayService, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", service.port, ae_title=service.settings.gateway.ae_title)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def _settle(service: GatewayService) -> int:
    """Let every study version the journal holds be completed and dispatched, as if an hour had passed."""
    return service.assembler.tick(now=time.time() + 3600)


def _instance_rows(service: GatewayService, study_uid: str) -> dict[str, sqlite3.Row]:
    return {str(row["sop_uid"]): row for row in service.journal.study_instances(study_uid)}


def _stored_digest(service: GatewayService, relative_path: str) -> str:
    return hashlib.sha256((service.spool.root / relative_path).read_bytes()).hexdigest()[:32]


def test_the_uid_root_is_the_gateways_and_the_workers_derive_under_it() -> None:
    assert uids.ORG_ROOT == ORG_ROOT
    assert uids.derive_uid("anything").startswith(ORG_ROOT)


def test_our_outputs_sent_back_are_stored_and_start_no_new_version(make_gateway, our_outputs) -> None:
    source, outputs = our_outputs
    assert all(is_own_output(ds) for ds in outputs)
    study_uid = str(source.StudyInstanceUID)
    service, dispatcher = make_gateway()
    assert _store(service, [source]) == [0x0000]
    _settle(service)
    (first,) = dispatcher.wait_for(1)

    # The PACS forwards the whole study back: the source again, and our SR and SC.
    assert _store(service, [source, *outputs]) == [0x0000] * (1 + len(outputs))
    assert _settle(service) == 0
    assert len(dispatcher.jobs) == 1
    assert [(s.version, s.state) for s in service.journal.studies()] == [(1, "dispatched")]
    rows = _instance_rows(service, study_uid)
    assert {uid for uid, row in rows.items() if row["own_output"]} == {
        str(ds.SOPInstanceUID) for ds in outputs
    }
    assert not rows[str(source.SOPInstanceUID)]["own_output"]
    assert all(row["study_version"] == 1 for row in rows.values())
    assert all((service.spool.root / row["path"]).is_file() for row in rows.values())
    assert first.instances[0].own_output is False

    # A new source image does open a version; our outputs go along in its job, marked as ours.
    added = bright_mammogram(study_uid, seed=3, laterality="R")
    assert _store(service, [added]) == [0x0000]
    _settle(service)
    _, second = dispatcher.wait_for(2)
    assert second.study_version == 2
    marked = {ref.sop_instance_uid: ref.own_output for ref in second.instances}
    assert marked == {uid: bool(row["own_output"]) for uid, row in _instance_rows(service, study_uid).items()}
    assert sum(marked.values()) == len(outputs)


def test_our_outputs_of_a_study_the_gateway_never_saw_open_nothing(make_gateway, our_outputs) -> None:
    _, outputs = our_outputs
    service, dispatcher = make_gateway()
    assert _store(service, outputs) == [0x0000] * len(outputs)
    assert _settle(service) == 0
    assert dispatcher.jobs == [] and service.journal.studies() == []
    rows = _instance_rows(service, str(outputs[0].StudyInstanceUID))
    assert len(rows) == len(outputs)
    assert all(row["own_output"] and row["study_version"] == 0 for row in rows.values())


def test_another_manufacturer_on_our_object_is_still_ours_by_its_contributing_equipment(
    make_gateway, our_outputs
) -> None:
    _, outputs = our_outputs
    renamed = []
    for ds in outputs:
        copied = copy.deepcopy(ds)
        copied.Manufacturer = "Site CAD Vendor"
        assert any(item.Manufacturer == CREATOR for item in copied.ContributingEquipmentSequence)
        renamed.append(copied)
    assert all(is_own_output(ds) for ds in renamed)
    service, dispatcher = make_gateway()
    assert _store(service, renamed) == [0x0000] * len(renamed)
    assert _settle(service) == 0 and dispatcher.jobs == []
    assert all(
        row["own_output"] for row in _instance_rows(service, str(renamed[0].StudyInstanceUID)).values()
    )


def test_our_manufacturer_under_a_foreign_uid_root_is_not_ours(make_gateway) -> None:
    foreign = make_instance(sop_uid=FOREIGN_ROOT + "77")
    foreign.Manufacturer = CREATOR
    as_equipment = make_instance(sop_uid=FOREIGN_ROOT + "78", study_uid=str(foreign.StudyInstanceUID))
    as_equipment.ContributingEquipmentSequence = [Dataset()]
    as_equipment.ContributingEquipmentSequence[0].Manufacturer = CREATOR
    ours_by_root_only = make_instance(sop_uid=ORG_ROOT + "79", study_uid=str(foreign.StudyInstanceUID))
    assert not any(is_own_output(ds) for ds in (foreign, as_equipment, ours_by_root_only))

    service, dispatcher = make_gateway()
    assert _store(service, [foreign, as_equipment, ours_by_root_only]) == [0x0000] * 3
    _settle(service)
    (job,) = dispatcher.wait_for(1)
    assert len(job.instances) == 3 and not any(ref.own_output for ref in job.instances)


def test_the_jobs_content_digest_is_the_stored_files_and_the_workers(make_gateway) -> None:
    study_uid = new_study_uid()
    views = [bright_mammogram(study_uid, seed=i, laterality=lat) for i, lat in enumerate("LR")]
    service, dispatcher = make_gateway()
    assert _store(service, views) == [0x0000, 0x0000]
    _settle(service)
    (job,) = dispatcher.wait_for(1)
    for ref in job.instances:
        stored = service.spool.root / ref.path
        assert ref.content_digest == _stored_digest(service, ref.path) == pipeline.file_digest(stored)
    # The digest travels through the queue's JSON.
    assert StudyJob.from_json_dict(json.loads(json.dumps(job.to_json_dict()))) == job


def test_a_repeat_is_told_from_a_replacement_by_the_journals_digest(make_gateway) -> None:
    source = bright_mammogram(new_study_uid())
    service, _ = make_gateway()
    assert _store(service, [source]) == [0x0000]
    uid = str(source.SOPInstanceUID)
    before = service.journal.find_instance(uid)
    assert _store(service, [source]) == [0x0000]
    assert service.journal.studies()[0].duplicates == 1
    changed = copy.deepcopy(source)
    changed.PixelData = bright_mammogram(str(source.StudyInstanceUID), seed=5).PixelData
    assert _store(service, [changed]) == [0x0000]
    after = service.journal.find_instance(uid)
    assert service.journal.studies()[0].duplicates == 1
    assert before["content_digest"] != after["content_digest"] == _stored_digest(service, after["path"])


def test_an_older_journal_gains_the_columns_and_its_rows_read_as_unknown(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with sqlite3.connect(path) as db:  # the instances table as the first release made it
        db.execute(
            "CREATE TABLE instances (sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,"
            " sop_class_uid TEXT NOT NULL, transfer_syntax TEXT NOT NULL, modality TEXT NOT NULL,"
            " laterality TEXT NOT NULL, view TEXT NOT NULL, presentation TEXT NOT NULL, path TEXT NOT NULL,"
            " size INTEGER NOT NULL, calling_ae TEXT NOT NULL, study_version INTEGER NOT NULL,"
            " received_at REAL NOT NULL)"
        )
        db.execute(
            "INSERT INTO instances VALUES ('1.2.3.1', '1.2.3', '1.2.3.9', '1.2', '1.2', 'MG', 'L', 'CC',"
            " '', 'studies/x.dcm', 10, 'AE', 1, 0)"
        )
    journal = Journal(path)
    try:
        old = journal.find_instance("1.2.3.1")
        assert (old["content_digest"], old["own_output"]) == ("", 0)
        record = InstanceRecord(
            sop_uid="1.2.3.2",
            study_uid="1.2.3",
            series_uid="1.2.3.9",
            sop_class_uid="1.2",
            transfer_syntax="1.2",
            modality="MG",
            laterality="R",
            view="CC",
            presentation="",
            path="studies/y.dcm",
            size=10,
            calling_ae="AE",
            priority=6,
            content_digest="ab" * 16,
            own_output=True,
        )
        assert journal.record_instance(record, StoreOutcome.NEW) == 0  # ours: no version opened
        assert journal.find_instance("1.2.3.2")["content_digest"] == "ab" * 16
    finally:
        journal.close()


def test_a_job_from_an_older_gateway_reads_with_no_digest_and_not_ours() -> None:
    ref = {
        "sop_instance_uid": "1.2.3.1",
        "sop_class_uid": "1.2",
        "series_instance_uid": "1.2.3.9",
        "modality": "MG",
        "path": "x.dcm",
        "transfer_syntax_uid": "1.2",
        "study_version": 1,
    }
    job = StudyJob.from_json_dict(
        {
            "schema_version": 2,
            "job_id": "j",
            "study_instance_uid": "1.2.3",
            "study_version": 1,
            "calling_ae": "AE",
            "storage_root": "/data",
            "instances": [ref],
        }
    )
    assert (job.instances[0].content_digest, job.instances[0].own_output) == ("", False)


def _with_a_value_pydicom_quotes(ds: Dataset, directory: Path, quoted: bytes) -> Path:
    """*ds* written with StudyDescription (read by the gateway) encoded under a numeric VR it cannot fit."""
    placeholder = b"X" * len(quoted)
    ds.StudyDescription = placeholder.decode()
    path = write(ds, directory)
    raw = path.read_bytes()
    declared = struct.pack("<HH", 0x0008, 0x1030) + b"%s" + struct.pack("<H", len(quoted))
    assert raw.count(declared % b"LO" + placeholder) == 1
    path.write_bytes(raw.replace(declared % b"LO" + placeholder, declared % b"UL" + quoted))
    return path


def test_a_quarantine_reason_carries_no_value_of_the_data_set(make_gateway, tmp_path: Path) -> None:
    quoted = b"1958-11-23 DOE^JANE   "  # 22 bytes: not a whole number of 4-byte UL values
    ds = make_instance(modality="MG", patient_name="DOE^JANE")
    path = _with_a_value_pydicom_quotes(ds, tmp_path / "send", quoted)
    with pytest.raises(Exception) as raised:  # what pydicom says about it quotes the value
        pydicom.dcmread(path).get("StudyDescription")
    assert "1958-11-23" in str(raised.value)

    service, _ = make_gateway()
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
    _config.STORE_SEND_CHUNKED_DATASET = True  # the bytes as they are, not re-encoded by pydicom
    try:
        assoc = ae.associate("127.0.0.1", service.port, ae_title=service.settings.gateway.ae_title)
        status = int(assoc.send_c_store(path).Status)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert status == 0xC210
    (note,) = service.spool.quarantine_dir.glob("*.json")
    reason = json.loads(note.read_text())["reason"]
    assert type(raised.value).__name__ in reason
    assert not any(value in reason for value in ("1958", "DOE", "JANE", "11-23"))
