"""What the edge accepts and refuses: retired storage classes, unknown SOP classes, deflate bombs."""

from __future__ import annotations

import copy
import io
import struct
import subprocess
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.dimse_primitives import C_STORE

from gateway.inflate import InflateBudgetExceeded, read_header
from gateway.service import GatewayService
from tests.conftest import gateway_settings, require_binary
from tests.utils import make_instance, write
from workers.pacs import keep_responses_for_the_caller

RETIRED_US = "1.2.840.10008.5.1.4.1.1.6"
RETIRED_US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3"
UNKNOWN_SOP_CLASS = "1.2.826.0.1.3680043.9.9999.4242"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayService]:
    service = GatewayService(gateway_settings(tmp_path, max_inflated_size=32 * 2**20))
    service.start()
    yield service
    service.stop()


def explicit_little_endian(ds: Dataset) -> DicomBytesIO:
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    return encoded


def deflated_bomb(path: Path, inflated_pixel_bytes: int) -> Path:
    """A valid deflated CT instance whose zero pixels inflate to *inflated_pixel_bytes* (written in steps)."""
    ds = make_instance(modality="CT")
    del ds.PixelData
    ds.Rows, ds.Columns = 4096, 4096
    ds.NumberOfFrames = inflated_pixel_bytes // (4096 * 4096 * 2)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    header = explicit_little_endian(ds)  # the stream inside the deflate
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, ds.file_meta)
        f.write(deflater.compress(header.getvalue()))
        f.write(deflater.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, inflated_pixel_bytes)))
        zeros = bytes(1 << 20)
        for _ in range(inflated_pixel_bytes // len(zeros)):
            f.write(deflater.compress(zeros))
        f.write(deflater.flush())
    return path


def test_header_of_a_deflate_bomb_is_read_in_bounded_memory(tmp_path: Path) -> None:
    bomb = deflated_bomb(tmp_path / "bomb.dcm", 256 * 2**20)
    assert bomb.stat().st_size < 2**20
    tracemalloc.start()
    try:
        header = read_header(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header.Modality == "CT" and "PixelData" not in header
    assert peak < 32 * 2**20, f"reading the header held {peak / 2**20:.0f} MiB"
    with pytest.raises(InflateBudgetExceeded):
        read_header(bomb, inflate_budget=64 * 2**20)


def test_deflate_bomb_is_refused_with_a700_and_nothing_is_kept(
    gateway: GatewayService, tmp_path: Path
) -> None:
    bomb = deflated_bomb(tmp_path / "bomb.dcm", 256 * 2**20)
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = [build_context(CT_IMAGE, [DeflatedExplicitVRLittleEndian])]
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title="PACS_TRIAGE")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        assert assoc.send_c_store(bomb).Status == 0xA700
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    small = make_instance(modality="CT")
    small_deflated = tmp_path / "small.dcm"
    small.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    small.save_as(small_deflated, enforce_file_format=True)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assert assoc.send_c_store(small_deflated).Status == 0x0000  # the association carries on
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assoc.release()
    assert len(list(gateway.spool.studies.rglob("*.dcm"))) == 1
    assert not any(p.is_file() for p in gateway.spool.incoming.rglob("*"))


@pytest.mark.parametrize("sop_class", [RETIRED_US, RETIRED_US_MULTIFRAME])
def test_retired_ultrasound_classes_are_received_from_storescu(
    gateway: GatewayService, tmp_path: Path, sop_class: str
) -> None:
    require_binary("storescu")
    ds = make_instance(modality="US", sop_class_uid=sop_class)
    path = write(ds, tmp_path / "send")
    sent = subprocess.run(
        ["storescu", "-R", "-aec", "PACS_TRIAGE", "127.0.0.1", str(gateway.port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    row = gateway.journal.find_instance(str(ds.SOPInstanceUID))
    assert row is not None and row["sop_class_uid"] == sop_class


def test_unknown_sop_class_gets_0122_and_the_association_carries_on(gateway: GatewayService) -> None:
    """A broken sender's C-STORE names a SOP class nobody knows, on an accepted context."""
    ds = make_instance(modality="CT")
    ae = AE(ae_title="BROKEN_SCU")
    ae.requested_contexts = [build_context(CT_IMAGE, [ExplicitVRLittleEndian])]
    assoc = ae.associate(
        "127.0.0.1",
        gateway.port,
        ae_title="PACS_TRIAGE",
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: keep_responses_for_the_caller(event.assoc))],
    )
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = UNKNOWN_SOP_CLASS
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 0
    plain = copy.deepcopy(ds)
    plain.SOPClassUID = UNKNOWN_SOP_CLASS
    request.DataSet = io.BytesIO(explicit_little_endian(plain).getvalue())
    assoc.dimse.send_msg(request, context_id)
    _, response = assoc.dimse.get_msg(block=True)
    assert response is not None and response.Status == 0x0122
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert gateway.journal.find_instance(str(ds.SOPInstanceUID)) is not None
