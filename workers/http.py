"""The operations web service: the triage worklist page, study timelines, dead letters, health and /metrics.

It only reads what the gateway and the workers write to the shared data directory (the
gateway's journal, the workers' results journal, the output DICOM files) and publishes to the
broker for a dead-letter replay, so it can run anywhere that directory is mounted.  It never
imports torch or the model plugins.

Routes (all but health and readiness need a token: ``Authorization: Bearer <token>``, or the
cookie the login form sets for browsers):

================================================  ===========================================
``GET /healthz``, ``GET /readyz``                  liveness; readiness (503 when the broker or
                                                   the spool cannot be used)
``GET /``                                          the triage worklist page, highest risk first
``GET /studies``, ``GET /studies/{job_id}``        every study with its state; one study with
                                                   findings, heatmaps and timeline
``GET /deadletters``                               dead letters with a replay button
``GET /api/worklist``, ``/api/studies``,           the same as JSON
``/api/studies/{job_id}``, ``/api/deadletters``
``GET /api/studies/{job_id}/heatmaps/{model}/{n}.png``  a heatmap Secondary Capture as PNG (``?width=``,
                                                   64 to 1024 px: the worker's preview)
``POST /api/deadletters/{id}/replay``              re-queue a dead letter
``GET /metrics``                                   Prometheus (:mod:`workers.metrics`)
================================================  ===========================================

URLs name studies by job id (a hash of the Study Instance UID plus the version) and heatmaps by
position, never by a UID or a patient attribute, so neither access logs nor browser history
hold patient identifiers.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import structlog
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydicom.uid import SecondaryCaptureImageStorage

from gateway import __version__
from gateway.assembly import job_id_for
from gateway.journal import JournalEvent, JournalReader, StudyRow, StudyState
from gateway.messages import Priority
from gateway.settings import Settings
from workers.metrics import broker_problem, data_paths, make_registry, render
from workers.results import (
    FINISHED_STATES,
    Analysis,
    ResultsReader,
    TimelineEntry,
    WorklistEntry,
)

log = structlog.get_logger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
COOKIE_NAME = "pacs_triage_token"
#: A cookie-authenticated POST must carry this header: a cross-site form cannot set it.
CSRF_HEADER = "X-Pacs-Triage"
_JOB_ID = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_MODEL = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
#: Keys of a finding summary that may leave the service (the evaluated image's UID stays in).
_FINDING_KEYS = (
    "model",
    "model_version",
    "frame",
    "laterality",
    "view",
    "predicted_class",
    "probabilities",
    "risk",
    "birads",
    "points",
    "demo_weights",
)
_EVENT_LABELS = {
    "first_instance": "first instance received",
    "complete": "study complete",
    "queued": "queued for analysis",
    "analysis_start:first": "analysis started (first stage)",
    "analysis_start:rest": "analysis started (remaining models)",
    "analysis_end:first": "analysis finished (first stage)",
    "analysis_end:rest": "analysis finished (remaining models)",
    "analysis_timeout": "analysis timed out",
    "outputs_kept_locally": "outputs kept locally (no destination)",
    "delivery_retry": "delivery failed, will retry",
    "delivered": "delivered",
    "dead-lettered": "dead-lettered",
    "replayed": "replayed from the dead letters",
}


# ------------------------------------------------------------------------------------ reading


def _priority_name(value: int | None) -> str:
    if value is None:
        return "-"
    try:
        return Priority(int(value)).name
    except ValueError:
        return str(value)


def _risk_band(risk: float | None, threshold: float) -> str:
    if risk is None:
        return "pending"
    if risk >= threshold:
        return "high"
    if risk >= threshold / 2:
        return "elevated"
    return "routine"


#: The worklist band (row colour) of each triage category.
_CATEGORY_BAND = {"high": "high", "intermediate": "elevated", "routine": "routine"}


def triage_view(entry: WorklistEntry) -> dict[str, Any] | None:
    """The study's triage decision as the worklist shows it: the category, and the model and operating
    point (name and threshold) that set it, with the one-line explanation; None before any decision."""
    if entry.triage_category is None:
        return None
    return {
        "category": entry.triage_category,
        "model": entry.triage_model,
        "operating_point": entry.triage_operating_point,
        "threshold": entry.triage_threshold,
        "explanation": entry.triage_explanation,
    }


def public_finding(finding: dict[str, Any]) -> dict[str, Any]:
    """A finding as the API shows it: everything but the evaluated image's UID."""
    return {key: finding.get(key) for key in _FINDING_KEYS if key in finding}


