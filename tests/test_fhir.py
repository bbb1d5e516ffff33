"""The triage flag as FHIR R4 resources, against a real HTTP server that parses what it receives.

:class:`FhirServer` is a stdlib ``ThreadingHTTPServer`` on a free loopback port: it parses each POSTed body
with the ``fhir.resources`` Bundle model, records it, and answers with the status it is told to (``201``,
``500``) or not at all (``silent``).  The Celery tests run a real worker on the test's private Redis.
"""

from __future__ import annotations

import datetime
import http.server
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.flag import Flag
from fhir.resources.R4B.observation import Observation

from gateway.settings import FhirEndpoint, NotificationsSettings, load_settings
from plugins.types import CERTAINTY_OF_FINDING, PROBABILITY_OF_CANCER, ScoreMeaning
from tests.peers import get_free_port
from tests.test_notifications import queue_notice as queue_notification
from tests.test_notifications import write_config as notifications_config
from workers.fhir import (
    DICOM_UIDS,
    RESOURCE_PROFILE,
    FhirRefused,
    build_resources,
    bundle_json,
    post,
    resource_urn,
)
from workers.notify import StudyNotice, interim_decision, wants_notification

pytestmark = pytest.mark.timeout(300)

CALIBRATED = ScoreMeaning(
    kind="probability_of_malignancy", description="calibrated p(malignant)", concept=PROBABILITY_OF_CANCER
)
SUSPICION = ScoreMeaning(
    kind="suspicion_score", description="p(malignant), uncalibrated", concept=CERTAINTY_OF_FINDING
)


def notice(
    category: str = "high", accession: str = "ACC0001", study_uid: str = "1.2.826.0.1.3680043.10.1"
) -> StudyNotice:
    risk = {"high": 0.91, "intermediate": 0.4, "routine": 0.05}[category]
    decision = interim_decision({"asg_mammonet": risk, "lem": risk / 2}, high_risk_threshold=0.7)
    return StudyNotice.from_decision(
        job_id=f"job-{accession}",
        study_uid=study_uid,
        accession_number=accession,
        patient_id="PAT-1",
        decision=decision,
    )


class FhirServer:
    """A FHIR server on a free loopback port that parses every POSTed Bundle with ``fhir.resources``."""

    def __init__(self, answer: str = "201") -> None:
        self.answer = answer
        self.received: list[Bundle] = []
        self.headers: list[dict[str, str]] = []
        self.unparsed: list[str] = []
        self._release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.headers.append(dict(self.headers.items()))
                try:
                    server.received.append(Bundle.model_validate_json(body))
                except ValueError as exc:
                    server.unparsed.append(type(exc).__name__)
                    self.send_error(400)
                    return
                if server.answer == "silent":
                    server._release.wait(60)
                    return
                self.send_response(int(server.answer))
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.port = get_free_port()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def __enter__(self) -> FhirServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


def endpoint(server: FhirServer, name: str = "fhir", timeout: float = 30.0, **extra: Any) -> FhirEndpoint:
    return FhirEndpoint(name=name, base_url=server.base_url, timeout_seconds=timeout, **extra)


def resources(bundle: Bundle) -> dict[str, Any]:
    return {entry.resource.get_resource_type(): entry.resource for entry in bundle.entry}


# ------------------------------------------------------------------ resources


