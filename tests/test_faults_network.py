"""Peers that misbehave on the wire: one stalls in the middle of a PDU, one between PDUs of a data set, one
drops the connection mid-PDU.  The gateway's timeouts fire, no half-file stays in ``incoming/``, nothing
is journalled, and the gateway goes on serving.

A peer's A-ABORT in the middle of a data set: ``tests/test_gateway_scp.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from gateway.service import GatewayService
from tests.conftest import gateway_settings
from tests.dispatchers import RecordingDispatcher
from tests.faults_harness import incoming_leftovers
from tests.utils import make_instance, wait_for

TIMEOUT = 2.0  # the gateway's network and DIMSE timeouts in these tests, seconds
_P_DATA_TF = 0x04


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayService]:
    settings = gateway_settings(
        tmp_path, network_timeout=TIMEOUT, dimse_timeout=TIMEOUT, max_pdu_size=16384, max_associations=4
    )
    service = GatewayService(settings, RecordingDispatcher())
    service.start()
    yield service
    service.stop()


class MisbehavingPeer:
    """A pynetdicom requestor whose socket writes go wrong at the *nth* P-DATA-TF PDU.

    ``mode`` ``"mid-pdu"`` writes half of that PDU and then nothing more; ``"between-pdus"`` writes nothing
    from that PDU on; ``"drop"`` writes half of it and closes the TCP connection.
    """

    def __init__(self, service: GatewayService, dataset: Dataset, mode: str, nth: int = 4) -> None:
        self.dataset = dataset
        self.stalled = threading.Event()
        self._release = threading.Event()
        ae = AE(ae_title="STALLER")
        # Longer than the gateway's: the gateway, not this peer, must be the one that gives up.
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 3 * TIMEOUT
        ae.requested_contexts = [build_context(dataset.SOPClassUID, [dataset.file_meta.TransferSyntaxUID])]
        self.assoc = ae.associate("127.0.0.1", service.port, ae_title=service.settings.gateway.ae_title)
        assert self.assoc.is_established
        transport = self.assoc.dul.socket
        real_send, count = transport.send, [0]

        def send(data: bytes) -> None:
            if not data or data[0] != _P_DATA_TF or self.stalled.is_set():
                if self.stalled.is_set():
                    self._release.wait(60)  # stay silent, the connection open
                    return None
                return real_send(data)
            count[0] += 1
            if count[0] < nth:
                return real_send(data)
            if mode in ("mid-pdu", "drop"):
                transport.socket.sendall(bytes(data[: len(data) // 2]))
            if mode == "drop":
                transport.socket.close()
            self.stalled.set()
            self._release.wait(60)
            return None

        transport.send = send
        self._sender = threading.Thread(target=self._store, daemon=True)
        self._sender.start()

    def _store(self) -> None:
        try:
            self.assoc.send_c_store(self.dataset)
        except Exception:  # the association dies under it, as intended
            pass

    def close(self) -> None:
        """Unblock and abort this peer's side, so none of its threads outlives the test."""
        self._release.set()
        if self.assoc.is_established:
            self.assoc.abort()
        self._sender.join(10)


def _store_one(service: GatewayService) -> int:
    ds = make_instance(modality="CT")
    ae = AE(ae_title="GOOD_PEER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.requested_contexts = [build_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])]
    assoc = ae.associate("127.0.0.1", service.port, ae_title=service.settings.gateway.ae_title)
    assert assoc.is_established
    status = int(assoc.send_c_store(ds).Status)
    assoc.release()
    return status


def _stored(service: GatewayService) -> list[Path]:
    return sorted(service.spool.studies.rglob("*.dcm"))


def _gateway_association_threads(service: GatewayService) -> list[threading.Thread]:
    """The live association and DUL threads of *service*'s associations (this process holds both sides)."""
    found = []
    for thread in threading.enumerate():
        assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
        if (
            isinstance(thread, (Association, DULServiceProvider))
            and thread.is_alive()
            and assoc.is_acceptor
            and assoc.acceptor.port == service.port
        ):
            found.append(thread)
    return found


#: ``mid-pdu`` found a bug (fixed in gateway/handlers.py handle_conn_open): the accepted socket had no
#: timeout (CPython's accept() drops the listener's), so the lean C-STORE path's recv_into() waited forever
#: for the rest of the PDU and the network-timeout abort spun in Association.kill() waiting for that DUL
#: thread; the association, its slot under max_associations and its half-file stayed for good.
@pytest.mark.parametrize("mode", ["mid-pdu", "between-pdus", "drop"])
def test_misbehaving_peer_times_out_and_leaves_no_half_file(gateway: GatewayService, mode: str) -> None:
    dataset = make_instance(modality="CT", rows=256, cols=256)  # 128 KiB: eight 16 KiB PDUs
    # As many misbehaving peers as gateway.max_associations: if their associations were never reaped, the
    # gateway would refuse every peer after them.
    peers = [
        MisbehavingPeer(gateway, dataset, mode) for _ in range(gateway.settings.gateway.max_associations)
    ]
    try:
        assert all(peer.stalled.wait(10) for peer in peers)
        if mode != "drop":
            assert incoming_leftovers(gateway.spool.root), "the stalled data sets should be half-received now"
        # Each association is aborted within a few timeouts: its threads end and its partial file is removed.
        wait_for(lambda: not _gateway_association_threads(gateway), timeout=4 * TIMEOUT + 5, interval=0.1)
        assert incoming_leftovers(gateway.spool.root) == []
        assert _stored(gateway) == []
        assert gateway.journal is not None and gateway.journal.studies() == []
        assert _store_one(gateway) == 0x0000  # the gateway still serves
    finally:
        for peer in peers:
            peer.close()
