"""C-STORE delivery to real peers (Orthanc, DCMTK storescp), error mapping and backoff."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from gateway.errors import PermanentError, TransientError
from gateway.settings import DestinationSettings, TLSSettings
from tests.peers import Orthanc, get_free_port, running_storescp
from tests.test_outputs import make_mammogram, make_prediction
from workers import outputs, pacs, study_report
from workers.pacs import DeliveryResult, check_results, deliver


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield peer
    finally:
        peer.stop()


def study_outputs() -> tuple[list[Dataset], list[Dataset]]:
    """The SR and SCs of a fabricated two-image result, and the sources."""
    images = [make_mammogram("L", "CC"), make_mammogram("R", "MLO")]
    predictions = [make_prediction(images[0], birads=4, localise=True), make_prediction(images[1])]
    sr = outputs.build_sr(images, predictions)
    scs = [
        outputs.build_heatmap_sc(image, None, prediction, instance_number=number)
        for number, (image, prediction) in enumerate(zip(images, predictions, strict=True), start=1)
    ]
    return [sr, *scs], images


def destination_of(orthanc: Orthanc) -> DestinationSettings:
    return DestinationSettings(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)


@pytest.mark.peers
def test_delivered_objects_read_back_from_orthanc(orthanc: Orthanc) -> None:
    objects, images = study_outputs()
    results = deliver(objects, destination_of(orthanc), timeout=20)

    assert [r.sop_instance_uid for r in results] == [str(o.SOPInstanceUID) for o in objects]
    assert all(r.ok and r.status == 0x0000 for r in results), results
    check_results(results)

    sr_id = orthanc.find_instance(str(objects[0].SOPInstanceUID))
    assert sr_id is not None
    sr = hd.sr.srread(io.BytesIO(orthanc.instance_file(sr_id)))
    assert sr.StudyInstanceUID == images[0].StudyInstanceUID
    groups = sr.content.get_image_measurement_groups()
    # The demo predictions' risk is an uncalibrated suspicion score: reported under its own concept.
    score = study_report.score_concept(None)
    risks = {
        str(group.source_images[0].referenced_sop_instance_uid): group.get_measurements(name=score)[0].value
        for group in groups
        if group.source_images and group.get_measurements(name=score)
    }
    assert risks == {str(image.SOPInstanceUID): pytest.approx(0.8) for image in images}
    assert len(sr.content.get_planar_roi_measurement_groups()) == 2

    for sc in objects[1:]:
        sc_id = orthanc.find_instance(str(sc.SOPInstanceUID))
        assert sc_id is not None
        stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(sc_id)))
        assert stored.BurnedInAnnotation == "YES"
        assert stored.pixel_array.shape == sc.pixel_array.shape


@pytest.mark.peers
def test_redelivery_creates_no_duplicates(orthanc: Orthanc) -> None:
    objects, _ = study_outputs()
    deliver(objects, destination_of(orthanc), timeout=20)
    before = set(orthanc.instances())
    # A retry rebuilds the objects: the deterministic UIDs make them the same instances.
    rebuilt, _ = study_outputs()
    results = deliver(rebuilt, destination_of(orthanc), timeout=20)
    assert all(r.ok for r in results)
    assert set(orthanc.instances()) == before
    assert all(orthanc.find_instance(str(o.SOPInstanceUID)) for o in rebuilt)


@pytest.mark.peers
def test_delivery_to_dcmtk_storescp(tmp_path: Path) -> None:
    objects, _ = study_outputs()
    with running_storescp(tmp_path) as scp:
        destination = DestinationSettings(ae_title=scp.aet, host="127.0.0.1", port=scp.port)
        results = deliver(objects, destination, timeout=20)
        assert all(r.ok for r in results)
        received = {str(pydicom.dcmread(path).SOPInstanceUID) for path in scp.received_files()}
    assert received == {str(o.SOPInstanceUID) for o in objects}


def test_closed_port_is_a_transient_error() -> None:
    objects, _ = study_outputs()
    destination = DestinationSettings(ae_title="NOBODY", host="127.0.0.1", port=get_free_port())
    with pytest.raises(TransientError, match="cannot connect"):
        deliver(objects[:1], destination, timeout=5)


def test_rejected_association_is_a_transient_error() -> None:
    # A peer that only knows Verification rejects nothing at ACSE level but accepts no storage
    # context, so pynetdicom aborts; a peer that requires another called AE title rejects.
    ae = AE(ae_title="PICKY")
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    port = get_free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        objects, _ = study_outputs()
        wrong_title = DestinationSettings(ae_title="SOMEONE_ELSE", host="127.0.0.1", port=port)
        with pytest.raises(TransientError, match="rejected the association"):
            deliver(objects[:1], wrong_title, timeout=5)
        right_title = DestinationSettings(ae_title="PICKY", host="127.0.0.1", port=port)
        with pytest.raises(TransientError, match="aborted"):
            deliver(objects[:1], right_title, timeout=5)
    finally:
        server.shutdown()


def test_failure_statuses_become_per_instance_errors() -> None:
    statuses = iter([0x0000, 0xA700, 0xC000, 0x0111])

    def handle_store(event: evt.Event) -> int:
        return next(statuses)

    objects, _ = study_outputs()
    ae = AE(ae_title="FAKEPACS")
    for sop_class in {str(o.SOPClassUID) for o in objects}:
        ae.add_supported_context(sop_class)
    port = get_free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        destination = DestinationSettings(ae_title="FAKEPACS", host="127.0.0.1", port=port)
        results = deliver([*objects, objects[0]], destination, timeout=10)
    finally:
        server.shutdown()
    assert [r.status for r in results] == [0x0000, 0xA700, 0xC000, 0x0111]
    assert [type(r.error) for r in results] == [type(None), TransientError, PermanentError, type(None)]
    assert results[1].retryable and not results[2].retryable
    assert results[2].to_json_dict()["status"] == "0xC000"
    with pytest.raises(TransientError, match="2 of 4"):
        check_results(results)
    with pytest.raises(PermanentError, match="1 of 2"):
        check_results([results[0], results[2]])


def test_tcp_nodelay_is_set_on_the_association_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    captured: list[int] = []
    original = pacs._set_nodelay

    def spy(event: evt.Event) -> None:
        original(event)
        raw = event.assoc.dul.socket.socket
        captured.append(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(pacs, "_set_nodelay", spy)
    objects, _ = study_outputs()
    ae = AE(ae_title="FAKEPACS")
    ae.add_supported_context(str(objects[0].SOPClassUID))
    port = get_free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)]
    )
    try:
        destination = DestinationSettings(ae_title="FAKEPACS", host="127.0.0.1", port=port)
        results = deliver(objects[:1], destination, timeout=10)
    finally:
        server.shutdown()
    assert results[0].ok
    assert captured == [1]


def test_the_reactor_leaves_a_response_to_the_waiting_sender() -> None:
    # Seen once in a full run: the reactor won the race for a C-STORE-RSP, dropped it, the sender timed
    # out and the retry stored the study's outputs at the PACS twice.
    from pynetdicom.association import Association
    from pynetdicom.dimse_primitives import C_ECHO, C_STORE

    assoc = Association(AE(), "requestor")
    pacs.keep_responses_for_the_caller(assoc)

    response = C_STORE()
    response.MessageIDBeingRespondedTo = 1
    response.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    response.AffectedSOPInstanceUID = "1.2.3.4"
    response.Status = 0x0000
    assoc.dimse.msg_queue.put((3, response))
    assert assoc.dimse.get_msg(block=False) == (None, None)  # the reactor's poll passes it by
    assert assoc.dimse.get_msg(block=True) == (3, response)  # the sender's wait gets it

    request = C_ECHO()
    request.MessageID = 7
    request.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assoc.dimse.msg_queue.put((1, request))
    assert assoc.dimse.get_msg(block=False) == (1, request) and assoc.dimse.msg_queue.empty()


def test_tls_settings_with_missing_files_are_a_permanent_error(tmp_path: Path) -> None:
    tls = TLSSettings(
        enabled=True, certificate=tmp_path / "missing.pem", private_key=tmp_path / "missing.key"
    )
    destination = DestinationSettings(ae_title="PACS", host="127.0.0.1", port=get_free_port(), tls=tls)
    objects, _ = study_outputs()
    with pytest.raises(PermanentError, match="TLS"):
        deliver(objects[:1], destination, timeout=5)


def test_empty_delivery_sends_nothing() -> None:
    destination = DestinationSettings(ae_title="NOBODY", host="127.0.0.1", port=get_free_port())
    assert deliver([], destination) == []


def test_delivery_result_json() -> None:
    ok = DeliveryResult(sop_instance_uid="1.2", sop_class_uid="1.2.3", status=0)
    assert ok.ok and ok.to_json_dict() == {
        "sop_instance_uid": "1.2",
        "sop_class_uid": "1.2.3",
        "status": "0x0000",
        "ok": True,
        "error_kind": None,
        "error": None,
    }
