"""Where completed studies go: the dispatcher interface and the gateway-only implementation.

The Celery dispatcher lives with the workers, which pass it in; the gateway only knows this
protocol, so it never imports Celery or torch.
"""

from __future__ import annotations

from typing import Protocol

import structlog

from gateway.messages import StudyJob

log = structlog.get_logger(__name__)


class Dispatcher(Protocol):
    """Takes a completed study version.

    ``dispatch`` must be idempotent per ``job.job_id`` (the assembler re-dispatches after a
    crash between dispatching and journalling), and raise :class:`~gateway.errors.TransientError`
    when the queue is unreachable, so the study stays undispatched and is retried.
    """

    def dispatch(self, job: StudyJob) -> None: ...


class LoggingDispatcher:
    """Logs completed studies; the gateway-only mode and the tour's first step."""

    def dispatch(self, job: StudyJob) -> None:
        log.info(
            "study.dispatched",
            job_id=job.job_id,
            version=job.study_version,
            instances=len(job.instances),
            priority=int(job.priority),
            completed_by=job.completed_by,
        )
