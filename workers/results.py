"""The workers' journal (SQLite in the shared data directory): analyses, worklist, deliveries, dead letters.

Every node writes here through SQLite's file locking, so it must live on storage all workers
share; that is the default data directory.  A network store would replace this class.

This module owns the results journal's tables: :class:`ResultsStore` writes them (the workers, the
dead-letter replay), and :class:`ResultsReader` answers the questions the web service and the
metrics ask of them.  No other module runs SQL against them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.journal import ExistingDatabaseReader, add_missing_columns
from plugins.types import OperatingPoint
from workers.triage import POLICY, TriageDecision

#: Worker states after which nothing more happens to a study without a person acting.
FINISHED_STATES: tuple[str, ...] = ("delivered", "done", "skipped", "dead-lettered", "failed")
#: Timeline events the metrics count: ``model_done:<model>`` carries the inference time as JSON.
MODEL_DONE_PREFIX = "model_done:"
DELIVERY_RETRY = "delivery_retry"
#: Timeline event: every output of the job is confirmed by each destination that does Storage Commitment.
COMMITTED = "committed"
#: Job ids whose every output the PACS confirmed (the worklist's "committed"), for the store and its reader.
_COMMITTED_JOBS_SQL = "SELECT DISTINCT job_id FROM timeline WHERE event = ?"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS worklist (
    study_uid     TEXT PRIMARY KEY,
    job_id        TEXT NOT NULL,
    version       INTEGER NOT NULL,
    risk          REAL,
    priority      INTEGER NOT NULL,
    state         TEXT NOT NULL,        -- queued | analysing | analysed | delivered | failed | dead-lettered
    findings      TEXT NOT NULL DEFAULT '[]',
    demo_weights  INTEGER NOT NULL DEFAULT 0,
    updated_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS timeline (
    job_id   TEXT NOT NULL,
    at       REAL NOT NULL,
    event    TEXT NOT NULL,
    detail   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS timeline_job ON timeline (job_id);
CREATE TABLE IF NOT EXISTS attempts (
    task_key  TEXT PRIMARY KEY,
    count     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS analyses (
    job_id      TEXT NOT NULL,
    model       TEXT NOT NULL,
    risk        REAL,
    predictions TEXT NOT NULL,          -- JSON, one entry per image
    failures    TEXT NOT NULL,
    outputs     TEXT NOT NULL,          -- JSON list of output paths
    finished_at REAL NOT NULL,
    PRIMARY KEY (job_id, model)
);
CREATE TABLE IF NOT EXISTS deliveries (
    sop_uid      TEXT NOT NULL,
    destination  TEXT NOT NULL,
    job_id       TEXT NOT NULL,
    status       TEXT NOT NULL,
    error        TEXT NOT NULL DEFAULT '',
    attempts     INTEGER NOT NULL,
    updated_at   REAL NOT NULL,
    PRIMARY KEY (sop_uid, destination)
);
CREATE TABLE IF NOT EXISTS notifications (
    job_id       TEXT NOT NULL,
    endpoint     TEXT NOT NULL,         -- notifications.hl7[].name
    study_uid    TEXT NOT NULL,
    status       TEXT NOT NULL,         -- notified | retrying | dead-lettered
    error        TEXT NOT NULL DEFAULT '',
    attempts     INTEGER NOT NULL,
    updated_at   REAL NOT NULL,
    PRIMARY KEY (job_id, endpoint)
);
CREATE TABLE IF NOT EXISTS commitments (
    sop_uid         TEXT NOT NULL,
    destination     TEXT NOT NULL,
    job_id          TEXT NOT NULL,
    status          TEXT NOT NULL,      -- committed | failed
    transaction_uid TEXT NOT NULL,
    updated_at      REAL NOT NULL,
    PRIMARY KEY (sop_uid, destination)
);
CREATE TABLE IF NOT EXISTS sent_outputs (
    sop_uid       TEXT NOT NULL,
    destination   TEXT NOT NULL,
    study_uid     TEXT NOT NULL,
    version       INTEGER NOT NULL,
    job_id        TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    series_uid    TEXT NOT NULL,
    rejected_by   TEXT,                 -- the SOP Instance UID of the IOCM rejection KOS
    PRIMARY KEY (sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS sent_outputs_study ON sent_outputs (study_uid, destination);
CREATE TABLE IF NOT EXISTS deadletters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    task        TEXT NOT NULL,
    job_id      TEXT NOT NULL,
    kwargs      TEXT NOT NULL,
    error       TEXT NOT NULL,
    at          REAL NOT NULL,
    replayed_at REAL
);
"""