@pytest.mark.parametrize("meaning", [CALIBRATED, SUSPICION, None], ids=["calibrated", "suspicion", "unsaid"])
def test_the_resources_validate_and_say_what_the_notice_says(meaning: ScoreMeaning | None) -> None:
    study = notice("high")
    settings = NotificationsSettings(priorities={"high": "S", "intermediate": "A", "routine": "R"})
    sent = bundle_json(build_resources(study, settings, meaning))
    bundle = Bundle.model_validate_json(json.dumps(sent))  # the library's own verdict on what goes out
    assert bundle.type == "transaction"
    found = resources(bundle)
    assert set(found) == {"DiagnosticReport", "Observation", "Flag"}
    urls = {entry.resource.get_resource_type(): entry.fullUrl for entry in bundle.entry}
    for entry in bundle.entry:
        assert entry.request.method == "POST" and entry.request.url == entry.resource.get_resource_type()
        assert entry.fullUrl.startswith("urn:uuid:")  # we never name a server id
        assert entry.resource.id is None and entry.fullUrl in entry.request.ifNoneExist
        type(entry.resource).model_validate(entry.resource.model_dump())

    report: DiagnosticReport = found["DiagnosticReport"]
    assert report.status == "preliminary"
    assert report.subject.identifier.value == study.patient_id and report.subject.reference is None
    (order,) = report.basedOn
    assert order.identifier.value == study.accession_number and order.identifier.type.coding[0].code == "ACSN"
    (imaging,) = report.imagingStudy
    assert imaging.reference is None
    assert (imaging.identifier.system, imaging.identifier.value) == (DICOM_UIDS, f"urn:oid:{study.study_uid}")
    assert [r.reference for r in report.result] == [urls["Observation"]]
    assert report.conclusion == study.explanation

    observation: Observation = found["Observation"]
    assert observation.status == "preliminary"
    assert observation.valueCodeableConcept.coding[0].code == study.category
    assert [c.code for c in observation.interpretation[0].coding] == ["A"]
    assert observation.derivedFrom[0].identifier.value == f"urn:oid:{study.study_uid}"
    assert study.model in observation.method.text and observation.device.display == study.model
    components = {c.code.coding[0].code: c for c in observation.component}
    risk = components[(meaning or SUSPICION).concept[0]]
    assert float(risk.valueQuantity.value) == pytest.approx(study.risk)
    if meaning is CALIBRATED:
        assert risk.code.coding[0].code == PROBABILITY_OF_CANCER[0]
        assert risk.valueQuantity.code == "1" and risk.valueQuantity.system == "http://unitsofmeasure.org"
    else:  # an uncalibrated score is never called a probability, nor given a unit
        assert risk.code.coding[0].code != PROBABILITY_OF_CANCER[0]
        assert risk.valueQuantity.system is None and "probability" not in risk.valueQuantity.unit
        assert "uncalibrated" in risk.code.text
    assert components["model"].valueString == study.model
    assert components["site-priority"].valueCodeableConcept.coding[0].code == settings.priority_for("high")

    flag: Flag = found["Flag"]
    assert flag.status == "active" and flag.subject.identifier.value == study.patient_id
    (detail,) = flag.extension
    assert detail.valueReference.reference == urls["DiagnosticReport"]


def test_a_routine_study_gets_no_flag_and_every_try_names_the_same_resources() -> None:
    study = notice("routine")
    settings = NotificationsSettings()
    first = build_resources(
        study, settings, SUSPICION, now=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    )
    again = build_resources(study, settings, SUSPICION)
    assert set(resources(first)) == {"DiagnosticReport", "Observation"}
    assert [e.fullUrl for e in first.entry] == [e.fullUrl for e in again.entry]
    assert first.entry[0].fullUrl == resource_urn(study, "DiagnosticReport")
    observation = resources(first)["Observation"]
    assert observation.interpretation is None
    assert observation.valueCodeableConcept.coding[0].code == "routine"
    components = {c.code.coding[0].code: c for c in observation.component}
    assert components["site-priority"].valueCodeableConcept.coding[0].code == settings.priority_for("routine")
    other = build_resources(notice("routine", accession="OTHER"), settings, SUSPICION)
    assert not {e.fullUrl for e in other.entry} & {e.fullUrl for e in first.entry}


def test_without_a_model_result_there_is_no_risk_and_without_a_patient_id_the_subject_is_words() -> None:
    decision = interim_decision({"asg_mammonet": None}, high_risk_threshold=0.7)
    study = StudyNotice.from_decision(
        job_id="job-x", study_uid="1.2.3.4", accession_number="", patient_id="", decision=decision
    )
    bundle = Bundle.model_validate_json(
        json.dumps(bundle_json(build_resources(study, NotificationsSettings())))
    )
    found = resources(bundle)
    observation = found["Observation"]
    assert {c.code.coding[0].code for c in observation.component} == {"site-priority"}
    assert found["DiagnosticReport"].basedOn is None
    assert found["DiagnosticReport"].subject.identifier is None and found["DiagnosticReport"].subject.display


