"""The triage flag where the radiologist reads, as FHIR: one transaction Bundle per study to each FHIR server.

For each study to notify and each ``notifications.fhir`` endpoint, the ``workers.tasks.notify`` task POSTs
to the endpoint's base URL one transaction Bundle holding

- a DiagnosticReport (the AI triage of the study),
- an Observation (the triage category, with the risk, the model, the operating point and the site's
  priority as its components), and
- for a high-risk study, a Flag.

We know no server ids (no Patient, ImagingStudy or ServiceRequest id): the patient, the order and the study
are logical references, by identifier only (Patient ID as received, the Accession Number, the Study
Instance UID as ``urn:dicom:uid``).  Our own three resources get ``urn:uuid`` full URLs and identifiers
derived from the study version, and each entry is a conditional create (``ifNoneExist`` on that
identifier), so a retry after an answer lost on the way creates nothing twice.

Every resource is built with, and so validated by, the FHIR models of ``fhir.resources`` before it is sent.
Those models are R4B (4.3.0): DiagnosticReport, Observation, Flag and Bundle have the same elements in R4
(4.0.1) for everything sent here.  docs/notifications.md lists what each field means.
"""

from __future__ import annotations

import datetime
import json
import ssl
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.extension import Extension
from fhir.resources.R4B.flag import Flag
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.observation import Observation, ObservationComponent, ObservationReferenceRange
from fhir.resources.R4B.period import Period
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference

from gateway.errors import TransientError
from gateway.settings import FhirEndpoint, NotificationsSettings
from plugins.types import UNCALIBRATED_SUSPICION, ScoreMeaning
from workers.notify import StudyNotice
from workers.triage import CATEGORIES

#: Our own codes (the AI triage, its category values, the components): local, so a site maps them if it must.
LOCAL_CODES = "urn:pacs-triage:codes"
#: FHIR's system for an identifier that is a URI, here the ``urn:uuid`` of each of our resources.
URI_IDENTIFIERS = "urn:ietf:rfc:3986"
#: How FHIR identifies a DICOM UID (ImagingStudy.identifier): value ``urn:oid:<UID>``.
DICOM_UIDS = "urn:dicom:uid"
#: HL7 v2 table 0203 (identifier type): ``ACSN`` marks the Accession Number.
IDENTIFIER_TYPES = "http://terminology.hl7.org/CodeSystem/v2-0203"
#: HL7 v2 table 0027, the priority codes of ``notifications.priorities`` (the ones HL7 v2 messages carry).
V2_PRIORITIES = "http://terminology.hl7.org/CodeSystem/v2-0027"
V2_SECTIONS = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORIES = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATIONS = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
FLAG_CATEGORIES = "http://terminology.hl7.org/CodeSystem/flag-category"
UCUM = "http://unitsofmeasure.org"
#: The coding schemes a :class:`~plugins.types.ScoreMeaning` concept may name, as FHIR systems.
SCHEMES = {"DCM": "http://dicom.nema.org/resources/ontology/DCM", "SCT": "http://snomed.info/sct"}
#: The standard extension that points a Flag at the resource that explains it.
FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"
FHIR_JSON = "application/fhir+json"

_PRIORITY_NAMES = {
    "S": "Stat",
    "A": "ASAP",
    "R": "Routine",
    "P": "Preop",
    "C": "Callback",
    "T": "Timing critical",
}
_IDENTITY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacs-triage:fhir-notifications")