def summarize_findings(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per model: its highest-risk finding, with where it was seen."""
    best: dict[str, dict[str, Any]] = {}
    for finding in findings:
        model = str(finding.get("model", "?"))
        if model not in best or float(finding.get("risk") or 0) > float(best[model].get("risk") or 0):
            best[model] = finding
    return [
        {
            "model": model,
            "predicted_class": f.get("predicted_class"),
            "risk": f.get("risk"),
            "birads": f.get("birads"),
            "where": " ".join(str(p) for p in (f.get("laterality"), f.get("view")) if p) or None,
        }
        for model, f in sorted(best.items())
    ]


@functools.lru_cache(maxsize=4096)
def _output_header(path: str, mtime_ns: int) -> tuple[str, str]:
    """SOP Class UID and caption of an output file (cached by path and modification time)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "ImageComments"])
    return str(ds.get("SOPClassUID", "")), str(ds.get("ImageComments", "") or "")


@functools.lru_cache(maxsize=4096)
def _study_header(path: str, mtime_ns: int) -> dict[str, str]:
    """The study attributes the page shows, from one received instance (no patient name, ID or birth date)."""
    from gateway.inflate import read_header

    # Never the whole data set: pydicom inflates a deflated one whole even with stop_before_pixels.
    ds = read_header(path)
    return {
        "accession_number": str(ds.get("AccessionNumber", "") or ""),
        "study_date": str(ds.get("StudyDate", "") or ""),
        "study_description": str(ds.get("StudyDescription", "") or ""),
        "modality": str(ds.get("Modality", "") or ""),
    }


@functools.lru_cache(maxsize=64)
def _png(path: str, mtime_ns: int, max_width: int) -> bytes | None:
    """The worker's PNG preview of a heatmap (at most :data:`workers.previews.MAX_WIDTH` wide), at most
    *max_width* wide; None when it has none.

    Never the DICOM object's pixel data: only the preview the worker wrote beside it.
    """
    import cv2
    import numpy as np

    from workers.previews import preview_path

    try:
        encoded = preview_path(path).read_bytes()
    except FileNotFoundError:
        return None
    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.shape[1] <= max_width:
        return encoded
    height = round(image.shape[0] * max_width / image.shape[1])
    ok, smaller = cv2.imencode(".png", cv2.resize(image, (max_width, height), interpolation=cv2.INTER_AREA))
    if not ok:
        raise ValueError("OpenCV could not encode the image as PNG")
    return smaller.tobytes()


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