def test_every_element_the_profile_lists_is_in_what_a_high_risk_study_sends() -> None:
    study = StudyNotice.from_decision(
        job_id="job-p",
        study_uid="1.2.3.5",
        accession_number="ACC5",
        patient_id="PAT-5",
        decision=interim_decision({"asg_mammonet": 0.9}, high_risk_threshold=0.7),
    )
    sent = bundle_json(build_resources(study, NotificationsSettings(), SUSPICION))
    sent_resources = {entry["resource"]["resourceType"]: entry["resource"] for entry in sent["entry"]}
    for resource, element, _ in RESOURCE_PROFILE:
        name = element.split(" ")[0]
        if resource == "Bundle":
            assert name.split(".")[0] in sent, element
        else:  # a component's presence hangs on the notice (no operating point crossed here)
            assert sent_resources[resource].get(name), (resource, element)


def test_the_score_meaning_travels_as_json() -> None:
    for meaning in (CALIBRATED, SUSPICION):
        assert ScoreMeaning.from_json_dict(json.loads(json.dumps(meaning.to_json_dict()))) == meaning
    assert ScoreMeaning.from_json_dict(None) is None


# ------------------------------------------------------------------ settings


def test_settings_take_fhir_endpoints_and_refuse_a_name_used_by_hl7_too(tmp_path: Path) -> None:
    config = tmp_path / "n.yaml"
    config.write_text(
        "notifications:\n"
        "  fhir: [{name: hub, base_url: 'https://fhir.example/r4', bearer_token: {$env: HUB_TOKEN},"
        " headers: {X-Site: a}}]\n"
    )
    settings = load_settings(config, environ={})
    (hub,) = settings.notifications.fhir
    assert hub.timeout_seconds > 0 and settings.notifications.fhir_endpoint("hub") == hub
    assert settings.notifications.hl7_endpoint("hub") is None
    assert wants_notification(settings.notifications, "high")
    assert not wants_notification(settings.notifications, "routine")
    config.write_text(
        "notifications:\n"
        "  hl7: [{name: ris, host: 127.0.0.1, port: 2575}]\n"
        "  fhir: [{name: ris, base_url: 'http://127.0.0.1:8080/fhir'}]\n"
    )
    with pytest.raises(Exception, match="unique"):
        load_settings(config, environ={})
    config.write_text("notifications: {fhir: [{name: hub, base_url: 'ftp://x', headers: {}}]}\n")
    with pytest.raises(Exception, match="base_url"):
        load_settings(config, environ={})
    config.write_text(
        "notifications: {fhir: [{name: hub, base_url: 'http://x', headers: {A: {$shell: ls}}}]}\n"
    )
    with pytest.raises(Exception, match="headers"):
        load_settings(config, environ={})


def test_the_bearer_token_is_read_from_the_environment_when_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_TEST_TOKEN", "s3cret")
    with FhirServer("201") as server:
        target = endpoint(server, bearer_token={"$env": "FHIR_TEST_TOKEN"}, headers={"X-Site": "unit-a"})
        assert "s3cret" not in target.model_dump_json()
        post(target, build_resources(notice(), NotificationsSettings()))
    (headers,) = server.headers
    assert headers["Authorization"] == "Bearer s3cret" and headers["X-Site"] == "unit-a"
    assert headers["Content-Type"].startswith("application/fhir+json")


# ------------------------------------------------------------------ HTTP


def test_the_server_parses_the_bundle_and_a_2xx_is_an_acceptance() -> None:
    study = notice("high")
    with FhirServer("201") as server:
        answer = post(endpoint(server), build_resources(study, NotificationsSettings(), SUSPICION))
    assert answer.status == 201
    assert server.unparsed == []
    (bundle,) = server.received
    found = resources(bundle)
    assert "Flag" in found
    assert found["DiagnosticReport"].basedOn[0].identifier.value == study.accession_number


