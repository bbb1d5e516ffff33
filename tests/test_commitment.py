"""Storage Commitment SCU against real peers: Orthanc commits what we stored and reports on a new
association; a peer that never reports, or does not offer the SOP class, is an error the delivery
retries and then dead-letters; the worklist says "committed" only when every output is confirmed."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event

from gateway.errors import TransientError
from gateway.settings import DestinationSettings, load_settings
from tests.peers import Orthanc, get_free_port, running_storescp
from tests.test_delivery import destination_of, study_outputs
from tests.test_triage_order import BUILTIN_MODELS, start_worker, stop
from tests.test_worker_reliability import _cli, _config, _job
from tests.utils import wait_for
from workers.commitment import (
    STORAGE_COMMITMENT_INSTANCE_UID,
    STORAGE_COMMITMENT_PUSH_MODEL,
    request_commitment,
)
from workers.pacs import deliver

OUR_AE = "PACS_TRIAGE"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def register_modality(orthanc: Orthanc, ae_title: str, port: int) -> None:
    """Tell Orthanc where *ae_title* listens (REST ``PUT /modalities``): it sends commitment reports there."""
    body = json.dumps({"AET": ae_title, "Host": "127.0.0.1", "Port": port}).encode()
    request = urllib.request.Request(f"{orthanc.url}/modalities/{ae_title}", data=body, method="PUT")
    with urllib.request.urlopen(request, timeout=10) as answer:
        answer.read()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture()
def report_port(orthanc: Orthanc) -> int:
    port = get_free_port()
    register_modality(orthanc, OUR_AE, port)
    return port


def _refs(datasets: list[Dataset]) -> list[tuple[str, str]]:
    return [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets]


@pytest.mark.peers
def test_orthanc_commits_every_delivered_instance(orthanc: Orthanc, report_port: int) -> None:
    objects, _ = study_outputs()
    destination = destination_of(orthanc)
    assert all(r.ok for r in deliver(objects, destination, calling_ae_title=OUR_AE, timeout=20))
    report = request_commitment(
        _refs(objects),
        destination,
        calling_ae_title=OUR_AE,
        listen_port=report_port,
        listen_host="127.0.0.1",
        timeout=30,
    )
    assert report.complete
    assert report.committed == {str(ds.SOPInstanceUID) for ds in objects}


@pytest.mark.peers
def test_an_instance_orthanc_does_not_hold_is_reported_failed(orthanc: Orthanc, report_port: int) -> None:
    objects, _ = study_outputs()
    destination = destination_of(orthanc)
    assert all(r.ok for r in deliver(objects, destination, calling_ae_title=OUR_AE, timeout=20))
    never_sent = (SECONDARY_CAPTURE, generate_uid())
    report = request_commitment(
        [*_refs(objects), never_sent],
        destination,
        calling_ae_title=OUR_AE,
        listen_port=report_port,
        listen_host="127.0.0.1",
        timeout=30,
    )
    assert not report.complete
    assert report.committed == {str(ds.SOPInstanceUID) for ds in objects}
    assert report.failed == {never_sent[1]: 0x0112}  # No such object instance


class SilentCommitmentPeer:
    """A PACS we control: it stores and accepts the N-ACTION with success.  It never sends the report
    until :meth:`report_to` says where to, and then reports on a new association, as Orthanc does:
    every instance committed, or every instance failed with *failure_reason*."""

    def __init__(self) -> None:
        self.actions: list[Dataset] = []
        self.report_port: int | None = None
        self.failure_reason: int | None = None
        self.port = get_free_port()
        self.ae = AE(ae_title="SILENT")
        self.ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL)
        self.ae.add_supported_context(SECONDARY_CAPTURE)
        self.ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.33")  # Comprehensive SR
        self.ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.59")  # KOS
        self.ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.50")  # Mammography CAD SR
        self.ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_ACTION, self._on_action), (evt.EVT_C_STORE, lambda event: 0x0000)],
        )

    def report_to(self, port: int, failure_reason: int | None = None) -> None:
        self.report_port, self.failure_reason = port, failure_reason

    def _on_action(self, event: Event) -> tuple[int, None]:
        self.actions.append(event.action_information)
        if self.report_port is not None:
            threading.Thread(target=self._report, args=(event.action_information,), daemon=True).start()
        return 0x0000, None

    def _report(self, action: Dataset) -> None:
        info = Dataset()
        info.TransactionUID = action.TransactionUID
        items = []
        for ref in action.ReferencedSOPSequence:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
            if self.failure_reason is not None:
                item.FailureReason = self.failure_reason
            items.append(item)
        if self.failure_reason is None:
            info.ReferencedSOPSequence = items
        else:
            info.FailedSOPSequence = items
        assoc = self.ae.associate("127.0.0.1", self.report_port, ae_title=OUR_AE)
        if assoc.is_established:
            assoc.send_n_event_report(
                info,
                1 if self.failure_reason is None else 2,
                STORAGE_COMMITMENT_PUSH_MODEL,
                STORAGE_COMMITMENT_INSTANCE_UID,
            )
            assoc.release()

    def destination(self, timeout: float) -> DestinationSettings:
        return DestinationSettings(
            ae_title="SILENT",
            host="127.0.0.1",
            port=self.port,
            storage_commitment=True,
            commitment_timeout_seconds=timeout,
        )

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def silent_peer() -> Iterator[SilentCommitmentPeer]:
    peer = SilentCommitmentPeer()
    try:
        yield peer
    finally:
        peer.close()


def test_a_report_that_never_comes_is_a_transient_error(silent_peer: SilentCommitmentPeer) -> None:
    objects, _ = study_outputs()
    with pytest.raises(TransientError, match="no Storage Commitment report"):
        request_commitment(
            _refs(objects),
            silent_peer.destination(0.5),
            calling_ae_title=OUR_AE,
            listen_port=get_free_port(),
            listen_host="127.0.0.1",
        )
    (action,) = silent_peer.actions
    assert action.TransactionUID
    assert [
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in action.ReferencedSOPSequence
    ] == _refs(objects)


def test_a_failed_sop_sequence_names_each_failure(silent_peer: SilentCommitmentPeer) -> None:
    objects, _ = study_outputs()
    port = get_free_port()
    silent_peer.report_to(port, failure_reason=0x0110)
    report = request_commitment(
        _refs(objects),
        silent_peer.destination(30),
        calling_ae_title=OUR_AE,
        listen_port=port,
        listen_host="127.0.0.1",
    )
    assert not report.complete and report.committed == set()
    assert report.failed == dict.fromkeys((str(ds.SOPInstanceUID) for ds in objects), 0x0110)


def test_each_request_has_its_own_transaction_uid(silent_peer: SilentCommitmentPeer) -> None:
    objects, _ = study_outputs()
    for _ in range(2):
        with pytest.raises(TransientError):
            request_commitment(
                _refs(objects),
                silent_peer.destination(0.2),
                calling_ae_title=OUR_AE,
                listen_port=get_free_port(),
                listen_host="127.0.0.1",
            )
    assert len({a.TransactionUID for a in silent_peer.actions}) == 2


@pytest.mark.peers
def test_a_peer_without_storage_commitment_is_a_transient_error(tmp_path: Path) -> None:
    with running_storescp(tmp_path) as storescp:
        destination = DestinationSettings(ae_title=storescp.aet, host="127.0.0.1", port=storescp.port)
        with pytest.raises(TransientError, match="SOP class is not supported"):
            request_commitment(
                [(SECONDARY_CAPTURE, "1.2.3.4")],
                destination,
                calling_ae_title=OUR_AE,
                listen_port=get_free_port(),
                listen_host="127.0.0.1",
                timeout=1,
            )


def test_a_busy_report_port_is_a_transient_error(silent_peer: SilentCommitmentPeer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TransientError, match="cannot listen"):
            request_commitment(
                [(SECONDARY_CAPTURE, "1.2.3.4")],
                silent_peer.destination(0.2),
                calling_ae_title=OUR_AE,
                listen_port=port,
                listen_host="127.0.0.1",
            )
    assert silent_peer.actions == []  # nothing asked before we could hear the answer


# ---------------------------------------------------------------------------------------- through the worker


@pytest.mark.redis
@pytest.mark.peers
@pytest.mark.slow
def test_a_committed_delivery_shows_committed_on_the_worklist(
    tmp_path: Path, redis_url: str, orthanc: Orthanc
) -> None:
    from workers.http import OpsData
    from workers.results import ResultsStore

    report_port = get_free_port()
    register_modality(orthanc, OUR_AE, report_port)
    config = _config(
        tmp_path,
        redis_url,
        plugins={
            "drop_in_dir": str(Path(__file__).parent / "triage_plugins"),
            "load_entrypoints": False,
            "disabled": BUILTIN_MODELS,
            "allow_demo_weights": True,
        },
        triage={"first_stage_model": "triage_probe"},
        delivery={
            "destinations": [
                {
                    "ae_title": orthanc.aet,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                    "storage_commitment": True,
                    "commitment_timeout_seconds": 30,
                }
            ],
            "ae_title": OUR_AE,
            "commitment_port": report_port,
        },
    )
    settings = load_settings(config, environ={})
    from workers.app import configure_app
    from workers.dispatch import CeleryDispatcher

    CeleryDispatcher(configure_app(settings)).dispatch(_job(tmp_path, bright=True, name="committed-study"))
    results = ResultsStore(tmp_path / "data" / "results.sqlite")
    worker = start_worker(config, "analysis,delivery", tmp_path / "worker.log")
    try:
        wait_for(
            lambda: any(e["event"] == "committed" for e in results.timeline("committed-study")),
            timeout=180,
            interval=0.5,
        )
    finally:
        stop(worker)
    outputs = {Path(p).stem for a in results.analyses("committed-study") for p in json.loads(a["outputs"])}
    assert len(outputs) >= 2  # both stages' SR and heatmaps
    commitments = results.commitments("committed-study")
    assert {c["sop_uid"] for c in commitments if c["status"] == "committed"} == outputs
    assert all(orthanc.find_instance(uid) for uid in outputs)
    (row,) = OpsData(settings).worklist()
    assert row["state"] == "delivered" and row["committed"] is True


@pytest.mark.redis
@pytest.mark.slow
def test_a_commitment_that_never_comes_is_retried_dead_lettered_and_replayed(
    tmp_path: Path, redis_url: str, silent_peer: SilentCommitmentPeer
) -> None:
    from workers.app import configure_app
    from workers.dispatch import CeleryDispatcher
    from workers.http import OpsData
    from workers.results import ResultsStore

    report_port = get_free_port()
    config = _config(
        tmp_path,
        redis_url,
        plugins={
            "drop_in_dir": str(Path(__file__).parent / "triage_plugins"),
            "load_entrypoints": False,
            "disabled": BUILTIN_MODELS,
            "allow_demo_weights": True,
            "models": {"triage_probe_heavy": {"enabled": False}},
        },
        triage={"first_stage_model": "triage_probe"},
        delivery={
            "destinations": [
                {
                    "ae_title": "SILENT",
                    "host": "127.0.0.1",
                    "port": silent_peer.port,
                    "storage_commitment": True,
                    "commitment_timeout_seconds": 0.5,
                }
            ],
            "commitment_port": report_port,
            "max_retries": 2,
            "backoff_base_seconds": 0.2,
            "backoff_max_seconds": 0.5,
        },
    )
    settings = load_settings(config, environ={})
    CeleryDispatcher(configure_app(settings)).dispatch(_job(tmp_path, bright=False, name="never-committed"))
    results = ResultsStore(tmp_path / "data" / "results.sqlite")
    worker = start_worker(config, "analysis,delivery", tmp_path / "worker.log")
    try:
        wait_for(lambda: results.dead_letters(), timeout=180, interval=0.5)
        (letter,) = results.dead_letters()
        assert letter["task"] == "deliver"
        assert (
            "gave up after 3 tries" in letter["error"] and "no Storage Commitment report" in letter["error"]
        )
        assert len(silent_peer.actions) == 3  # one request per try, each for every output
        assert len({a.TransactionUID for a in silent_peer.actions}) == 3
        assert not any(e["event"] == "committed" for e in results.timeline("never-committed"))
        (row,) = OpsData(settings).worklist()
        assert row["state"] == "dead-lettered" and row["committed"] is False
        listing = _cli(config, "deadletters")
        assert listing.returncode == 0 and f"{letter['id']:>5}" in listing.stdout
        # The PACS now reports: one command replays the delivery, and its commitment is journalled.
        silent_peer.report_to(report_port)
        replay = _cli(config, "deadletters", "--replay", str(letter["id"]))
        assert replay.returncode == 0, replay.stderr
        outputs = {
            Path(p).stem for a in results.analyses("never-committed") for p in json.loads(a["outputs"])
        }
        wait_for(
            lambda: (
                {c["sop_uid"] for c in results.commitments("never-committed") if c["status"] == "committed"}
                == outputs
            ),
            timeout=120,
            interval=0.5,
        )
    finally:
        stop(worker)
    assert results.dead_letters() == []
    assert len({a.TransactionUID for a in silent_peer.actions}) == 4
