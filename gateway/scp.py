"""Builds the Storage and Verification SCP: contexts, limits, TLS, the caller allow-list and the receive path.

The receive path keeps pynetdicom for association negotiation, TLS, release and abort, and
replaces what costs time per instance: the 1 ms polling loops (event-driven reactors) and, for
C-STOREs over plain TCP, pynetdicom's per-PDU objects (the lean C-STORE path).  See
``benchmarks/gateway/README.md`` for what each part buys.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import select
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydicom import uid as ts
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt, sop_class
from pynetdicom import _config as pynetdicom_config
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import ThreadedAssociationServer

from gateway.errors import StartupError
from gateway.handlers import StoreHandler, discard_partial_receive, handle_conn_open, handle_echo
from gateway.journal import Journal
from gateway.settings import AllowedCaller, GatewaySettings
from gateway.spool import Spool

log = structlog.get_logger(__name__)

#: Accepted as received and stored as received: we never transcode on ingest.
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ts.ExplicitVRLittleEndian,
    ts.ImplicitVRLittleEndian,
    ts.DeflatedExplicitVRLittleEndian,
    ts.ExplicitVRBigEndian,
    ts.JPEGBaseline8Bit,
    ts.JPEGExtended12Bit,
    ts.JPEGLossless,
    ts.JPEGLosslessSV1,
    ts.JPEGLSLossless,
    ts.JPEGLSNearLossless,
    ts.JPEG2000Lossless,
    ts.JPEG2000,
    ts.HTJ2KLossless,
    ts.HTJ2KLosslessRPCL,
    ts.HTJ2K,
    ts.RLELossless,
)

#: Every standard storage SOP class pynetdicom knows, Enhanced/multi-frame and SR included.
STANDARD_STORAGE_CLASSES: tuple[str, ...] = tuple(sorted(set(sop_class._STORAGE_CLASSES.values())))

# A-ASSOCIATE-RJ: rejected-permanent, service-user, "calling AE title not recognized" (PS3.8 §9.3.4).
_REJECT_UNKNOWN_CALLER = (0x01, 0x01, 0x03)


def storage_sop_classes(settings: GatewaySettings) -> tuple[str, ...]:
    """The SOP classes we accept: all standard storage classes plus configured private ones."""
    private = tuple(u for u in settings.private_sop_classes if u not in STANDARD_STORAGE_CLASSES)
    for index, uid in enumerate(private):
        # pynetdicom routes a C-STORE only for SOP classes it knows the service class of.
        if uid not in sop_class._STORAGE_CLASSES.values():
            sop_class.register_uid(uid, f"PrivateStorage{index}", StorageServiceClass)
    return STANDARD_STORAGE_CLASSES + private


def caller_allowed(allowed: tuple[AllowedCaller, ...] | None, calling_ae: str, peer_host: str) -> bool:
    """Whether a calling AE title from *peer_host* may associate. ``None`` allows everyone."""
    if allowed is None:
        return True
    for entry in allowed:
        if entry.ae_title.strip() != calling_ae.strip():
            continue
        if not entry.hosts:
            return True
        try:
            peer = ipaddress.ip_address(peer_host)
        except ValueError:
            continue
        if any(peer in ipaddress.ip_network(h, strict=False) for h in entry.hosts):
            return True
    return False


def _guard_callers(allowed: tuple[AllowedCaller, ...] | None) -> Callable[[Any], None]:
    """An ``EVT_CONN_OPEN`` handler that makes this association check the allow-list with the peer's host.

    pynetdicom's own ``require_calling_aet`` checks titles only; host checks need the peer
    address, so the acceptor's negotiation step is wrapped for this one association.
    """

    def on_open(event: Any) -> None:
        handle_conn_open(event)
        make_event_driven(event.assoc)
        if allowed is None:
            return
        assoc = event.assoc
        acse = assoc.acse
        negotiate = acse._negotiate_as_acceptor
        peer_host = str(event.address[0]) if event.address else ""

        def checked_negotiation() -> None:
            calling = str(acse.requestor.primitive.calling_ae_title).strip()
            if caller_allowed(allowed, calling, peer_host):
                negotiate()
                return
            log.warning("association.rejected", reason="calling AE title not recognised",
                        calling_ae=calling, peer=peer_host)
            acse.send_reject(*_REJECT_UNKNOWN_CALLER)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()

        acse._negotiate_as_acceptor = checked_negotiation

    return on_open


# ------------------------------------------------------------------ event-driven reactors
#
# pynetdicom's acceptor runs two polling loops per association: the DUL thread and the
# association thread each sleep 1 ms whenever they find nothing to do.  Every C-STORE therefore
# waits about 1 ms for the association thread to notice the decoded message and about 1 ms more
# for the DUL thread to send the response, and the loops burn CPU at 1 kHz per thread, which a
# 2-core machine with several associations feels.  The functions below keep pynetdicom's state
# machine, ACSE and DIMSE code, and replace only the waiting: each thread blocks until there is
# work (socket data, a primitive to send, a decoded message or a release/abort) and is woken by
# the thread that queued it.  They rely on private attributes of pynetdicom's DUL and Association;
# when those are missing (another pynetdicom version), the association keeps pynetdicom's loops.

#: Largest single read outside the lean path (negotiation, release, TLS associations).
_RECV_CHUNK = 1 << 20
#: Longest a reactor blocks without news: timers (ARTIM, network idle) are checked at this pace.
_REACTOR_TICK = 0.05
_REQUIRED_ASSOC = ("_run_reactor", "_reactor_checkpoint", "_kill", "dimse", "acse", "dul")
_REQUIRED_DUL = ("_process_recv_primitive", "_is_transport_event", "artim_timer", "_idle_timer",
                 "state_machine", "event_queue", "to_provider_queue", "to_user_queue", "_kill_thread",
                 "socket")
# pynetdicom's loggers, so that these loops log what the loops they replace would have logged.
_DUL_LOG = logging.getLogger("pynetdicom.dul")
_ASSOC_LOG = logging.getLogger("pynetdicom.association")
_HANDLER_LOG = logging.getLogger("pynetdicom.service_class")
#: Put on the DIMSE message queue to wake the association thread; pynetdicom reads it as "no message".
_WAKE = (None, None)


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls *wake* after every put, so a thread blocked elsewhere notices the item."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


def make_event_driven(assoc: Any) -> bool:
    """Replace the polling of one not-yet-started acceptor association with blocking waits.

    :param assoc: The ``Association`` from ``EVT_CONN_OPEN``, before its threads start.
    :returns: Whether the association was changed (False on an unknown pynetdicom layout).
    """
    dul = getattr(assoc, "dul", None)
    if not all(hasattr(assoc, a) for a in _REQUIRED_ASSOC) or not all(hasattr(dul, a) for a in _REQUIRED_DUL):
        return False
    if getattr(dul.socket, "socket", None) is None or dul.is_alive():
        return False
    wake_reader, wake_writer = socket.socketpair()
    wake_reader.setblocking(False)
    wake_writer.setblocking(False)

    def wake_dul() -> None:
        try:
            wake_writer.send(b"\0")
        except OSError:  # buffer full (a wake is pending anyway) or already closed
            pass

    def kill_dul() -> None:
        dul._kill_thread = True
        wake_dul()

    dul.to_provider_queue = _WakingQueue(wake_dul)
    dul.to_user_queue = _WakingQueue(lambda: assoc.dimse.msg_queue.put(_WAKE))
    dul.kill_dul = kill_dul
    dul.run = types.MethodType(_dul_reactor(wake_reader, wake_writer), dul)
    dul.socket.recv = types.MethodType(_recv_exactly, dul.socket)
    assoc._run_reactor = types.MethodType(_association_reactor, assoc)
    return True


def _recv_exactly(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with ``recv_into`` calls of up to 1 MiB instead of a 4 KiB read loop.

    Like the original, it returns what it has when the peer closes the connection, and its memory
    grows with the bytes that actually arrive, never with the length a peer claims.
    """
    received = bytearray()
    chunk = bytearray(min(nr_bytes, _RECV_CHUNK))
    view = memoryview(chunk)
    raw = self.socket
    try:
        while len(received) < nr_bytes:
            count = raw.recv_into(view, min(len(chunk), nr_bytes - len(received)))
            if not count:
                break
            received += view[:count]
    finally:
        view.release()
    return received


