"""The Storage/Verification SCP over real loopback associations, from pynetdicom and from DCMTK."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification

from gateway.journal import StudyState
from gateway.service import GatewayService
from gateway.settings import AllowedCaller, DiskWatermark
from tests.conftest import gateway_settings, require_binary
from tests.dispatchers import RecordingDispatcher
from tests.utils import MG_FOR_PRESENTATION, four_view_study, make_instance, wait_for, write

PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.9999.1"


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator:
    started: list[GatewayService] = []

    def factory(**gateway: object) -> tuple[GatewayService, RecordingDispatcher]:
        dispatcher = RecordingDispatcher()
        service = GatewayService(gateway_settings(tmp_path, **gateway), dispatcher)
        service.start()
        started.append(service)
        return service, dispatcher

    yield factory
    for service in started:
        service.stop()


def _associate(service: GatewayService, contexts: list, calling_ae: str = "TEST_SCU"):
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for cx in contexts:
        ae.add_requested_context(*cx) if isinstance(cx, tuple) else ae.requested_contexts.append(cx)
    return ae.associate("127.0.0.1", service.port, ae_title=service.settings.gateway.ae_title)


def _store(service: GatewayService, datasets, calling_ae: str = "TEST_SCU") -> list[int]:
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    assoc = _associate(service, [build_context(s, [t]) for s, t in contexts], calling_ae)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds, priority=0).Status) for ds in datasets]
    assoc.release()
    return statuses


def _stored_files(service: GatewayService) -> list[Path]:
    return sorted(service.spool.studies.rglob("*.dcm"))


def test_echo_from_pynetdicom(make_gateway) -> None:
    service, _ = make_gateway()
    assoc = _associate(service, [(Verification,)])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_store_is_on_disk_and_journalled_before_success(make_gateway) -> None:
    service, dispatcher = make_gateway()
    ds = make_instance(modality="CT")
    assert _store(service, [ds]) == [0x0000]
    row = service.journal.find_instance(ds.SOPInstanceUID)
    assert row is not None and row["study_uid"] == ds.StudyInstanceUID
    stored = service.spool.root / row["path"]
    assert dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPInstanceUID not in str(stored) and ds.StudyInstanceUID not in str(stored)
    jobs = dispatcher.wait_for(1)
    assert jobs[0].study_instance_uid == ds.StudyInstanceUID
    assert jobs[0].completed_by == "quiet"
    assert [i.sop_instance_uid for i in jobs[0].instances] == [ds.SOPInstanceUID]


def test_resent_instance_is_kept_once_and_reported(make_gateway) -> None:
    service, _ = make_gateway()
    ds = make_instance(modality="CT")
    assert _store(service, [ds, ds]) == [0x0000, 0x0000]
    assert _store(service, [ds]) == [0x0000]
    assert len(_stored_files(service)) == 1
    assert service.journal.studies()[0].duplicates == 2


@pytest.mark.parametrize(
    "filename",
    ["CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm",
     "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm", "image_dfl.dcm",
     "MR_small_jp2klossless.dcm", "MR_small_implicit.dcm", "liver_1frame.dcm", "test-SR.dcm"],
)
def test_transfer_syntaxes_are_stored_as_received(make_gateway, filename: str) -> None:
    """Whatever the transfer syntax, the stored dataset bytes equal the sent ones: no transcoding."""
    service, _ = make_gateway()
    source = dcmread(get_testdata_file(filename))
    for element in ("StudyInstanceUID", "SeriesInstanceUID"):  # a few test files lack them
        if element not in source:
            setattr(source, element, generate_uid())
    assert _store(service, [source]) == [0x0000]
    (stored,) = _stored_files(service)
    received = dcmread(stored)
    assert received.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    if "PixelData" in source:
        assert received.PixelData == source.PixelData


def test_dcmtk_echoscu_and_storescu(make_gateway, tmp_path: Path) -> None:
    service, dispatcher = make_gateway()
    require_binary("storescu")
    env = {**os.environ, "TCP_NODELAY": "1"}
    port, aet = str(service.port), service.settings.gateway.ae_title
    subprocess.run(["echoscu", "-aec", aet, "127.0.0.1", port], check=True, env=env, timeout=30)
    files = [write(ds, tmp_path / "send") for ds in four_view_study()]
    subprocess.run(["storescu", "-aec", aet, "-aet", "MAMMO_ROOM1", "127.0.0.1", port, *map(str, files)],
                   check=True, env=env, timeout=60)
    jobs = dispatcher.wait_for(1)
    assert jobs[0].completed_by == "rule:four_views"
    assert jobs[0].calling_ae == "MAMMO_ROOM1"
    assert len(jobs[0].instances) == 4


def test_undecodable_dataset_gets_c210_and_is_quarantined(make_gateway, tmp_path: Path) -> None:
    service, _ = make_gateway()
    # A C-STORE whose data set is not a DICOM encoding at all, sent raw as the peer would.
    garbage = tmp_path / "garbage.dcm"
    ds = make_instance(modality="CT")
    write(ds, tmp_path)
    raw = (tmp_path / f"{ds.SOPInstanceUID}.dcm").read_bytes()
    meta_end = raw.index(b"\x08\x00\x16\x00")  # first dataset element (0008,0016) after the meta group
    garbage.write_bytes(raw[:meta_end] + b"\x08\x00\x16\x00UI\xff\xff" + os.urandom(64))
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        statuses = []
        assoc = _associate(service, [build_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])])
        statuses.append(int(assoc.send_c_store(garbage).Status))
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert statuses == [0xC210]
    assert _stored_files(service) == []
    assert len(list(service.spool.quarantine_dir.glob("*.dcm"))) == 1
    assert list(service.spool.incoming.iterdir()) == []


@pytest.mark.parametrize("element", ["StudyInstanceUID", "SeriesInstanceUID"])
@pytest.mark.parametrize("bad", [None, "1.2.03.4", "1.2.abc", "1." + "2" * 70])
def test_missing_or_malformed_uid_is_refused(make_gateway, element: str, bad: str | None) -> None:
    service, dispatcher = make_gateway()
    ds = make_instance(modality="CT")
    if bad is None:
        delattr(ds, element)
    else:
        setattr(ds, element, bad)
    with pydicom.config.disable_value_validation():
        assert _store(service, [ds]) == [0xC220]
    assert _stored_files(service) == []
    assert service.journal.studies() == []


def test_disk_below_watermark_gets_a700_and_nothing_is_kept(make_gateway) -> None:
    service, _ = make_gateway(disk_watermark=DiskWatermark(min_free_percent=100.0))
    assert _store(service, [make_instance(modality="CT")]) == [0xA700]
    assert _stored_files(service) == []
    assert list(service.spool.incoming.iterdir()) == []


def test_unknown_calling_ae_is_rejected(make_gateway) -> None:
    service, _ = make_gateway(allowed_callers=(AllowedCaller(ae_title="MAMMO_ROOM1"),))
    assoc = _associate(service, [(Verification,)], calling_ae="INTRUDER")
    assert assoc.is_rejected
    assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.result_source,
            assoc.acceptor.primitive.diagnostic) == (0x01, 0x01, 0x03)
    ok = _associate(service, [(Verification,)], calling_ae="MAMMO_ROOM1")
    assert ok.is_established
    ok.release()


def test_known_ae_from_the_wrong_host_is_rejected(make_gateway) -> None:
    service, _ = make_gateway(allowed_callers=(AllowedCaller(ae_title="MAMMO_ROOM1", hosts=("10.9.9.9",)),))
    assert _associate(service, [(Verification,)], calling_ae="MAMMO_ROOM1").is_rejected


def test_private_sop_class_only_when_configured(make_gateway) -> None:
    ds = make_instance(modality="OT", sop_class_uid=PRIVATE_SOP_CLASS)
    service, _ = make_gateway()
    assoc = _associate(service, [build_context(PRIVATE_SOP_CLASS, [ds.file_meta.TransferSyntaxUID])])
    # With its only context refused, pynetdicom's requestor aborts the association.
    assert not assoc.is_established and assoc.accepted_contexts == []
    service2, _ = make_gateway(private_sop_classes=(PRIVATE_SOP_CLASS,))
    assert _store(service2, [ds]) == [0x0000]


def test_instance_after_completion_reopens_the_study_as_a_new_version(make_gateway) -> None:
    service, dispatcher = make_gateway()
    study = four_view_study()
    assert _store(service, study) == [0] * 4
    dispatcher.wait_for(1)
    extra = make_instance(study_uid=study[0].StudyInstanceUID, laterality="L", view="XCCL")
    assert _store(service, [extra]) == [0]
    jobs = dispatcher.wait_for(2)
    assert [j.study_version for j in jobs] == [1, 2]
    assert len(jobs[1].instances) == 5  # the new version carries the whole study


def test_peer_abort_mid_dataset_leaves_no_partial_file(make_gateway) -> None:
    """The peer sends part of a data set, then aborts: the partial spool file must vanish."""
    import threading

    from pynetdicom.pdu_primitives import P_DATA

    service, _ = make_gateway(max_pdu_size=16384)
    ds = make_instance(modality="CT", rows=512, cols=512)
    assoc = _associate(service, [build_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])])
    assert assoc.is_established
    sent_some, release = threading.Event(), threading.Event()
    send_pdu, count = assoc.dul.send_pdu, [0]

    def stall_after_a_few_fragments(primitive):
        if isinstance(primitive, P_DATA):
            count[0] += 1
            if count[0] > 4:
                sent_some.set()
                release.wait(10)
                return None
        return send_pdu(primitive)

    assoc.dul.send_pdu = stall_after_a_few_fragments
    sender = threading.Thread(target=lambda: assoc.send_c_store(ds), daemon=True)
    sender.start()
    assert sent_some.wait(10)
    wait_for(lambda: any(service.spool.incoming.iterdir()), timeout=10)
    assoc.dul.send_pdu = send_pdu
    assoc.abort()
    release.set()  # the sender thread then waits out its DIMSE timeout; it is a daemon
    wait_for(lambda: not any(service.spool.incoming.iterdir()), timeout=10)
    assert _stored_files(service) == []
    assert _store(service, [make_instance(modality="CT")]) == [0x0000]


def test_gateway_stays_up_after_raw_garbage_on_the_port(make_gateway) -> None:
    service, _ = make_gateway()
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as s:
        s.sendall(os.urandom(512))
        time.sleep(0.2)
    assert _store(service, [make_instance(modality="CT")]) == [0x0000]


def test_stat_description_and_dimse_priority_set_the_job_priority(make_gateway) -> None:
    service, dispatcher = make_gateway()
    urgent = make_instance(modality="CT")
    urgent.StudyDescription = "MAMMO DIAGNOSTIC STAT"
    assert _store(service, [urgent]) == [0]
    (job,) = dispatcher.wait_for(1)
    assert int(job.priority) == 0


def test_force_complete_age_completes_a_study_that_never_goes_quiet(tmp_path: Path) -> None:
    from gateway.assembly import Assembler
    from gateway.journal import InstanceRecord, Journal, StoreOutcome
    from gateway.settings import AssemblySettings

    journal = Journal(tmp_path / "j.sqlite")
    dispatcher = RecordingDispatcher()
    assembler = Assembler(journal, dispatcher, AssemblySettings(quiet_seconds=10, force_complete_seconds=60), "/x")
    study = generate_uid()
    for second in range(0, 70, 5):  # an instance every 5 s: never quiet for 10 s
        rec = InstanceRecord(sop_uid=generate_uid(), study_uid=study, series_uid="1.2", sop_class_uid=MG_FOR_PRESENTATION,
                             transfer_syntax="1.2.840.10008.1.2.1", modality="CT", laterality="", view="",
                             presentation="", path="x", size=1, calling_ae="A", priority=6)
        journal.record_instance(rec, StoreOutcome.NEW, now=1000.0 + second)
        assembler.tick(now=1000.0 + second)
    assert journal.studies(StudyState.DISPATCHED)[0].completed_by == "force"


def test_quiet_override_for_calling_ae_and_modality(tmp_path: Path) -> None:
    from gateway.assembly import Assembler
    from gateway.journal import Journal
    from gateway.settings import AssemblySettings, QuietOverride

    settings = AssemblySettings(quiet_seconds=10, quiet_overrides=(
        QuietOverride(modality="US", quiet_seconds=30),
        QuietOverride(calling_ae="US_ROOM1", modality="US", quiet_seconds=60),
    ))
    assembler = Assembler(Journal(tmp_path / "j.sqlite"), RecordingDispatcher(), settings, "/x")
    assert assembler.quiet_seconds("US_ROOM1", "US") == 60
    assert assembler.quiet_seconds("OTHER", "US") == 30
    assert assembler.quiet_seconds("US_ROOM1", "MG") == 10