#: The resources and elements sent, for the conformance statement and docs/notifications.md.
RESOURCE_PROFILE: tuple[tuple[str, str, str], ...] = (
    ("Bundle", "type", "transaction: every resource is created, or none"),
    (
        "Bundle",
        "entry.request",
        "POST <type>, ifNoneExist on the resource's identifier: a retry after a lost answer creates nothing twice",
    ),
    ("DiagnosticReport", "status", "preliminary: a machine's triage, not a reading (as OBR-25 P in HL7)"),
    ("DiagnosticReport", "code", f'{LOCAL_CODES} ai-triage "AI triage"'),
    ("DiagnosticReport", "category", "v2-0074 RAD"),
    (
        "DiagnosticReport",
        "subject",
        "Patient by identifier: the Patient ID as received (no system, no server id)",
    ),
    ("DiagnosticReport", "basedOn", "ServiceRequest by identifier: the Accession Number, type v2-0203 ACSN"),
    (
        "DiagnosticReport",
        "imagingStudy",
        "ImagingStudy by identifier: urn:dicom:uid, urn:oid:<Study Instance UID>",
    ),
    ("DiagnosticReport", "result", "the Observation of the same Bundle"),
    (
        "DiagnosticReport",
        "conclusion",
        "the triage explanation (model and operating point behind the category)",
    ),
    ("Observation", "status", "preliminary"),
    ("Observation", "code", f"{LOCAL_CODES} triage-category"),
    ("Observation", "valueCodeableConcept", f"{LOCAL_CODES} high, intermediate or routine"),
    ("Observation", "interpretation", "v3-ObservationInterpretation A, only when high"),
    ("Observation", "derivedFrom", "the ImagingStudy, by identifier as in DiagnosticReport.imagingStudy"),
    ("Observation", "device", "the deciding model (display only)"),
    ("Observation", "method", "text: the deciding model and the triage explanation"),
    (
        "Observation",
        "component (risk)",
        "code: DCM 111047 Probability of cancer only for a calibrated probability of malignancy, else the "
        "concept the model names (DCM 111012 Certainty of Finding) with its own description as text; "
        "valueQuantity: the risk, UCUM 1 only when a probability, else no unit system; referenceRange: the "
        "model's scale; absent without a model result",
    ),
    ("Observation", "component (model)", f"{LOCAL_CODES} model, valueString the deciding plugin"),
    (
        "Observation",
        "component (operating-point)",
        "valueString: the crossed point's name, when one was crossed",
    ),
    (
        "Observation",
        "component (site-priority)",
        "valueCodeableConcept v2-0027: the priority the category maps to",
    ),
    ("Flag", "status", "active; only for a study triaged high"),
    ("Flag", "code", f'{LOCAL_CODES} ai-high-risk "AI triage: high-risk study, read first"'),
    ("Flag", "subject", "as DiagnosticReport.subject (or the accession in words without a Patient ID)"),
    ("Flag", "author", "the deciding model, as a Device display"),
    ("Flag", "extension flag-detail", "the DiagnosticReport of the same Bundle"),
)


class FhirRefused(TransientError):
    """The FHIR server answered other than 2xx, or not at all: retried, then dead-lettered."""


@dataclass(frozen=True, slots=True)
class FhirAnswer:
    """The server's acceptance of one Bundle: the HTTP status and, when given, the Location header."""

    status: int
    location: str


def resource_urn(notice: StudyNotice, resource_type: str) -> str:
    """The ``urn:uuid`` of one of our resources: the same for every try of one study version."""
    return f"urn:uuid:{uuid.uuid5(_IDENTITY_NAMESPACE, f'{notice.job_id}|{resource_type}')}"


def _local(code: str, display: str) -> CodeableConcept:
    return CodeableConcept(coding=[Coding(system=LOCAL_CODES, code=code, display=display)], text=display)


def _patient(notice: StudyNotice) -> Reference:
    if notice.patient_id:
        return Reference(type="Patient", identifier=Identifier(value=notice.patient_id))
    # A Flag needs a subject: without a Patient ID, the study's order names the patient in words.
    return Reference(
        type="Patient", display=f"the patient of accession {notice.accession_number or '(none)'}"
    )


def _order(notice: StudyNotice) -> list[Reference]:
    if not notice.accession_number:
        return []
    accession = Identifier(
        type=CodeableConcept(
            coding=[Coding(system=IDENTIFIER_TYPES, code="ACSN", display="Accession ID")],
            text="Accession Number",
        ),
        value=notice.accession_number,
    )
    return [Reference(type="ServiceRequest", identifier=accession)]


def _study(notice: StudyNotice) -> Reference:
    return Reference(
        type="ImagingStudy",
        identifier=Identifier(system=DICOM_UIDS, value=f"urn:oid:{notice.study_uid}"),
        display="the analysed imaging study",
    )