def _dul_reactor(wake_reader: socket.socket, wake_writer: socket.socket) -> Callable[[Any], None]:
    """The DUL thread's loop: pynetdicom's steps, but it blocks in ``select`` when idle."""

    def run(dul: Any) -> None:
        assoc = dul.assoc
        dul._idle_timer.start()
        lean: _LeanStore | None = None
        lean_decided = False
        try:
            while True:
                if not assoc._dul_ready.is_set():
                    assoc._dul_ready.set()
                if dul._kill_thread:
                    break
                if dul.artim_timer.expired:
                    dul.event_queue.put("Evt18")
                try:
                    # Either send one queued primitive or read one PDU per turn, as pynetdicom does.
                    if not lean_decided and dul.state_machine.current_state == "Sta6":
                        lean, lean_decided = _lean_store_for(assoc), True
                    if dul._process_recv_primitive():
                        pass
                    elif lean is not None and lean.enabled and dul.state_machine.current_state == "Sta6":
                        if lean.poll():
                            dul._idle_timer.restart()
                    elif dul._is_transport_event():
                        dul._idle_timer.restart()
                except Exception as exc:  # pynetdicom's own policy: abort the association
                    _DUL_LOG.error("Exception in DUL.run(), aborting association")
                    _DUL_LOG.exception(exc)
                    abort = A_ABORT_RQ()
                    abort.source, abort.reason_diagnostic = 0x02, 0x00
                    with contextlib.suppress(OSError):
                        dul.socket.send(abort.encode())
                    assoc.is_aborted, assoc.is_established = True, False
                    assoc._kill, dul._kill_thread = True, True
                    return
                try:
                    event = dul.event_queue.get(block=False)
                except queue.Empty:
                    _wait_for_work(dul, wake_reader)
                    continue
                dul.state_machine.do_action(event)
        finally:
            if lean is not None:
                lean.discard()
            wake_reader.close()
            wake_writer.close()

    return run


