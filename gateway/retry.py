"""The retry policy: how many times a failed operation is tried again, and how long to wait before each try.

Every retry in pacs-triage waits by one :class:`RetryPolicy`; the policies themselves are here, so
one file answers "how long until it tries again?":

==============================================  =====================================  ===================
what fails                                      who waits                              policy
==============================================  =====================================  ===================
a C-STORE of our results to the PACS            Celery (``Task.retry(countdown=)``)    :func:`delivery_policy`
the gateway handing a study to the broker       the assembler, between its ticks      :data:`GATEWAY_DISPATCH`
publishing one task message, gateway side       kombu (``send_task(retry_policy=)``)   :data:`GATEWAY_PUBLISH`
publishing a follow-up task, worker side        kombu (``send_task(retry_policy=)``)   :data:`WORKER_PUBLISH`
==============================================  =====================================  ===================

Celery's reliability settings (late acknowledgement, requeue when a worker dies, the cap on
redeliveries of a poison study) are not retries of an operation and stay in ``workers/app.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.settings import DeliverySettings

#: 2**retry overflows a float near 1024; past 63 doublings every sane cap is reached.
_MAX_DOUBLINGS = 63


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Capped exponential backoff: retry *n* (0 first) waits ``min(max_seconds, first_seconds * 2**n)``.

    :param first_seconds: The wait before the first retry.
    :param max_seconds: The longest wait.
    :param max_retries: Retries before giving up; ``None`` retries for as long as the caller runs.
    :param jitter: Draw each wait uniformly from [0, the exponential value] ("full jitter"), so
        many studies failing together against one peer do not retry in lock-step.
    :raises ValueError: if a wait is not positive or *max_retries* is negative.
    """

    first_seconds: float
    max_seconds: float
    max_retries: int | None = None
    jitter: bool = False

    def __post_init__(self) -> None:
        if self.first_seconds <= 0 or self.max_seconds <= 0:
            raise ValueError(f"retry waits must be positive, not {self.first_seconds} and {self.max_seconds}")
        if self.max_retries is not None and self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0 or None, not {self.max_retries}")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number *retry* (zero for the first retry).

        :param retry: How many retries came before this one.
        :param rng: The random source of the jitter (tests pass a seeded one).
        :raises ValueError: if *retry* is negative.
        """
        if retry < 0:
            raise ValueError(f"retry must be >= 0, not {retry}")
        wait = min(self.max_seconds, self.first_seconds * 2.0 ** min(retry, _MAX_DOUBLINGS))
        return (rng or random).uniform(0.0, wait) if self.jitter else wait

    def exhausted(self, retries: int) -> bool:
        """Whether a caller that has already retried *retries* times must give up now."""
        return self.max_retries is not None and retries >= self.max_retries

    def kombu_retry_policy(self) -> dict[str, Any]:
        """This policy as kombu's publish ``retry_policy`` (``Connection.ensure``'s arguments).

        kombu's wait grows linearly, by ``interval_step`` per retry up to ``interval_max``, and
        never jitters.  Given ``first_seconds`` as start and step it waits first, 2x first,
        3x first ... where this policy would double: never longer, with the same cap and count.

        :raises ValueError: for a jittered policy, which kombu cannot follow.
        """
        if self.jitter:
            raise ValueError("kombu's publish retries cannot jitter; use a policy without jitter")
        return {
            "max_retries": self.max_retries,
            "interval_start": self.first_seconds,
            "interval_step": self.first_seconds,
            "interval_max": self.max_seconds,
        }

    def describe(self) -> str:
        """The policy in one line of prose, for the conformance statement and the docs."""
        count = "without limit" if self.max_retries is None else f"at most {self.max_retries}"
        return f"{count}, backoff from {self.first_seconds:g} s up to {self.max_seconds:g} s" + (
            " with full jitter" if self.jitter else ""
        )


def delivery_policy(settings: DeliverySettings) -> RetryPolicy:
    """The configured retries of a delivery to the PACS (``delivery.max_retries``, ``delivery.backoff_*``).

    Jittered: after a PACS outage, the studies that waited do not all come back in the same second.
    """
    return RetryPolicy(
        first_seconds=settings.backoff_base_seconds,
        max_seconds=settings.backoff_max_seconds,
        max_retries=settings.max_retries,
        jitter=True,
    )


#: The assembler's wait after the broker refused a study: it keeps the study and tries again on a
#: later tick, for as long as the gateway runs; one success resets the count.
GATEWAY_DISPATCH = RetryPolicy(first_seconds=2.0, max_seconds=60.0)
#: Short: the assembler's tick waits on it, and :data:`GATEWAY_DISPATCH` retries the study later anyway.
GATEWAY_PUBLISH = RetryPolicy(first_seconds=0.25, max_seconds=1.0, max_retries=2)
#: A worker publishing a follow-up task (delivery, stage two) rides out a broker restart of about
#: 20 s before giving the study back; kombu's defaults give up after about one second.
WORKER_PUBLISH = RetryPolicy(first_seconds=0.5, max_seconds=3.0, max_retries=10)
