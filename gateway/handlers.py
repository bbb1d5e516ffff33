"""pynetdicom event handlers: C-STORE into the durable spool, C-ECHO, and connection hygiene."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from pydicom.dataset import Dataset

from gateway.errors import PermanentError, failure_reason
from gateway.inflate import DEFAULT_INFLATE_BUDGET, InflateBudgetExceeded, read_header
from gateway.journal import InstanceRecord, Journal, StoreOutcome
from gateway.messages import Priority
from gateway.provenance import is_own_output
from gateway.spool import Spool, file_digest, fsync_path, uid_problem

if TYPE_CHECKING:
    from pynetdicom.events import Event

log = structlog.get_logger(__name__)
# structlog renders an event (timestamp included) before the stdlib level filter drops it; the
# per-instance success line is skipped up front when INFO is off, as it is in production.
_stdlib_log = logging.getLogger(__name__)

#: Storage statuses we return (PS3.4 Annex B.2.3; 0xCxxx is "Error: cannot understand").
STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_INVALID_UID = 0xC220
STATUS_UID_MISMATCH = 0xC221
STATUS_PROCESSING_FAILURE = 0x0110
#: The reason each refusal is counted under in the journal's ``refusals`` table (and /metrics).
_REFUSAL_REASONS = {
    STATUS_SOP_CLASS_NOT_SUPPORTED: "sop_class_not_supported",
    STATUS_OUT_OF_RESOURCES: "out_of_resources",
    STATUS_CANNOT_UNDERSTAND: "undecodable",
    STATUS_INVALID_UID: "invalid_uid",
    STATUS_UID_MISMATCH: "uid_mismatch",
}
#: Every status the Storage SCP returns, with its meaning (the conformance statement prints this table).
STORE_STATUSES: tuple[tuple[int, str], ...] = (
    (
        STATUS_SUCCESS,
        "Success: the instance is on disk (fsynced, atomically renamed) and in the journal; also "
        "returned for a repeat of an instance already held",
    ),
    (STATUS_SOP_CLASS_NOT_SUPPORTED, "Refused: the C-STORE's SOP class is not one the gateway accepts"),
    (
        STATUS_OUT_OF_RESOURCES,
        "Refused, out of resources: free space below the disk watermark, or the write failed",
    ),
    (
        STATUS_CANNOT_UNDERSTAND,
        "Error, cannot understand: the data set cannot be decoded (its bytes are quarantined)",
    ),
    (STATUS_INVALID_UID, "Error: Study, Series or SOP Instance UID missing or not a valid UID"),
    (STATUS_UID_MISMATCH, "Error: the data set's SOP Instance UID differs from the C-STORE request's"),
    (0xC211, "Error: any other failure while storing"),  # pynetdicom's status when a handler raises
)


@dataclass(eq=False)
class _Pending:
    """One instance waiting for its group commit."""

    record: InstanceRecord
    outcome: StoreOutcome
    done: bool = False
    committed: bool = False
    version: int = 0
    error: BaseException | None = None


class GroupCommit:
    """Commits the journal rows of concurrent C-STOREs together: one transaction, one WAL fsync.

    Each receiving thread has already made its file durable under its final name (file fsync,
    rename, directory fsync: those run in parallel, one per thread).  Threads that arrive while a
    commit is running queue up; when it ends, one of them commits the whole queue.  A lone thread
    commits its own row at once, so a single association pays no extra latency.

    :param journal: Where the rows go.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._busy = False

    def submit(self, record: InstanceRecord, outcome: StoreOutcome) -> int:
        """Block until *record* is committed and return its study version.

        :raises sqlite3.Error: if the journal refused the row.
        """
        item = _Pending(record, outcome)
        with self._cond:
            self._queue.append(item)
            while self._busy and not item.done:
                self._cond.wait()
            batch: list[_Pending] = []
            if not item.done:
                self._busy = True
                batch, self._queue = self._queue, []
        if batch:
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error
        return item.version

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            versions = self.journal.record_instances([(item.record, item.outcome) for item in batch])
            for item, version in zip(batch, versions, strict=True):
                item.version, item.committed = version, True
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
            else:
                # One bad row must not fail its neighbours: retry them one transaction each.
                for item in batch:
                    try:
                        item.version = self.journal.record_instance(item.record, item.outcome)
                        item.committed = True
                    except Exception as single:  # reported to that item's own thread
                        item.error = single
        finally:
            for item in batch:
                # Version 0 is a valid answer (our own output of a study the gateway does not hold).
                if not item.committed and item.error is None:
                    item.error = RuntimeError("the journal commit was interrupted")
                item.done = True