#: The study's triage decision (workers.triage.decide), added to ``worklist`` in place on older journals:
#: the category, the model and operating point that set it, the point's threshold and the one-line reason.
_TRIAGE_COLUMNS = (
    ("triage_category", "TEXT"),
    ("triage_model", "TEXT"),
    ("triage_operating_point", "TEXT"),
    ("triage_threshold", "REAL"),
    ("triage_explanation", "TEXT"),
)
#: Worklist order: triage category (most urgent first), then risk, unanalysed studies last.
_WORKLIST_ORDER = (
    "risk IS NULL AND triage_category IS NULL, CASE triage_category WHEN 'high' THEN 0"
    " WHEN 'intermediate' THEN 1 WHEN 'routine' THEN 2 ELSE 3 END, risk DESC, updated_at ASC"
)


class ResultsStore:
    """Thread-safe access to ``results.sqlite``.

    :param path: The database file; created with its tables when missing.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=60000")
        with self._transaction() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            add_missing_columns(db, "worklist", _TRIAGE_COLUMNS)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ attempts

    def bump_attempt(self, task_key: str) -> int:
        """Count one more start of *task_key* and return the count (redeliveries included)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO attempts (task_key, count) VALUES (?, 1)"
                " ON CONFLICT(task_key) DO UPDATE SET count = count + 1",
                (task_key,),
            )
            return int(db.execute("SELECT count FROM attempts WHERE task_key = ?", (task_key,)).fetchone()[0])

    def reset_attempts(self, task_key: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM attempts WHERE task_key = ?", (task_key,))

    # ------------------------------------------------------------------ worklist and timeline

    def event(self, job_id: str, event: str, detail: str = "", at: float | None = None) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO timeline (job_id, at, event, detail) VALUES (?, ?, ?, ?)",
                (job_id, time.time() if at is None else at, event, detail),
            )

    def timeline(self, job_id: str) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM timeline WHERE job_id = ? ORDER BY at", (job_id,))

    def upsert_study(
        self,
        *,
        study_uid: str,
        job_id: str,
        version: int,
        priority: int,
        state: str,
        risk: float | None = None,
        findings: list[dict[str, Any]] | None = None,
        demo_weights: bool | None = None,
        triage: TriageDecision | None = None,
    ) -> None:
        """Create or update the worklist row of a study; ``None`` arguments keep the stored value."""
        with self._transaction() as db:
            row = db.execute("SELECT * FROM worklist WHERE study_uid = ?", (study_uid,)).fetchone()
            if row is not None and int(row["version"]) > version:
                return  # a late message about an older version must not overwrite the newer one
            same_version = row is not None and int(row["version"]) == version
            keep = dict(row) if same_version else {}
            db.execute(
                "INSERT OR REPLACE INTO worklist (study_uid, job_id, version, risk, priority, state, findings,"
                " demo_weights, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    study_uid,
                    job_id,
                    version,
                    risk if risk is not None else keep.get("risk"),
                    priority,
                    state,
                    json.dumps(findings) if findings is not None else keep.get("findings", "[]"),
                    int(demo_weights) if demo_weights is not None else keep.get("demo_weights", 0),
                    time.time(),
                ),
            )
            columns = (
                _triage_values(triage)
                if triage is not None
                else {name: keep.get(name) for name, _ in _TRIAGE_COLUMNS}
            )
            assignments = ", ".join(f"{name} = ?" for name in columns)
            db.execute(
                f"UPDATE worklist SET {assignments} WHERE study_uid = ?", (*columns.values(), study_uid)
            )

    def worklist(self) -> list[sqlite3.Row]:
        """Studies, most urgent triage category first, then highest risk (unanalysed last), then oldest."""
        return self._query(f"SELECT * FROM worklist ORDER BY {_WORKLIST_ORDER}")

    def study(self, study_uid: str) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM worklist WHERE study_uid = ?", (study_uid,))
        return rows[0] if rows else None

    # ------------------------------------------------------------------ analyses

    def record_analysis(
        self,
        job_id: str,
        model: str,
        risk: float | None,
        predictions: list[dict[str, Any]],
        failures: list[dict[str, Any]],
        outputs: list[str],
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO analyses VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    model,
                    risk,
                    json.dumps(predictions),
                    json.dumps(failures),
                    json.dumps(outputs),
                    time.time(),
                ),
            )

    def analyses(self, job_id: str) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM analyses WHERE job_id = ? ORDER BY model", (job_id,))

    def analysis(self, job_id: str, model: str) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM analyses WHERE job_id = ? AND model = ?", (job_id, model))
        return rows[0] if rows else None

    # ------------------------------------------------------------------ deliveries

    def record_delivery(
        self, *, sop_uid: str, destination: str, job_id: str, status: str, error: str = ""
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO deliveries (sop_uid, destination, job_id, status, error, attempts, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 1, ?) ON CONFLICT(sop_uid, destination) DO UPDATE SET"
                " status = excluded.status, error = excluded.error, attempts = attempts + 1,"
                " updated_at = excluded.updated_at",
                (sop_uid, destination, job_id, status, error, time.time()),
            )

    def stored_at(self, sop_uids: list[str]) -> set[tuple[str, str]]:
        """(SOP UID, destination) pairs journalled as stored, whichever job's delivery stored them.

        A later study version shares its unchanged outputs with the earlier one; their rows keep
        the job that first delivered them.
        """
        found: set[tuple[str, str]] = set()
        for start in range(0, len(sop_uids), 500):  # SQLite's limit on bound parameters
            chunk = sop_uids[start : start + 500]
            rows = self._query(
                "SELECT sop_uid, destination FROM deliveries WHERE status = 'stored'"
                f" AND sop_uid IN ({','.join('?' * len(chunk))})",
                tuple(chunk),
            )
            found.update((r["sop_uid"], r["destination"]) for r in rows)
        return found

    def deliveries(self, job_id: str | None = None) -> list[sqlite3.Row]:
        if job_id is None:
            return self._query("SELECT * FROM deliveries ORDER BY updated_at")
        return self._query("SELECT * FROM deliveries WHERE job_id = ? ORDER BY updated_at", (job_id,))

    # ------------------------------------------------------------------ notifications

    def record_notification(
        self, *, job_id: str, endpoint: str, study_uid: str, status: str, error: str = ""
    ) -> None:
        """The latest try to notify *endpoint* of a study version: notified, retrying or dead-lettered."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO notifications (job_id, endpoint, study_uid, status, error, attempts, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 1, ?) ON CONFLICT(job_id, endpoint) DO UPDATE SET"
                " status = excluded.status, error = excluded.error, attempts = attempts + 1,"
                " updated_at = excluded.updated_at",
                (job_id, endpoint, study_uid, status, error, time.time()),
            )

    def notifications(self, job_id: str) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM notifications WHERE job_id = ? ORDER BY endpoint", (job_id,))

    def notified_endpoints(self) -> dict[str, list[str]]:
        """Per job id, the endpoints that acknowledged its notification: the worklist's "notified"."""
        notified: dict[str, list[str]] = {}
        for row in self._query(
            "SELECT job_id, endpoint FROM notifications WHERE status = 'notified' ORDER BY endpoint"
        ):
            notified.setdefault(str(row["job_id"]), []).append(str(row["endpoint"]))
        return notified

    def committed_jobs(self) -> set[str]:
        """Job ids whose every output the PACS confirmed by Storage Commitment: the worklist's "committed"."""
        return {str(row["job_id"]) for row in self._query(_COMMITTED_JOBS_SQL, (COMMITTED,))}

    # ------------------------------------------------------------------ storage commitment

    def record_commitment(
        self, *, job_id: str, destination: str, transaction_uid: str, committed: list[str], failed: list[str]
    ) -> None:
        """Journal a Storage Commitment report: which instances the PACS committed, which it did not."""
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO commitments (sop_uid, destination, job_id, status, transaction_uid,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(uid, destination, job_id, "committed", transaction_uid, now) for uid in committed]
                + [(uid, destination, job_id, "failed", transaction_uid, now) for uid in failed],
            )

    def committed_at(self, sop_uids: list[str]) -> set[tuple[str, str]]:
        """(SOP UID, destination) pairs the PACS committed to keep, whichever job sent them."""
        found: set[tuple[str, str]] = set()
        for start in range(0, len(sop_uids), 500):  # SQLite's limit on bound parameters
            chunk = sop_uids[start : start + 500]
            rows = self._query(
                "SELECT sop_uid, destination FROM commitments WHERE status = 'committed'"
                f" AND sop_uid IN ({','.join('?' * len(chunk))})",
                tuple(chunk),
            )
            found.update((r["sop_uid"], r["destination"]) for r in rows)
        return found

    def commitments(self, job_id: str) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM commitments WHERE job_id = ? ORDER BY updated_at", (job_id,))

    # ------------------------------------------------------------------ outputs sent per study version

    def record_sent(
        self,
        *,
        study_uid: str,
        version: int,
        job_id: str,
        destination: str,
        instances: list[tuple[str, str, str]],
    ) -> None:
        """Journal outputs stored at *destination* for one study version.

        :param instances: ``(SOP Instance UID, SOP Class UID, Series Instance UID)`` of each.
        """
        with self._transaction() as db:
            # An output a later version shares with an earlier one keeps its first version: it was
            # never replaced, so it must never be rejected.
            db.executemany(
                "INSERT OR IGNORE INTO sent_outputs (sop_uid, destination, study_uid, version, job_id,"
                " sop_class_uid, series_uid) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (uid, destination, study_uid, version, job_id, sop_class, series)
                    for uid, sop_class, series in instances
                ],
            )

    def superseded_outputs(
        self, *, study_uid: str, version: int, destination: str, current: set[str]
    ) -> list[sqlite3.Row]:
        """Outputs of earlier versions of a study stored at *destination*, not among *current* and not
        rejected yet: the results a newer version replaces."""
        rows = self._query(
            "SELECT * FROM sent_outputs WHERE study_uid = ? AND destination = ? AND version < ?"
            " AND rejected_by IS NULL ORDER BY version, sop_uid",
            (study_uid, destination, version),
        )
        return [r for r in rows if r["sop_uid"] not in current]

    def mark_rejected(self, *, destination: str, sop_uids: list[str], rejected_by: str) -> None:
        """Record that a rejection KOS stored at *destination* names these outputs."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE sent_outputs SET rejected_by = ? WHERE sop_uid = ? AND destination = ?",
                [(rejected_by, uid, destination) for uid in sop_uids],
            )

    # ------------------------------------------------------------------ dead letters

    def dead_letter(self, task: str, job_id: str, kwargs: dict[str, Any], error: str) -> int:
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO deadletters (task, job_id, kwargs, error, at) VALUES (?, ?, ?, ?, ?)",
                (task, job_id, json.dumps(kwargs), error, time.time()),
            )
            return int(cur.lastrowid or 0)

    def dead_letters(self, include_replayed: bool = False) -> list[sqlite3.Row]:
        where = "" if include_replayed else " WHERE replayed_at IS NULL"
        return self._query(f"SELECT * FROM deadletters{where} ORDER BY at")

    def dead_letter_by_id(self, letter_id: int) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM deadletters WHERE id = ?", (letter_id,))
        return rows[0] if rows else None

    def mark_replayed(self, letter_id: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE deadletters SET replayed_at = ? WHERE id = ?", (time.time(), letter_id))


# -------------------------------------------------------------------------------- reading


def _triage_values(decision: TriageDecision) -> dict[str, Any]:
    point = decision.operating_point
    return {
        "triage_category": decision.category,
        "triage_model": decision.model,
        "triage_operating_point": None if point is None else point.name,
        "triage_threshold": None if point is None else point.threshold,
        "triage_explanation": decision.explanation,
    }


def stored_triage(row: sqlite3.Row) -> TriageDecision | None:
    """The triage decision a worklist row holds, for a study version that takes over an earlier one's."""
    if row["triage_category"] is None:
        return None
    point = (
        None
        if row["triage_operating_point"] is None
        else OperatingPoint(name=row["triage_operating_point"], threshold=float(row["triage_threshold"]))
    )
    return TriageDecision(
        category=row["triage_category"],
        risk=row["risk"],
        model=row["triage_model"],
        operating_point=point,
        policy=POLICY,
    )


