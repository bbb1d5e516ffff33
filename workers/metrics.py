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
``pacs_triage_queue_depth{queue}``                  gauge      broker: messages waiting in each queue
``pacs_triage_broker_up``                           gauge      1 when the broker answered this scrape
``pacs_triage_inference_seconds{model}``            histogram  results: ``model_done:<model>`` events
``pacs_triage_delivery_failures_total{kind}``       counter    results: delivery retries, dead letters
``pacs_triage_dead_letters{task}``                  gauge      results: dead letters not replayed
``pacs_triage_oldest_unfinished_study_age_seconds`` gauge      journal + results (0 when none)
==================================================  =========  ==========================================

A study is unfinished from its first instance until it is delivered, or analysed with nothing to
deliver; a dead-lettered study counts as finished here and shows in ``pacs_triage_dead_letters``.

The journals are read through their owners (:class:`gateway.journal.JournalReader`,
:class:`workers.results.ResultsReader`), and the broker through kombu's API, so no table is
queried from here and a schema changes in one place.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.journal import JournalReader, StudyState
from gateway.settings import Settings
from workers.app import ANALYSIS_QUEUE, DELIVERY_QUEUE, transport_options
from workers.results import DELIVERY_RETRY, MODEL_DONE_PREFIX, ResultsReader

#: Upper bounds of the inference latency buckets, in seconds (a CPU test model to a slow GPU batch).
LATENCY_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
QUEUES: tuple[str, ...] = (ANALYSIS_QUEUE, DELIVERY_QUEUE)


def data_paths(settings: Settings) -> dict[str, Path]:
    """The shared files the metrics and the web service read, under ``gateway.data_dir``."""
    root = Path(settings.gateway.data_dir).resolve()
    return {
        "root": root,
        "journal": root / "journal.sqlite",
        "results": root / "results.sqlite",
        "broker": root / "broker.sqlite",
        "outputs": root / "outputs",
    }


# ---------------------------------------------------------------------------------------- broker


def _broker(settings: Settings) -> str:
    # workers.app.broker_url without its mkdir: a probe must not create a missing data directory.
    if settings.broker.url == "embedded":
        return f"sqla+sqlite:///{data_paths(settings)['broker']}"
    return settings.broker.url


def _connection(settings: Settings, timeout: float) -> Any:
    from kombu import Connection

    url = _broker(settings)
    return Connection(url, connect_timeout=timeout, transport_options=transport_options(settings, url))


def queue_depths(settings: Settings, timeout: float = 2.0) -> dict[str, int]:
    """Messages waiting in each queue, as the broker counts them (a passive ``queue.declare``).

    Messages a worker has reserved but not yet acknowledged are not waiting and not counted.

    :raises OSError: or a kombu error, when the broker cannot be reached.
    """
    depths = dict.fromkeys(QUEUES, 0)
    if settings.broker.url == "embedded" and not data_paths(settings)["broker"].is_file():
        return depths  # no message was ever published, and counting must not create the broker's file
    with _connection(settings, timeout) as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout)
        for queue in QUEUES:
            # A channel each: a passive declare of a missing queue closes its channel on AMQP brokers.
            # A queue that does not exist yet never had anything queued: it stays at 0.
            with connection.channel() as channel, contextlib.suppress(*connection.channel_errors):
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
    return depths


