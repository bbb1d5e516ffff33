"""Delivery of our SR and SC objects to a PACS by C-STORE (its retry policy is in :mod:`gateway.retry`)."""

from __future__ import annotations

import queue
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pydicom
import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event

from gateway.errors import PacsTriageError, PermanentError, TransientError
from gateway.settings import DestinationSettings, TLSSettings

__all__ = [
    "DEFAULT_CALLING_AE_TITLE",
    "DELIVERY_STATUSES",
    "DeliveryResult",
    "check_results",
    "deliver",
    "ssl_context",
]

log = structlog.get_logger(__name__)

DEFAULT_CALLING_AE_TITLE = "PACS_TRIAGE"

# 0x0111 "Duplicate SOP Instance": our UIDs are deterministic, so the PACS already holds exactly
# this object from an earlier try; that is a success for us.
_DUPLICATE_SOP_INSTANCE = 0x0111
# Failures worth retrying: "Processing failure", "Resource limitation" and "Out of resources".
_TRANSIENT_FAILURES = (0x0110, 0x0213)
_OUT_OF_RESOURCES = range(0xA700, 0xA800)
_WARNINGS = (0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007)
#: How :func:`deliver` reads each C-STORE response (the conformance statement prints this table).
DELIVERY_STATUSES: tuple[tuple[str, str], ...] = (
    ("0x0000, warnings " + " ".join(f"0x{s:04X}" for s in _WARNINGS), "stored"),
    (
        f"0x{_DUPLICATE_SOP_INSTANCE:04X} Duplicate SOP Instance",
        "stored: UIDs are deterministic, so the PACS already holds this object",
    ),
    (
        ", ".join(f"0x{s:04X}" for s in _TRANSIENT_FAILURES) + f", 0x{_OUT_OF_RESOURCES.start >> 8:02X}xx",
        "retried with capped exponential backoff, then dead-lettered",
    ),
    ("any other failure", "dead-lettered at once (can be replayed)"),
    (
        "no association, rejection, abort, timeout",
        "retried with capped exponential backoff, then dead-lettered",
    ),
)