@dataclass(frozen=True, slots=True)
class WorklistEntry:
    """A study's row on the worklist: the newest version the workers know, with its findings."""

    study_uid: str
    job_id: str
    version: int
    risk: float | None
    priority: int
    state: str
    findings: list[dict[str, Any]]
    demo_weights: bool
    updated_at: float
    #: The triage decision: category, the model and operating point behind it, its threshold, and why.
    triage_category: str | None = None
    triage_model: str | None = None
    triage_operating_point: str | None = None
    triage_threshold: float | None = None
    triage_explanation: str | None = None

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> WorklistEntry:
        triage = {name: row[name] for name, _ in _TRIAGE_COLUMNS if name in row.keys()}  # noqa: SIM118
        return cls(
            study_uid=row["study_uid"],
            job_id=row["job_id"],
            version=int(row["version"]),
            risk=row["risk"],
            priority=int(row["priority"]),
            state=row["state"],
            findings=json.loads(row["findings"] or "[]"),
            demo_weights=bool(row["demo_weights"]),
            updated_at=float(row["updated_at"]),
            **triage,
        )


@dataclass(frozen=True, slots=True)
class Analysis:
    """One model's analysis of one study version."""

    job_id: str
    model: str
    risk: float | None
    predictions: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    #: Paths of the DICOM objects built from it.
    outputs: list[str]
    finished_at: float

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> Analysis:
        return cls(
            job_id=row["job_id"],
            model=row["model"],
            risk=row["risk"],
            predictions=json.loads(row["predictions"]),
            failures=json.loads(row["failures"]),
            outputs=json.loads(row["outputs"]),
            finished_at=float(row["finished_at"]),
        )


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One entry of a job's worker timeline."""

    at: float
    event: str
    detail: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """The latest attempt to store one output at one destination."""

    destination: str
    status: str
    error: str
    attempts: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class Notification:
    """The latest try to send one study version's triage flag to one RIS endpoint."""

    endpoint: str
    #: ``notified`` (acknowledged), ``retrying`` or ``dead-lettered``.
    status: str
    error: str
    attempts: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class DeadLetterSummary:
    """A dead letter as the web service lists it: its task arguments (which hold UIDs) stay inside."""

    id: int
    task: str
    job_id: str
    error: str
    at: float
    replayed_at: float | None