def broker_problem(settings: Settings, timeout: float = 2.0) -> str | None:
    """Why the broker cannot be used right now, or ``None`` when it answers."""
    if settings.broker.url == "embedded" and not data_paths(settings)["broker"].parent.is_dir():
        return f"the embedded broker's directory {data_paths(settings)['broker'].parent} does not exist"
    try:
        with _connection(settings, timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            with connection.channel():  # the Redis transport pings the server when it opens a channel
                pass
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
        paths = data_paths(settings)
        self.journal = JournalReader(paths["journal"])
        self.results = ResultsReader(paths["results"])
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
        received = CounterMetricFamily(
            "pacs_triage_instances_received",
            "Instances the gateway acknowledged, by outcome",
            labels=["outcome"],
        )
        refused = CounterMetricFamily(
            "pacs_triage_instances_refused", "C-STOREs the gateway refused, by reason", labels=["reason"]
        )
        completed = CounterMetricFamily(
            "pacs_triage_studies_completed",
            "Study versions the gateway declared complete, by rule",
            labels=["completed_by"],
        )
        counts = self.journal.counts()
        received.add_metric(["stored"], float(counts.stored))
        received.add_metric(["duplicate"], float(counts.duplicates))
        for rule, n in sorted(counts.completed_by.items()):
            completed.add_metric([rule], float(n))
        for reason, n in sorted(counts.refused.items()):
            refused.add_metric([reason], float(n))
        yield received
        yield refused
        yield completed

    # ------------------------------------------------------------------ workers' results

    def _workers(self) -> Iterator[Metric]:
        studies = GaugeMetricFamily(
            "pacs_triage_studies", "Studies on the worklist, by worker state", labels=["state"]
        )
        latency = HistogramMetricFamily(
            "pacs_triage_inference_seconds",
            "Model inference time per study and model (from the timeline)",
            labels=["model"],
        )
        failures = CounterMetricFamily(
            "pacs_triage_delivery_failures",
            "Failed deliveries to the PACS: retried attempts and dead letters",
            labels=["kind"],
        )
        letters = GaugeMetricFamily(
            "pacs_triage_dead_letters", "Dead letters waiting for a replay", labels=["task"]
        )
        counts = self.results.counts()
        for state, n in sorted(counts.studies_by_state.items()):
            studies.add_metric([state], float(n))
        for task, n in sorted(counts.waiting_letters_by_task.items()):
            letters.add_metric([task], float(n))
        self._read_timeline()
        for model in sorted(self._tally.buckets):
            latency.add_metric([model], self._tally.histogram(model), self._tally.sums[model])
        failures.add_metric(["retry"], float(self._tally.retries))
        failures.add_metric(["dead_letter"], float(counts.dead_deliveries))
        yield studies
        yield latency
        yield failures
        yield letters

    def _read_timeline(self) -> None:
        tail = self.results.timeline_tail(self._tally.last_rowid)
        if tail.newest < self._tally.last_rowid:
            self._tally = _LatencyTally()  # the results journal was replaced: count it afresh
            tail = self.results.timeline_tail(0)
        for rowid, event, detail in tail.events:
            self._tally.last_rowid = max(self._tally.last_rowid, rowid)
            if event == DELIVERY_RETRY:
                self._tally.retries += 1
                continue
            seconds = _inference_seconds(detail)
            if seconds is not None:
                self._tally.observe(event.removeprefix(MODEL_DONE_PREFIX), seconds)

    # ------------------------------------------------------------------ broker

    def _queues(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "pacs_triage_queue_depth", "Messages waiting in each broker queue", labels=["queue"]
        )
        up = GaugeMetricFamily("pacs_triage_broker_up", "1 when the broker answered this scrape")
        try:
            depths = queue_depths(self.settings)
        except Exception:  # a broker outage is a value of the metrics, not a failed scrape
            up.add_metric([], 0.0)
        else:
            up.add_metric([], 1.0)
            for queue, count in sorted(depths.items()):
                depth.add_metric([queue], float(count))
        yield depth
        yield up

    # ------------------------------------------------------------------ stuck studies

    def _oldest_unfinished(self) -> Metric:
        gauge = GaugeMetricFamily(
            "pacs_triage_oldest_unfinished_study_age_seconds",
            "Seconds since the first instance of the oldest study not yet finished",
        )
        oldest = oldest_unfinished_since(self.journal, self.results)
        gauge.add_metric([], max(0.0, self.clock() - oldest) if oldest is not None else 0.0)
        return gauge


def _inference_seconds(detail: str) -> float | None:
    try:
        value = json.loads(detail).get("inference_s")
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def oldest_unfinished_since(journal: JournalReader, results: ResultsReader) -> float | None:
    """The first-instance time of the oldest unfinished study version, or ``None``.

    A version is unfinished while the gateway still holds it (receiving or complete), or once
    dispatched until the worklist shows it finished: delivered, dead-lettered, or analysed with
    no outputs to deliver.  A newer version on the worklist supersedes an older one.
    """
    progress = results.progress()
    for arrival in journal.arrivals():
        if arrival.state != StudyState.DISPATCHED:
            return arrival.first_at
        worker = progress.get(arrival.study_uid)
        if worker is None or worker.version < arrival.version:
            return arrival.first_at  # queued, and no worker has reported on this version yet
        if worker.version == arrival.version and not worker.finished:
            return arrival.first_at
    return None


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
        {"name": "pacs_triage_queue_depth", "type": "gauge", "labels": ["queue"]},
        {"name": "pacs_triage_broker_up", "type": "gauge", "labels": []},
        {"name": "pacs_triage_inference_seconds", "type": "histogram", "labels": ["model"]},
        {"name": "pacs_triage_delivery_failures_total", "type": "counter", "labels": ["kind"]},
        {"name": "pacs_triage_dead_letters", "type": "gauge", "labels": ["task"]},
        {"name": "pacs_triage_oldest_unfinished_study_age_seconds", "type": "gauge", "labels": []},
    ]