@dataclass(frozen=True, kw_only=True)
class DeliveryResult:
    """What happened to one instance: the peer's DIMSE status and our reading of it."""

    sop_instance_uid: str
    sop_class_uid: str
    #: The C-STORE response status; ``None`` when the instance was never sent.
    status: int | None
    #: ``None`` on success (warnings included); a TransientError when a retry may help;
    #: a PermanentError when it cannot.
    error: PacsTriageError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def retryable(self) -> bool:
        return isinstance(self.error, TransientError)

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-ready record for the delivery journal."""
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "status": None if self.status is None else f"0x{self.status:04X}",
            "ok": self.ok,
            "error_kind": None if self.error is None else type(self.error).__name__,
            "error": None if self.error is None else str(self.error),
        }


def ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """A client TLS context that verifies the PACS and presents our certificate.

    :param tls: The destination's TLS settings; ``ca_certificates`` verifies the PACS (the
        system store when unset), ``certificate``/``private_key`` authenticate us.
    """
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=str(tls.ca_certificates) if tls.ca_certificates else None,
        )
        if tls.certificate is not None and tls.private_key is not None:
            context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    except (OSError, ssl.SSLError) as exc:
        raise PermanentError(f"cannot set up TLS for delivery: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _set_nodelay(event: Event) -> None:
    # pynetdicom has no option for it; without it Nagle's algorithm delays the small PDUs
    # that end each DIMSE message by up to 40 ms per instance.
    raw = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ResponsesForTheCaller(queue.Queue[Any]):
    """A DIMSE message queue whose non-blocking ``get`` (the association reactor's poll) sees requests only.

    ``send_c_store`` waits for its response with a blocking ``get``; pynetdicom's reactor polls the
    same queue with a non-blocking one, and its pause around each send can race (it may pass its
    checkpoint just before the pause), take a fast response, log "Received unexpected C-STORE
    service message" and drop it.  Here a response at the head of the queue is left for the
    blocking ``get``.
    """

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            return super().get(block, timeout)
        with self.mutex:
            if not self.queue or not getattr(self.queue[0][1], "is_valid_request", True):
                raise queue.Empty
            item = self.queue.popleft()
            self.not_full.notify()
            return item


def keep_responses_for_the_caller(assoc: Any) -> None:
    """Make the association's reactor leave every DIMSE response to the waiting ``send_c_store``.

    Call it before the association starts (``EVT_CONN_OPEN``).  It replaces the DIMSE provider's
    ``msg_queue`` (a documented attribute) with :class:`_ResponsesForTheCaller`: an association that
    only sends requests never has a response of its own to serve.
    """
    assoc.dimse.msg_queue = _ResponsesForTheCaller()


def _transfer_syntax(dataset: pydicom.Dataset) -> str:
    meta = getattr(dataset, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    return str(syntax or ExplicitVRLittleEndian)


def _classify(status: int) -> PacsTriageError | None:
    if status == 0x0000 or status in _WARNINGS or status == _DUPLICATE_SOP_INSTANCE:
        return None
    if status in _TRANSIENT_FAILURES or status in _OUT_OF_RESOURCES:
        return TransientError(f"the PACS could not store the instance now (status 0x{status:04X})")
    return PermanentError(f"the PACS refused the instance (status 0x{status:04X})")


def deliver(
    datasets: Sequence[pydicom.Dataset],
    destination: DestinationSettings,
    *,
    timeout: float = 30.0,
    calling_ae_title: str = DEFAULT_CALLING_AE_TITLE,
) -> list[DeliveryResult]:
    """C-STORE *datasets* to *destination* over one association.

    Each instance gets a :class:`DeliveryResult`.  A success, a warning and "duplicate SOP
    instance" count as stored.  A refusal by the PACS is a PermanentError in that instance's
    result; "out of resources" and similar statuses are a TransientError there.

    :param datasets: The instances to send (each with its file meta or transfer syntax).
    :param destination: The PACS: AE title, host, port and TLS settings.
    :param timeout: Seconds allowed for connecting, for association negotiation and for
        each DIMSE response.
    :param calling_ae_title: Our AE title.
    :raises TransientError: when the connection is refused or times out, the association is
        rejected or aborted, or no response comes back; resending is safe because every
        output has a deterministic SOP Instance UID.
    :raises PermanentError: when the TLS context cannot be built.
    """
    if not datasets:
        return []
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    contexts: dict[str, list[str]] = {}
    for dataset in datasets:
        syntaxes = contexts.setdefault(str(dataset.SOPClassUID), [])
        for syntax in (_transfer_syntax(dataset), ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if syntax not in syntaxes:
                syntaxes.append(syntax)
    if len(contexts) > 128:
        raise PermanentError(f"{len(contexts)} SOP classes in one delivery; an association allows 128")
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)

    rejection: list[str] = []
    connected: list[bool] = []

    def _on_open(event: Event) -> None:
        connected.append(True)
        _set_nodelay(event)
        keep_responses_for_the_caller(event.assoc)

    def _remember_rejection(event: Event) -> None:
        primitive = getattr(event, "primitive", None)
        if primitive is not None and getattr(primitive, "result", None) in (0x01, 0x02):
            rejection.append(f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}")

    tls_args = None
    if destination.tls.enabled:
        tls_args = (ssl_context(destination.tls), destination.host)
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, _on_open), (evt.EVT_ACSE_RECV, _remember_rejection)],
        tls_args=tls_args,
    )
    if not assoc.is_established:
        if not connected:
            raise TransientError(f"cannot connect to {where} (refused or timed out after {timeout} s)")
        if assoc.is_rejected:
            reason = rejection[0] if rejection else "no reason given"
            raise TransientError(f"{where} rejected the association ({reason})")
        if assoc.is_aborted:
            raise TransientError(f"{where} aborted the association (no accepted presentation context?)")
        raise TransientError(f"no association with {where} (no answer within {timeout} s)")

    results: list[DeliveryResult] = []
    try:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        accepted_classes = {sop_class for sop_class, _ in accepted}
        for dataset in datasets:
            sop_uid, sop_class = str(dataset.SOPInstanceUID), str(dataset.SOPClassUID)
            if sop_class not in accepted_classes:
                results.append(
                    DeliveryResult(
                        sop_instance_uid=sop_uid,
                        sop_class_uid=sop_class,
                        status=None,
                        error=PermanentError(f"{where} does not accept SOP class {sop_class}"),
                    )
                )
                continue
            try:
                response = assoc.send_c_store(dataset)
            except (ValueError, AttributeError) as exc:
                # pynetdicom could not encode the dataset for any accepted transfer syntax.
                results.append(
                    DeliveryResult(
                        sop_instance_uid=sop_uid,
                        sop_class_uid=sop_class,
                        status=None,
                        error=PermanentError(f"cannot send the instance to {where}: {exc}"),
                    )
                )
                continue
            status = getattr(response, "Status", None)
            if status is None:
                stored = sum(r.ok for r in results)
                raise TransientError(
                    f"no C-STORE response from {where} (aborted or timed out after {timeout} s) "
                    f"after {stored} of {len(datasets)} instances"
                )
            results.append(
                DeliveryResult(
                    sop_instance_uid=sop_uid,
                    sop_class_uid=sop_class,
                    status=int(status),
                    error=_classify(int(status)),
                )
            )
            log.info(
                "delivery.instance",
                destination=where,
                sop_instance_uid=sop_uid,
                status=f"0x{int(status):04X}",
                ok=results[-1].ok,
            )
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def check_results(results: Sequence[DeliveryResult]) -> None:
    """Raise if any instance was not stored: TransientError first, since a retry re-sends all.

    :param results: The results of :func:`deliver`.
    :raises TransientError: if any failure may pass on a retry.
    :raises PermanentError: if all failures are definitive.
    """
    failed = [r for r in results if not r.ok]
    if not failed:
        return
    summary = "; ".join(f"{r.sop_instance_uid}: {r.error}" for r in failed)
    if any(r.retryable for r in failed):
        raise TransientError(f"{len(failed)} of {len(results)} instances not stored: {summary}")
    raise PermanentError(f"{len(failed)} of {len(results)} instances refused: {summary}")
