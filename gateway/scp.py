"""Builds the Storage and Verification SCP: presentation contexts, limits, TLS and the caller allow-list."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import structlog
from pydicom import uid as ts
from pynetdicom import AE, evt, sop_class
from pynetdicom.service_class import StorageServiceClass
from pynetdicom import _config as pynetdicom_config
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