@pytest.mark.parametrize("answer", ["500", "302", "silent"])
def test_any_other_answer_or_none_is_refused_in_our_own_words(answer: str) -> None:
    study = notice("high")
    with FhirServer(answer) as server:
        with pytest.raises(FhirRefused) as refused:
            post(
                endpoint(server, timeout=1.0 if answer == "silent" else 30.0),
                build_resources(study, NotificationsSettings()),
            )
        assert len(server.received) == 1
    reason = str(refused.value)
    assert study.accession_number not in reason and study.patient_id not in reason
    assert ("no answer" in reason) if answer == "silent" else (f"HTTP {answer}" in reason)


def test_an_unreachable_server_is_refused() -> None:
    with FhirServer("201") as server:
        target = endpoint(server, timeout=0.5)
    with pytest.raises(FhirRefused):
        post(target, build_resources(notice(), NotificationsSettings()))


# ------------------------------------------------------------ Celery: flags, retries, dead letters, replay


def write_config(tmp_path: Path, redis_url: str, fhir: list[dict[str, Any]]) -> Path:
    return notifications_config(tmp_path, redis_url, fhir, kind="fhir")


def queue_notice(app: Any, study: StudyNotice, endpoint_name: str, priority: int) -> None:
    queue_notification(app, study, endpoint_name, priority, score=SUSPICION)


@pytest.mark.redis
def test_the_worker_sends_a_flag_for_the_high_risk_study_first_and_none_for_routine_ones(
    tmp_path: Path, redis_url: str
) -> None:
    from gateway.messages import Priority
    from tests.test_triage_order import start_worker, stop
    from tests.utils import wait_for
    from workers.app import configure_app
    from workers.results import ResultsStore

    with FhirServer("201") as server:
        config = write_config(tmp_path, redis_url, [{"name": "hub", "base_url": server.base_url}])
        app = configure_app(load_settings(config, environ={}))
        routine = [notice("routine", accession=f"R{i:03d}", study_uid=f"1.2.3.{i}") for i in range(2)]
        high = notice("high", accession="H001", study_uid="1.2.3.99")
        for study in routine:  # queued first, while no worker runs
            queue_notice(app, study, "hub", int(Priority.ROUTINE))
        queue_notice(app, high, "hub", int(Priority.STAT))
        store = ResultsStore(tmp_path / "data" / "results.sqlite")
        worker = start_worker(config, "delivery", tmp_path / "worker.log")
        try:
            wait_for(lambda: len(store.notified_endpoints()) == 3, timeout=120, interval=0.1)
        finally:
            stop(worker)
    assert server.unparsed == []
    accessions = [resources(b)["DiagnosticReport"].basedOn[0].identifier.value for b in server.received]
    assert accessions[0] == "H001", accessions
    flagged = {
        resources(b)["DiagnosticReport"].basedOn[0].identifier.value: "Flag" in resources(b)
        for b in server.received
    }
    assert flagged == {"H001": True, "R000": False, "R001": False}
    assert all(store.notified_endpoints().get(s.job_id) == ["hub"] for s in [*routine, high])
    assert any(e["event"] == "notified" and "hub" in e["detail"] for e in store.timeline(high.job_id))