def _own_identifier(notice: StudyNotice, resource_type: str) -> Identifier:
    return Identifier(system=URI_IDENTIFIERS, value=resource_urn(notice, resource_type))


def _risk_component(risk: float, meaning: ScoreMeaning) -> ObservationComponent:
    """The risk under the concept its model says it is: DCM 111047 "Probability of cancer" only for a
    calibrated probability of malignancy (:class:`ScoreMeaning` refuses it otherwise), and a UCUM unit
    only then; an uncalibrated score keeps its own words and scale and has no unit."""
    value, scheme, meaning_text = meaning.concept
    concept = CodeableConcept(
        coding=[
            Coding(
                system=SCHEMES.get(scheme, f"urn:pacs-triage:scheme:{scheme}"),
                code=value,
                display=meaning_text,
            )
        ],
        text=meaning.description,
    )
    low, high = meaning.scale
    if meaning.is_probability_of_malignancy:
        quantity = Quantity(value=round(risk, 6), unit="probability", system=UCUM, code="1")
    else:
        quantity = Quantity(value=round(risk, 6), unit=f"score ({meaning.description})")
    scale = ObservationReferenceRange(
        low=Quantity(value=low), high=Quantity(value=high), text=f"the model's scale: {low:g} to {high:g}"
    )
    return ObservationComponent(code=concept, valueQuantity=quantity, referenceRange=[scale])


def _observation(
    notice: StudyNotice, priority: str, meaning: ScoreMeaning, now: datetime.datetime
) -> Observation:
    high = notice.category == CATEGORIES[0]
    components = []
    if notice.risk is not None:
        components.append(_risk_component(notice.risk, meaning))
    if notice.model is not None:
        components.append(
            ObservationComponent(code=_local("model", "Deciding model"), valueString=notice.model)
        )
    if notice.operating_point is not None:
        components.append(
            ObservationComponent(
                code=_local("operating-point", "Operating point crossed"), valueString=notice.operating_point
            )
        )
    components.append(
        ObservationComponent(
            code=_local("site-priority", "Site priority"),
            valueCodeableConcept=CodeableConcept(
                coding=[Coding(system=V2_PRIORITIES, code=priority, display=_PRIORITY_NAMES.get(priority))],
                text=_PRIORITY_NAMES.get(priority, priority),
            ),
        )
    )
    return Observation(
        identifier=[_own_identifier(notice, "Observation")],
        basedOn=_order(notice) or None,
        status="preliminary",
        category=[
            CodeableConcept(coding=[Coding(system=OBSERVATION_CATEGORIES, code="imaging", display="Imaging")])
        ],
        code=_local("triage-category", "AI triage category"),
        subject=_patient(notice),
        effectiveDateTime=now,
        issued=now,
        device=Reference(type="Device", display=notice.model or "no model gave a result"),
        method=CodeableConcept(text=f"AI triage by {notice.model or 'no model'}: {notice.explanation}"),
        derivedFrom=[_study(notice)],
        valueCodeableConcept=_local(notice.category, f"{notice.category} (AI triage)"),
        interpretation=(
            [CodeableConcept(coding=[Coding(system=INTERPRETATIONS, code="A", display="Abnormal")])]
            if high
            else None
        ),
        component=components,
    )


def _report(notice: StudyNotice, observation_urn: str, now: datetime.datetime) -> DiagnosticReport:
    return DiagnosticReport(
        identifier=[_own_identifier(notice, "DiagnosticReport")],
        basedOn=_order(notice) or None,
        # A machine's triage, not a radiologist's reading: preliminary, as OBR-25 says in the HL7 message.
        status="preliminary",
        category=[CodeableConcept(coding=[Coding(system=V2_SECTIONS, code="RAD", display="Radiology")])],
        code=_local("ai-triage", "AI triage"),
        subject=_patient(notice),
        effectiveDateTime=now,
        issued=now,
        imagingStudy=[_study(notice)],
        result=[Reference(reference=observation_urn, type="Observation")],
        conclusion=notice.explanation,
    )


