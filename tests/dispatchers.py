"""A dispatcher for tests: it keeps the jobs the gateway hands over, so a test can wait for them."""

from __future__ import annotations

import threading

from gateway.messages import StudyJob


class RecordingDispatcher:
    """Keeps every job in memory; ``wait_for(n)`` blocks until *n* have arrived."""

    def __init__(self) -> None:
        self.jobs: list[StudyJob] = []
        self._changed = threading.Condition()

    def dispatch(self, job: StudyJob) -> None:
        with self._changed:
            self.jobs.append(job)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[StudyJob]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.jobs) >= count, timeout=timeout)
            return list(self.jobs)