@dataclass(frozen=True, slots=True)
class WorkProgress:
    """Whether the workers are done with the version of a study on the worklist."""

    version: int
    #: Delivered, dead-lettered, failed, or analysed with no output to deliver.
    finished: bool


@dataclass(frozen=True, slots=True)
class ResultsCounts:
    """The workers' totals, for the metrics."""

    studies_by_state: dict[str, int]
    #: Dead letters not replayed yet, by task.
    waiting_letters_by_task: dict[str, int]
    #: Deliveries ever dead-lettered, replayed ones included.
    dead_deliveries: int


@dataclass(frozen=True, slots=True)
class TimelineTail:
    """The timeline events the metrics count, past a position in the timeline."""

    #: The position of the newest timeline entry of any kind (0 when empty); smaller than a
    #: position seen before means the journal was replaced.
    newest: int
    #: ``(position, event, detail)`` of each :data:`MODEL_DONE_PREFIX` and :data:`DELIVERY_RETRY` event.
    events: list[tuple[int, str, str]]


class ResultsReader(ExistingDatabaseReader):
    """The results journal's answers for the web service and the metrics, read without a worker.

    Each call opens the file and closes it again; a journal no worker has made yet reads as empty.

    :param path: The workers' ``results.sqlite``.
    """

    _TABLES = ("worklist", "timeline", "attempts", "analyses", "deliveries", "notifications", "deadletters")

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._read() as db:
            return [] if db is None else db.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ worklist

    def worklist(self, limit: int) -> list[WorklistEntry]:
        """Up to *limit* studies in :meth:`ResultsStore.worklist`'s order (most urgent first)."""
        with self._read() as db:
            if db is None:
                return []
            have = {row[1] for row in db.execute("PRAGMA table_info(worklist)")}
            # A journal no worker of this version has opened yet has no triage columns: order by risk.
            order = (
                _WORKLIST_ORDER if "triage_category" in have else "risk IS NULL, risk DESC, updated_at ASC"
            )
            rows = db.execute(f"SELECT * FROM worklist ORDER BY {order} LIMIT ?", (limit,)).fetchall()
        return [WorklistEntry._from_row(r) for r in rows]

    def worklist_by_study(self) -> dict[str, WorklistEntry]:
        """Every worklist row, by Study Instance UID."""
        return {r["study_uid"]: WorklistEntry._from_row(r) for r in self._rows("SELECT * FROM worklist")}

    def worklist_entry(
        self, *, job_id: str | None = None, study_uid: str | None = None
    ) -> WorklistEntry | None:
        """The worklist row of one job id, or of one study whichever version it holds."""
        if (job_id is None) == (study_uid is None):
            raise ValueError("give exactly one of job_id and study_uid")
        column, value = ("job_id", job_id) if job_id is not None else ("study_uid", study_uid)
        rows = self._rows(f"SELECT * FROM worklist WHERE {column} = ?", (value,))
        return WorklistEntry._from_row(rows[0]) if rows else None

    def progress(self) -> dict[str, WorkProgress]:
        """For each study on the worklist, its version there and whether the workers are done with it."""
        rows = self._rows(
            "SELECT w.study_uid, w.version, w.state, EXISTS (SELECT 1 FROM analyses a"
            " WHERE a.job_id = w.job_id AND a.outputs != '[]') AS has_outputs FROM worklist w"
        )
        progress = {}
        for r in rows:
            nothing_to_deliver = r["state"] == "analysed" and not r["has_outputs"]
            finished = r["state"] in FINISHED_STATES or nothing_to_deliver
            progress[r["study_uid"]] = WorkProgress(version=int(r["version"]), finished=finished)
        return progress

    # ------------------------------------------------------------------ one job

    def analyses(self, job_id: str) -> list[Analysis]:
        """Every model's analysis of one job, by model name."""
        return [
            Analysis._from_row(r)
            for r in self._rows("SELECT * FROM analyses WHERE job_id = ? ORDER BY model", (job_id,))
        ]

    def analysis(self, job_id: str, model: str) -> Analysis | None:
        rows = self._rows("SELECT * FROM analyses WHERE job_id = ? AND model = ?", (job_id, model))
        return Analysis._from_row(rows[0]) if rows else None

    def timeline(self, job_id: str) -> list[TimelineEntry]:
        """The workers' timeline of one job, oldest first."""
        return [
            TimelineEntry(float(r["at"]), str(r["event"]), str(r["detail"]))
            for r in self._rows(
                "SELECT at, event, detail FROM timeline WHERE job_id = ? ORDER BY at", (job_id,)
            )
        ]

    def deliveries(self, job_id: str) -> list[Delivery]:
        """Where one job's outputs went, oldest attempt first."""
        return [
            Delivery(
                str(r["destination"]),
                str(r["status"]),
                str(r["error"]),
                int(r["attempts"]),
                float(r["updated_at"]),
            )
            for r in self._rows(
                "SELECT destination, status, error, attempts, updated_at FROM deliveries WHERE job_id = ?"
                " ORDER BY updated_at",
                (job_id,),
            )
        ]

    def notified_jobs(self) -> set[str]:
        """Job ids that at least one RIS endpoint acknowledged (the worklist's "notified")."""
        return {
            str(r["job_id"])
            for r in self._rows("SELECT DISTINCT job_id FROM notifications WHERE status = 'notified'")
        }

    def notifications(self, job_id: str) -> list[Notification]:
        """Where one job's triage flag went (one row per RIS endpoint)."""
        return [
            Notification(
                str(r["endpoint"]),
                str(r["status"]),
                str(r["error"]),
                int(r["attempts"]),
                float(r["updated_at"]),
            )
            for r in self._rows(
                "SELECT endpoint, status, error, attempts, updated_at FROM notifications WHERE job_id = ?"
                " ORDER BY endpoint",
                (job_id,),
            )
        ]

    def committed_jobs(self) -> set[str]:
        """Job ids whose every output the PACS confirmed by Storage Commitment (the ``committed`` event)."""
        return {str(r["job_id"]) for r in self._rows(_COMMITTED_JOBS_SQL, (COMMITTED,))}

    # ------------------------------------------------------------------ dead letters

    def dead_letters(self, include_replayed: bool = False) -> list[DeadLetterSummary]:
        """Dead letters, oldest first; those already replayed only when asked."""
        where = "" if include_replayed else " WHERE replayed_at IS NULL"
        return [
            DeadLetterSummary(
                int(r["id"]),
                str(r["task"]),
                str(r["job_id"]),
                str(r["error"]),
                float(r["at"]),
                r["replayed_at"],
            )
            for r in self._rows(
                f"SELECT id, task, job_id, error, at, replayed_at FROM deadletters{where} ORDER BY at"
            )
        ]

    # ------------------------------------------------------------------ metrics

    def counts(self) -> ResultsCounts:
        """Worklist rows by state, dead letters waiting by task, and deliveries ever dead-lettered."""
        with self._read() as db:
            if db is None:
                return ResultsCounts(studies_by_state={}, waiting_letters_by_task={}, dead_deliveries=0)
            states = db.execute("SELECT state, count(*) AS n FROM worklist GROUP BY state").fetchall()
            waiting = db.execute(
                "SELECT task, count(*) AS n FROM deadletters WHERE replayed_at IS NULL GROUP BY task"
            ).fetchall()
            dead = db.execute("SELECT count(*) FROM deadletters WHERE task = 'deliver'").fetchone()[0]
        return ResultsCounts(
            studies_by_state={str(r["state"]): int(r["n"]) for r in states},
            waiting_letters_by_task={str(r["task"]): int(r["n"]) for r in waiting},
            dead_deliveries=int(dead),
        )

    def timeline_tail(self, after: int) -> TimelineTail:
        """The model timings and delivery retries past position *after* (a rowid), oldest first."""
        with self._read() as db:
            if db is None:
                return TimelineTail(newest=0, events=[])
            newest = db.execute("SELECT coalesce(max(rowid), 0) FROM timeline").fetchone()[0]
            rows = db.execute(
                "SELECT rowid, event, detail FROM timeline WHERE rowid > ? AND (event LIKE ? OR event = ?)"
                " ORDER BY rowid",
                (after, MODEL_DONE_PREFIX + "%", DELIVERY_RETRY),
            ).fetchall()
        return TimelineTail(
            newest=int(newest), events=[(int(r["rowid"]), str(r["event"]), str(r["detail"])) for r in rows]
        )