def _flag(notice: StudyNotice, report_urn: str, now: datetime.datetime) -> Flag:
    return Flag(
        identifier=[_own_identifier(notice, "Flag")],
        status="active",
        category=[
            CodeableConcept(coding=[Coding(system=FLAG_CATEGORIES, code="clinical", display="Clinical")])
        ],
        code=_local("ai-high-risk", "AI triage: high-risk study, read first"),
        subject=_patient(notice),
        period=Period(start=now),
        author=Reference(type="Device", display=notice.model or "AI triage"),
        extension=[
            Extension(
                url=FLAG_DETAIL, valueReference=Reference(reference=report_urn, type="DiagnosticReport")
            )
        ],
    )


def build_resources(
    notice: StudyNotice,
    settings: NotificationsSettings,
    meaning: ScoreMeaning | None = None,
    now: datetime.datetime | None = None,
) -> Bundle:
    """The transaction Bundle for *notice*: DiagnosticReport, Observation and, for a high-risk study, a Flag.

    :param meaning: What the deciding model's risk means; ``None``: an uncalibrated suspicion score.
    :param now: The time the triage is reported at (issued, effective, the Flag's start).
    """
    now = now or datetime.datetime.now(datetime.UTC)
    meaning = meaning or UNCALIBRATED_SUSPICION
    observation = _observation(notice, settings.priority_for(notice.category), meaning, now)
    observation_urn = resource_urn(notice, "Observation")
    report = _report(notice, observation_urn, now)
    report_urn = resource_urn(notice, "DiagnosticReport")
    resources: list[tuple[str, Observation | DiagnosticReport | Flag]] = [
        (report_urn, report),
        (observation_urn, observation),
    ]
    if notice.category == CATEGORIES[0]:
        resources.append((resource_urn(notice, "Flag"), _flag(notice, report_urn, now)))
    return Bundle(
        type="transaction",
        identifier=Identifier(system=URI_IDENTIFIERS, value=resource_urn(notice, "Bundle")),
        timestamp=now,
        entry=[
            BundleEntry(
                fullUrl=urn,
                resource=resource,
                request=BundleEntryRequest(
                    method="POST",
                    url=resource.get_resource_type(),
                    ifNoneExist=f"identifier={URI_IDENTIFIERS}|{urn}",
                ),
            )
            for urn, resource in resources
        ],
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would follow a 301/302/303 to a POST with a body-less GET, whose 200 would pass for acceptance:
    a redirect is answered as the failure it is, for the site to fix the base URL."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def post(endpoint: FhirEndpoint, bundle: Bundle) -> FhirAnswer:
    """POST *bundle* to the base URL of *endpoint*.

    :raises FhirRefused: on any answer but 2xx, a connection failure or no answer within
        ``timeout_seconds``.  The reason is in our own words: a server's OperationOutcome can quote the
        resources, which hold patient identifiers.
    """
    where = f"{endpoint.name} ({endpoint.base_url})"
    request = urllib.request.Request(
        endpoint.base_url,
        data=bundle.model_dump_json(exclude_none=True).encode(),
        method="POST",
        headers={
            **endpoint.request_headers(),
            "Content-Type": f"{FHIR_JSON}; charset=utf-8",
            "Accept": FHIR_JSON,
        },
    )
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if endpoint.ca_certificates is not None:
        context = ssl.create_default_context(cafile=str(endpoint.ca_certificates))
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=endpoint.timeout_seconds) as response:
            response.read()
            return FhirAnswer(int(response.status), str(response.headers.get("Location", "") or ""))
    except urllib.error.HTTPError as exc:
        exc.close()
        raise FhirRefused(f"{where}: answered HTTP {exc.code}") from exc
    except TimeoutError as exc:
        raise FhirRefused(f"{where}: no answer within {endpoint.timeout_seconds:g} s") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise FhirRefused(f"{where}: no answer within {endpoint.timeout_seconds:g} s") from exc
        raise FhirRefused(f"{where}: connection failed ({type(exc.reason).__name__})") from exc
    except (OSError, ValueError) as exc:  # a reset mid-answer, a malformed status line
        raise FhirRefused(f"{where}: connection failed ({type(exc).__name__})") from exc


def bundle_json(bundle: Bundle) -> dict[str, Any]:
    """*bundle* as the JSON sent, for logs of shape and for tests."""
    return dict(json.loads(bundle.model_dump_json(exclude_none=True)))