class OpsData:
    """Read-side views over the shared data directory, through the journals' readers.

    Combining the gateway's journal with the workers' happens here, in Python: the two are
    separate files owned by separate modules.

    :param settings: Where the data directory is, and the triage threshold for risk bands.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = data_paths(settings)
        self.journal = JournalReader(self.paths["journal"])
        self.results = ResultsReader(self.paths["results"])
        self.threshold = settings.triage.high_risk_threshold

    # ------------------------------------------------------------------ study attributes

    def study_attributes(self, study_uid: str) -> dict[str, str]:
        """Accession number, date, description and modality from one received instance."""
        relative = self.journal.first_instance_path(study_uid)
        if relative is None:
            return {}
        path = self.paths["root"] / relative
        try:
            return _study_header(str(path), _mtime(path))
        except Exception:  # a missing or unreadable file only costs the row its attributes
            return {}

    # ------------------------------------------------------------------ worklist

    def worklist(self, limit: int = 200) -> list[dict[str, Any]]:
        """The worklist in ResultsStore.worklist's order: highest risk first, unanalysed last."""
        committed = self.results.committed_jobs()
        notified = self.results.notified_jobs()
        return [self._worklist_item(entry, committed, notified) for entry in self.results.worklist(limit)]

    def _worklist_item(self, entry: WorklistEntry, committed: set[str], notified: set[str]) -> dict[str, Any]:
        return {
            "job_id": entry.job_id,
            "version": entry.version,
            "risk": entry.risk,
            # Every output confirmed by Storage Commitment at each destination configured for it.
            "committed": entry.job_id in committed,
            # The triage flag acknowledged by a RIS (notifications.hl7).
            "notified": entry.job_id in notified,
            "band": (
                _CATEGORY_BAND[entry.triage_category]
                if entry.triage_category in _CATEGORY_BAND
                else _risk_band(entry.risk, self.threshold)
            ),
            "state": entry.state,
            # Which model, at which of its operating points, put the study where it is (workers.triage).
            "triage": triage_view(entry),
            "priority": entry.priority,
            "priority_name": _priority_name(entry.priority),
            "demo_weights": entry.demo_weights,
            "updated_at": entry.updated_at,
            "summary": summarize_findings(entry.findings),
            "findings": [public_finding(f) for f in entry.findings],
            "study": self.study_attributes(entry.study_uid),
        }

    # ------------------------------------------------------------------ studies

    def studies(self, limit: int = 200) -> list[dict[str, Any]]:
        """Every study version the gateway or the workers know, newest first, with one state."""
        worker = self.results.worklist_by_study()
        items: list[dict[str, Any]] = []
        seen: set[str] = set()
        for row in self.journal.newest_studies(limit):
            job_id = row.job_id or job_id_for(row.study_uid, row.version)
            items.append(self._gateway_item(row, job_id, worker.get(row.study_uid)))
            seen.add(job_id)
        for entry in worker.values():  # studies queued without the gateway (tests, benchmarks, imports)
            if entry.job_id not in seen and len(items) < limit:
                items.append(
                    {
                        "job_id": entry.job_id,
                        "version": entry.version,
                        "state": entry.state,
                        "gateway_state": None,
                        "worker_state": entry.state,
                        "risk": entry.risk,
                        "band": _risk_band(entry.risk, self.threshold),
                        "priority": entry.priority,
                        "priority_name": _priority_name(entry.priority),
                        "calling_ae": None,
                        "modality": None,
                        "first_at": None,
                        "completed_at": None,
                        "completed_by": None,
                        "dispatched_at": None,
                        "updated_at": entry.updated_at,
                    }
                )
        return items

    def _gateway_item(self, row: StudyRow, job_id: str, worker: WorklistEntry | None) -> dict[str, Any]:
        # The worklist keeps only the newest version of a study.
        newer = worker is not None and worker.version > row.version
        same = worker if worker is not None and worker.version == row.version else None
        worker_state = same.state if same is not None else None
        if row.state != StudyState.DISPATCHED:
            state = str(row.state)
        elif newer:
            state = "superseded"
        else:
            state = worker_state or "queued"
        risk = same.risk if same is not None else None
        priority = same.priority if same is not None else row.priority
        return {
            "job_id": job_id,
            "version": row.version,
            "state": state,
            "gateway_state": row.state,
            "worker_state": worker_state,
            "risk": risk,
            "band": _risk_band(risk, self.threshold),
            "priority": priority,
            "priority_name": _priority_name(priority),
            "calling_ae": row.calling_ae,
            "modality": row.modality,
            "first_at": row.first_at,
            "completed_at": row.completed_at,
            "completed_by": row.completed_by,
            "dispatched_at": row.dispatched_at,
            "updated_at": same.updated_at if same is not None else row.last_at,
        }

    def _gateway_study(self, job_id: str) -> StudyRow | None:
        row = self.journal.study_by_job_id(job_id)
        if row is not None:
            return row
        version = re.search(r"-v(\d+)$", job_id)
        if version is None:
            return None
        # Not dispatched yet, so no job id stored: recompute it for the versions still waiting.
        for candidate in self.journal.undispatched_studies(int(version.group(1))):
            if job_id_for(candidate.study_uid, candidate.version) == job_id:
                return candidate
        return None

    def study(self, job_id: str) -> dict[str, Any] | None:
        """One study version: state, findings per model with heatmap links, deliveries and timeline."""
        events: list[dict[str, Any]] = []
        instances = 0
        gateway = self._gateway_study(job_id)
        if gateway is not None:
            events = [_event(e, "gateway") for e in self.journal.events(gateway.study_uid, gateway.version)]
            instances = self.journal.instance_count(gateway.study_uid, gateway.version)
        worker = self.results.worklist_entry(job_id=job_id)
        newest_version = None
        if worker is None and gateway is not None:
            newest = self.results.worklist_entry(study_uid=gateway.study_uid)
            newest_version = newest.version if newest is not None else None
        analyses = self.results.analyses(job_id)
        events += [_event(e, "worker") for e in self.results.timeline(job_id)]
        deliveries = self.results.deliveries(job_id)
        if gateway is None and worker is None and not events and not analyses:
            return None
        events.sort(key=lambda e: e["at"])
        if gateway is not None and gateway.state != StudyState.DISPATCHED:
            state = str(gateway.state)
        elif worker is not None:
            state = worker.state
        elif gateway is not None and (newest_version is None or newest_version < gateway.version):
            state = "queued"
        else:
            state = "superseded"  # the worklist holds a newer version of this study
        source = worker if worker is not None else gateway  # the worker's view is the more recent one
        risk = worker.risk if worker is not None else None
        findings = worker.findings if worker is not None else []
        study_uid = source.study_uid if source is not None else None
        priority = source.priority if source is not None else None
        return {
            "job_id": job_id,
            "version": source.version if source is not None else None,
            "state": state,
            "finished": state in FINISHED_STATES,
            "risk": risk,
            "band": _risk_band(risk, self.threshold),
            "priority": priority,
            "priority_name": _priority_name(priority),
            "demo_weights": worker.demo_weights if worker is not None else False,
            "calling_ae": gateway.calling_ae if gateway is not None else None,
            "modality": gateway.modality if gateway is not None else None,
            "instances": instances,
            "study": self.study_attributes(study_uid) if study_uid else {},
            "summary": summarize_findings(findings),
            "models": [self._analysis(job_id, a) for a in analyses],
            "deliveries": [dataclasses.asdict(d) for d in deliveries],
            "timeline": events,
        }

    def _analysis(self, job_id: str, analysis: Analysis) -> dict[str, Any]:
        heatmaps = []
        for index, (_, caption) in enumerate(self._heatmaps(analysis)):
            heatmaps.append(
                {
                    "index": index,
                    "caption": caption,
                    "url": f"/api/studies/{job_id}/heatmaps/{analysis.model}/{index}.png",
                }
            )
        return {
            "model": analysis.model,
            "risk": analysis.risk,
            "findings": [public_finding(p) for p in analysis.predictions],
            "failures": [{"error": f.get("error")} for f in analysis.failures],
            "outputs": len(analysis.outputs),
            "heatmaps": heatmaps,
            "finished_at": analysis.finished_at,
        }

    def _heatmaps(self, analysis: Analysis) -> list[tuple[Path, str]]:
        """The model's heatmap Secondary Captures among its outputs, in output order."""
        found = []
        outputs_root = self.paths["outputs"]
        for raw in analysis.outputs:
            path = Path(raw).resolve()
            if not path.is_relative_to(outputs_root) or not path.is_file():
                continue  # only files the workers wrote under data_dir/outputs are ever served
            try:
                sop_class, caption = _output_header(str(path), _mtime(path))
            except Exception:
                continue
            if sop_class == SecondaryCaptureImageStorage:
                found.append((path, caption))
        return found

    def heatmap_png(self, job_id: str, model: str, index: int, max_width: int = 1024) -> bytes | None:
        analysis = self.results.analysis(job_id, model)
        if analysis is None:
            return None
        heatmaps = self._heatmaps(analysis)
        if not 0 <= index < len(heatmaps):
            return None
        path = heatmaps[index][0]
        return _png(str(path), _mtime(path), max_width)

    # ------------------------------------------------------------------ dead letters

    def dead_letters(self, include_replayed: bool = False) -> list[dict[str, Any]]:
        return [dataclasses.asdict(letter) for letter in self.results.dead_letters(include_replayed)]


