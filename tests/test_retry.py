"""The one retry policy: capped exponential waits, full jitter, giving up, kombu's view of it, its users."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gateway.assembly import Assembler
from gateway.errors import TransientError
from gateway.journal import InstanceRecord, Journal, StoreOutcome, StudyState
from gateway.messages import StudyJob
from gateway.retry import GATEWAY_DISPATCH, GATEWAY_PUBLISH, WORKER_PUBLISH, RetryPolicy, delivery_policy
from gateway.settings import AssemblySettings, DeliverySettings


def test_waits_double_up_to_the_cap() -> None:
    policy = RetryPolicy(first_seconds=2.0, max_seconds=60.0)
    assert [policy.delay(n) for n in range(8)] == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert RetryPolicy(first_seconds=2.0, max_seconds=600.0).delay(10_000) == 600.0
    with pytest.raises(ValueError, match="retry must be"):
        policy.delay(-1)


def test_full_jitter_spreads_the_waits_below_the_exponential_value() -> None:
    policy = RetryPolicy(first_seconds=2.0, max_seconds=60.0, jitter=True)
    rng = random.Random(5)
    waits = [policy.delay(3, rng) for _ in range(200)]
    assert all(0.0 <= w <= 16.0 for w in waits)
    assert len(set(waits)) > 150  # spread out, not lock-step


def test_a_policy_gives_up_after_max_retries_or_never() -> None:
    policy = RetryPolicy(first_seconds=1.0, max_seconds=1.0, max_retries=2)
    assert [policy.exhausted(n) for n in range(4)] == [False, False, True, True]
    assert not RetryPolicy(first_seconds=1.0, max_seconds=1.0).exhausted(10**6)
    with pytest.raises(ValueError, match="positive"):
        RetryPolicy(first_seconds=0.0, max_seconds=1.0)
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(first_seconds=1.0, max_seconds=1.0, max_retries=-1)


def test_kombu_waits_never_exceed_the_policy_and_keep_its_cap_and_count() -> None:
    for policy in (GATEWAY_PUBLISH, WORKER_PUBLISH):
        options = policy.kombu_retry_policy()
        assert options["max_retries"] == policy.max_retries
        # kombu's schedule: start, then one step more per retry, up to the cap.
        start, step, cap = options["interval_start"], options["interval_step"], options["interval_max"]
        kombu_waits = [min(cap, start + n * step) for n in range(policy.max_retries or 0)]
        assert all(k <= policy.delay(n) for n, k in enumerate(kombu_waits))
        assert max(kombu_waits) <= policy.max_seconds
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(first_seconds=1.0, max_seconds=2.0, jitter=True).kombu_retry_policy()


def test_delivery_follows_the_settings_and_the_gateway_retries_dispatch_for_ever() -> None:
    settings = DeliverySettings(max_retries=5, backoff_base_seconds=3.0, backoff_max_seconds=30.0)
    policy = delivery_policy(settings)
    assert (policy.first_seconds, policy.max_seconds, policy.max_retries) == (3.0, 30.0, 5) and policy.jitter
    assert policy.describe() == "at most 5, backoff from 3 s up to 30 s with full jitter"
    assert GATEWAY_DISPATCH.max_retries is None and not GATEWAY_DISPATCH.exhausted(10**6)


def test_the_assembler_waits_by_its_policy_after_the_broker_refused_a_study(tmp_path: Path) -> None:
    class BrokerDownOnce:
        def __init__(self) -> None:
            self.calls = 0

        def dispatch(self, job: StudyJob) -> None:
            self.calls += 1
            if self.calls == 1:
                raise TransientError("broker unreachable")

    journal = Journal(tmp_path / "journal.sqlite")
    record = InstanceRecord(sop_uid="1.2.3.1", study_uid="1.2.3", series_uid="1.2.3.9",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                            transfer_syntax="1.2.840.10008.1.2.1",
                            modality="CT", laterality="", view="", presentation="", path="a.dcm", size=1,
                            calling_ae="A", priority=6)
    now = 1_000.0
    version = journal.record_instance(record, StoreOutcome.NEW, now=now)
    journal.complete_study("1.2.3", version, "quiet", now=now)
    dispatcher = BrokerDownOnce()
    assembler = Assembler(journal, dispatcher, AssemblySettings(), str(tmp_path))
    assert assembler.tick(now) == 0 and dispatcher.calls == 1
    wait = GATEWAY_DISPATCH.delay(0)
    assert assembler.tick(now + wait / 2) == 0 and dispatcher.calls == 1  # still waiting: not tried
    assert assembler.tick(now + wait) == 1 and dispatcher.calls == 2
    study = journal.study("1.2.3", version)
    assert study is not None and study.state == StudyState.DISPATCHED
