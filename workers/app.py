"""The Celery application and its reliability settings; each setting cites the docs page behind it.

Two brokers, one code path:

- ``broker.url: embedded`` (the default) is kombu's SQLAlchemy transport on a SQLite file in the
  data directory.  It needs no service, keeps queued messages on disk across restarts, and is
  the same kombu/Celery machinery the Redis set-up uses.  Its limits: one machine, polling, and
  no message priorities (FIFO).
- ``broker.url: redis://...`` is production: priorities through Redis's priority transport,
  several worker nodes, a visibility timeout longer than the longest task.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import structlog
from celery import Celery
from celery.signals import worker_init, worker_process_init

from gateway.settings import Settings

log = structlog.get_logger(__name__)

ANALYSIS_QUEUE = "analysis"
DELIVERY_QUEUE = "delivery"

app = Celery("pacs_triage", include=["workers.tasks"])

_settings: Settings | None = None


def broker_url(settings: Settings) -> str:
    if settings.broker.url == "embedded":
        path = Path(settings.gateway.data_dir).resolve() / "broker.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqla+sqlite:///{path}"
    return settings.broker.url


def transport_options(settings: Settings, url: str) -> dict[str, Any]:
    """kombu's transport options for the broker at *url*; every client of the broker uses these.

    The Redis transport names its per-priority lists from ``priority_steps`` and ``sep``, so a
    client with other options would count or read other lists.
    """
    if not url.startswith(("redis://", "rediss://")):
        return {}
    longest_task = settings.worker.time_limit_seconds + settings.delivery.backoff_max_seconds
    # routing.html "Redis Message Priorities": 0 is the highest; one list per level.
    return {
        "queue_order_strategy": "priority",
        "priority_steps": list(range(10)),
        "sep": ":",
        # redis.html "Visibility Timeout": longer than the longest task plus retry delays.
        "visibility_timeout": max(settings.broker.visibility_timeout_seconds, int(longest_task * 2)),
    }


def configure_app(settings: Settings) -> Celery:
    """Point the app at the configured broker and apply the reliability settings."""
    global _settings
    _settings = settings
    url = broker_url(settings)
    if app.conf.broker_url not in (None, url):
        # Connection pools made for an earlier broker would keep publishing there; drop them as
        # Celery itself does after a fork.
        app._pool = None
        app.amqp._producer_pool = None
    app.conf.update(
        broker_url=url,
        broker_transport_options=transport_options(settings, url),
        broker_connection_retry_on_startup=True,
        broker_polling_interval=0.2,  # the SQLite transport polls; keep hand-off latency low
        result_backend=None,
        task_ignore_result=True,  # results live in our own journal (workers/results.py)
        # tasks.html: ack after the task ran, and requeue when a worker process dies mid-task;
        # our attempts counter caps redeliveries so a poison study cannot loop.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # optimizing.html "Prefetch Limits": one task reserved per process for long tasks.
        worker_prefetch_multiplier=1,
        # security.html / configuration.html: JSON only, never pickle.
        task_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # configuration.html task_soft_time_limit / task_time_limit.
        task_soft_time_limit=settings.worker.soft_time_limit_seconds,
        task_time_limit=settings.worker.time_limit_seconds,
        # configuration.html worker_soft_shutdown_timeout: requeue unacked work on shutdown.
        worker_soft_shutdown_timeout=10.0,
        worker_enable_soft_shutdown_on_idle=True,
        # configuration.html worker_max_tasks_per_child: bounds any slow leak in model code.
        worker_max_tasks_per_child=200,
        worker_hijack_root_logger=False,
        task_default_queue=ANALYSIS_QUEUE,
        task_routes={
            "workers.tasks.analyse": {"queue": ANALYSIS_QUEUE},
            "workers.tasks.deliver": {"queue": DELIVERY_QUEUE},
            "workers.tasks.notify": {"queue": DELIVERY_QUEUE},
        },
        task_queue_max_priority=9,
        task_default_priority=6,
    )
    return app


def current_settings() -> Settings:
    """The settings the app was configured with (workers inherit them across fork)."""
    if _settings is None:
        from gateway.settings import load_settings

        configure_app(load_settings())
    if _settings is None:
        raise RuntimeError("the Celery app has no settings")
    return _settings


def apply_memory_limit(settings: Settings) -> int | None:
    """Cap this process's address space (RLIMIT_AS) at ``worker.memory_limit_mb``; returns the bytes set.

    An allocation past the cap then raises ``MemoryError`` in Python (or torch's out-of-memory
    error): the host records it as that image's out-of-memory failure, and the process, its
    other images and the other studies carry on.  Without it a huge allocation meets the
    kernel's OOM killer, and a killed process is redelivered until it is dead-lettered.
    Nothing is set for 0 or for a CUDA worker (its runtime reserves far more address space
    than it uses), and a hard limit already lower is kept.
    """
    megabytes = settings.worker.memory_limit_mb
    device = os.environ.get("PACS_TRIAGE_WORKER_DEVICE") or settings.worker.device
    if not megabytes or device.startswith("cuda"):
        return None
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = megabytes << 20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


@worker_process_init.connect
def _limit_pool_process_memory(**_: Any) -> None:
    # signals.html worker_process_init: runs in each new pool process, before it takes a task.
    limit = apply_memory_limit(current_settings())
    log.info("worker.memory_limit", address_space_bytes=limit)


@worker_init.connect
def _load_standard_tables(**_: Any) -> None:
    # signals.html worker_init: runs in the worker's main process before its pool starts, so the pool
    # processes it forks inherit highdicom's tables instead of each loading them on its first study.
    from workers.outputs import warm_standard_tables

    warm_standard_tables()