@dataclass(frozen=True, slots=True)
class _Described:
    """The header values the journal and the triage priority use, decoded once."""

    modality: str
    laterality: str
    view: str
    presentation: str
    study_description: str
    requested_priority: str

    @classmethod
    def of(cls, header: Dataset) -> _Described:
        return cls(
            modality=str(header.get("Modality", "") or ""),
            laterality=str(header.get("ImageLaterality", "") or header.get("Laterality", "") or "").upper(),
            view=_view_of(header),
            presentation=str(header.get("PresentationIntentType", "") or "").upper(),
            study_description=str(header.get("StudyDescription", "") or "").upper(),
            requested_priority=str(header.get("RequestedProcedurePriority", "") or "").upper(),
        )


def _view_of(ds: Dataset) -> str:
    view = str(ds.get("ViewPosition", "") or "")
    if not view and ds.get("ViewCodeSequence"):
        meaning = str(ds.ViewCodeSequence[0].get("CodeMeaning", "")).lower()
        view = {"cranio-caudal": "CC", "medio-lateral oblique": "MLO"}.get(meaning, meaning.upper())
    return view.upper()


class StoreHandler:
    """The ``evt.EVT_C_STORE`` handler: spool, fsync, journal, then acknowledge.

    It returns one of :data:`STORE_STATUSES`.

    :param spool: Where files go.
    :param journal: Where their state is recorded.
    :param stat_keywords: Study descriptions containing one of these words are queued as STAT.
    :param accepted_sop_classes: The SOP classes we store; ``None`` stores any.
    :param inflate_budget: The most bytes a deflated data set may inflate to.
    """

    def __init__(
        self,
        spool: Spool,
        journal: Journal,
        stat_keywords: tuple[str, ...] = (),
        accepted_sop_classes: tuple[str, ...] | None = None,
        inflate_budget: int = DEFAULT_INFLATE_BUDGET,
    ) -> None:
        self.spool = spool
        self.journal = journal
        self.accepted_sop_classes = (
            frozenset(accepted_sop_classes) if accepted_sop_classes is not None else None
        )
        self.inflate_budget = inflate_budget
        self.stat_keywords = tuple(k.upper() for k in stat_keywords)
        self.group_commit = GroupCommit(journal)

    def __call__(self, event: Event) -> int:
        started = time.perf_counter()
        request = event.request
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(calling_ae=calling_ae, peer=event.assoc.requestor.address)
        temp_path = Path(event.dataset_path)
        status = STATUS_PROCESSING_FAILURE
        try:
            status = self._store(event, temp_path, calling_ae, request, started)
            return status
        finally:
            if status != STATUS_SUCCESS:
                self._count_refusal(status)
            # Whatever happened, no partial file stays in incoming/ (pynetdicom unlinks it too,
            # but only by the name it knows, which we may have moved).
            temp_path.unlink(missing_ok=True)

    def _store(self, event: Event, temp_path: Path, calling_ae: str, request: Any, started: float) -> int:
        requested_class = str(getattr(request, "AffectedSOPClassUID", "") or "")
        if self.accepted_sop_classes is not None and requested_class not in self.accepted_sop_classes:
            log.warning(
                "store.refused", reason="sop_class_not_supported", status=hex(STATUS_SOP_CLASS_NOT_SUPPORTED)
            )
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        if self.spool.disk_status().below_watermark:
            log.warning("store.refused", reason="disk_watermark", status=hex(STATUS_OUT_OF_RESOURCES))
            return STATUS_OUT_OF_RESOURCES
        try:
            # The whole header, not just the tags we use: pydicom reads leniently, and a dataset
            # without SOP Class and Instance UIDs is one we cannot understand.  A deflated data
            # set is inflated as a stream under the budget, never whole.
            header = read_header(temp_path, self.inflate_budget)
            transfer_syntax = str(header.file_meta.TransferSyntaxUID)
            missing = [name for name in ("SOPClassUID", "SOPInstanceUID") if name not in header]
            if missing:
                raise PermanentError(f"no {' or '.join(missing)} in the data set")
            uids = {
                name: header.get(name)
                for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
            }
            # Decoded here, where a malformed value is a 0xC210, not later as a crash after the rename.
            described = _Described.of(header)
            own_output = is_own_output(header)
        except InflateBudgetExceeded:
            log.warning(
                "store.refused",
                reason="inflate_budget",
                budget=self.inflate_budget,
                status=hex(STATUS_OUT_OF_RESOURCES),
            )
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # any decode failure of untrusted bytes is a 0xC210, never a crash
            # The note is read by people and kept: pydicom's message may quote the data set's values.
            where = self.spool.quarantine(
                temp_path, failure_reason("undecodable", exc), {"calling_ae": calling_ae}
            )
            log.warning(
                "store.refused",
                reason="undecodable",
                error=type(exc).__name__,
                quarantined=where.name,
                status=hex(STATUS_CANNOT_UNDERSTAND),
            )
            return STATUS_CANNOT_UNDERSTAND
        for name, value in uids.items():
            if problem := uid_problem(value):
                log.warning(
                    "store.refused",
                    reason="invalid_uid",
                    element=name,
                    problem=problem,
                    status=hex(STATUS_INVALID_UID),
                )
                return STATUS_INVALID_UID
        study_uid, series_uid, sop_uid, _ = (str(v) for v in uids.values())
        if sop_uid != str(request.AffectedSOPInstanceUID):
            log.warning("store.refused", reason="uid_mismatch", status=hex(STATUS_UID_MISMATCH))
            return STATUS_UID_MISMATCH

        final_path = self.spool.instance_path(study_uid, sop_uid)
        outcome = StoreOutcome.NEW
        size = temp_path.stat().st_size
        try:
            # Now, while the bytes just written are in the page cache; hashlib releases the GIL.
            content_digest = file_digest(temp_path)
            # The file test first: it is a stat, and it spares new instances a journal query.
            if final_path.exists() and (held := self.journal.find_instance(sop_uid)) is not None:
                # A row from before digests were kept has none: hash the stored copy then.
                held_digest = str(held["content_digest"] or "") or file_digest(final_path)
                outcome = StoreOutcome.DUPLICATE if held_digest == content_digest else StoreOutcome.REPLACED
            if outcome is not StoreOutcome.DUPLICATE:
                # fsync, rename, fsync the folders: each thread its own, so concurrent
                # associations' flushes overlap instead of queueing behind one another.
                for directory in self.spool.place(temp_path, final_path):
                    fsync_path(directory)
        except OSError as exc:
            log.error(
                "store.refused", reason="write_failed", error=str(exc), status=hex(STATUS_OUT_OF_RESOURCES)
            )
            return STATUS_OUT_OF_RESOURCES

        record = InstanceRecord(
            sop_uid=sop_uid,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_class_uid=str(uids["SOPClassUID"] or request.AffectedSOPClassUID),
            transfer_syntax=transfer_syntax,
            modality=described.modality,
            laterality=described.laterality,
            view=described.view,
            presentation=described.presentation,
            path=self.spool.relative(final_path),
            size=size,
            calling_ae=calling_ae,
            priority=int(self._priority(request, described)),
            content_digest=content_digest,
            own_output=own_output,
        )
        # The journal commit (its WAL fsync) is shared with concurrent associations.
        version = self.group_commit.submit(record, outcome)
        if own_output:
            log.info(
                "store.own_output",
                outcome=str(outcome),
                study_version=version,
                sop_class_uid=record.sop_class_uid,
                detail="stored; it opens no study version and starts no analysis",
            )
        if _stdlib_log.isEnabledFor(logging.INFO):
            log.info(
                "store.received",
                outcome=str(outcome),
                study_version=version,
                bytes=size,
                modality=record.modality,
                ms=round(1000 * (time.perf_counter() - started), 2),
            )
        return STATUS_SUCCESS

    def _count_refusal(self, status: int) -> None:
        # For /metrics; a journal that cannot count must not change the status the peer gets.
        try:
            self.journal.record_refusal(_REFUSAL_REASONS.get(status, "processing_failure"))
        except Exception as exc:
            log.warning("store.refusal_not_counted", error=str(exc))

    def _priority(self, request: Any, described: _Described) -> Priority:
        priority = Priority.from_dimse(int(getattr(request, "Priority", 0) or 0))
        if described.requested_priority == "STAT" or any(
            word in described.study_description for word in self.stat_keywords
        ):
            priority = Priority.STAT
        return priority


def handle_echo(event: Event) -> int:
    """``evt.EVT_C_ECHO``: Verification always succeeds while the gateway runs."""
    return STATUS_SUCCESS


def handle_conn_open(event: Event) -> None:
    """``evt.EVT_CONN_OPEN``: turn Nagle off and give the accepted socket the network timeout.

    Without TCP_NODELAY small C-STOREs wait ~40 ms for delayed ACKs.  The timeout bounds sends
    to a peer that stops reading; reads have their own per-PDU deadlines (gateway.edge).
    """
    raw = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(event.assoc.ae.network_timeout)
        except OSError:
            pass


def log_rejection(event: Event) -> None:
    """``evt.EVT_REJECTED``: say which caller was turned away (no reason here: pynetdicom logs it)."""
    log.warning(
        "association.rejected",
        calling_ae=str(event.assoc.requestor.ae_title).strip(),
        peer=event.assoc.requestor.address,
    )