@pytest.mark.redis
def test_a_failing_and_a_silent_server_are_retried_then_dead_lettered_and_replay_works(
    tmp_path: Path, redis_url: str
) -> None:
    from tests.test_triage_order import start_worker, stop
    from tests.utils import wait_for
    from workers.app import configure_app
    from workers.commands import replay_dead_letter
    from workers.results import ResultsStore

    with FhirServer("500") as failing, FhirServer("silent") as silent:
        config = write_config(
            tmp_path,
            redis_url,
            [
                {"name": "failing", "base_url": failing.base_url, "timeout_seconds": 30},
                {"name": "silent", "base_url": silent.base_url, "timeout_seconds": 0.5},
            ],
        )
        app = configure_app(load_settings(config, environ={}))
        study = notice("high")
        queue_notice(app, study, "failing", 0)
        queue_notice(app, study, "silent", 0)
        store = ResultsStore(tmp_path / "data" / "results.sqlite")
        worker = start_worker(config, "delivery", tmp_path / "worker.log")
        try:
            wait_for(lambda: len(store.dead_letters()) == 2, timeout=120, interval=0.1)
            letters = store.dead_letters()
            # max_retries 2: the first try and two retries reached each server, then it was dead-lettered.
            # A loaded machine may record the last request a moment after the worker gave up on it.
            wait_for(lambda: len(failing.received) == 3 and len(silent.received) == 3, timeout=10, interval=0.1)
            assert {json.loads(letter["kwargs"])["endpoint"] for letter in letters} == {"failing", "silent"}
            assert all(letter["task"] == "notify" for letter in letters)
            assert {r["endpoint"]: r["status"] for r in store.notifications(study.job_id)} == {
                "failing": "dead-lettered",
                "silent": "dead-lettered",
            }
            assert all(
                study.accession_number not in letter["error"] and study.patient_id not in letter["error"]
                for letter in letters
            )
            assert sum(e["event"] == "notification_retry" for e in store.timeline(study.job_id)) == 4

            failing.answer = "201"  # the server is fixed; the operator replays its letter
            letter = next(
                letter for letter in letters if json.loads(letter["kwargs"])["endpoint"] == "failing"
            )
            replay_dead_letter(store, app, int(letter["id"]))
            wait_for(
                lambda: (
                    {r["endpoint"]: r["status"] for r in store.notifications(study.job_id)}["failing"]
                    == "notified"
                ),
                timeout=60,
                interval=0.1,
            )
        finally:
            stop(worker)
    assert len(failing.received) == 4
    # The replay sends the very resources of the first try: a server that kept them creates nothing twice.
    assert [e.fullUrl for e in failing.received[-1].entry] == [e.fullUrl for e in failing.received[0].entry]
    assert store.notified_endpoints() == {study.job_id: ["failing"]}
    assert [d["id"] for d in store.dead_letters()] == [
        d["id"] for d in letters if json.loads(d["kwargs"])["endpoint"] == "silent"
    ]


def test_the_analysis_queues_one_notification_per_hl7_and_fhir_endpoint_with_the_risks_meaning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    import pydicom

    from gateway.messages import Priority, StudyJob
    from workers import tasks
    from workers.triage import TriageDecision

    config = tmp_path / "q.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"data_dir": str(tmp_path / "data")},
                "notifications": {
                    "hl7": [{"name": "ris", "host": "127.0.0.1", "port": 2575}],
                    "fhir": [{"name": "hub", "base_url": "http://127.0.0.1:1/fhir"}],
                },
            }
        )
    )
    settings = load_settings(config, environ={})
    queued: list[tuple[str, dict[str, Any], int]] = []
    monkeypatch.setattr(
        tasks.app, "send_task", lambda name, kwargs, priority, **_: queued.append((name, kwargs, priority))
    )
    header = pydicom.Dataset()
    header.AccessionNumber, header.PatientID = "ACC9", "PAT-9"
    study = StudyJob(
        job_id="job-9",
        study_instance_uid="1.2.3.9",
        study_version=1,
        calling_ae="MODALITY",
        priority=Priority.ROUTINE,
        storage_root=str(tmp_path),
        instances=(),
    )
    decision = TriageDecision(
        category="high", risk=0.93, model="asg_mammonet", operating_point=None, policy="p"
    )
    tasks._queue_notifications(
        study,
        [SimpleNamespace(header=header, own_output=False)],
        settings,
        tasks.results_store(settings),
        Priority.STAT,
        decision,
        CALIBRATED,
    )
    assert [(name, kwargs["endpoint"], priority) for name, kwargs, priority in queued] == [
        ("workers.tasks.notify", "ris", int(Priority.STAT)),
        ("workers.tasks.notify", "hub", int(Priority.STAT)),
    ]
    for _, kwargs, _ in queued:
        assert ScoreMeaning.from_json_dict(kwargs["score"]) == CALIBRATED
        assert kwargs["notice"]["accession_number"] == "ACC9" and kwargs["notice"]["category"] == "high"
