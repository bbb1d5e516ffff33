"""Prometheus metrics read from the journals and the broker at scrape time, so every process's work counts.

The gateway, the workers and the web service are separate processes (often on separate
machines), so no in-process counter sees everything.  What they all share is the data directory:
the gateway's ``journal.sqlite``, the workers' ``results.sqlite`` and the broker.  A custom
collector turns those into series each time Prometheus scrapes:

==================================================  =========  ==========================================
series                                              type       source
==================================================  =========  ==========================================
``pacs_triage_instances_received_total{outcome}``   counter    journal: instances (stored), duplicates
``pacs_triage_instances_refused_total{reason}``     counter    journal: refusals, by C-STORE status
``pacs_triage_studies_completed_total{completed_by}`` counter  journal: studies with a completion time
``pacs_triage_studies{state}``                      gauge      results: worklist rows by state
``pacs_triage_queue_depth{queue,priority}``         gauge      broker: waiting messages (0 = highest)
``pacs_triage_broker_up``                           gauge      1 when the broker answered this scrape
``pacs_triage_inference_seconds{model}``            histogram  results: ``model_done:<model>`` events
``pacs_triage_delivery_failures_total{kind}``       counter    results: delivery retries, dead letters
``pacs_triage_dead_letters{task}``                  gauge      results: dead letters not replayed
``pacs_triage_oldest_unfinished_study_age_seconds`` gauge      journal + results (0 when none)
==================================================  =========  ==========================================

A study is unfinished from its first instance until it is delivered, or analysed with nothing to
deliver; a dead-lettered study counts as finished here and shows in ``pacs_triage_dead_letters``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.settings import Settings
from workers.app import ANALYSIS_QUEUE, DELIVERY_QUEUE

#: Upper bounds of the inference latency buckets, in seconds (a CPU test model to a slow GPU batch).
LATENCY_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Worker states after which nothing more happens to a study without a person acting.
FINISHED_STATES: tuple[str, ...] = ("delivered", "done", "dead-lettered", "failed")
QUEUES: tuple[str, ...] = (ANALYSIS_QUEUE, DELIVERY_QUEUE)
#: The Redis transport's priority levels (workers/app.py sets ``priority_steps`` 0..9, ``sep`` ":").
REDIS_PRIORITY_STEPS: tuple[int, ...] = tuple(range(10))
REDIS_PRIORITY_SEP = ":"


def open_database(path: Path) -> sqlite3.Connection | None:
    """Open an existing SQLite journal for reading, or return ``None`` when there is none yet.

    Opened read-write without create (``mode=rw``): a read-only handle cannot join a WAL
    database whose ``-shm`` file the writer has not made, and nothing here ever writes.
    """
    if not path.is_file():
        return None
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=10.0,
                         check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout=10000")
    return db


def _table_exists(db: sqlite3.Connection, name: str, schema: str = "main") -> bool:
    row = db.execute(f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = ?",
                     (name,)).fetchone()
    return row is not None


def data_paths(settings: Settings) -> dict[str, Path]:
    """The shared files the metrics and the web service read, under ``gateway.data_dir``."""
    root = Path(settings.gateway.data_dir).resolve()
    return {"root": root, "journal": root / "journal.sqlite", "results": root / "results.sqlite",
            "broker": root / "broker.sqlite", "outputs": root / "outputs"}


# ---------------------------------------------------------------------------------------- broker


def _broker(settings: Settings) -> str:
    # workers.app.broker_url without its mkdir: a probe must not create a missing data directory.
    if settings.broker.url == "embedded":
        return f"sqla+sqlite:///{data_paths(settings)['broker']}"
    return settings.broker.url


def queue_depths(settings: Settings, timeout: float = 2.0) -> dict[tuple[str, int], int]:
    """Messages waiting in each queue at each priority, keyed ``(queue, priority)``.

    Redis keeps one list per queue and priority level (``analysis``, ``analysis:1`` ...
    ``analysis:9``; kombu's ``_q_for_pri``).  The embedded SQLite transport has no priorities of
    its own, so its waiting messages are counted by the priority each carries.

    :raises OSError: or a client error, when the broker cannot be read.
    """
    url = _broker(settings)
    depths: dict[tuple[str, int], int] = {(q, p): 0 for q in QUEUES for p in REDIS_PRIORITY_STEPS}
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            keys = [(q, p) for q in QUEUES for p in REDIS_PRIORITY_STEPS]
            pipe = client.pipeline()
            for queue, priority in keys:
                pipe.llen(queue if priority == 0 else f"{queue}{REDIS_PRIORITY_SEP}{priority}")
            for key, length in zip(keys, pipe.execute(), strict=True):
                depths[key] = int(length)
        finally:
            client.close()
        return depths
    if url.startswith("sqla+sqlite:///"):
        db = open_database(Path(url.removeprefix("sqla+sqlite:///")))
        if db is None:
            return depths  # no message was ever published
        with closing(db):
            if not _table_exists(db, "kombu_message"):
                return depths
            rows = db.execute(
                "SELECT q.name AS queue, json_extract(m.payload, '$.properties.priority') AS priority,"
                " count(*) AS n FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id"
                " WHERE m.visible = 1 GROUP BY q.name, priority").fetchall()
        for row in rows:
            priority = int(row["priority"]) if row["priority"] is not None else 0
            depths[(row["queue"], priority)] = depths.get((row["queue"], priority), 0) + int(row["n"])
        return depths
    raise ValueError(f"cannot count messages on broker {url.split('://', 1)[0]}://")


def broker_problem(settings: Settings, timeout: float = 2.0) -> str | None:
    """Why the broker cannot be used right now, or ``None`` when it answers."""
    url = _broker(settings)
    try:
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
            try:
                client.ping()
            finally:
                client.close()
            return None
        if url.startswith("sqla+sqlite:///"):
            path = Path(url.removeprefix("sqla+sqlite:///"))
            if not path.parent.is_dir():
                return f"the embedded broker's directory {path.parent} does not exist"
            with closing(sqlite3.connect(path, timeout=timeout)) as db:
                db.execute("PRAGMA schema_version").fetchone()
            return None
        from kombu import Connection

        with Connection(url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
        return None
    except Exception as exc:  # any failure means "not usable"; the reason goes to /readyz
        return f"{type(exc).__name__}: {exc}"[:300]


# ---------------------------------------------------------------------------------------- collector


class _LatencyTally:
    """Inference latencies per model, read incrementally from the timeline by rowid."""

    def __init__(self) -> None:
        self.last_rowid = 0
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.retries = 0

    def observe(self, model: str, seconds: float) -> None:
        counts = self.buckets.setdefault(model, [0] * (len(LATENCY_BUCKETS) + 1))
        index = next((i for i, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound), len(LATENCY_BUCKETS))
        counts[index] += 1
        self.sums[model] = self.sums.get(model, 0.0) + seconds

    def histogram(self, model: str) -> list[tuple[str, float]]:
        cumulative, running = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.buckets[model], strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return cumulative


class TriageCollector(Collector):
    """Yields every pacs-triage series from the shared journals and the broker.

    The timeline is read incrementally (rows past the last rowid seen), so a scrape costs the
    new events, not the whole history.

    :param settings: Where the data directory and the broker are.
    :param clock: Wall-clock time, replaceable in tests.
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.paths = data_paths(settings)
        self.clock = clock
        self._tally = _LatencyTally()
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        # Returning nothing keeps registration from running a scrape.
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._gateway()
            yield from self._workers()
            yield from self._queues()
            yield self._oldest_unfinished()

    # ------------------------------------------------------------------ gateway journal

    def _gateway(self) -> Iterator[Metric]:
        received = CounterMetricFamily("pacs_triage_instances_received",
                                       "Instances the gateway acknowledged, by outcome", labels=["outcome"])
        refused = CounterMetricFamily("pacs_triage_instances_refused",
                                      "C-STOREs the gateway refused, by reason", labels=["reason"])
        completed = CounterMetricFamily("pacs_triage_studies_completed",
                                        "Study versions the gateway declared complete, by rule",
                                        labels=["completed_by"])
        db = open_database(self.paths["journal"])
        if db is not None:
            with closing(db):
                if _table_exists(db, "instances"):
                    stored = db.execute("SELECT count(*) FROM instances").fetchone()[0]
                    duplicates = db.execute("SELECT coalesce(sum(duplicates), 0) FROM studies").fetchone()[0]
                    received.add_metric(["stored"], float(stored))
                    received.add_metric(["duplicate"], float(duplicates))
                    for row in db.execute("SELECT completed_by, count(*) AS n FROM studies"
                                          " WHERE completed_at IS NOT NULL GROUP BY completed_by"):
                        completed.add_metric([row["completed_by"] or "unknown"], float(row["n"]))
                if _table_exists(db, "refusals"):
                    for row in db.execute("SELECT reason, count FROM refusals ORDER BY reason"):
                        refused.add_metric([row["reason"]], float(row["count"]))
        yield received
        yield refused
        yield completed

    # ------------------------------------------------------------------ workers' results

    def _workers(self) -> Iterator[Metric]:
        studies = GaugeMetricFamily("pacs_triage_studies", "Studies on the worklist, by worker state",
                                    labels=["state"])
        latency = HistogramMetricFamily("pacs_triage_inference_seconds",
                                        "Model inference time per study and model (from the timeline)",
                                        labels=["model"])
        failures = CounterMetricFamily("pacs_triage_delivery_failures",
                                       "Failed deliveries to the PACS: retried attempts and dead letters",
                                       labels=["kind"])
        letters = GaugeMetricFamily("pacs_triage_dead_letters", "Dead letters waiting for a replay",
                                    labels=["task"])
        db = open_database(self.paths["results"])
        dead_deliveries = 0
        if db is not None:
            with closing(db):
                if _table_exists(db, "worklist"):
                    for row in db.execute("SELECT state, count(*) AS n FROM worklist GROUP BY state"):
                        studies.add_metric([row["state"]], float(row["n"]))
                if _table_exists(db, "timeline"):
                    self._read_timeline(db)
                if _table_exists(db, "deadletters"):
                    for row in db.execute("SELECT task, count(*) AS n FROM deadletters"
                                          " WHERE replayed_at IS NULL GROUP BY task"):
                        letters.add_metric([row["task"]], float(row["n"]))
                    dead_deliveries = db.execute(
                        "SELECT count(*) FROM deadletters WHERE task = 'deliver'").fetchone()[0]
        for model in sorted(self._tally.buckets):
            latency.add_metric([model], self._tally.histogram(model), self._tally.sums[model])
        failures.add_metric(["retry"], float(self._tally.retries))
        failures.add_metric(["dead_letter"], float(dead_deliveries))
        yield studies
        yield latency
        yield failures
        yield letters

    def _read_timeline(self, db: sqlite3.Connection) -> None:
        newest = db.execute("SELECT coalesce(max(rowid), 0) FROM timeline").fetchone()[0]
        if newest < self._tally.last_rowid:
            self._tally = _LatencyTally()  # the results journal was replaced: count it afresh
        rows = db.execute(
            "SELECT rowid, event, detail FROM timeline WHERE rowid > ?"
            " AND (event LIKE 'model_done:%' OR event = 'delivery_retry') ORDER BY rowid",
            (self._tally.last_rowid,)).fetchall()
        for row in rows:
            self._tally.last_rowid = max(self._tally.last_rowid, int(row["rowid"]))
            if row["event"] == "delivery_retry":
                self._tally.retries += 1
                continue
            seconds = _inference_seconds(row["detail"])
            if seconds is not None:
                self._tally.observe(row["event"].split(":", 1)[1], seconds)

    # ------------------------------------------------------------------ broker

    def _queues(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("pacs_triage_queue_depth",
                                  "Messages waiting in the broker, by queue and priority (0 is the highest)",
                                  labels=["queue", "priority"])
        up = GaugeMetricFamily("pacs_triage_broker_up", "1 when the broker answered this scrape")
        try:
            depths = queue_depths(self.settings)
        except Exception:  # a broker outage is a value of the metrics, not a failed scrape
            up.add_metric([], 0.0)
        else:
            up.add_metric([], 1.0)
            for (queue, priority), count in sorted(depths.items()):
                depth.add_metric([queue, str(priority)], float(count))
        yield depth
        yield up

    # ------------------------------------------------------------------ stuck studies

    def _oldest_unfinished(self) -> Metric:
        gauge = GaugeMetricFamily("pacs_triage_oldest_unfinished_study_age_seconds",
                                  "Seconds since the first instance of the oldest study not yet finished")
        oldest = oldest_unfinished_since(self.paths["journal"], self.paths["results"])
        gauge.add_metric([], max(0.0, self.clock() - oldest) if oldest is not None else 0.0)
        return gauge


def _inference_seconds(detail: str) -> float | None:
    try:
        value = json.loads(detail).get("inference_s")
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def oldest_unfinished_since(journal_path: Path, results_path: Path) -> float | None:
    """The first-instance time of the oldest unfinished study version, or ``None``.

    A version is unfinished while the gateway still holds it (receiving or complete), or once
    dispatched until the worklist shows it finished: delivered, dead-lettered, or analysed with
    no outputs to deliver.  A newer version on the worklist supersedes an older one.
    """
    db = open_database(journal_path)
    if db is None:
        return None
    finished = ", ".join(f"'{state}'" for state in FINISHED_STATES)
    with closing(db):
        if not _table_exists(db, "studies"):
            return None
        if not results_path.is_file():
            row = db.execute("SELECT min(first_at) FROM studies").fetchone()
            return None if row[0] is None else float(row[0])
        db.execute("ATTACH DATABASE ? AS r", (f"{results_path.resolve().as_uri()}?mode=rw",))
        if not _table_exists(db, "worklist", "r") or not _table_exists(db, "analyses", "r"):
            row = db.execute("SELECT min(first_at) FROM studies").fetchone()
            return None if row[0] is None else float(row[0])
        row = db.execute(
            "SELECT min(s.first_at) FROM studies s LEFT JOIN r.worklist w ON w.study_uid = s.study_uid"
            " WHERE s.state != 'dispatched' OR w.study_uid IS NULL OR w.version < s.version"
            f" OR (w.version = s.version AND w.state NOT IN ({finished})"
            "     AND NOT (w.state = 'analysed' AND NOT EXISTS ("
            "         SELECT 1 FROM r.analyses a WHERE a.job_id = w.job_id AND a.outputs != '[]')))"
        ).fetchone()
    return None if row[0] is None else float(row[0])


def make_registry(settings: Settings, clock: Callable[[], float] = time.time) -> CollectorRegistry:
    """A registry holding only the pacs-triage collector (no process metrics of the web server)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TriageCollector(settings, clock))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus's text format, with its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST


def describe_series() -> list[dict[str, Any]]:
    """Name and type of every series, for the docs and the tests."""
    return [
        {"name": "pacs_triage_instances_received_total", "type": "counter", "labels": ["outcome"]},
        {"name": "pacs_triage_instances_refused_total", "type": "counter", "labels": ["reason"]},
        {"name": "pacs_triage_studies_completed_total", "type": "counter", "labels": ["completed_by"]},
        {"name": "pacs_triage_studies", "type": "gauge", "labels": ["state"]},
        {"name": "pacs_triage_queue_depth", "type": "gauge", "labels": ["queue", "priority"]},
        {"name": "pacs_triage_broker_up", "type": "gauge", "labels": []},
        {"name": "pacs_triage_inference_seconds", "type": "histogram", "labels": ["model"]},
        {"name": "pacs_triage_delivery_failures_total", "type": "counter", "labels": ["kind"]},
        {"name": "pacs_triage_dead_letters", "type": "gauge", "labels": ["task"]},
        {"name": "pacs_triage_oldest_unfinished_study_age_seconds", "type": "gauge", "labels": []},
    ]
