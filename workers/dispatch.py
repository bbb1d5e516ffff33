"""The Celery dispatcher the gateway is given: a completed study becomes a first-stage analysis task."""

from __future__ import annotations

import kombu.exceptions
from celery import Celery

from gateway.errors import TransientError
from gateway.messages import StudyJob
from gateway.retry import GATEWAY_PUBLISH
from workers.app import ANALYSIS_QUEUE


class CeleryDispatcher:
    """Publishes ``workers.tasks.analyse`` by name, at the study's incoming priority.

    :param app: A configured Celery app (:func:`workers.app.configure_app`).
    """

    def __init__(self, app: Celery) -> None:
        self.app = app

    def dispatch(self, job: StudyJob) -> None:
        try:
            self.app.send_task(
                "workers.tasks.analyse",
                kwargs={"job": job.to_json_dict(), "stage": "first"},
                queue=ANALYSIS_QUEUE,
                priority=int(job.priority),
                retry=True,
                retry_policy=GATEWAY_PUBLISH.kombu_retry_policy(),
            )
        except (kombu.exceptions.OperationalError, OSError) as exc:
            raise TransientError(f"broker unreachable: {exc}") from exc
