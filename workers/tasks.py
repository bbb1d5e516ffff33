"""Celery tasks: two-stage, risk-first analysis on the analysis queue, and delivery on its own queue.

Messages carry the job (UIDs and storage paths) and output paths, never pixels.  Each task
counts its starts in the results journal; past ``worker.max_redeliveries`` (a process killed
mid-task again and again) the work is dead-lettered instead of looping.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import kombu.exceptions
import pydicom
import structlog
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from gateway.errors import PermanentError, PluginError, TransientError
from gateway.messages import Priority, StudyJob
from gateway.retry import WORKER_PUBLISH, delivery_policy
from gateway.settings import DestinationSettings, Settings
from plugins.host import ModelHost
from plugins.types import ScoreMeaning, failure_reason
from workers.app import ANALYSIS_QUEUE, DELIVERY_QUEUE, app, current_settings
from workers.commitment import request_commitment
from workers.fhir import FhirRefused, build_resources
from workers.fhir import post as post_to_fhir
from workers.notify import (
    NotificationRefused,
    StudyNotice,
    build_message,
    interim_decision,
    send,
    wants_notification,
)
from workers.pacs import deliver as deliver_to_pacs
from workers.pipeline import (
    DECODED_DIR,
    DecodedImages,
    ModelRun,
    StudyTimings,
    accepting_models,
    adds_new_source,
    analyse_study,
    content_digests,
    model_host,
    prediction_summary,
    read_sources,
    skip_reasons,
    study_budget_refusals,
    write_study_report,
)
from workers.results import (
    COMMITTED,
    DELIVERY_RETRY,
    FINISHED_STATES,
    MODEL_DONE_PREFIX,
    ResultsStore,
    stored_triage,
)
from workers.supersede import SupersededOutput, rejection_kos
from workers.triage import ModelRisk, TriageDecision, decide
from workers.triage import priority as triage_priority

log = structlog.get_logger(__name__)

_stores: dict[str, ResultsStore] = {}

#: The broker is unreachable: a fault of the queue, never of the study.
_BROKER_ERRORS = (kombu.exceptions.OperationalError, ConnectionError)


def results_store(settings: Settings) -> ResultsStore:
    path = str(Path(settings.gateway.data_dir).resolve() / "results.sqlite")
    if path not in _stores:
        _stores[path] = ResultsStore(path)
    return _stores[path]


def worker_device(settings: Settings) -> str:
    return os.environ.get("PACS_TRIAGE_WORKER_DEVICE") or settings.worker.device


def _too_many_attempts(
    store: ResultsStore, settings: Settings, key: str, task: str, job_id: str, kwargs: dict[str, Any]
) -> bool:
    attempt = store.bump_attempt(key)
    if attempt <= settings.worker.max_redeliveries:
        return False
    letter = store.dead_letter(
        task, job_id, kwargs, f"started {attempt} times without finishing (the worker died each time)"
    )
    store.event(job_id, "dead-lettered", f"letter {letter}")
    log.error("task.dead_lettered", task=task, job_id=job_id, attempts=attempt, letter=letter)
    return True


def _findings(runs: list[ModelRun]) -> list[dict[str, Any]]:
    return [prediction_summary(p) for run in runs for p in run.predictions]


@app.task(name="workers.tasks.analyse", bind=True, acks_late=True)
def analyse(self: Task, job: dict[str, Any], stage: str = "first") -> None:
    """Analyse one study version.

    Stage ``first`` runs the fast triage model (``triage.first_stage_model``) at the incoming
    priority; its risk sets the priority of stage ``rest`` (every other accepting model) and of
    the deliveries, so a suspicious study's full analysis and results overtake routine ones.
    Any failure dead-letters the study visibly instead of leaving it "analysing" forever.
    """
    settings = current_settings()
    study = StudyJob.from_json_dict(job)
    store = results_store(settings)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(job_id=study.job_id, stage=stage)
    key = f"analyse:{study.job_id}:{stage}"

    def give_up(error: str) -> None:
        store.upsert_study(
            study_uid=study.study_instance_uid,
            job_id=study.job_id,
            version=study.study_version,
            priority=int(study.priority),
            state="dead-lettered",
        )

    if _too_many_attempts(store, settings, key, "analyse", study.job_id, {"job": job, "stage": stage}):
        give_up("too many attempts")
        return
    try:
        _analyse(study, job, stage, settings, store, key)
    except _BROKER_ERRORS as exc:
        # The analysis is journalled, but its delivery could not be queued.  Dead-lettering would hide a
        # finished study behind a broker restart: give the message back instead (requeued now if the
        # broker is back, else Redis restores it after the visibility timeout) and let it run again.
        log.warning("analysis.requeued", reason="broker unreachable", error=str(exc))
        store.event(study.job_id, "requeued", "broker unreachable when queueing the next step")
        store.reset_attempts(key)
        raise Reject(str(exc), requeue=True) from exc
    except BaseException as exc:  # recorded and visible; Celery would ack it anyway (tasks.html)
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise  # the process is going away: acks_late + reject_on_worker_lost give the study back
        # BaseException, not Exception: a Rust decoder's panic (pyo3's PanicException) is one, and
        # escaping here it left the study "analysing" for ever with its message acknowledged.
        # The type and our own words only (failure_reason): a foreign message can quote patient data.
        reason = failure_reason("analysis failed", exc)
        log.error("analysis.failed", error=reason)
        letter = store.dead_letter("analyse", study.job_id, {"job": job, "stage": stage}, reason)
        store.event(study.job_id, "dead-lettered", f"letter {letter}")
        store.reset_attempts(key)
        give_up(str(exc))


def _analyse(
    study: StudyJob, job: dict[str, Any], stage: str, settings: Settings, store: ResultsStore, key: str
) -> None:
    """One stage of a study version; it ends in a final state (done, delivered via the delivery
    task, skipped, dead-lettered) or hands the rest to the next stage."""
    store.event(study.job_id, f"analysis_start:{stage}")
    timings = StudyTimings()
    sources = read_sources(study, timings)
    if stage == "first" and not adds_new_source(study, sources):
        _inherit_earlier_version(study, job, store, key)
        return
    store.upsert_study(
        study_uid=study.study_instance_uid,
        job_id=study.job_id,
        version=study.study_version,
        priority=int(study.priority),
        state="analysing",
    )
    host = model_host(settings, worker_device(settings))
    unreadable = [
        {"sop_instance_uid": s.instance.sop_instance_uid, "error": s.error} for s in sources if s.error
    ]
    for problem in unreadable:
        log.warning(
            "instance.unreadable", sop_uid_hash=problem["sop_instance_uid"][-8:], error=problem["error"]
        )
    models = accepting_models(host, [s.ref for s in sources if s.ref is not None])
    if not models:
        if unreadable:
            raise PermanentError(
                "no model accepts any readable image; unreadable: "
                + "; ".join(str(u["error"]) for u in unreadable[:5])
            )
        _finish_skipped(store, study, skip_reasons(host, sources), key)
        return
    first = settings.triage.first_stage_model
    if stage == "first" and first in models:
        this_stage, later = [first], [m for m in models if m != first]
    elif stage == "first":
        this_stage, later = models, []
    else:
        this_stage, later = [m for m in models if m != first], []

    def journal(run: ModelRun, done: bool = True) -> None:
        # Unreadable instances are every model's failures: journalled and shown, not only logged.
        store.record_analysis(
            study.job_id,
            run.model,
            run.risk,
            [prediction_summary(p) for p in run.predictions],
            [{"sop_instance_uid": f.image.sop_instance_uid, "error": f.error} for f in run.failures]
            + unreadable,
            [str(p) for p in run.outputs],
        )
        if not done:
            return
        store.event(
            study.job_id,
            f"{MODEL_DONE_PREFIX}{run.model}",
            json.dumps(
                {
                    "inference_s": round(run.seconds_inference, 3),
                    "outputs_s": round(run.seconds_outputs, 3),
                    "failures": len(run.failures),
                    # Why this model left images out (its rules, the routing, the pixel budget).
                    "skipped": [
                        {"sop_instance_uid": k.image.sop_instance_uid, "reason": k.reason}
                        for k in run.skipped
                    ],
                }
            ),
        )

    output_root = Path(settings.gateway.data_dir).resolve() / "outputs" / study.job_id
    # The first stage leaves what it decoded for the second (another task, perhaps another process), which
    # reads it back instead of decoding each source again.
    images = DecodedImages(timings, saved=output_root / DECODED_DIR, digests=content_digests(sources))
    try:
        runs = analyse_study(
            host,
            this_stage,
            sources,
            settings,
            output_root,
            timings,
            on_model_done=journal,
            images=images,
            # Only a later stage's report reads this stage's maps back; this stage's own takes them from memory.
            maps_on_disk=bool(later),
        )
    except SoftTimeLimitExceeded:
        store.event(study.job_id, "analysis_timeout", stage)
        raise

    if later:
        images.save(output_root / DECODED_DIR)
    decision = study_triage(host, store, study.job_id, settings)
    if not later and runs and settings.outputs.report == "study":
        # Every stage is done: the heatmap series of the model that set the triage and one SR for the study,
        # over every model's kept predictions and maps.  Journalled with the last model's outputs before the
        # study is "analysed", so their delivery (this stage's one delivery) is waited for.
        try:
            report = write_study_report(
                sources,
                output_root,
                decision,
                settings,
                triage=partial(
                    decide,
                    high_point=settings.triage.high_operating_point,
                    intermediate_point=settings.triage.intermediate_operating_point,
                    fallback_threshold=settings.triage.high_risk_threshold,
                ),
                images=images,
                accepting=models,
                # The journalled failures of every stage: the CAD SR's summary says which model partly failed.
                failed_images={
                    str(a["model"]): [str(f["sop_instance_uid"]) for f in json.loads(a["failures"])]
                    for a in store.analyses(study.job_id)
                },
                on_problem=lambda reason: store.event(study.job_id, "cad_sr_failed", reason),
                kept_maps={run.model: run.kept_maps for run in runs if run.kept_maps is not None},
            )
        except Exception as exc:  # our words and the type only: highdicom can quote patient attributes
            raise PermanentError(failure_reason("building the study report failed", exc)) from exc
        if report:
            runs[-1].outputs.extend(report)
            journal(runs[-1], done=False)
    if not later:
        # No stage reads them any more; a redelivered task that finds them gone decodes again.
        shutil.rmtree(output_root / DECODED_DIR, ignore_errors=True)
    store.event(study.job_id, f"timings:{stage}", json.dumps(timings.as_dict()))

    risk = decision.risk
    priority = study.priority
    if decision.model is not None:
        priority = min(study.priority, triage_priority(decision))
    previous = store.study(study.study_instance_uid)
    findings = json.loads(previous["findings"]) if previous and previous["job_id"] == study.job_id else []
    findings += _findings(runs)
    demo = any(f.get("demo_weights") for f in findings)
    store.upsert_study(
        study_uid=study.study_instance_uid,
        job_id=study.job_id,
        version=study.study_version,
        priority=int(priority),
        state="analysed" if not later else "analysing",
        risk=risk,
        findings=findings,
        demo_weights=demo,
        triage=decision,
    )
    store.event(study.job_id, f"analysis_end:{stage}", f"risk={risk}; triage {decision.explanation}")

    if risk is not None and decision.category == "high" and stage == "first":
        host.plugin_manager.hook.pacs_triage_high_risk_study(
            study_instance_uid=study.study_instance_uid,
            risk=risk,
            predictions=[p for run in runs for p in run.predictions],
        )

    unbuilt = [f"{run.model}: {run.outputs_error}" for run in runs if run.outputs_error]
    if unbuilt:
        # Predictions without their SR/SCs: nothing would ever reach the PACS and the study would stay
        # "analysed" for good.  Dead-letter it, visibly; its risk and findings stay on the worklist.
        raise PermanentError("; ".join(unbuilt))
    if not later and not findings:
        analyses = store.analyses(study.job_id)
        failed = [f"{a['model']}: {f['error']}" for a in analyses for f in json.loads(a["failures"])]
        if failed:
            # Every image failed in every model: nothing will reach the PACS, so say so visibly.
            raise PermanentError(f"no model could analyse any image: {'; '.join(failed[:5])}")
        # Nothing failed and nothing was found: every image was declined (routing, pixel budget).
        refs = [s.ref for s in sources if s.ref is not None]
        _finish_skipped(
            store, study, skip_reasons(host, sources, study_budget_refusals(host, refs, settings)), key
        )
        return
    outputs = [str(p) for run in runs for p in run.outputs]
    if not outputs and not later:
        # This stage adds nothing to deliver; the first stage's outputs may all be stored already.
        _mark_delivered(store, study.study_instance_uid, study.job_id)
    if outputs:
        app.send_task(
            "workers.tasks.deliver",
            kwargs={
                "job_id": study.job_id,
                "paths": outputs,
                "study_uid": study.study_instance_uid,
                "study_version": study.study_version,
            },
            queue=DELIVERY_QUEUE,
            priority=int(priority),
            retry=True,
            retry_policy=WORKER_PUBLISH.kombu_retry_policy(),
        )
    if later:
        app.send_task(
            "workers.tasks.analyse",
            kwargs={"job": job, "stage": "rest"},
            queue=ANALYSIS_QUEUE,
            priority=int(priority),
            retry=True,
            retry_policy=WORKER_PUBLISH.kombu_retry_policy(),
        )
    else:
        _queue_notifications(
            study, sources, settings, store, priority, decision, _score_meaning(host, decision.model)
        )
    store.reset_attempts(key)


def _queue_notifications(
    study: StudyJob,
    sources: list[Any],
    settings: Settings,
    store: ResultsStore,
    priority: Priority,
    decision: TriageDecision | None = None,
    meaning: ScoreMeaning | None = None,
) -> None:
    """Queue the study's triage flag for each RIS endpoint and FHIR server, on the delivery queue at the
    study's priority and after its delivery, so they hear of studies in triage order too.

    *meaning* (what the deciding model's risk is) travels with the task for the FHIR Observation, which
    names the risk for what it is; the delivery worker need not load the model to learn it.
    """
    if decision is None:
        risks = {str(a["model"]): a["risk"] for a in store.analyses(study.job_id)}
        decision = interim_decision(risks, settings.triage.high_risk_threshold)
    if not wants_notification(settings.notifications, decision.category):
        return
    header = next((s.header for s in sources if s.header is not None and not s.own_output), None)
    notice = StudyNotice.from_decision(
        job_id=study.job_id,
        study_uid=study.study_instance_uid,
        decision=decision,
        accession_number=str(header.get("AccessionNumber", "") or "") if header is not None else "",
        patient_id=str(header.get("PatientID", "") or "") if header is not None else "",
    )
    score = None if meaning is None else meaning.to_json_dict()
    hl7_names = [endpoint.name for endpoint in settings.notifications.hl7]
    for name in hl7_names + [endpoint.name for endpoint in settings.notifications.fhir]:
        kwargs = {"notice": notice.to_json_dict(), "endpoint": name, "score": score}
        app.send_task(
            "workers.tasks.notify",
            kwargs=kwargs,
            queue=DELIVERY_QUEUE,
            priority=int(priority),
            retry=True,
            retry_policy=WORKER_PUBLISH.kombu_retry_policy(),
        )


def _score_meaning(host: ModelHost, model: str | None) -> ScoreMeaning | None:
    """What *model*'s risk means, as its predictions carry it; None when no model decided or it cannot load."""
    if model is None:
        return None
    try:
        return host.load(model).plugin.spec.score
    except PluginError:
        return None


def study_triage(host: ModelHost, store: ResultsStore, job_id: str, settings: Settings) -> TriageDecision:
    """The study's triage so far: every model that analysed it (this stage's and earlier ones'), each read
    against its own operating points (:func:`workers.triage.decide`)."""
    models = []
    for analysis in store.analyses(job_id):
        if analysis["risk"] is None:
            continue
        name = str(analysis["model"])
        try:
            points = host.load(name).operating_points
        except PluginError:  # disabled or unloadable since it ran: the site-wide threshold stands in
            points = ()
        models.append(ModelRisk(model=name, risk=float(analysis["risk"]), operating_points=points))
    return decide(
        models,
        high_point=settings.triage.high_operating_point,
        intermediate_point=settings.triage.intermediate_operating_point,
        fallback_threshold=settings.triage.high_risk_threshold,
    )


#: How long a version that adds no new source waits before it looks again at the earlier one.
_EARLIER_VERSION_POLL_SECONDS = 30


def _inherit_earlier_version(study: StudyJob, job: dict[str, Any], store: ResultsStore, key: str) -> None:
    """A version that adds no new source image (our own SR and SCs sent back by the PACS, or only
    instances an earlier version had) runs no model and delivers nothing: it takes the earlier
    version's final state, risk and findings once that version has one."""
    earlier = store.study(study.study_instance_uid)
    if earlier is not None and int(earlier["version"]) >= study.study_version:
        store.event(study.job_id, "not_analysed", "a newer version of the study is already on the worklist")
        store.reset_attempts(key)
        return
    if earlier is not None and earlier["state"] not in FINISHED_STATES:
        # Taking its row now would refuse the earlier version's own updates (they are older): wait.
        store.event(study.job_id, "waiting", f"for version {earlier['version']} to finish")
        store.reset_attempts(key)
        app.send_task(
            "workers.tasks.analyse",
            kwargs={"job": job, "stage": "first"},
            queue=ANALYSIS_QUEUE,
            priority=int(study.priority),
            countdown=_EARLIER_VERSION_POLL_SECONDS,
            retry=True,
            retry_policy=WORKER_PUBLISH.kombu_retry_policy(),
        )
        return
    detail = (
        "this study version adds no new source image (only our own outputs or instances an earlier "
        "version already had)"
    )
    store.event(study.job_id, "not_analysed", detail)
    if earlier is None:  # nothing on the worklist to take over (a fresh results journal): say why, finished
        _finish_skipped(store, study, {"all": {"all": detail}}, key)
        return
    store.upsert_study(
        study_uid=study.study_instance_uid,
        job_id=study.job_id,
        version=study.study_version,
        priority=int(earlier["priority"]),
        state=str(earlier["state"]),
        risk=earlier["risk"],
        findings=json.loads(earlier["findings"]),
        demo_weights=bool(earlier["demo_weights"]),
        triage=stored_triage(earlier),
    )
    store.reset_attempts(key)


def _finish_skipped(
    store: ResultsStore, study: StudyJob, reasons: dict[str, dict[str, str]], key: str
) -> None:
    """Final state ``skipped``: no model analyses any image; each image's reasons are journalled."""
    store.event(study.job_id, "skipped", json.dumps(reasons, sort_keys=True))
    store.upsert_study(
        study_uid=study.study_instance_uid,
        job_id=study.job_id,
        version=study.study_version,
        priority=int(study.priority),
        state="skipped",
        findings=[],
    )
    log.info("analysis.skipped", images=len(reasons))
    store.reset_attempts(key)


def _destination_key(destination: DestinationSettings) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


@app.task(name="workers.tasks.deliver", bind=True, acks_late=True, max_retries=None)
def deliver(self: Task, job_id: str, paths: list[str], study_uid: str = "", study_version: int = 0) -> None:
    """C-STORE a study's outputs to every configured destination, retrying with capped backoff.

    Output UIDs are deterministic, so a retry or a redelivery re-sends the same instances and the
    PACS stores no duplicate.  After ``delivery.max_retries`` the delivery is dead-lettered.
    """
    settings = current_settings()
    store = results_store(settings)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(job_id=job_id)
    kwargs = {"job_id": job_id, "paths": paths, "study_uid": study_uid, "study_version": study_version}
    key = f"deliver:{job_id}:{hashlib.sha256('|'.join(paths).encode()).hexdigest()[:16]}"
    if _too_many_attempts(store, settings, key, "deliver", job_id, kwargs):
        return
    if not settings.delivery.destinations:
        store.event(
            job_id, "outputs_kept_locally", f"{len(paths)} objects; no delivery destination configured"
        )
        _mark_delivered(store, study_uid, job_id)
        store.reset_attempts(key)
        return
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            store.dead_letter("deliver", job_id, kwargs, failure_reason(f"output {path} unreadable", exc))
            return
    pending_error: Exception | None = None
    for destination in settings.delivery.destinations:
        where = _destination_key(destination)
        try:
            results = deliver_to_pacs(datasets, destination, calling_ae_title=settings.delivery.ae_title)
        except TransientError as exc:
            pending_error = exc
            for ds in datasets:
                store.record_delivery(
                    sop_uid=ds.SOPInstanceUID,
                    destination=where,
                    job_id=job_id,
                    status="retrying",
                    error=str(exc),
                )
            continue
        except PermanentError as exc:
            store.dead_letter("deliver", job_id, kwargs, f"{where}: {exc}")
            store.event(job_id, "dead-lettered", where)
            return
        for result in results:
            store.record_delivery(
                sop_uid=result.sop_instance_uid,
                destination=where,
                job_id=job_id,
                status="stored" if result.ok else "failed",
                error=str(result.error or ""),
            )
        refused = [r for r in results if not r.ok and not r.retryable]
        if refused:
            store.dead_letter("deliver", job_id, kwargs, f"{where}: {refused[0].error}")
            store.event(job_id, "dead-lettered", where)
            return
        pending_error = next((r.error for r in results if not r.ok), pending_error)
        _remember_sent(store, datasets, results, where, job_id, study_uid, study_version)
        if destination.storage_commitment and all(r.ok for r in results):
            try:
                _commit(store, settings, destination, results, job_id)
            except TransientError as exc:
                pending_error = exc
            except PermanentError as exc:
                store.dead_letter("deliver", job_id, kwargs, f"{where}: {exc}")
                store.event(job_id, "dead-lettered", where)
                return
    if pending_error is None:
        try:
            pending_error = _after_stored(store, settings, job_id, study_uid, datasets)
        except PermanentError as exc:
            store.dead_letter("deliver", job_id, kwargs, str(exc))
            store.event(job_id, "dead-lettered", "rejection KOS refused")
            return
    if pending_error is not None:
        retries = self.request.retries
        policy = delivery_policy(settings.delivery)
        if policy.exhausted(retries):
            letter = store.dead_letter(
                "deliver", job_id, kwargs, f"gave up after {retries + 1} tries: {pending_error}"
            )
            store.event(job_id, "dead-lettered", f"letter {letter}")
            if study_uid:
                row = store.study(study_uid)
                if row is not None:
                    store.upsert_study(
                        study_uid=study_uid,
                        job_id=job_id,
                        version=row["version"],
                        priority=row["priority"],
                        state="dead-lettered",
                    )
            store.reset_attempts(key)
            return
        delay = policy.delay(retries)
        store.event(job_id, DELIVERY_RETRY, f"in {delay:.1f}s: {pending_error}")
        store.reset_attempts(key)
        raise self.retry(countdown=delay, exc=pending_error)
    store.event(job_id, "delivered", f"{len(datasets)} objects")
    _mark_delivered(store, study_uid, job_id)
    store.reset_attempts(key)


@app.task(name="workers.tasks.notify", bind=True, acks_late=True, max_retries=None)
def notify(self: Task, notice: dict[str, Any], endpoint: str, score: dict[str, Any] | None = None) -> None:
    """Send one study version's triage flag to one endpoint: an HL7 v2 message to a RIS
    (``notifications.hl7``), waiting for its ACK, or a FHIR transaction Bundle to a FHIR server
    (``notifications.fhir``), waiting for a 2xx answer.  Endpoint names are unique across both lists.

    An AE/AR answer, another HTTP status, a silence past ``timeout_seconds`` or an unreachable endpoint
    is retried with the delivery backoff (``delivery.max_retries``, ``delivery.backoff_*``), then
    dead-lettered.  *score* is what the risk means (:meth:`plugins.types.ScoreMeaning.to_json_dict`), for FHIR.
    """
    settings = current_settings()
    store = results_store(settings)
    study = StudyNotice.from_json_dict(notice)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(job_id=study.job_id, endpoint=endpoint)
    kwargs = {"notice": notice, "endpoint": endpoint, "score": score}
    key = f"notify:{study.job_id}:{endpoint}"
    if _too_many_attempts(store, settings, key, "notify", study.job_id, kwargs):
        return
    target = settings.notifications.hl7_endpoint(endpoint)
    server = settings.notifications.fhir_endpoint(endpoint)
    if target is None and server is None:
        store.event(
            study.job_id, "notification_dropped", f"{endpoint}: not in notifications.hl7 or .fhir now"
        )
        store.reset_attempts(key)
        return
    try:
        bundle = (
            None
            if server is None
            else build_resources(study, settings.notifications, ScoreMeaning.from_json_dict(score))
        )
    except (
        Exception
    ) as exc:  # the models' validation error quotes the value it refused: type and our words only
        reason = failure_reason(f"{endpoint}: building the FHIR resources failed", exc)
        letter = store.dead_letter("notify", study.job_id, kwargs, reason)
        store.record_notification(
            job_id=study.job_id,
            endpoint=endpoint,
            study_uid=study.study_uid,
            status="dead-lettered",
            error=reason,
        )
        store.event(study.job_id, "dead-lettered", f"letter {letter}")
        store.reset_attempts(key)
        return
    sent = "FHIR"
    try:
        if target is not None:
            send(target, build_message(study, target, settings.notifications.priority_for(study.category)))
            sent = target.message
        elif server is not None and bundle is not None:
            post_to_fhir(server, bundle)
    except (NotificationRefused, FhirRefused) as exc:
        retries = self.request.retries
        policy = delivery_policy(settings.delivery)
        if policy.exhausted(retries):
            reason = f"gave up after {retries + 1} tries: {exc}"
            letter = store.dead_letter("notify", study.job_id, kwargs, reason)
            store.record_notification(
                job_id=study.job_id,
                endpoint=endpoint,
                study_uid=study.study_uid,
                status="dead-lettered",
                error=str(exc),
            )
            store.event(study.job_id, "dead-lettered", f"letter {letter}")
            log.error("notification.dead_lettered", letter=letter, error=str(exc))
            store.reset_attempts(key)
            return
        delay = policy.delay(retries)
        store.record_notification(
            job_id=study.job_id,
            endpoint=endpoint,
            study_uid=study.study_uid,
            status="retrying",
            error=str(exc),
        )
        store.event(study.job_id, "notification_retry", f"{endpoint} in {delay:.1f}s: {exc}")
        store.reset_attempts(key)
        raise self.retry(countdown=delay, exc=exc) from exc
    store.record_notification(
        job_id=study.job_id, endpoint=endpoint, study_uid=study.study_uid, status="notified"
    )
    store.event(study.job_id, "notified", f"{endpoint} ({sent})")
    log.info("notification.acknowledged", message=sent)
    store.reset_attempts(key)


def _remember_sent(
    store: ResultsStore,
    datasets: list[pydicom.FileDataset],
    results: list[Any],
    where: str,
    job_id: str,
    study_uid: str,
    study_version: int,
) -> None:
    """Journal which outputs of which study version are stored where, for superseding them later."""
    row = store.study(study_uid) if study_uid else None
    version = study_version or (int(row["version"]) if row is not None and row["job_id"] == job_id else 0)
    if not version:
        return  # a delivery queued before versions were passed along: nothing to supersede by
    series = {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID) for ds in datasets}
    store.record_sent(
        study_uid=study_uid,
        version=version,
        job_id=job_id,
        destination=where,
        instances=[
            (r.sop_instance_uid, r.sop_class_uid, series[r.sop_instance_uid]) for r in results if r.ok
        ],
    )


