"""The web service over journals written as the gateway and workers write them: auth, timeline, metrics."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from structlog.testing import capture_logs

from gateway.assembly import job_id_for
from gateway.journal import InstanceRecord, Journal, StoreOutcome
from gateway.settings import Settings, load_settings
from tests.utils import get_port, make_instance, write
from workers.http import create_app
from workers.metrics import TriageCollector, queue_depths
from workers.previews import MAX_WIDTH, preview_path, write_preview
from workers.results import ResultsStore

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789"
PATIENT_NAME = "SYNTH^TESTPATIENT"
PATIENT_ID = "SYNTH-0001"


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values = {"gateway.data_dir": str(tmp_path / "data"), "http.tokens": [TOKEN], "broker.url": "embedded",
              **overrides}
    return load_settings(REPO / "configs" / "default.yaml", environ={}, overrides=values)


def configured_app(settings: Settings) -> Any:
    """The Celery app pointed at *settings*' broker, with no connection pooled from an earlier test."""
    from workers.app import configure_app

    return configure_app(settings)


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_sc(path: Path, study_uid: str, seed: int, rows: int = 40, cols: int = 64) -> np.ndarray:
    """A small RGB Secondary Capture like the workers' heatmaps; returns its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (rows, cols, 3), dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.ImageComments = f"heatmap {seed}"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    write_preview(ds, path)  # as the worker does for every heatmap it writes
    return pixels


@pytest.fixture
def ops(tmp_path: Path) -> SimpleNamespace:
    """A data directory as a gateway and a worker leave it after two studies, one delivered."""
    settings = make_settings(tmp_path)
    data = Path(settings.gateway.data_dir)
    journal = Journal(data / "journal.sqlite")
    store = ResultsStore(data / "results.sqlite")
    t0 = time.time() - 300
    studies = []
    for index, risk in enumerate((0.2, 0.9)):
        ds = make_instance(modality="MG", seed=index)
        study_uid = str(ds.StudyInstanceUID)
        stored = write(ds, data / "studies" / f"s{index}")
        record = InstanceRecord(sop_uid=str(ds.SOPInstanceUID), study_uid=study_uid,
                                series_uid=str(ds.SeriesInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                                transfer_syntax=ExplicitVRLittleEndian, modality="MG", laterality="L",
                                view="CC", presentation="FOR PRESENTATION",
                                path=str(stored.relative_to(data)),
                                size=stored.stat().st_size, calling_ae="MAMMO_ROOM1", priority=6)
        version = journal.record_instance(record, StoreOutcome.NEW, now=t0 + index)
        journal.complete_study(study_uid, version, "quiet", now=t0 + index + 10)
        job_id = job_id_for(study_uid, version)
        journal.mark_dispatched(study_uid, version, job_id, now=t0 + index + 11)
        store.event(job_id, "analysis_start:first", at=t0 + index + 12)
        model_dir = data / "outputs" / job_id / "probe"
        sr = write(make_instance(study_uid=study_uid, modality="CT", seed=10 + index), model_dir)
        pixels = make_sc(model_dir / "sc.dcm", study_uid, seed=index)
        finding = {"model": "probe", "model_version": "1.0", "sop_instance_uid": str(ds.SOPInstanceUID),
                   "frame": 0, "laterality": "L", "view": "CC", "predicted_class": "malignant",
                   "probabilities": {"benign": 1 - risk, "malignant": risk}, "risk": risk, "birads": None,
                   "points": 0, "demo_weights": True}
        store.record_analysis(job_id, "probe", risk, [finding], [], [str(sr), str(model_dir / "sc.dcm")])
        timings = {"inference_s": 0.3, "outputs_s": 0.1, "failures": 0}
        store.event(job_id, "model_done:probe", json.dumps(timings), at=t0 + index + 13)
        store.event(job_id, "analysis_end:first", f"risk={risk}", at=t0 + index + 14)
        store.upsert_study(study_uid=study_uid, job_id=job_id, version=version, priority=6, state="analysed",
                           risk=risk, findings=[finding], demo_weights=True)
        studies.append(SimpleNamespace(study_uid=study_uid, job_id=job_id, risk=risk, pixels=pixels,
                                       sop_uid=str(ds.SOPInstanceUID)))
    store.event(studies[0].job_id, "delivered", "2 objects", at=t0 + 20)
    store.upsert_study(study_uid=studies[0].study_uid, job_id=studies[0].job_id, version=1, priority=6,
                       state="delivered")
    client = TestClient(create_app(settings))
    return SimpleNamespace(settings=settings, journal=journal, store=store, studies=studies, client=client,
                           data=data, t0=t0)


# ------------------------------------------------------------------------------ auth and health


def test_every_route_but_health_needs_a_token(ops: SimpleNamespace) -> None:
    client = ops.client
    study = ops.studies[0].job_id
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    api = ["/api/worklist", "/api/studies", f"/api/studies/{study}", "/api/deadletters", "/metrics",
           f"/api/studies/{study}/heatmaps/probe/0.png", "/partials/worklist", "/partials/studies"]
    pages = ["/", "/studies", f"/studies/{study}", "/deadletters"]
    for path in api:
        for headers in ({}, bearer("wrong"), {"Authorization": TOKEN}):
            response = client.get(path, headers=headers, follow_redirects=False)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get(path, headers=bearer()).status_code == 200, path
    for path in pages:
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == f"/login?next={path}"
        assert client.get(path, headers=bearer()).status_code == 200, path
    replay = client.post("/api/deadletters/1/replay", follow_redirects=False)
    assert replay.status_code == 401
    # Every route of the app is in one of the lists above, so a new route cannot skip the check.
    checked = {"/healthz", "/readyz", "/login", "/logout", "/api/deadletters/{letter_id}/replay",
               *api, *pages}
    routes = {getattr(r, "path", "") for r in client.app.routes}
    templated = {p.replace(study, "{job_id}").replace("/probe/0.png", "/{model}/{index}.png")
                 for p in checked}
    assert routes <= templated


def test_login_sets_a_strict_cookie_and_refuses_wrong_tokens(ops: SimpleNamespace) -> None:
    client = ops.client
    wrong = client.post("/login", data={"token": "nope", "next": "/studies"}, follow_redirects=False)
    assert wrong.status_code == 303 and wrong.headers["location"].startswith("/login?failed=1")
    assert "set-cookie" not in wrong.headers
    evil = client.post("/login", data={"token": TOKEN, "next": "//evil.example/"}, follow_redirects=False)
    assert evil.headers["location"] == "/"
    good = client.post("/login", data={"token": TOKEN, "next": "/studies"}, follow_redirects=False)
    assert good.headers["location"] == "/studies"
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/studies", follow_redirects=False).status_code == 200
    # With the cookie alone, a POST must carry the header a cross-site form cannot set.
    letter = ops.store.dead_letter("deliver", ops.studies[0].job_id, {"job_id": "x", "paths": []},
                                   "PACS refused")
    assert client.post(f"/api/deadletters/{letter}/replay").status_code == 403


def test_tokens_come_from_the_environment_and_rotate(tmp_path: Path) -> None:
    environ = {"PACS_TRIAGE_HTTP__TOKENS": "[new-token-aaaa, old-token-bbbb]",
               "PACS_TRIAGE_GATEWAY__DATA_DIR": str(tmp_path / "data")}
    settings = load_settings(REPO / "configs" / "default.yaml", environ=environ)
    assert settings.http.tokens == ("new-token-aaaa", "old-token-bbbb")
    client = TestClient(create_app(settings))
    assert client.get("/api/worklist", headers=bearer("new-token-aaaa")).status_code == 200
    assert client.get("/api/worklist", headers=bearer("old-token-bbbb")).status_code == 200
    assert client.get("/api/worklist", headers=bearer("retired-token")).status_code == 401
    single = load_settings(REPO / "configs" / "default.yaml",
                           environ={"PACS_TRIAGE_HTTP__TOKENS": "12345678"})
    assert single.http.tokens == ("12345678",)
    with pytest.raises(ValueError, match="at least one token"):
        create_app(load_settings(REPO / "configs" / "default.yaml", environ={}))


def test_readiness_is_false_when_the_broker_or_the_spool_is_unusable(tmp_path: Path) -> None:
    dead_port = get_port()
    settings = make_settings(tmp_path, **{"broker.url": f"redis://127.0.0.1:{dead_port}/0"})
    Path(settings.gateway.data_dir).mkdir(parents=True)
    answer = TestClient(create_app(settings)).get("/readyz")
    assert answer.status_code == 503
    assert answer.json()["checks"]["spool"] == "ok" and answer.json()["checks"]["broker"] != "ok"

    missing = make_settings(tmp_path, **{"gateway.data_dir": str(tmp_path / "not-mounted")})
    answer = TestClient(create_app(missing)).get("/readyz")
    assert answer.status_code == 503 and "does not exist" in answer.json()["checks"]["spool"]

    full = make_settings(tmp_path, **{"gateway.disk_watermark.min_free_percent": 100.0})
    Path(full.gateway.data_dir).mkdir(parents=True, exist_ok=True)
    answer = TestClient(create_app(full)).get("/readyz")
    assert answer.status_code == 503 and "watermark" in answer.json()["checks"]["spool"]


# ------------------------------------------------------------------------------ studies and worklist


def test_a_data_directory_nobody_wrote_yet_reads_as_empty_and_stays_untouched(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    client = TestClient(create_app(settings))
    for path in ("/api/worklist", "/api/studies", "/api/deadletters"):
        assert client.get(path, headers=bearer()).json() == []
    assert client.get("/api/studies/abc-v1", headers=bearer()).status_code == 404
    samples = _samples(client.get("/metrics", headers=bearer()).text)
    assert samples[("pacs_triage_queue_depth", (("queue", "analysis"),))] == 0
    assert samples[("pacs_triage_instances_received_total", (("outcome", "stored"),))] == 0
    assert samples[("pacs_triage_oldest_unfinished_study_age_seconds", ())] == 0
    assert not Path(settings.gateway.data_dir).exists()  # reading creates no journal, broker or folder


def test_worklist_is_sorted_by_risk_and_names_no_patient(ops: SimpleNamespace) -> None:
    response = ops.client.get("/api/worklist", headers=bearer())
    rows = response.json()
    assert [r["risk"] for r in rows] == sorted((s.risk for s in ops.studies), reverse=True)
    assert rows[0]["band"] == "high" and rows[1]["band"] == "routine"
    assert rows[0]["summary"][0]["predicted_class"] == "malignant"
    assert rows[0]["study"]["accession_number"] == "SYNTH0001"
    for text in (response.text, ops.client.get("/", headers=bearer()).text):
        assert PATIENT_NAME not in text and PATIENT_ID not in text
        assert all(s.study_uid not in text and s.sop_uid not in text for s in ops.studies)


def test_study_timeline_merges_gateway_and_worker_events(ops: SimpleNamespace) -> None:
    delivered = ops.studies[0]
    detail = ops.client.get(f"/api/studies/{delivered.job_id}", headers=bearer()).json()
    events = [(e["source"], e["event"]) for e in detail["timeline"]]
    assert events == [("gateway", "first_instance"), ("gateway", "complete"), ("gateway", "queued"),
                      ("worker", "analysis_start:first"), ("worker", "model_done:probe"),
                      ("worker", "analysis_end:first"), ("worker", "delivered")]
    assert [e["at"] for e in detail["timeline"]] == sorted(e["at"] for e in detail["timeline"])
    assert "outputs built" in detail["timeline"][4]["label"]
    assert detail["state"] == "delivered" and detail["instances"] == 1
    assert detail["calling_ae"] == "MAMMO_ROOM1"
    studies = {s["job_id"]: s for s in ops.client.get("/api/studies", headers=bearer()).json()}
    assert studies[delivered.job_id]["state"] == "delivered"
    assert studies[ops.studies[1].job_id]["state"] == "analysed"
    assert ops.client.get("/api/studies/no-such-job-v1", headers=bearer()).status_code == 404
    assert ops.client.get("/api/studies/..%2Fetc", headers=bearer()).status_code == 404


def test_a_study_still_at_the_gateway_has_a_timeline_before_any_job_id(ops: SimpleNamespace) -> None:
    ds = make_instance(modality="MG", seed=99)
    record = InstanceRecord(sop_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID),
                            series_uid=str(ds.SeriesInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                            transfer_syntax=ExplicitVRLittleEndian, modality="MG", laterality="R", view="MLO",
                            presentation="FOR PRESENTATION", path="nowhere.dcm", size=1,
                            calling_ae="US_ROOM2", priority=6)
    version = ops.journal.record_instance(record, StoreOutcome.NEW)
    job_id = job_id_for(str(ds.StudyInstanceUID), version)
    detail = ops.client.get(f"/api/studies/{job_id}", headers=bearer()).json()
    assert detail["state"] == "receiving" and [e["event"] for e in detail["timeline"]] == ["first_instance"]
    listed = {s["job_id"]: s["state"] for s in ops.client.get("/api/studies", headers=bearer()).json()}
    assert listed[job_id] == "receiving"
    page = ops.client.get(f"/studies/{job_id}", headers=bearer()).text
    assert 'http-equiv="refresh"' in page  # an unfinished study's page refreshes itself


def test_heatmap_png_is_the_secondary_capture(ops: SimpleNamespace) -> None:
    study = ops.studies[1]
    detail = ops.client.get(f"/api/studies/{study.job_id}", headers=bearer()).json()
    (model,) = detail["models"]
    assert model["outputs"] == 2 and len(model["heatmaps"]) == 1  # the SR is not a heatmap
    assert model["heatmaps"][0]["caption"] == "heatmap 1"
    with pytest.MonkeyPatch.context() as patch:  # the service never decodes a DICOM object's pixels
        patch.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("pixel data decoded")))
        response = ops.client.get(model["heatmaps"][0]["url"], headers=bearer())
    assert response.headers["content-type"] == "image/png"
    decoded = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), study.pixels)
    small = ops.client.get(model["heatmaps"][0]["url"] + "?width=64", headers=bearer())
    assert cv2.imdecode(np.frombuffer(small.content, np.uint8), cv2.IMREAD_COLOR).shape[1] == 64
    for bad in ("/probe/1.png", "/other/0.png", "/probe/-1.png"):
        url = f"/api/studies/{study.job_id}/heatmaps{bad}"
        assert ops.client.get(url, headers=bearer()).status_code in (404, 422)
    page = ops.client.get(f"/studies/{study.job_id}", headers=bearer()).text
    assert model["heatmaps"][0]["url"] in page and "DEMO WEIGHTS" in page


def test_a_preview_is_the_sc_shrunk_to_the_page_width_and_keeps_its_aspect(tmp_path: Path) -> None:
    wide = make_sc(tmp_path / "wide.dcm", generate_uid(), seed=7, rows=300, cols=MAX_WIDTH + 500)
    preview = cv2.imread(str(preview_path(tmp_path / "wide.dcm")), cv2.IMREAD_COLOR)
    assert preview.shape == (round(300 * MAX_WIDTH / (MAX_WIDTH + 500)), MAX_WIDTH, 3)
    expected = cv2.resize(wide, preview.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.array_equal(cv2.cvtColor(preview, cv2.COLOR_BGR2RGB), expected)
    narrow = make_sc(tmp_path / "narrow.dcm", generate_uid(), seed=8, rows=40, cols=50)
    kept = cv2.imread(str(preview_path(tmp_path / "narrow.dcm")), cv2.IMREAD_COLOR)
    assert np.array_equal(cv2.cvtColor(kept, cv2.COLOR_BGR2RGB), narrow)


def test_outputs_outside_the_data_directory_are_never_served(ops: SimpleNamespace, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "sc.dcm"
    make_sc(outside, ops.studies[0].study_uid, seed=5)
    ops.store.record_analysis(ops.studies[0].job_id, "probe", 0.2, [], [], [str(outside)])
    detail = ops.client.get(f"/api/studies/{ops.studies[0].job_id}", headers=bearer()).json()
    assert detail["models"][0]["heatmaps"] == []
    url = f"/api/studies/{ops.studies[0].job_id}/heatmaps/probe/0.png"
    assert ops.client.get(url, headers=bearer()).status_code == 404


# ------------------------------------------------------------------------------ dead letters


def test_dead_letter_replay_requeues_the_task_once(ops: SimpleNamespace) -> None:
    job_id = ops.studies[1].job_id
    kwargs = {"job_id": job_id, "paths": ["/x.dcm"], "study_uid": ops.studies[1].study_uid}
    letter = ops.store.dead_letter("deliver", job_id, kwargs, "PACS refused the instance")
    listed = ops.client.get("/api/deadletters", headers=bearer()).json()
    assert [(d["id"], d["task"], d["job_id"]) for d in listed] == [(letter, "deliver", job_id)]
    assert ops.studies[1].study_uid not in json.dumps(listed)  # the kwargs stay inside
    page = ops.client.get("/deadletters", headers=bearer()).text
    assert f'data-replay="{letter}"' in page

    with capture_logs() as logs:
        answer = ops.client.post(f"/api/deadletters/{letter}/replay", headers=bearer())
    assert answer.status_code == 200 and answer.json()["replayed"] == letter
    assert queue_depths(ops.settings)["delivery"] == 1
    assert ops.store.dead_letter_by_id(letter)["replayed_at"] is not None
    assert ops.client.get("/api/deadletters", headers=bearer()).json() == []
    timeline = ops.client.get(f"/api/studies/{job_id}", headers=bearer()).json()["timeline"]
    assert "replayed" in [e["event"] for e in timeline]
    assert ops.client.post(f"/api/deadletters/{letter}/replay", headers=bearer()).status_code == 409
    assert ops.client.post("/api/deadletters/999/replay", headers=bearer()).status_code == 404
    logged = json.dumps(logs)
    assert ops.studies[1].study_uid not in logged and job_id in logged


# ------------------------------------------------------------------------------ metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_expose_every_series_from_the_journals_and_the_broker(ops: SimpleNamespace) -> None:
    first = ops.studies[0]
    # One resend of a held instance, refusals, a study still receiving, timings, retries, letters.
    row = ops.journal.find_instance(first.sop_uid)
    fields = [f.name for f in dataclasses.fields(InstanceRecord) if f.name != "priority"]
    resend = InstanceRecord(**{name: row[name] for name in fields}, priority=6)
    ops.journal.record_instance(resend, StoreOutcome.DUPLICATE)
    for reason in ("invalid_uid", "invalid_uid", "out_of_resources"):
        ops.journal.record_refusal(reason)
    waiting = InstanceRecord(sop_uid=generate_uid(), study_uid=generate_uid(), series_uid=generate_uid(),
                             sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                             transfer_syntax=ExplicitVRLittleEndian, modality="MG", laterality="L", view="CC",
                             presentation="", path="w.dcm", size=1, calling_ae="MAMMO_ROOM1", priority=6)
    ops.journal.record_instance(waiting, StoreOutcome.NEW, now=time.time() - 100)
    ops.store.event(first.job_id, "model_done:heavy", json.dumps({"inference_s": 7.0}))
    ops.store.event(first.job_id, "model_done:heavy", json.dumps({"inference_s": 0.04}))
    ops.store.event(first.job_id, "delivery_retry", "in 2.0s: connection refused")
    ops.store.event(first.job_id, "delivery_retry", "in 4.0s: connection refused")
    ops.store.dead_letter("deliver", first.job_id, {}, "gave up")
    ops.store.dead_letter("analyse", first.job_id, {}, "worker died")
    app = configured_app(ops.settings)
    for queue, priority in (("analysis", 0), ("analysis", 0), ("analysis", 6), ("delivery", 2)):
        app.send_task(f"workers.tasks.{'analyse' if queue == 'analysis' else 'deliver'}", kwargs={},
                      queue=queue, priority=priority)

    text = ops.client.get("/metrics", headers=bearer()).text
    samples = _samples(text)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("pacs_triage_instances_received_total", outcome="stored") == 3
    assert value("pacs_triage_instances_received_total", outcome="duplicate") == 1
    assert value("pacs_triage_instances_refused_total", reason="invalid_uid") == 2
    assert value("pacs_triage_instances_refused_total", reason="out_of_resources") == 1
    assert value("pacs_triage_studies_completed_total", completed_by="quiet") == 2
    assert value("pacs_triage_studies", state="delivered") == 1
    assert value("pacs_triage_studies", state="analysed") == 1
    assert value("pacs_triage_queue_depth", queue="analysis") == 3
    assert value("pacs_triage_queue_depth", queue="delivery") == 1
    assert value("pacs_triage_broker_up") == 1
    assert value("pacs_triage_inference_seconds_count", model="probe") == 2
    assert value("pacs_triage_inference_seconds_bucket", model="probe", le="0.25") == 0
    assert value("pacs_triage_inference_seconds_bucket", model="probe", le="0.5") == 2
    assert value("pacs_triage_inference_seconds_count", model="heavy") == 2
    assert value("pacs_triage_inference_seconds_bucket", model="heavy", le="0.05") == 1
    assert value("pacs_triage_inference_seconds_bucket", model="heavy", le="5.0") == 1
    assert value("pacs_triage_inference_seconds_bucket", model="heavy", le="+Inf") == 2
    assert value("pacs_triage_inference_seconds_sum", model="heavy") == pytest.approx(7.04)
    assert value("pacs_triage_delivery_failures_total", kind="retry") == 2
    assert value("pacs_triage_delivery_failures_total", kind="dead_letter") == 1
    assert value("pacs_triage_dead_letters", task="deliver") == 1
    assert value("pacs_triage_dead_letters", task="analyse") == 1
    # The receiving study is the oldest unfinished one; the analysed study (it has outputs to
    # deliver) is older still, so the age is that of the analysed study's first instance.
    assert value("pacs_triage_oldest_unfinished_study_age_seconds") == pytest.approx(time.time() - ops.t0 - 1,
                                                                                      abs=30)
    # A second scrape reads only new timeline rows: nothing is counted twice.
    ops.store.event(first.job_id, "model_done:heavy", json.dumps({"inference_s": 0.5}))
    again = _samples(ops.client.get("/metrics", headers=bearer()).text)
    assert again[("pacs_triage_inference_seconds_count", (("model", "heavy"),))] == 3
    assert again[("pacs_triage_delivery_failures_total", (("kind", "retry"),))] == 2


def test_oldest_unfinished_study_ignores_finished_and_superseded_versions(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    data = Path(settings.gateway.data_dir)
    journal, store = Journal(data / "journal.sqlite"), ResultsStore(data / "results.sqlite")
    now = 10_000.0
    collector = TriageCollector(settings, clock=lambda: now)

    def age() -> float:
        name = "pacs_triage_oldest_unfinished_study_age_seconds"
        (family,) = [m for m in collector.collect() if m.name == name]
        return family.samples[0].value

    assert age() == 0
    record = InstanceRecord(sop_uid="1.2.3.1", study_uid="1.2.3", series_uid="1.2.3.9",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                            transfer_syntax=ExplicitVRLittleEndian, modality="MG", laterality="L", view="CC",
                            presentation="", path="a.dcm", size=1, calling_ae="A", priority=6)
    journal.record_instance(record, StoreOutcome.NEW, now=now - 500)
    assert age() == 500  # receiving
    journal.complete_study("1.2.3", 1, "quiet", now=now - 400)
    journal.mark_dispatched("1.2.3", 1, job_id_for("1.2.3", 1), now=now - 399)
    assert age() == 500  # queued, no worker has it yet
    store.upsert_study(study_uid="1.2.3", job_id=job_id_for("1.2.3", 1), version=1, priority=6,
                       state="analysed")
    assert age() == 0  # analysed with nothing to deliver is finished
    store.record_analysis(job_id_for("1.2.3", 1), "m", 0.5, [], [], ["/out/sr.dcm"])
    assert age() == 500  # now there are outputs waiting for delivery
    # A new instance reopens the study as version 2; the worklist moves to it and version 1 is superseded.
    journal.record_instance(dataclasses.replace(record, sop_uid="1.2.3.2"), StoreOutcome.NEW, now=now - 50)
    store.upsert_study(study_uid="1.2.3", job_id=job_id_for("1.2.3", 2), version=2, priority=6,
                       state="delivered")
    assert age() == 50  # v1 superseded; v2 still receiving at the gateway
    journal.complete_study("1.2.3", 2, "quiet", now=now - 40)
    journal.mark_dispatched("1.2.3", 2, job_id_for("1.2.3", 2), now=now - 39)
    assert age() == 0


@pytest.mark.redis
def test_queue_depth_on_redis_counts_every_priority(tmp_path: Path, redis_url: str) -> None:
    try:
        settings = make_settings(tmp_path, **{"broker.url": redis_url})
        assert queue_depths(settings) == {"analysis": 0, "delivery": 0}  # nothing was ever queued
        app = configured_app(settings)
        # The Redis transport keeps one list per priority level: a count of one list would miss most.
        for priority in (0, 0, 3, 9):
            app.send_task("workers.tasks.analyse", kwargs={}, queue="analysis", priority=priority)
        app.send_task("workers.tasks.deliver", kwargs={}, queue="delivery", priority=2)
        assert queue_depths(settings) == {"analysis": 4, "delivery": 1}
    finally:
        configured_app(make_settings(tmp_path))


def test_the_gateway_counts_refused_instances_by_reason(tmp_path: Path) -> None:
    from gateway.service import GatewayService
    from tests.conftest import gateway_settings
    from tests.test_gateway_scp import _store

    service = GatewayService(gateway_settings(tmp_path), None)
    service.start()
    try:
        good, bad = make_instance(modality="CT", seed=1), make_instance(modality="CT", seed=2)
        bad.StudyInstanceUID = "1.2.03.4"
        with pydicom.config.disable_value_validation():
            assert _store(service, [good, bad, bad]) == [0x0000, 0xC220, 0xC220]
    finally:
        service.stop()
    settings = gateway_settings(tmp_path).model_copy(
        update={"http": make_settings(tmp_path).http})
    samples = _samples(TestClient(create_app(settings)).get("/metrics", headers=bearer()).text)
    assert samples[("pacs_triage_instances_refused_total", (("reason", "invalid_uid"),))] == 2
    assert samples[("pacs_triage_instances_received_total", (("outcome", "stored"),))] == 1
