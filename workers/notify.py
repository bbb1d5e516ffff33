"""The triage flag where the radiologist reads: HL7 v2 messages to the RIS over MLLP.

One message per study per configured endpoint (``notifications.hl7``), keyed on the study's
Accession Number and Study Instance UID, carrying the triage category, the risk, the deciding
model and the HL7 priority the site maps the category to (``notifications.priorities``).  Messages
are built and parsed with python-hl7 (``hl7``) and sent with its asyncio MLLP client; the task in
:mod:`workers.tasks` waits for the ACK and retries an AE/AR answer or a silence with the delivery
backoff.  The segments and fields sent are listed in docs/conformance.md (:data:`MESSAGE_PROFILE`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hl7
import hl7.mllp

from gateway.errors import TransientError
from gateway.settings import Hl7Endpoint, NotificationsSettings
from workers.triage import CATEGORIES, TriageDecision

#: The HL7 version every message declares (MSH-12).
HL7_VERSION = "2.5.1"
#: Coding system of our own observation identifiers (OBX-3), table 0396 "L" (local).
LOCAL_CODES = "L"
#: ACK codes (table 0008) that mean the RIS took the message.
ACCEPTED_ACKS = ("AA", "CA")

#: The segments and fields of each message kind, for the conformance statement.
MESSAGE_PROFILE: dict[str, tuple[tuple[str, str], ...]] = {
    "common": (
        (
            "MSH",
            "MSH-3/4 sending application/facility, MSH-5/6 receiving application/facility (configured); "
            "MSH-7 time; MSH-9 message type; MSH-10 control ID (stable per study version and endpoint, "
            "so a retry is recognisable as the same message); MSH-11 processing ID; MSH-12 2.5.1",
        ),
        ("PID", "PID-3 Patient ID of the study (as received)"),
    ),
    "ORU^R01": (
        (
            "OBR",
            "OBR-2/OBR-3 placer/filler order number = Accession Number; OBR-4 PACS_TRIAGE^AI triage^L; "
            "OBR-5 priority (the category's mapped priority); OBR-7 time; OBR-18 Accession Number; "
            "OBR-25 result status P (preliminary: a machine's triage, not a reading)",
        ),
        ("ZDS", "ZDS-1 Study Instance UID^PACS_TRIAGE^Application^DICOM (IHE Radiology's Z segment)"),
        (
            "OBX",
            "one per item in this order (OBX-1 counts the items sent), OBX-11 P: "
            "TRIAGE_CATEGORY (ST, high/intermediate/routine; OBX-8 A when high), "
            "RISK (NM, 0..1, absent without a model result), MODEL (ST, the deciding plugin), "
            "OPERATING_POINT (ST, the crossed point's name, when one was crossed), "
            "PRIORITY (ST, the mapped HL7 priority), STUDY_UID (ST), EXPLANATION (TX)",
        ),
    ),
    "ORM^O01": (
        ("ORC", "ORC-1 XO (order changed); ORC-2/3 Accession Number; ORC-7 ^^^^^priority"),
        ("OBR", "as in ORU^R01, with OBR-5 the mapped priority"),
        ("ZDS", "as in ORU^R01"),
        ("OBX", "as in ORU^R01"),
    ),
    "OMI^O23": (
        ("ORC", "ORC-1 XO; ORC-2/3 Accession Number"),
        ("TQ1", "TQ1-9 priority (the mapped priority)"),
        ("OBR", "as in ORU^R01"),
        (
            "IPC",
            "IPC-1 Accession Number; IPC-2 Accession Number (requested procedure); IPC-3 Study Instance UID; "
            "IPC-4 Accession Number (scheduled procedure step)",
        ),
        ("OBX", "as in ORU^R01"),
    ),
}


class NotificationRefused(TransientError):
    """The RIS answered with an error or reject ACK, or not at all: retried, then dead-lettered."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyNotice:
    """What one notification says about one study version."""

    job_id: str
    study_uid: str
    accession_number: str
    patient_id: str
    category: str
    risk: float | None
    model: str | None
    operating_point: str | None
    explanation: str

    @classmethod
    def from_decision(
        cls, *, job_id: str, study_uid: str, accession_number: str, patient_id: str, decision: TriageDecision
    ) -> StudyNotice:
        return cls(
            job_id=job_id,
            study_uid=study_uid,
            accession_number=accession_number,
            patient_id=patient_id,
            category=decision.category,
            risk=decision.risk,
            model=decision.model,
            operating_point=decision.operating_point.name if decision.operating_point else None,
            explanation=decision.explanation,
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "study_uid": self.study_uid,
            "accession_number": self.accession_number,
            "patient_id": self.patient_id,
            "category": self.category,
            "risk": self.risk,
            "model": self.model,
            "operating_point": self.operating_point,
            "explanation": self.explanation,
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> StudyNotice:
        return cls(**data)


def wants_notification(settings: NotificationsSettings, category: str) -> bool:
    """Whether a study of *category* is notified at all (``notifications.notify``)."""
    return bool(settings.hl7 or settings.fhir) and (settings.notify == "all" or category == "high")


def control_id(notice: StudyNotice, endpoint: Hl7Endpoint) -> str:
    """MSH-10, at most 20 characters: the same for every try of one study version to one endpoint."""
    return hashlib.sha256(f"{notice.job_id}|{endpoint.name}".encode()).hexdigest()[:20].upper()


# An empty message of our encoding characters: python-hl7 escapes a value against a message's separators.
_ESCAPER = hl7.parse("MSH|^~\\&|")


def _value(value: object) -> str:
    return str(_ESCAPER.escape("" if value is None else str(value)))


def _segment(name: str, fields: Sequence[object | Sequence[object]]) -> str:
    """One segment from field values; a list is a field's components.  Every value is escaped."""
    encoded = ["^".join(_value(c) for c in f) if isinstance(f, (list, tuple)) else _value(f) for f in fields]
    return "|".join([name, *encoded]).rstrip("|")


def _observations(notice: StudyNotice, priority: str) -> list[str]:
    items: list[tuple[str, str, str, object]] = [
        ("ST", "TRIAGE_CATEGORY", "Triage category", notice.category),
        ("NM", "RISK", "AI risk score", None if notice.risk is None else f"{notice.risk:.4f}"),
        ("ST", "MODEL", "Deciding model", notice.model),
        ("ST", "OPERATING_POINT", "Operating point crossed", notice.operating_point),
        ("ST", "PRIORITY", "Site priority", priority),
        ("ST", "STUDY_UID", "Study Instance UID", notice.study_uid),
        ("TX", "EXPLANATION", "Triage explanation", notice.explanation),
    ]
    segments: list[str] = []
    for kind, code, meaning, value in items:
        if value is None:
            continue
        abnormal = "A" if code == "TRIAGE_CATEGORY" and notice.category == CATEGORIES[0] else ""
        segments.append(
            _segment(
                "OBX",
                [
                    len(segments) + 1,
                    kind,
                    [code, meaning, LOCAL_CODES],
                    "",
                    value,
                    "",
                    "",
                    abnormal,
                    "",
                    "",
                    "P",
                ],
            )
        )
    return segments


def build_message(
    notice: StudyNotice, endpoint: Hl7Endpoint, priority: str, now: datetime.datetime | None = None
) -> hl7.Message:
    """The message *endpoint* takes (``ORU^R01``, ``ORM^O01`` or ``OMI^O23``) for *notice*, parsed back."""
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%d%H%M%S")
    code, event = endpoint.message.split("^")
    structure = {"ORU^R01": "ORU_R01", "ORM^O01": "ORM_O01", "OMI^O23": "OMI_O23"}[endpoint.message]
    msh = (
        "MSH|^~\\&|"
        + _segment(
            "",
            [
                endpoint.sending_application,
                endpoint.sending_facility,
                endpoint.receiving_application,
                endpoint.receiving_facility,
                stamp,
                "",
                [code, event, structure],
                control_id(notice, endpoint),
                endpoint.processing_id,
                HL7_VERSION,
            ],
        )[1:]
    )
    accession = notice.accession_number
    pid = _segment("PID", [1, "", notice.patient_id])
    obr = _segment(
        "OBR",
        [
            1,
            accession,
            accession,
            ["PACS_TRIAGE", "AI triage", LOCAL_CODES],
            priority,
            "",
            stamp,
            *[""] * 10,
            accession,
            *[""] * 6,
            "P",
        ],
    )
    zds = _segment("ZDS", [[notice.study_uid, "PACS_TRIAGE", "Application", "DICOM"]])
    segments: list[str]
    if endpoint.message == "ORU^R01":
        segments = [msh, pid, obr, zds, *_observations(notice, priority)]
    elif endpoint.message == "ORM^O01":
        orc = _segment("ORC", ["XO", accession, accession, "", "", "", ["", "", "", "", "", priority]])
        segments = [msh, pid, orc, obr, zds, *_observations(notice, priority)]
    else:
        orc = _segment("ORC", ["XO", accession, accession])
        tq1 = _segment("TQ1", [1, "", "", "", "", "", "", "", priority])
        ipc = _segment("IPC", [accession, accession, notice.study_uid, accession])
        segments = [msh, pid, orc, tq1, obr, ipc, *_observations(notice, priority)]
    return hl7.parse("\r".join(segments))


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    """The RIS's answer to one message: MSA-1 and whether it acknowledged that very message."""

    code: str
    matches: bool

    @property
    def accepted(self) -> bool:
        return self.matches and self.code in ACCEPTED_ACKS


def read_ack(ack: hl7.Message, sent_control_id: str) -> Acknowledgement:
    """MSA-1 of *ack*, and whether its MSA-2 names the message sent."""
    try:
        msa = ack.segment("MSA")
    except KeyError:
        return Acknowledgement("", False)
    return Acknowledgement(str(msa(1)).strip(), str(msa(2)).strip() == sent_control_id)


async def _exchange(endpoint: Hl7Endpoint, message: hl7.Message) -> hl7.Message:
    reader, writer = await asyncio.wait_for(
        hl7.mllp.open_hl7_connection(endpoint.host, endpoint.port, encoding="utf-8"), endpoint.timeout_seconds
    )
    try:
        writer.writemessage(message)
        await writer.drain()
        return await asyncio.wait_for(reader.readmessage(), endpoint.timeout_seconds)
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the RIS hung up first: its answer (or silence) is known already
            await writer.wait_closed()


def send(endpoint: Hl7Endpoint, message: hl7.Message) -> Acknowledgement:
    """Send *message* to *endpoint* over MLLP and wait for its ACK.

    :raises NotificationRefused: when the RIS answers AE/AR (or CE/CR), acknowledges another message,
        does not answer within ``timeout_seconds``, or cannot be reached.  The reason is in our own
        words: an ACK's text may quote the message, which holds patient identifiers.
    """
    where = f"{endpoint.name} ({endpoint.host}:{endpoint.port})"
    sent_id = str(message.segment("MSH")(10))
    try:
        answer = asyncio.run(_exchange(endpoint, message))
    except TimeoutError as exc:
        raise NotificationRefused(f"{where}: no ACK within {endpoint.timeout_seconds:g} s") from exc
    except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
        raise NotificationRefused(f"{where}: connection failed ({type(exc).__name__})") from exc
    except (ValueError, hl7.HL7Exception, hl7.mllp.InvalidBlockError) as exc:
        raise NotificationRefused(f"{where}: unreadable answer ({type(exc).__name__})") from exc
    ack = read_ack(answer, sent_id)
    if not ack.matches:
        raise NotificationRefused(f"{where}: the ACK names another message")
    if not ack.accepted:
        raise NotificationRefused(f"{where}: answered {ack.code or 'without an acknowledgement code'}")
    return ack


def interim_decision(risks: dict[str, float | None], high_risk_threshold: float) -> TriageDecision:
    """A stand-in decision for a notification queued without the study's own (:func:`workers.triage.decide`).

    From each model's study risk, by the triage thresholds that set queue priority: high at or
    above ``triage.high_risk_threshold``, intermediate at or above half of it (the boundaries of
    :meth:`gateway.messages.Priority.from_risk`), routine below; the deciding model is the one with
    the highest risk, and no operating point is named.
    """
    scored = {model: risk for model, risk in risks.items() if risk is not None}
    if not scored:
        return TriageDecision(
            category="routine",
            risk=None,
            model=None,
            operating_point=None,
            policy="routine when no model gave a result",
        )
    model = max(scored, key=lambda name: scored[name])
    risk = scored[model]
    category = (
        "high"
        if risk >= high_risk_threshold
        else "intermediate"
        if risk >= high_risk_threshold / 2
        else "routine"
    )
    return TriageDecision(
        category=category,
        risk=risk,
        model=model,
        operating_point=None,
        policy=f"high at or above risk {high_risk_threshold:g}, intermediate at or above "
        f"{high_risk_threshold / 2:g}, by the highest model risk",
    )