def _wait_for_work(dul: Any, wake_reader: socket.socket) -> None:
    """Block until the peer sends data, a primitive is queued to send, or a timer tick passes."""
    if not dul.to_provider_queue.empty():
        return
    raw = getattr(dul.socket, "socket", None)
    watched: list[Any] = [wake_reader]
    if raw is not None and getattr(dul.socket, "_is_connected", False):
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes already buffered: select would not see them
        watched.append(raw)
    try:
        readable, _, _ = select.select(watched, [], [], _REACTOR_TICK)
    except (OSError, ValueError):  # the socket was closed under us; the state machine will notice
        readable = []
        time.sleep(0.001)
    if wake_reader in readable:
        with contextlib.suppress(OSError):
            while wake_reader.recv(4096):
                pass


# ------------------------------------------------------------------ the lean C-STORE path
#
# Once the association is established (state Sta6), the DUL thread reads P-DATA-TF PDUs itself
# when they carry a C-STORE-RQ on an accepted storage context: the data set fragments go straight
# from one reused buffer into the spool file, the StoreHandler runs in this thread, and the
# C-STORE-RSP is encoded and sent here.  Per instance this skips pynetdicom's PDU objects, state
# machine, DIMSE message decoding, event dispatch, thread hand-offs and pydicom encoding of the
# response, which together cost more CPU than the store itself.  Every other PDU (release, abort,
# C-ECHO and any other message) goes to pynetdicom as before, and anything unexpected switches the
# association back to pynetdicom for good.  TLS associations always use pynetdicom's path.

