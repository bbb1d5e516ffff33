"""Builds the Storage and Verification SCP: contexts, limits, TLS, the caller allow-list and the receive path.

The receive path is pynetdicom's own, on its public API: event handlers, the chunked data set
receive (``STORE_RECV_CHUNKED_DATASET``: each data set streams to a file in the spool's file
system, never into memory) and the documented subclasses in :mod:`gateway.edge`, which bound what
a peer can make the gateway hold (PDU sizes and deadlines, TLS handshakes, associations per host).
"""

from __future__ import annotations

import ssl
import threading
from typing import Any, cast

import structlog
from pydicom import uid as ts
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt, register_uid
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from gateway.edge import (
    EarlyWriteback,
    EdgeAE,
    EdgeServer,
    PduLimits,
    association_spool_dirs,
    bound_pdus,
    install_tempdir,
    route_unrecognised_store,
)
from gateway.errors import StartupError
from gateway.handlers import StoreHandler, handle_conn_open, handle_echo, log_rejection
from gateway.journal import Journal
from gateway.settings import GatewaySettings
from gateway.spool import Spool

log = structlog.get_logger(__name__)

VERIFICATION = "1.2.840.10008.1.1"

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

#: Retired storage SOP classes that DCMTK's storescp accepts and pynetdicom's storage list lacks.
#: Older ultrasound units still send the retired US classes, and the US plugin reads them.
RETIRED_STORAGE_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.1.27": "StoredPrintStorageRetired",
    "1.2.840.10008.5.1.1.29": "HardcopyGrayscaleImageStorageRetired",
    "1.2.840.10008.5.1.1.30": "HardcopyColorImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.3": "UltrasoundMultiFrameImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.5": "NuclearMedicineImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.6": "UltrasoundImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.8": "StandaloneOverlayStorageRetired",
    "1.2.840.10008.5.1.4.1.1.9": "StandaloneCurveStorageRetired",
    "1.2.840.10008.5.1.4.1.1.10": "StandaloneModalityLUTStorageRetired",
    "1.2.840.10008.5.1.4.1.1.11": "StandaloneVOILUTStorageRetired",
    "1.2.840.10008.5.1.4.1.1.12.3": "XRayAngiographicBiPlaneImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.77.1": "VLImageStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.77.2": "VLMultiFrameImageStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.88.1": "TextSRStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.88.2": "AudioSRStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.88.3": "DetailSRStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.88.4": "ComprehensiveSRStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.129": "StandalonePETCurveStorageRetired",
}

#: Every standard storage SOP class pynetdicom knows (Enhanced/multi-frame and SR included) and
#: the retired ones above.
STANDARD_STORAGE_CLASSES: tuple[str, ...] = tuple(
    sorted({str(cx.abstract_syntax) for cx in AllStoragePresentationContexts} | set(RETIRED_STORAGE_CLASSES))
)

_register_lock = threading.Lock()


def _register_storage(uid: str, keyword: str) -> None:
    """Route C-STOREs of *uid* to pynetdicom's Storage service (its documented ``register_uid``)."""
    with _register_lock:
        if not issubclass(uid_to_service_class(uid), StorageServiceClass):
            register_uid(uid, keyword, StorageServiceClass)


def storage_sop_classes(settings: GatewaySettings) -> tuple[str, ...]:
    """The SOP classes we accept: all standard storage classes (retired too) and configured private ones."""
    for uid, keyword in RETIRED_STORAGE_CLASSES.items():
        _register_storage(uid, keyword)
    private = tuple(u for u in settings.private_sop_classes if u not in STANDARD_STORAGE_CLASSES)
    for index, uid in enumerate(private):
        _register_storage(uid, f"PrivateStorage{index}")
    return STANDARD_STORAGE_CLASSES + private


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


def build_ae(settings: GatewaySettings) -> EdgeAE:
    """An AE with our limits and every storage context we accept, plus Verification."""
    ae = EdgeAE(settings.ae_title, settings.allowed_callers, settings.max_associations_per_host)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.require_called_aet = True
    for sop in storage_sop_classes(settings):
        ae.add_supported_context(sop, list(ACCEPTED_TRANSFER_SYNTAXES))
    ae.add_supported_context(VERIFICATION)
    return ae


def start_scp(
    settings: GatewaySettings,
    spool: Spool,
    journal: Journal,
    stat_keywords: tuple[str, ...] = (),
    *,
    reuse_port: bool = False,
) -> tuple[EdgeAE, EdgeServer]:
    """Start a non-blocking Storage/Verification SCP and return ``(ae, server)``.

    :raises StartupError: if the port cannot be bound or TLS files cannot be read.
    """
    # pynetdicom's documented configuration switch (pynetdicom._config is its configuration
    # module, set as its documentation shows): stream every received data set to a file in the
    # spool's file system instead of memory, so a multi-GB object costs no RAM and the final
    # rename is atomic.  No other name of that module is touched.
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    tempdir, remove_association_folder = association_spool_dirs(spool.incoming)
    install_tempdir(tempdir)
    writeback = EarlyWriteback(tempdir)
    ae = build_ae(settings)
    limits = PduLimits(
        max_pdu_size=settings.max_pdu_size,
        request_deadline=settings.acse_timeout,
        pdu_deadline=settings.network_timeout,
    )
    store = StoreHandler(
        spool,
        journal,
        stat_keywords,
        accepted_sop_classes=storage_sop_classes(settings),
        inflate_budget=settings.max_inflated_size,
    )
    handlers: list[Any] = [
        (evt.EVT_C_STORE, store),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_CONN_OPEN, bound_pdus(limits)),
        (evt.EVT_CONN_OPEN, handle_conn_open),
        (evt.EVT_DIMSE_RECV, route_unrecognised_store),
        (evt.EVT_PDU_RECV, writeback.on_pdu),
        (evt.EVT_CONN_CLOSE, writeback.forget),
        (evt.EVT_REJECTED, log_rejection),
        (evt.EVT_ABORTED, remove_association_folder),
        (evt.EVT_CONN_CLOSE, remove_association_folder),
    ]
    server_class = type(
        "EdgeServerForGateway",
        (EdgeServer,),
        {"reuse_port": reuse_port, "handshake_timeout": settings.acse_timeout},
    )
    try:
        server = ae.make_server(
            (settings.host, settings.port),
            ssl_context=build_ssl_context(settings),
            evt_handlers=handlers,
            server_class=server_class,
        )
    except OSError as exc:
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from exc
    thread = threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True)
    thread.start()
    return ae, cast(EdgeServer, server)
