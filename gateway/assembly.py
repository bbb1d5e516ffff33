"""Study assembly: decide when a study is complete and hand it to the dispatcher.

Completion state lives only in the journal (timestamps, not in-memory timers), so a restarted
gateway resumes every timer where it was and dispatches what was completed but not queued.
"""

from __future__ import annotations

import hashlib
import threading
import time

import structlog

from gateway.dispatch import Dispatcher
from gateway.errors import TransientError
from gateway.journal import Journal, StudyRow, StudyState
from gateway.messages import InstanceRef, Priority, StudyJob
from gateway.retry import GATEWAY_DISPATCH
from gateway.settings import AssemblySettings

log = structlog.get_logger(__name__)

_FOUR_VIEWS = {("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")}


def job_id_for(study_uid: str, version: int) -> str:
    """A deterministic job id, so re-dispatching after a crash is recognisable downstream."""
    return f"{hashlib.sha256(study_uid.encode()).hexdigest()[:24]}-v{version}"


class Assembler:
    """Completes studies by quiet time, by the four-view rule or by age, then dispatches them.

    :param journal: The shared journal.
    :param dispatcher: Receives each completed study version.
    :param settings: Quiet times, the force-complete age and the rules.
    :param storage_root: Written into every job so workers know where paths are relative to.
    """

    def __init__(
        self, journal: Journal, dispatcher: Dispatcher, settings: AssemblySettings, storage_root: str
    ) -> None:
        self.journal = journal
        self.dispatcher = dispatcher
        self.settings = settings
        self.storage_root = storage_root
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry_after = 0.0
        self._dispatch_failures = 0

    # ------------------------------------------------------------------ rules

    def quiet_seconds(self, calling_ae: str, modality: str) -> float:
        """The quiet time for a study; the most specific matching override wins."""
        best: tuple[int, float] | None = None
        for rule in self.settings.quiet_overrides:
            if rule.calling_ae not in (None, calling_ae) or rule.modality not in (None, modality):
                continue
            specificity = (rule.calling_ae is not None) + (rule.modality is not None)
            if best is None or specificity > best[0]:
                best = (specificity, rule.quiet_seconds)
        return best[1] if best else self.settings.quiet_seconds

    def _has_four_views(self, study: StudyRow) -> bool:
        if not self.settings.complete_on_four_views:
            return False
        seen = {
            (row["laterality"], row["view"])
            for row in self.journal.study_instances(study.study_uid)
            if row["study_version"] == study.version
            and not row["own_output"]
            and row["modality"] == "MG"
            and row["presentation"] != "FOR PROCESSING"
        }
        return seen >= _FOUR_VIEWS

    def completion_reason(self, study: StudyRow, now: float) -> str | None:
        if study.modality == "MG" and self._has_four_views(study):
            return "rule:four_views"
        if now - study.last_at >= self.quiet_seconds(study.calling_ae, study.modality):
            return "quiet"
        if now - study.first_at >= self.settings.force_complete_seconds:
            return "force"
        return None

    # ------------------------------------------------------------------ work

    def tick(self, now: float | None = None) -> int:
        """Complete what is due and dispatch what is complete; returns how many were dispatched."""
        now = time.time() if now is None else now
        for study in self.journal.studies(StudyState.RECEIVING):
            reason = self.completion_reason(study, now)
            if reason and self.journal.complete_study(study.study_uid, study.version, reason, now):
                log.info(
                    "study.complete", job_id=job_id_for(study.study_uid, study.version), completed_by=reason
                )
        if now < self._retry_after:
            return 0
        dispatched = 0
        for study in self.journal.studies(StudyState.COMPLETE):
            job = self.build_job(study)
            try:
                self.dispatcher.dispatch(job)
            except TransientError as exc:
                self._dispatch_failures += 1
                delay = GATEWAY_DISPATCH.delay(self._dispatch_failures - 1)
                self._retry_after = now + delay
                log.warning("study.dispatch_failed", job_id=job.job_id, error=str(exc), retry_in_s=delay)
                return dispatched
            self.journal.mark_dispatched(study.study_uid, study.version, job.job_id)
            self._dispatch_failures = 0
            dispatched += 1
        return dispatched

    def build_job(self, study: StudyRow) -> StudyJob:
        instances = tuple(
            InstanceRef(
                sop_instance_uid=row["sop_uid"],
                sop_class_uid=row["sop_class_uid"],
                series_instance_uid=row["series_uid"],
                modality=row["modality"],
                path=row["path"],
                transfer_syntax_uid=row["transfer_syntax"],
                study_version=int(row["study_version"]),
                content_digest=str(row["content_digest"]),
                own_output=bool(row["own_output"]),
            )
            for row in self.journal.study_instances(study.study_uid)
        )
        return StudyJob(
            job_id=job_id_for(study.study_uid, study.version),
            study_instance_uid=study.study_uid,
            study_version=study.version,
            calling_ae=study.calling_ae,
            priority=Priority(study.priority),
            completed_by=study.completed_by or "recovery",
            storage_root=self.storage_root,
            instances=instances,
        )

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.tick_seconds):
            try:
                self.tick()
            except Exception:  # the assembler must outlive any single bad tick
                log.exception("assembler.tick_failed")