def _event(entry: JournalEvent | TimelineEntry, source: str) -> dict[str, Any]:
    return {
        "at": entry.at,
        "source": source,
        "event": entry.event,
        "detail": entry.detail,
        "label": _event_label(entry.event, entry.detail),
    }


def _event_label(event: str, detail: str) -> str:
    if event.startswith("model_done:"):
        model = event.split(":", 1)[1]
        try:
            times = json.loads(detail)
            return (
                f"model {model} done: inference {times.get('inference_s', '?')} s, outputs built in "
                f"{times.get('outputs_s', '?')} s, {times.get('failures', 0)} failed images"
            )
        except (ValueError, AttributeError):
            return f"model {model} done"
    return _EVENT_LABELS.get(event, event.replace("_", " "))


# ------------------------------------------------------------------------------------ readiness


class Readiness:
    """Whether the broker and the spool can be used, cached for a moment so probes stay cheap.

    :param settings: The broker URL, the data directory and the disk watermark.
    :param cache_seconds: How long one answer is reused.
    """

    def __init__(self, settings: Settings, cache_seconds: float = 2.0) -> None:
        self.settings = settings
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._answer: tuple[float, dict[str, Any]] | None = None

    def check(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            if self._answer is None or now - self._answer[0] > self.cache_seconds:
                checks = {
                    "spool": self._spool_problem() or "ok",
                    "broker": broker_problem(self.settings) or "ok",
                }
                self._answer = (now, {"ready": all(v == "ok" for v in checks.values()), "checks": checks})
            return self._answer[1]

    def _spool_problem(self) -> str | None:
        root = Path(self.settings.gateway.data_dir).resolve()
        if not root.is_dir():
            return f"data directory {root} does not exist"
        if not os.access(root, os.W_OK):
            return f"data directory {root} is not writable"
        from gateway.spool import Spool

        try:
            status = Spool(root, self.settings.gateway.disk_watermark).disk_status()
        except OSError as exc:
            return f"spool unusable: {exc.strerror}"
        if status.below_watermark:
            return (
                f"free space below the watermark ({status.free_bytes} bytes, "
                f"{status.free_percent:.1f}%): the gateway refuses new instances"
            )
        return None


# ------------------------------------------------------------------------------------ the app


class _LoginRequired(Exception):
    """A page was asked for without a token: send the browser to the login form."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def _safe_next(value: str | None) -> str:
    # Only a local path: an open redirect would turn the login form into a phishing aid.
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def create_app(
    settings: Settings, *, refresh_seconds: float = 10.0, tokens: tuple[str, ...] | None = None
) -> FastAPI:
    """Build the web service over *settings*' data directory and broker.

    :param settings: The running configuration; ``http.tokens`` are the accepted tokens.
    :param refresh_seconds: How often the worklist and studies pages refresh themselves.
    :param tokens: Overrides ``http.tokens`` (``serve-http`` passes the token it made when none is set).
    """
    accepted = tuple(t.encode() for t in (settings.http.tokens if tokens is None else tokens))
    if not accepted:
        raise ValueError("the web service needs at least one token (http.tokens)")
    data = OpsData(settings)
    readiness = Readiness(settings)
    registry = make_registry(settings)
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["risk"] = lambda v: "-" if v is None else f"{float(v):.3f}"
    env.filters["clock"] = lambda v: (
        "-" if v is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
    )
    writer: dict[str, Any] = {}
    writer_lock = threading.Lock()

    def token_of(request: Request) -> tuple[str | None, bool]:
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            return header[7:].strip(), True
        return request.cookies.get(COOKIE_NAME), False

    def valid(token: str | None) -> bool:
        if not token:
            return False
        candidate = token.encode()
        # Compare with every token, so the time taken does not tell which one nearly matched.
        return any([hmac.compare_digest(candidate, known) for known in accepted])  # noqa: C419

    def require_token(request: Request) -> None:
        token, from_header = token_of(request)
        if not valid(token):
            log.warning(
                "http.unauthorised",
                path=request.url.path,
                client=request.client.host if request.client else None,
            )
            raise HTTPException(
                status_code=401,
                detail="a valid bearer token is required",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if request.method == "POST" and not from_header and request.headers.get(CSRF_HEADER) != "1":
            raise HTTPException(status_code=403, detail=f"a browser POST must carry the {CSRF_HEADER} header")

    def require_page_token(request: Request) -> None:
        if not valid(token_of(request)[0]):
            raise _LoginRequired(request.url.path)

    def page(name: str, **context: Any) -> HTMLResponse:
        html = env.get_template(name).render(
            threshold=settings.triage.high_risk_threshold, refresh_ms=int(refresh_seconds * 1000), **context
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    def results_writer() -> tuple[Any, Any]:
        # Made on first use: a read-only deployment never opens the journal for writing.
        with writer_lock:
            if not writer:
                from workers.app import configure_app
                from workers.results import ResultsStore

                writer["store"] = ResultsStore(data.paths["results"])
                writer["app"] = configure_app(settings)
            return writer["store"], writer["app"]

    app = FastAPI(title="pacs-triage", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    authed = [Depends(require_token)]
    page_authed = [Depends(require_page_token)]

    @app.middleware("http")
    async def _hardening_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.exception_handler(_LoginRequired)
    async def _to_login(request: Request, exc: _LoginRequired) -> RedirectResponse:
        return RedirectResponse(f"/login?next={exc.next_path}", status_code=303)

    # ------------------------------------------------------------------ health

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        answer = readiness.check()
        return JSONResponse(answer, status_code=200 if answer["ready"] else 503)

    # ------------------------------------------------------------------ login

    @app.get("/login", response_class=HTMLResponse)
    def login_form(next_path: str = Query("/", alias="next"), failed: bool = False) -> HTMLResponse:
        return page("login.html", next=_safe_next(next_path), failed=failed)

    @app.post("/login")
    async def login(request: Request) -> Response:
        # The form is urlencoded; parsed here rather than with python-multipart, one dependency fewer.
        fields = parse_qs((await request.body())[:8192].decode("utf-8", "replace"))
        token, next_path = fields.get("token", [""])[0], fields.get("next", ["/"])[0]
        if not valid(token):
            log.warning("http.login_failed", client=request.client.host if request.client else None)
            return RedirectResponse(f"/login?failed=1&next={_safe_next(next_path)}", status_code=303)
        response = RedirectResponse(_safe_next(next_path), status_code=303)
        response.set_cookie(
            COOKIE_NAME,
            token,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            max_age=12 * 3600,
        )
        return response

    @app.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE_NAME)
        return response

    # ------------------------------------------------------------------ pages

    @app.get("/", response_class=HTMLResponse, dependencies=page_authed)
    def worklist_page(limit: int = 200) -> HTMLResponse:
        return page("worklist.html", rows=data.worklist(limit), limit=limit)

    @app.get("/partials/worklist", response_class=HTMLResponse, dependencies=authed)
    def worklist_rows(limit: int = 200) -> HTMLResponse:
        return page("_worklist_rows.html", rows=data.worklist(limit))

    @app.get("/studies", response_class=HTMLResponse, dependencies=page_authed)
    def studies_page(limit: int = 200) -> HTMLResponse:
        return page("studies.html", rows=data.studies(limit), limit=limit)

    @app.get("/partials/studies", response_class=HTMLResponse, dependencies=authed)
    def studies_rows(limit: int = 200) -> HTMLResponse:
        return page("_studies_rows.html", rows=data.studies(limit))

    @app.get("/studies/{job_id}", response_class=HTMLResponse, dependencies=page_authed)
    def study_page(job_id: str) -> HTMLResponse:
        return page("study.html", study=_study_or_404(data, job_id))

    @app.get("/deadletters", response_class=HTMLResponse, dependencies=page_authed)
    def deadletters_page(show_all: bool = Query(False, alias="all")) -> HTMLResponse:
        letters = data.dead_letters(include_replayed=show_all)
        return page("deadletters.html", letters=letters, show_all=show_all)

    # ------------------------------------------------------------------ JSON API

    @app.get("/api/worklist", dependencies=authed)
    def api_worklist(limit: int = 200) -> list[dict[str, Any]]:
        return data.worklist(limit)

    @app.get("/api/studies", dependencies=authed)
    def api_studies(limit: int = 200) -> list[dict[str, Any]]:
        return data.studies(limit)

    @app.get("/api/studies/{job_id}", dependencies=authed)
    def api_study(job_id: str) -> dict[str, Any]:
        return _study_or_404(data, job_id)

    @app.get("/api/studies/{job_id}/heatmaps/{model}/{index}.png", dependencies=authed)
    def api_heatmap(job_id: str, model: str, index: int, width: int = 1024) -> Response:
        if not _JOB_ID.match(job_id) or not _MODEL.match(model):
            raise HTTPException(status_code=404, detail="no such heatmap")
        png = data.heatmap_png(job_id, model, index, max_width=max(64, min(width, 4096)))
        if png is None:
            raise HTTPException(status_code=404, detail="no such heatmap")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/deadletters", dependencies=authed)
    def api_deadletters(show_all: bool = Query(False, alias="all")) -> list[dict[str, Any]]:
        return data.dead_letters(include_replayed=show_all)

    @app.post("/api/deadletters/{letter_id}/replay", dependencies=authed)
    def api_replay(letter_id: int) -> dict[str, Any]:
        from workers.commands import replay_dead_letter

        store, celery_app = results_writer()
        letter = store.dead_letter_by_id(letter_id)
        if letter is None:
            raise HTTPException(status_code=404, detail=f"no dead letter {letter_id}")
        if letter["replayed_at"] is not None:
            raise HTTPException(status_code=409, detail=f"dead letter {letter_id} was already replayed")
        try:
            replay_dead_letter(store, celery_app, letter_id)
        except Exception as exc:  # the broker is down: say so instead of a bare 500
            log.error("http.replay_failed", letter=letter_id, job_id=letter["job_id"], error=str(exc))
            raise HTTPException(status_code=503, detail=f"could not re-queue: {type(exc).__name__}") from exc
        log.info("http.deadletter_replayed", letter=letter_id, job_id=letter["job_id"], task=letter["task"])
        return {"replayed": letter_id, "task": letter["task"], "job_id": letter["job_id"]}

    # ------------------------------------------------------------------ metrics

    @app.get("/metrics", dependencies=authed)
    def metrics() -> Response:
        body, content_type = render(registry)
        return Response(body, media_type=content_type)

    return app


def _study_or_404(data: OpsData, job_id: str) -> dict[str, Any]:
    study = data.study(job_id) if _JOB_ID.match(job_id) else None
    if study is None:
        raise HTTPException(status_code=404, detail="no such study")
    return study