_P_DATA_TF = 0x04
_C_STORE_RQ, _C_STORE_RSP, _NO_DATA_SET = 0x0001, 0x8001, 0x0101
_STATUS_UNABLE_TO_PROCESS = 0xC211  # pynetdicom's status when the handler raises
_STATUS_INVALID_HANDLER_RESULT = 0xC002
_STATUS_OUT_OF_RESOURCES = 0xA700
#: A command set is a few hundred bytes; a longer one goes to pynetdicom rather than into our copies.
_MAX_LEAN_COMMAND = 1 << 16
#: Start writing a received data set to disk every this many bytes, while the rest still arrives.
_WRITEBACK_STEP = 1 << 20


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` from libc (Linux), or None."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, count: int) -> None:
        function(fd, offset, count, 2)  # SYNC_FILE_RANGE_WRITE: start writing, do not wait

    return start_writeback


#: Early writeback: by the time the last fragment arrives, most of a large object is on its way
#: to disk, so the fsync before the acknowledgement waits for the tail only.  The fsync stays
#: what makes the data durable; this only starts the writing sooner.
_start_writeback = _load_sync_file_range() if sys.platform.startswith("linux") else None


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _ui(uid: str) -> bytes:
    return _even(uid.encode("ascii"), b"\0")


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and group 0002 in explicit VR little endian, as pynetdicom writes them."""

    def short(element: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", 2, element, vr, len(value)) + value

    body = (struct.pack("<HH2sHI", 2, 0x0001, b"OB", 0, 2) + b"\0\1"
            + short(0x0002, b"UI", _ui(sop_class)) + short(0x0003, b"UI", _ui(sop_instance))
            + short(0x0010, b"UI", _ui(transfer_syntax))
            + short(0x0012, b"UI", _ui(str(PYNETDICOM_IMPLEMENTATION_UID)))
            + short(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" ")))
    return b"\0" * 128 + b"DICM" + short(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _parse_command(raw: bytes) -> dict[int, bytes] | None:
    """Group 0000 elements of an implicit VR little endian command set, or None if malformed."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    while offset + 8 <= end:
        group, element, length = struct.unpack_from("<HHI", raw, offset)
        offset += 8
        if group != 0 or offset + length > end:
            return None
        elements[element] = raw[offset:offset + length]
        offset += length
    return elements if offset == end else None


def _store_response(context_id: int, message_id: int, sop_class: bytes, sop_instance: bytes,
                    status: int) -> bytes:
    """A whole P-DATA-TF PDU holding a C-STORE-RSP command set (implicit VR little endian)."""
    elements = (
        (0x0002, sop_class),
        (0x0100, struct.pack("<H", _C_STORE_RSP)),
        (0x0120, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", _NO_DATA_SET)),
        (0x0900, struct.pack("<H", status)),
        (0x1000, sop_instance),
    )
    body = b"".join(struct.pack("<HHI", 0, tag, len(value)) + value for tag, value in elements)
    command = struct.pack("<HHII", 0, 0x0000, 4, len(body)) + body
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", _P_DATA_TF, 0, len(pdv)) + pdv


@dataclass(frozen=True, slots=True)
class FastStoreRequest:
    """The parts of a C-STORE-RQ that the store handler reads (as pynetdicom's ``C_STORE`` names them)."""

    MessageID: int
    AffectedSOPClassUID: str
    AffectedSOPInstanceUID: str
    Priority: int


@dataclass(frozen=True, slots=True)
class FastStoreEvent:
    """What :class:`StoreHandler` reads from pynetdicom's ``Event``, for a C-STORE on the lean path."""

    assoc: Any
    request: FastStoreRequest
    context: tuple[int, str, str]
    dataset_path: Path


class _LeanStore:
    """The lean C-STORE path of one association; used only from its DUL thread."""

    def __init__(self, assoc: Any, dul: Any, handler: StoreHandler) -> None:
        self.assoc, self.dul, self.handler = assoc, dul, handler
        self.enabled = True
        #: The maximum PDU length we announced; a longer P-DATA-TF is invalid.  It also bounds the
        #: buffer, which grows to the longest valid PDU length a peer announces.
        self.limit = int(assoc.acceptor.maximum_length)
        self.buffer = bytearray(min(self.limit, 1 << 16) + 6)
        self.command = bytearray()
        self.command_pdus: list[bytes] = []
        #: The command began in a PDU that also ended a lean C-STORE, so it cannot be replayed.
        self.command_mixed = False
        self.file: int | None = None
        self.path: Path | None = None
        self.written = 0
        self.flushed = 0
        self.failed_status: int | None = None
        self.message: tuple[int, int, bytes, bytes, FastStoreRequest] | None = None

    # -------------------------------------------------------------- reading

    def poll(self) -> bool:
        """Read one PDU if one is waiting; False when there was nothing to read."""
        dul = self.dul
        if not dul.socket.ready:
            return False
        raw = dul.socket.socket
        try:
            header = _peek_header(raw)
        except (OSError, TimeoutError):
            header = b""
        if len(header) == 6:
            kind, _, length = struct.unpack(">BBL", header)
            if kind == _P_DATA_TF and self.enabled and dul.state_machine.current_state == "Sta6":
                if length <= self.limit:
                    self._read_p_data(raw, length)
                    return True
                self.discard()
                dul.event_queue.put("Evt19")  # larger than the maximum we announced
                return True
        # Release, abort, garbage, a closed connection: pynetdicom's reader and state machine.
        if self.message is not None or self.command:
            self.discard()
        dul._read_pdu_data()
        return True

    def _read_p_data(self, raw: socket.socket, length: int) -> None:
        total = 6 + length
        if len(self.buffer) < total:
            self.buffer = bytearray(total)
        view = memoryview(self.buffer)
        try:
            received = 0
            while received < total:
                count = raw.recv_into(view[received:total], total - received)
                if not count:
                    break
                received += count
        except (OSError, TimeoutError):
            received = -1
        if received != total:
            view.release()
            _DUL_LOG.error("Connection closed before the entire PDU was received")
            self.discard()
            self.dul.event_queue.put("Evt17")
            return
        try:
            self._process(view, total)
        finally:
            view.release()

    def _process(self, view: memoryview, total: int) -> None:
        collecting = self.message is None
        if collecting:
            # Kept until the command is complete: if it is not one for this path, pynetdicom
            # gets these PDUs as they came.
            self.command_pdus.append(bytes(view[:total]))
        offset = 6
        while offset < total:
            if offset + 6 > total:
                return self._invalid()
            (item_length,) = struct.unpack_from(">L", view, offset)
            end = offset + 4 + item_length
            if item_length < 2 or end > total:
                return self._invalid()
            context_id, control = view[offset + 4], view[offset + 5]
            fragment = view[offset + 6:end]
            offset = end
            if control & 1:
                if self.message is not None:
                    return self._invalid()  # a command inside a data set
                if not self.command and not collecting:
                    self.command_mixed = True
                self.command += fragment
                if control & 2:
                    if not self._start(context_id):
                        return  # handed to pynetdicom, this PDU included
                elif len(self.command) > _MAX_LEAN_COMMAND:
                    return self._hand_over()  # not a command set this path knows; bounds our copies
            elif self.message is None:
                return self._invalid()  # a data set without its command
            else:
                self._write(fragment)
                if control & 2:
                    self._finish()

    def _hand_over(self) -> None:
        """Give the message begun in the kept PDUs to pynetdicom, and this association with it."""
        pdus, mixed = self.command_pdus, self.command_mixed
        self.command, self.command_pdus, self.command_mixed = bytearray(), [], False
        self.enabled = False
        if mixed:
            return self._invalid()  # its first PDU also ended a lean C-STORE: it cannot be replayed
        for pdu in pdus:
            try:
                decoded, event = self.dul._decode_pdu(bytearray(pdu))
            except Exception as exc:  # as pynetdicom's reader: an undecodable PDU is Evt19
                _DUL_LOG.error("Unable to decode the received PDU data")
                _DUL_LOG.exception(exc)
                self.dul.event_queue.put("Evt19")
                return None
            self.dul.event_queue.put(event)
            self.dul._recv_pdu.put(decoded)
        return None

    def _invalid(self) -> None:
        _DUL_LOG.error("Unable to decode the received PDU data")
        self.discard()
        self.dul.event_queue.put("Evt19")

    # -------------------------------------------------------------- one C-STORE

    def _start(self, context_id: int) -> bool:
        """A command set is complete: begin a lean C-STORE, or hand everything to pynetdicom."""
        command = bytes(self.command)
        elements = _parse_command(command)
        context = self.assoc._accepted_cx.get(context_id)
        try:
            # What pynetdicom would route to StorageServiceClass.SCP and so to our handler:
            # the service class follows the command's SOP Class UID.
            eligible = (
                elements is not None and context is not None and not self.assoc._sent_release
                and struct.unpack("<H", elements[0x0100])[0] == _C_STORE_RQ
                and struct.unpack("<H", elements[0x0800])[0] != _NO_DATA_SET
                and elements[0x0002].rstrip(b"\0 ") and elements[0x1000].rstrip(b"\0 ")
                and _is_storage(elements[0x0002].rstrip(b"\0 ").decode("ascii"), self.assoc)
            )
        except (KeyError, struct.error, UnicodeDecodeError):
            eligible = False
        if not eligible or elements is None or context is None:
            self._hand_over()
            return False
        self.command, self.command_pdus, self.command_mixed = bytearray(), [], False
        sop_class = elements[0x0002].rstrip(b"\0 ").decode("ascii", "replace")
        sop_instance = elements[0x1000].rstrip(b"\0 ").decode("ascii", "replace")
        request = FastStoreRequest(
            MessageID=struct.unpack("<H", elements[0x0110])[0] if len(elements.get(0x0110, b"")) == 2 else 0,
            AffectedSOPClassUID=sop_class, AffectedSOPInstanceUID=sop_instance,
            Priority=struct.unpack("<H", elements[0x0700])[0] if len(elements.get(0x0700, b"")) == 2 else 0,
        )
        self.message = (context_id, request.MessageID, elements[0x0002], elements[0x1000], request)
        self.failed_status = None
        try:
            fd, name = tempfile.mkstemp(suffix=".dcm", dir=self.handler.spool.incoming)
            self.file, self.path = fd, Path(name)
            self.written = os.write(fd, _file_meta(sop_class, sop_instance, str(context.transfer_syntax[0])))
            self.flushed = 0
        except OSError as exc:
            self._write_failed(exc)
        return True

    def _write(self, fragment: memoryview) -> None:
        if self.file is None:
            return  # an earlier write failed; the rest of the data set is read and dropped
        try:
            while fragment:
                count = os.write(self.file, fragment)
                fragment = fragment[count:]
                self.written += count
        except OSError as exc:
            self._write_failed(exc)
            return
        if _start_writeback is not None and self.written - self.flushed >= _WRITEBACK_STEP:
            _start_writeback(self.file, self.flushed, self.written - self.flushed)
            self.flushed = self.written

    def _write_failed(self, exc: OSError) -> None:
        log.error("store.refused", reason="write_failed", error=str(exc),
                  status=hex(_STATUS_OUT_OF_RESOURCES))
        self.discard_file()
        self.failed_status = _STATUS_OUT_OF_RESOURCES

    def _finish(self) -> None:
        if self.message is None:
            return
        context_id, message_id, sop_class, sop_instance, request = self.message
        self.message = None
        status = self.failed_status
        if status is None and self.file is not None:
            fd, self.file = self.file, None
            try:
                os.close(fd)
            except OSError as exc:
                self._write_failed(exc)
                status = self.failed_status
        if status is None and self.path is not None:
            context = self.assoc._accepted_cx[context_id]
            event = FastStoreEvent(self.assoc, request, (context_id, str(context.abstract_syntax),
                                                         str(context.transfer_syntax[0])), self.path)
            try:
                result = self.handler(event)
                status = result if isinstance(result, int) else _STATUS_INVALID_HANDLER_RESULT
            except Exception as exc:  # pynetdicom's policy for a raising handler
                _HANDLER_LOG.error("Exception in handler bound to 'evt.EVT_C_STORE'")
                _HANDLER_LOG.exception(exc)
                status = _STATUS_UNABLE_TO_PROCESS
            finally:
                self.discard_file()
        if status is None:
            status = _STATUS_UNABLE_TO_PROCESS
        if self.assoc.is_established:
            self.dul.socket.send(_store_response(context_id, message_id, sop_class, sop_instance, status))

    def discard_file(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                os.close(self.file)
            self.file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def discard(self) -> None:
        """Forget a half-received message: no partial file stays in the spool."""
        self.discard_file()
        self.message = None
        self.command = bytearray()
        self.command_pdus = []


def _peek_header(raw: socket.socket) -> bytes:
    """The next PDU's 6-byte header, left in the socket (fewer bytes at end of stream).

    ``MSG_WAITALL`` does not apply to ``MSG_PEEK`` on Linux, so a header split across two TCP
    segments is waited for here (rare: the header is 6 bytes at the start of a PDU).
    """
    header = raw.recv(6, socket.MSG_PEEK)
    deadline = time.monotonic() + (raw.gettimeout() or 60.0)
    while 0 < len(header) < 6 and time.monotonic() < deadline:
        time.sleep(0.0002)
        header = raw.recv(6, socket.MSG_PEEK)
    return header


def _is_storage(sop_class: str, assoc: Any) -> bool:
    """Whether pynetdicom would serve a C-STORE of *sop_class* with its Storage service class."""
    if getattr(pynetdicom_config, "UNRESTRICTED_STORAGE_SERVICE", False):
        return False  # pynetdicom maps every SOP class itself then
    if sop_class in getattr(assoc.acceptor, "accepted_common_extended", {}):
        return False  # so does SOP Class Common Extended Negotiation
    return issubclass(uid_to_service_class(sop_class), StorageServiceClass)


def _lean_store_for(assoc: Any) -> _LeanStore | None:
    """The lean path for *assoc*, when its C-STOREs go to our StoreHandler over plain TCP."""
    raw = getattr(assoc.dul.socket, "socket", None)
    if raw is None or isinstance(raw, ssl.SSLSocket) or not hasattr(socket, "MSG_PEEK"):
        return None
    if not getattr(getattr(assoc, "acceptor", None), "maximum_length", 0):
        return None  # an unlimited PDU size would leave the buffer unbounded
    if not all(hasattr(assoc, a) for a in ("_accepted_cx", "_sent_release", "acceptor")):
        return None
    if not all(hasattr(assoc.dul, a) for a in ("_decode_pdu", "_recv_pdu", "_read_pdu_data")):
        return None
    bound = assoc.get_handlers(evt.EVT_C_STORE)
    handler = bound[0] if isinstance(bound, tuple) and not bound[1] else None
    return _LeanStore(assoc, assoc.dul, handler) if isinstance(handler, StoreHandler) else None


def _association_reactor(self: Any) -> None:
    """The acceptor's loop: serve each decoded DIMSE message as soon as it is queued.

    The checks after the wait are pynetdicom's (release, abort, DUL gone, network timeout).
    """
    self._is_paused = False
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        try:
            context_id, msg = self.dimse.msg_queue.get(timeout=_REACTOR_TICK)
        except queue.Empty:
            context_id, msg = _WAKE
        if msg is not None:
            self._serve_request(msg, context_id)
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            _ASSOC_LOG.info("Association Released")
            self.is_released, self.is_established = True, False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            provider = " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else ""
            _ASSOC_LOG.info(f"Association Aborted{provider}")
            self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV subscribers see the abort
            self.is_aborted, self.is_established = True, False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return
        if not self.dul.is_alive():
            self.kill()
            return
        if self.dul.idle_timer_expired():
            _ASSOC_LOG.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


def build_ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if not tls.enabled:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
        if tls.ca_certificates:
            context.load_verify_locations(cafile=str(tls.ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load the gateway's TLS files: {exc}") from exc
    return context


def build_ae(settings: GatewaySettings) -> AE:
    """An AE with our limits and every storage context we accept, plus Verification."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.require_called_aet = True
    for sop in storage_sop_classes(settings):
        ae.add_supported_context(sop, list(ACCEPTED_TRANSFER_SYNTAXES))
    ae.add_supported_context(sop_class.Verification)
    return ae


class ReusePortServer(ThreadedAssociationServer):
    """An association server whose port several receiving processes can share (SO_REUSEPORT)."""

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def start_scp(settings: GatewaySettings, spool: Spool, journal: Journal,
              stat_keywords: tuple[str, ...] = (), *, reuse_port: bool = False) -> tuple[AE, Any]:
    """Start a non-blocking Storage/Verification SCP and return ``(ae, server)``.

    :raises StartupError: if the port cannot be bound or TLS files cannot be read.
    """
    # Stream every received dataset to a file in the spool's file system (bounded memory for
    # multi-GB tomosynthesis objects), so the final rename is atomic and nothing is transcoded.
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool.incoming)
    ae = build_ae(settings)
    handlers = [
        (evt.EVT_C_STORE, StoreHandler(spool, journal, stat_keywords)),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_CONN_OPEN, _guard_callers(settings.allowed_callers)),
        (evt.EVT_ABORTED, discard_partial_receive),
        (evt.EVT_CONN_CLOSE, discard_partial_receive),
    ]
    try:
        server = ae.make_server(
            (settings.host, settings.port),
            ssl_context=build_ssl_context(settings),
            evt_handlers=handlers,
            server_class=ReusePortServer if reuse_port else ThreadedAssociationServer,
        )
    except OSError as exc:
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from exc
    thread = threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True)
    thread.start()
    ae._servers.append(server)
    return ae, server