def _commit(
    store: ResultsStore, settings: Settings, destination: DestinationSettings, results: list[Any], job_id: str
) -> None:
    """Storage Commitment for what was just stored at *destination*; a TransientError unless all committed."""
    where = _destination_key(destination)
    report = request_commitment(
        [(r.sop_class_uid, r.sop_instance_uid) for r in results],
        destination,
        calling_ae_title=settings.delivery.ae_title,
        listen_port=settings.delivery.commitment_port,
    )
    store.record_commitment(
        job_id=job_id,
        destination=where,
        transaction_uid=report.transaction_uid,
        committed=sorted(report.committed),
        failed=sorted({*report.failed, *report.missing}),
    )
    if not report.complete:
        reasons = ", ".join(sorted({f"0x{reason:04X}" for reason in report.failed.values()})) or "none given"
        raise TransientError(
            f"{where} did not commit {len(report.failed) + len(report.missing)} of "
            f"{len(results)} instances (failure reasons: {reasons})"
        )
    store.event(job_id, "commitment", f"{len(report.committed)} objects at {where}")


def _after_stored(
    store: ResultsStore, settings: Settings, job_id: str, study_uid: str, datasets: list[pydicom.FileDataset]
) -> TransientError | None:
    """Once the study version is delivered: mark it committed when every destination that does Storage
    Commitment confirmed every output, and supersede earlier versions' outputs (``delivery.supersede``).

    :returns: the error to retry with when a rejection KOS could not be stored.
    :raises PermanentError: when a PACS refuses the rejection KOS.
    """
    _mark_delivered(store, study_uid, job_id)
    row = store.study(study_uid) if study_uid else None
    if row is None or row["job_id"] != job_id or row["state"] != "delivered":
        return None
    wanted = sorted(
        {Path(p).stem for analysis in store.analyses(job_id) for p in json.loads(analysis["outputs"])}
    )
    committing = [_destination_key(d) for d in settings.delivery.destinations if d.storage_commitment]
    if committing and not any(e["event"] == COMMITTED for e in store.timeline(job_id)):
        committed = store.committed_at(wanted)
        if all((uid, where) in committed for uid in wanted for where in committing):
            store.event(job_id, COMMITTED, f"{len(wanted)} objects at {', '.join(committing)}")
    if not settings.delivery.supersede or not datasets:
        return None
    error: TransientError | None = None
    for destination in settings.delivery.destinations:
        where = _destination_key(destination)
        earlier = store.superseded_outputs(
            study_uid=study_uid, version=int(row["version"]), destination=where, current=set(wanted)
        )
        if not earlier:
            continue
        superseded = [
            SupersededOutput(
                sop_instance_uid=r["sop_uid"],
                sop_class_uid=r["sop_class_uid"],
                series_instance_uid=r["series_uid"],
            )
            for r in earlier
        ]
        kos = rejection_kos(superseded, datasets[0])
        try:
            (result,) = deliver_to_pacs([kos], destination, calling_ae_title=settings.delivery.ae_title)
        except TransientError as exc:
            error = exc
            continue
        if not result.ok:
            if result.retryable:
                error = TransientError(f"{where}: rejection KOS not stored: {result.error}")
                continue
            raise PermanentError(f"{where} refused the rejection KOS: {result.error}")
        store.mark_rejected(
            destination=where, sop_uids=[r["sop_uid"] for r in earlier], rejected_by=str(kos.SOPInstanceUID)
        )
        store.event(
            job_id, "superseded", f"{len(earlier)} earlier outputs rejected at {where} by an IOCM KOS"
        )
        log.info("delivery.superseded", destination=where, rejected=len(earlier))
    return error


def _mark_delivered(store: ResultsStore, study_uid: str, job_id: str) -> None:
    """Mark the study delivered once every output of every finished stage reached every destination."""
    row = store.study(study_uid) if study_uid else None
    if row is None or row["job_id"] != job_id or row["state"] != "analysed":
        return
    settings = current_settings()
    wanted = {
        Path(path).stem for analysis in store.analyses(job_id) for path in json.loads(analysis["outputs"])
    }
    # By SOP UID, not by job: outputs a new study version shares with the previous one were stored
    # by the previous version's delivery (their journal rows keep that job id).
    stored = store.stored_at(sorted(wanted))
    destinations = [_destination_key(d) for d in settings.delivery.destinations]
    if all((uid, where) in stored for uid in wanted for where in destinations):
        store.upsert_study(
            study_uid=study_uid,
            job_id=job_id,
            version=row["version"],
            priority=row["priority"],
            state="delivered" if destinations else "done",
        )
