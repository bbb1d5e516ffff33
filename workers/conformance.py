"""The DICOM conformance statement (PS3.2 outline, Markdown) generated from the running configuration.

Every fact comes from the code or the settings that decide it: the accepted SOP classes from
``gateway.scp.storage_sop_classes``, the transfer syntaxes from ``ACCEPTED_TRANSFER_SYNTAXES``,
the status tables from ``gateway.handlers.STORE_STATUSES`` and ``workers.pacs.DELIVERY_STATUSES``,
the delivery AE title from ``workers.pacs``, the version from the installed distribution, and
the limits, AE titles, allow-list and TLS from the settings, so the statement cannot drift from
what the gateway does.  ``pacs-triage conformance`` prints it; ``docs/conformance.md`` is the
statement of ``configs/default.yaml``.  The output is deterministic (no dates, no host names
but the configured ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pynetdicom
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time

from gateway import __version__
from gateway.handlers import STORE_STATUSES
from gateway.retry import delivery_policy
from gateway.scp import ACCEPTED_TRANSFER_SYNTAXES, storage_sop_classes
from gateway.settings import Settings, TLSSettings
from workers.cad_sr import MAMMOGRAPHY_CAD_SR_STORAGE
from workers.commitment import STORAGE_COMMITMENT_PUSH_MODEL
from workers.fhir import RESOURCE_PROFILE
from workers.notify import HL7_VERSION, MESSAGE_PROFILE
from workers.pacs import DELIVERY_STATUSES
from workers.supersede import KOS_SOP_CLASS_UID, REJECTED_FOR_QUALITY_REASONS
from workers.triage import CATEGORIES

PRODUCT = "pacs-triage"


def _name(uid: str) -> str:
    name = UID(uid).name
    if not name or name == uid:
        return "Private or unnamed SOP Class"
    return f"{name} (Retired)" if UID(uid).is_retired else name


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def _tls_text(tls: TLSSettings, *, server: bool) -> str:
    if not tls.enabled:
        return "off (plain TCP)"
    parts = ["on, TLS 1.2 or newer"]
    if server:
        parts.append(
            "client certificates required and verified against the configured CA (mutual TLS)"
            if tls.require_client_certificate
            else "client certificates not required"
        )
    else:
        parts.append(
            "the PACS certificate is verified against "
            + ("the configured CA" if tls.ca_certificates else "the system CA store")
        )
        if tls.certificate is not None:
            parts.append("our certificate is presented (mutual TLS)")
    return "; ".join(parts)


def _hl7_notifications(settings: Settings, add: Callable[[str], None]) -> None:
    """Section 6.1: the HL7 v2 messages that carry the triage flag to the RIS (HL7, not DICOM)."""
    notifications = settings.notifications
    add("### 6.1 HL7 v2 messages (triage notifications, MLLP client)\n")
    if notifications.hl7:
        add(
            _table(
                ("Endpoint", "Host", "Port", "Message", "ACK timeout"),
                [
                    (f"`{e.name}`", e.host, e.port, e.message, f"{e.timeout_seconds:g} s")
                    for e in notifications.hl7
                ],
            )
            + "\n"
        )
    else:
        add("No RIS endpoint is configured (`notifications.hl7`): no HL7 message is sent.\n")
    add(
        "- Message per endpoint (`notifications.hl7[].message`): ORU^R01, an unsolicited preliminary result "
        "(the default); or, for a RIS that takes AI flags as order updates, ORM^O01 or OMI^O23 (ORC-1 XO, "
        "the mapped priority in ORC-7 or TQ1-9). Each is keyed on the study's Accession Number (OBR-2/3, "
        "OBR-18) and Study Instance UID (ZDS-1, or IPC-3 in OMI^O23) and carries the triage category, risk, "
        "deciding model and mapped priority (OBX)."
    )
    add(
        "- MLLP framing: each message is sent as `<VT>` message `<FS><CR>` on its own TCP connection; the ACK "
        "comes back framed the same way on that connection."
    )
    high_only = notifications.notify == "high-risk"
    which = "only for studies triaged high" if high_only else "for every analysed study"
    add(
        f"- Sent {which} (`notifications.notify: {notifications.notify}`), one message per study version "
        "and endpoint, after the study's analysis, on the delivery queue at the study's priority, so the RIS "
        "hears of high-risk studies first."
    )
    add(
        f"- HL7 v{HL7_VERSION} over MLLP (plain TCP, one connection per message), built and parsed with "
        "python-hl7. The message waits for the original-mode ACK: MSA-1 AA (or CA) whose MSA-2 is our MSH-10 "
        f"counts as received; AE, AR, another control ID, no answer within the timeout or no connection is "
        f"retried ({delivery_policy(settings.delivery).describe()}) and then dead-lettered; dead letters can "
        "be replayed like the others."
    )
    add(
        "- Priority of each triage category: "
        + ", ".join(f"{category} {notifications.priority_for(category)}" for category in CATEGORIES)
        + ".\n"
    )
    add(
        _table(
            ("Message", "Segment", "Fields sent"),
            [
                (kind if kind != "common" else "all", segment, fields)
                for kind, rows in MESSAGE_PROFILE.items()
                for segment, fields in rows
            ],
        )
        + "\n"
    )


def _fhir_notifications(settings: Settings, add: Callable[[str], None]) -> None:
    """Section 6.2: the FHIR R4 resources that carry the triage flag to a FHIR server (HTTP, not DICOM)."""
    notifications = settings.notifications
    add("### 6.2 FHIR R4 resources (triage notifications, HTTP client)\n")
    if notifications.fhir:
        add(
            _table(
                ("Endpoint", "Base URL", "Timeout"),
                [(f"`{e.name}`", e.base_url, f"{e.timeout_seconds:g} s") for e in notifications.fhir],
            )
            + "\n"
        )
    else:
        add("No FHIR endpoint is configured (`notifications.fhir`): no FHIR resource is sent.\n")
    which = (
        "only for studies triaged high" if notifications.notify == "high-risk" else "for every analysed study"
    )
    add(
        f"- Sent {which} (`notifications.notify: {notifications.notify}`): one transaction Bundle per study "
        "version and endpoint, POSTed to the base URL as application/fhir+json, queued with the HL7 messages "
        "on the delivery queue at the study's priority. It holds a DiagnosticReport, an Observation and, for "
        "a study triaged high, a Flag, built and validated with the models of fhir.resources 8.0.0 (R4B "
        "models; the elements sent are the same in R4)."
    )
    add(
        "- No server ids: the patient, the order and the study are referenced by identifier only (Patient ID, "
        "Accession Number with type v2-0203 ACSN, Study Instance UID as urn:dicom:uid); our resources have "
        "urn:uuid full URLs, stable per study version, and are conditional creates (ifNoneExist)."
    )
    add(
        "- Any 2xx answer counts as accepted; another status (a redirect is not followed), no connection or no "
        f"answer within the timeout is retried ({delivery_policy(settings.delivery).describe()}) and then "
        "dead-lettered; dead letters can be replayed like the others.\n"
    )
    add(_table(("Resource", "Element", "Meaning"), [tuple(row) for row in RESOURCE_PROFILE]) + "\n")


def _commitment_and_supersede(settings: Settings, add: Callable[[str], None]) -> None:
    """Sections 4.1 and 4.2: Storage Commitment SCU and the IOCM rejection KOS."""
    delivery = settings.delivery
    committing = [d for d in delivery.destinations if d.storage_commitment]
    asked = ", ".join(
        f"`{d.ae_title}` (report awaited {d.commitment_timeout_seconds:g} s)" for d in committing
    )
    syntaxes = ", ".join(_name(ts) for ts in pynetdicom.DEFAULT_TRANSFER_SYNTAXES)
    add("### 4.1 Storage Commitment SCU\n")
    add(
        f"- SOP class: Storage Commitment Push Model (`{STORAGE_COMMITMENT_PUSH_MODEL}`), role SCU, "
        f"{syntaxes}; asked of {asked or 'no destination (set `storage_commitment: true` on one)'}."
    )
    add(
        "- After the C-STOREs, one N-ACTION (Action Type ID 1) on a new association, with a new "
        "Transaction UID and the Referenced SOP Sequence of every instance just stored."
    )
    add(
        f"- The report (N-EVENT-REPORT, Event Type ID 1 or 2) is accepted on a new association to AE "
        f"`{delivery.ae_title}` on port {delivery.commitment_port} (the PACS must know this AE title, host "
        "and port), or on the requesting association. A report for another Transaction UID is "
        "acknowledged and ignored."
    )
    add(
        "- The study is shown as committed once every output is in a report's Referenced SOP Sequence. A "
        "Failed SOP Sequence entry, no report within the timeout, or a PACS that refuses the association "
        "(one without Storage Commitment does) retries the whole delivery (same SOP Instance UIDs, new "
        "Transaction UID) with the delivery backoff, then dead-letters it.\n"
    )
    note = REJECTED_FOR_QUALITY_REASONS
    add("### 4.2 Superseding earlier results (IHE IOCM)\n")
    add(
        f"- {'On' if delivery.supersede else 'Off'} (`delivery.supersede`). When a newer version of a study "
        "is delivered and earlier outputs of ours in the PACS are not among its outputs (new images, another "
        f"model version or weights), one Key Object Selection Document (`{KOS_SOP_CLASS_UID}`, role SCU, "
        f"{_name(ExplicitVRLittleEndian)}) is C-STOREd into the study."
    )
    add(
        f'- Document Title (CID 7011): ({note.value}, {note.scheme_designator}, "{note.meaning}"); its '
        "content and Current Requested Procedure Evidence Sequence list every rejected SR and Secondary "
        "Capture instance. Its UIDs depend only on the study and the rejected instances, so a retry "
        "resends the same document.\n"
    )


def conformance_statement(settings: Settings) -> str:
    """The conformance statement of *settings* as Markdown.

    :param settings: The configuration the gateway and the workers run with.
    """
    gw = settings.gateway
    sop_classes = storage_sop_classes(gw)
    private = set(gw.private_sop_classes)
    out: list[str] = []
    add = out.append

    add(f"# DICOM Conformance Statement: {PRODUCT} {__version__}\n")
    source = Path(settings.source.split(" (with environment overrides")[0]).name
    overridden = " with environment overrides" if "(with environment overrides" in settings.source else ""
    add(
        f"Generated by `pacs-triage conformance` from the configuration `{source}`{overridden}; "
        "regenerate it after any configuration change. **Not a medical device: every object produced "
        "says NOT FOR DIAGNOSTIC USE.**\n"
    )

    add("## 1. Overview\n")
    add(
        f"{PRODUCT} is an AI gateway for breast imaging. It receives images from modalities or a PACS as a "
        "Storage SCP, runs the analysis models that apply, and sends the results back as a Comprehensive "
        "Structured Report, heatmap Secondary Capture images and, for a mammogram, a Mammography CAD SR as a "
        "Storage SCU.\n"
    )
    add(
        _table(
            ("Network service", "User of service (SCU)", "Provider of service (SCP)"),
            [
                ("Verification", "Yes (`pacs-triage echo`)", "Yes"),
                (f"Storage ({len(sop_classes)} SOP classes)", "No", "Yes"),
                ("Storage: Comprehensive SR, Secondary Capture, Mammography CAD SR (results)", "Yes", "No"),
                (
                    "Storage Commitment Push Model (results)",
                    "Yes, per destination with `storage_commitment: true` (receives N-EVENT-REPORT)",
                    "No",
                ),
                (
                    "Storage: Key Object Selection, IHE IOCM rejection of superseded results",
                    "Yes, with `delivery.supersede`",
                    "No",
                ),
                ("Query/Retrieve, Worklist, MPPS", "No", "No"),
            ],
        )
        + "\n"
    )

    add("## 2. Application entities\n")
    add(
        _table(
            ("AE", "AE title", "Role", "Port"),
            [
                (
                    "Receiving gateway",
                    f"`{gw.ae_title}`",
                    "Storage SCP, Verification SCP",
                    f"{gw.port} ({gw.host})",
                ),
                (
                    "Result delivery (workers)",
                    f"`{settings.delivery.ae_title}`",
                    "Storage SCU, Storage Commitment SCU",
                    "ephemeral",
                ),
                (
                    "Storage Commitment reports (workers)",
                    f"`{settings.delivery.ae_title}`",
                    "accepts N-EVENT-REPORT (Storage Commitment Push Model, SCU role)",
                    f"{settings.delivery.commitment_port}, open only while a report is awaited",
                ),
            ],
        )
        + "\n"
    )
    add(
        _table(
            ("Implementation", "Value"),
            [
                ("Implementation Class UID", pynetdicom.PYNETDICOM_IMPLEMENTATION_UID),
                ("Implementation Version Name", pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION),
                ("DICOM toolkit", f"pynetdicom {pynetdicom.__version__}"),
            ],
        )
        + "\n"
    )

    add("## 3. Receiving gateway: Storage and Verification SCP\n")
    add("### 3.1 Association acceptance policy\n")
    callers = gw.allowed_callers
    if callers is None:
        policy = "Any calling AE title is accepted (no allow-list configured)."
    else:
        policy = (
            "Only the calling AE titles below are accepted, each from the listed hosts when hosts are "
            "given; any other caller gets A-ASSOCIATE-RJ (rejected-permanent, service-user, "
            '"calling AE title not recognized").'
        )
    add(f"- The called AE title must be `{gw.ae_title}`; another called AE title is rejected.")
    add(f"- {policy}")
    add(
        f"- At most {gw.max_associations} simultaneous associations; "
        f"{gw.receive_processes} receiving process(es) share the port."
    )
    add(f"- Maximum PDU size received: {gw.max_pdu_size} bytes (never unlimited).")
    add(
        f"- Timeouts: ACSE {gw.acse_timeout:g} s, DIMSE {gw.dimse_timeout:g} s, "
        f"network {gw.network_timeout:g} s."
    )
    add("- Asynchronous operations window: not supported (one operation at a time per association).")
    add(
        "- No extended negotiation and no SCP/SCU role selection; every presentation context is accepted as "
        "SCP only.\n"
    )
    if callers is not None:
        add(
            _table(
                ("Calling AE title", "Hosts"),
                [(f"`{c.ae_title}`", ", ".join(c.hosts) if c.hosts else "any") for c in callers],
            )
            + "\n"
        )

    add("### 3.2 Transfer syntaxes accepted\n")
    add(
        "Every accepted storage SOP class is offered all of these; the data set is stored exactly as "
        "received, never transcoded.\n"
    )
    add(_table(("Transfer syntax", "UID"), [(_name(ts), ts) for ts in ACCEPTED_TRANSFER_SYNTAXES]) + "\n")
    add(
        f"Verification (`{Verification}`) is accepted with "
        + ", ".join(_name(ts) for ts in pynetdicom.DEFAULT_TRANSFER_SYNTAXES)
        + ".\n"
    )

    add("### 3.3 C-STORE response status\n")
    store_statuses = [(f"0x{status:04X}", meaning) for status, meaning in STORE_STATUSES]
    add(_table(("Status", "Meaning"), store_statuses) + "\n")

    add("### 3.4 Storage behaviour\n")
    add(
        "- Level of storage: every element is kept as received (the file is stored byte for byte); nothing "
        "is coerced."
    )
    add(
        "- An instance is acknowledged only after it is fsynced, atomically renamed into the spool and "
        "committed to the journal; a crash loses no acknowledged instance."
    )
    add(
        "- The same SOP Instance UID with the same bytes is kept once (counted as a duplicate); with "
        "different bytes it replaces the earlier copy. An instance arriving after its study was completed "
        "opens a new version of the study."
    )
    add(
        f"- A study is complete after {settings.assembly.quiet_seconds:g} s without a new instance"
        + (
            ", at once when a mammogram's four standard views (L/R x CC/MLO) have arrived"
            if settings.assembly.complete_on_four_views
            else ""
        )
        + f", or {settings.assembly.force_complete_seconds:g} s after its first instance."
    )
    add(
        f"- Disk watermark: below {gw.disk_watermark.min_free_bytes} free bytes or "
        f"{gw.disk_watermark.min_free_percent:g}% free, C-STOREs are refused with 0xA700.\n"
    )

    add("### 3.5 Storage SOP classes accepted (SCP)\n")
    add(
        _table(
            ("SOP class", "UID", "Note"),
            [
                (_name(uid), uid, "configured private class" if uid in private else "")
                for uid in sorted(sop_classes, key=lambda u: (_name(u), u))
            ],
        )
        + "\n"
    )

    add("## 4. Result delivery: Storage SCU\n")
    destinations = settings.delivery.destinations
    if destinations:
        add(
            _table(
                ("Destination AE title", "Host", "Port", "TLS"),
                [(f"`{d.ae_title}`", d.host, d.port, _tls_text(d.tls, server=False)) for d in destinations],
            )
            + "\n"
        )
    else:
        add("No destination is configured: results are kept in the data directory and not sent.\n")
    add(
        "- One association per delivery, opened when a study's results are ready; high-risk studies are "
        "delivered first."
    )
    add("- Proposed presentation contexts, role SCU:\n")
    add(
        _table(
            ("SOP class", "UID", "Transfer syntaxes proposed"),
            [
                (_name(uid), uid, f"{_name(ExplicitVRLittleEndian)}, {_name(ImplicitVRLittleEndian)}")
                for uid in (ComprehensiveSRStorage, SecondaryCaptureImageStorage, MAMMOGRAPHY_CAD_SR_STORAGE)
            ],
        )
        + "\n"
    )
    add(_table(("C-STORE response", "Behaviour"), DELIVERY_STATUSES) + "\n")
    add(
        f"- Retries: {delivery_policy(settings.delivery).describe()}. Dead letters can be replayed "
        "(`pacs-triage deadletters --replay ID` or the web service).\n"
    )

    _commitment_and_supersede(settings, add)

    add("## 5. Objects produced\n")
    add(
        _table(
            ("Object", "SOP class UID", "Content"),
            [
                (
                    "Comprehensive SR",
                    ComprehensiveSRStorage,
                    "TID 1500 Imaging Measurement Report: per image the finding, BI-RADS assessment when the model "
                    "gives one, probability of cancer, per-class probabilities, point/region localisations (TID 1410), "
                    "algorithm identification (TID 4019) and a not-for-diagnostic-use comment",
                ),
                (
                    "Secondary Capture Image",
                    SecondaryCaptureImageStorage,
                    "RGB heatmap blended over the source image with a caption banner and colour scale; Burned In "
                    "Annotation YES, Image Type DERIVED\\SECONDARY, Source Image Sequence to the source image",
                ),
                (
                    "Mammography CAD SR",
                    MAMMOGRAPHY_CAD_SR_STORAGE,
                    "TID 4000 Mammography CAD Report of a study with MG images"
                    + ("" if settings.outputs.cad_sr.enabled else " (off: `outputs.cad_sr.enabled`)")
                    + ": Image Library (TID 4020), per finding a Single Image Finding (TID 4006) with rendering "
                    "intent after the model's operating point, certainty or probability of cancer, centre and "
                    "outline (TID 4021) and algorithm identification (TID 4019); summaries of detections and "
                    f"analyses (TID 4015-4018). Manufacturer `{settings.outputs.cad_sr.manufacturer}`, "
                    f"Manufacturer's Model Name `{settings.outputs.cad_sr.model_name}` "
                    "(`outputs.cad_sr`); an IHE AIR Contributing Equipment item per model",
                ),
            ],
        )
        + "\n"
    )
    add(
        "- All go into the source study (same Study Instance UID, patient and study attributes copied from "
        "the source images), written in Explicit VR Little Endian: the study SR, the heatmap series and the "
        "Mammography CAD SR each in a series of their own (one per model and version with "
        "`outputs.report: per-model`)."
    )
    add(
        "- SOP Instance and Series UIDs are derived deterministically from the study, the evaluated images "
        "and the model id and version, so a retried or replayed delivery resends the same instances."
    )
    add(
        "- Series Description and the SR text say NOT FOR DIAGNOSTIC USE; results of untrained demo weights "
        "say so as well.\n"
    )

    add("## 6. Communication profiles and security\n")
    add(f"- TCP/IP on the configured listening address ({gw.host}), TCP_NODELAY on every association.")
    add(f"- Receiving gateway TLS: {_tls_text(gw.tls, server=True)}.")
    add(
        "- Callers are identified by calling AE title"
        + (" and, where configured, source host." if callers is not None else " (no allow-list configured).")
    )
    add(
        "- No patient name, ID or birth date is written to the logs; the web service's URLs carry job ids "
        "(hashes), never UIDs or patient attributes, and need a bearer token.\n"
    )

    _hl7_notifications(settings, add)
    _fhir_notifications(settings, add)

    add("## 7. Character sets\n")
    add(
        "Received objects are stored as received, in whatever Specific Character Set they declare. Produced "
        "objects carry the patient and study attributes of the source images unchanged.\n"
    )
    return "\n".join(out)
