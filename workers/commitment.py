"""Storage Commitment Push Model SCU: ask a PACS to take responsibility for what we stored there.

The request is an N-ACTION (Action Type 1) on its own association, carrying a fresh Transaction
UID and the Referenced SOP Sequence of every instance delivered.  PACSs answer asynchronously
with an N-EVENT-REPORT on a *new* association to our AE (Orthanc does; most do), so while it
waits :func:`request_commitment` runs a small N-EVENT-REPORT SCP of its own on
``delivery.commitment_port``.  The listener lives only for one request: nothing listens between
deliveries, and a report that arrives after the timeout is refused (the delivery is retried with
a new Transaction UID anyway).  A report on the requesting association is accepted too.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event

from gateway.errors import PermanentError, TransientError
from gateway.settings import DestinationSettings

__all__ = [
    "STORAGE_COMMITMENT_INSTANCE_UID",
    "STORAGE_COMMITMENT_PUSH_MODEL",
    "CommitmentReport",
    "request_commitment",
]

log = structlog.get_logger(__name__)

#: Storage Commitment Push Model SOP Class.
STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
#: The well-known SOP Instance UID of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE_UID = "1.2.840.10008.1.20.1.1"
_REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID (PS3.4 J.3.2.1)
_ALL_COMMITTED = 1  # Event Type ID: "Storage Commitment Request Successful"
_SOME_FAILED = 2  # Event Type ID: "Storage Commitment Request Complete - Failures Exist"


@dataclass(frozen=True, kw_only=True)
class CommitmentReport:
    """The PACS's answer to one Storage Commitment request."""

    transaction_uid: str
    #: SOP Instance UIDs the PACS has committed to keep.
    committed: frozenset[str]
    #: SOP Instance UID -> Failure Reason (PS3.3 C.14.1.1) of each instance it did not commit.
    failed: dict[str, int]
    #: Instances the request named that the report mentions in neither list.
    missing: frozenset[str]

    @property
    def complete(self) -> bool:
        """Every requested instance is committed."""
        return not self.failed and not self.missing


def _action_information(transaction_uid: str, instances: Sequence[tuple[str, str]]) -> Dataset:
    info = Dataset()
    info.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    info.ReferencedSOPSequence = items
    return info


def _read_report(
    transaction_uid: str, requested: set[str], event_type: int | None, info: Dataset
) -> CommitmentReport:
    committed = {str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])}
    failed = {
        str(i.ReferencedSOPInstanceUID): int(i.get("FailureReason", 0x0110))
        for i in info.get("FailedSOPSequence", [])
    }
    if event_type == _SOME_FAILED and not failed:
        failed = dict.fromkeys(requested - committed, 0x0110)  # failures reported, none named
    committed &= requested
    return CommitmentReport(
        transaction_uid=transaction_uid,
        committed=frozenset(committed - set(failed)),
        failed={uid: reason for uid, reason in failed.items() if uid in requested},
        missing=frozenset(requested - committed - set(failed)),
    )


def request_commitment(
    instances: Sequence[tuple[str, str]],
    destination: DestinationSettings,
    *,
    calling_ae_title: str,
    listen_port: int,
    listen_host: str = "",
    timeout: float | None = None,
    network_timeout: float = 30.0,
) -> CommitmentReport:
    """Ask *destination* to commit *instances* and wait for its report.

    :param instances: ``(SOP Class UID, SOP Instance UID)`` of each instance stored there.
    :param destination: The PACS.
    :param calling_ae_title: Our AE title; the PACS reports to the AE it knows by this title.
    :param listen_port: Where the N-EVENT-REPORT SCP listens while it waits.
    :param listen_host: The address it listens on (every interface by default).
    :param timeout: Seconds to wait for the report after the N-ACTION succeeded
        (default: the destination's ``commitment_timeout_seconds``).
    :param network_timeout: Seconds allowed for connecting, negotiating and each DIMSE response.
    :returns: What the PACS committed and what it did not.
    :raises TransientError: when the listener cannot open its port, the PACS cannot be reached,
        refuses the N-ACTION, or no report comes within *timeout*.
    :raises PermanentError: when the association is up but the PACS did not accept the Storage
        Commitment Push Model (pynetdicom normally aborts such an association instead).
    """
    wait = destination.commitment_timeout_seconds if timeout is None else timeout
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    transaction_uid = generate_uid()
    requested = {uid for _, uid in instances}
    reports: queue.Queue[CommitmentReport] = queue.Queue()

    def _on_report(event: Event) -> tuple[int, Dataset | None]:
        info = event.event_information
        if str(info.get("TransactionUID", "")) != transaction_uid:
            log.warning("commitment.unexpected_report", destination=where)
            return 0x0000, None  # an older transaction's late report: acknowledged, not ours
        event_type = getattr(event.request, "EventTypeID", None)
        event_type_id = None if event_type is None else int(event_type)
        reports.put(_read_report(transaction_uid, requested, event_type_id, info))
        return 0x0000, None

    listener = AE(ae_title=calling_ae_title)
    listener.network_timeout = network_timeout
    listener.acse_timeout = network_timeout
    listener.dimse_timeout = network_timeout
    # The PACS is the association requestor but the commitment SCP: accept either role it proposes.
    listener.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=True, scp_role=True)
    try:
        server = listener.start_server(
            (listen_host, listen_port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, _on_report)]
        )
    except OSError as exc:
        raise TransientError(
            f"cannot listen for Storage Commitment reports on port {listen_port}: {type(exc).__name__}"
        ) from exc
    try:
        requester = AE(ae_title=calling_ae_title)
        requester.connection_timeout = network_timeout
        requester.acse_timeout = network_timeout
        requester.dimse_timeout = network_timeout
        requester.network_timeout = network_timeout
        requester.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
        assoc = requester.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, _on_report)],
        )
        if not assoc.is_established:
            # pynetdicom aborts when the peer accepts no proposed context: a PACS without Storage
            # Commitment lands here too, and is retried like a missing report, then dead-lettered.
            raise TransientError(
                f"no association with {where} for Storage Commitment (refused, aborted, or the SOP class "
                "is not supported)"
            )
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            if STORAGE_COMMITMENT_PUSH_MODEL not in accepted:
                raise PermanentError(f"{where} does not accept the Storage Commitment Push Model")
            status, _ = assoc.send_n_action(
                _action_information(transaction_uid, instances),
                _REQUEST_STORAGE_COMMITMENT,
                STORAGE_COMMITMENT_PUSH_MODEL,
                STORAGE_COMMITMENT_INSTANCE_UID,
            )
            code = getattr(status, "Status", None)
            if code is None:
                raise TransientError(f"no N-ACTION response from {where} within {network_timeout} s")
            if int(code) != 0x0000:
                raise TransientError(
                    f"{where} refused the Storage Commitment request (status 0x{int(code):04X})"
                )
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("commitment.requested", destination=where, instances=len(instances))
        try:
            report = reports.get(timeout=wait)
        except queue.Empty:
            raise TransientError(f"no Storage Commitment report from {where} within {wait} s") from None
    finally:
        if server is not None:
            server.shutdown()
    log.info(
        "commitment.reported",
        destination=where,
        committed=len(report.committed),
        failed=len(report.failed),
        missing=len(report.missing),
    )
    return report
