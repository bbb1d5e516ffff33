"""The workers' journal (SQLite in the shared data directory): analyses, worklist, deliveries, dead letters.

Every node writes here through SQLite's file locking, so it must live on storage all workers
share; that is the default data directory.  A network store would replace this class.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
            db.execute("INSERT INTO attempts (task_key, count) VALUES (?, 1)"
                       " ON CONFLICT(task_key) DO UPDATE SET count = count + 1", (task_key,))
            return int(db.execute("SELECT count FROM attempts WHERE task_key = ?", (task_key,)).fetchone()[0])

    def reset_attempts(self, task_key: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM attempts WHERE task_key = ?", (task_key,))

    # ------------------------------------------------------------------ worklist and timeline

    def event(self, job_id: str, event: str, detail: str = "", at: float | None = None) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO timeline (job_id, at, event, detail) VALUES (?, ?, ?, ?)",
                       (job_id, time.time() if at is None else at, event, detail))

    def timeline(self, job_id: str) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM timeline WHERE job_id = ? ORDER BY at", (job_id,))

    def upsert_study(self, *, study_uid: str, job_id: str, version: int, priority: int, state: str,
                     risk: float | None = None, findings: list[dict[str, Any]] | None = None,
                     demo_weights: bool | None = None) -> None:
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
                (study_uid, job_id, version, risk if risk is not None else keep.get("risk"), priority, state,
                 json.dumps(findings) if findings is not None else keep.get("findings", "[]"),
                 int(demo_weights) if demo_weights is not None else keep.get("demo_weights", 0), time.time()),
            )

    def worklist(self) -> list[sqlite3.Row]:
        """Studies, highest risk first (unanalysed ones last), then oldest first."""
        return self._query("SELECT * FROM worklist ORDER BY risk IS NULL, risk DESC, updated_at ASC")

    def study(self, study_uid: str) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM worklist WHERE study_uid = ?", (study_uid,))
        return rows[0] if rows else None

    # ------------------------------------------------------------------ analyses

    def record_analysis(self, job_id: str, model: str, risk: float | None, predictions: list[dict[str, Any]],
                        failures: list[dict[str, Any]], outputs: list[str]) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO analyses VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (job_id, model, risk, json.dumps(predictions), json.dumps(failures), json.dumps(outputs),
                        time.time()))

    def analyses(self, job_id: str) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM analyses WHERE job_id = ? ORDER BY model", (job_id,))

    def analysis(self, job_id: str, model: str) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM analyses WHERE job_id = ? AND model = ?", (job_id, model))
        return rows[0] if rows else None

    # ------------------------------------------------------------------ deliveries

    def record_delivery(self, *, sop_uid: str, destination: str, job_id: str, status: str, error: str = "") -> None:
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
            chunk = sop_uids[start:start + 500]
            rows = self._query("SELECT sop_uid, destination FROM deliveries WHERE status = 'stored'"
                               f" AND sop_uid IN ({','.join('?' * len(chunk))})", tuple(chunk))
            found.update((r["sop_uid"], r["destination"]) for r in rows)
        return found

    def deliveries(self, job_id: str | None = None) -> list[sqlite3.Row]:
        if job_id is None:
            return self._query("SELECT * FROM deliveries ORDER BY updated_at")
        return self._query("SELECT * FROM deliveries WHERE job_id = ? ORDER BY updated_at", (job_id,))

    # ------------------------------------------------------------------ dead letters

    def dead_letter(self, task: str, job_id: str, kwargs: dict[str, Any], error: str) -> int:
        with self._transaction() as db:
            cur = db.execute("INSERT INTO deadletters (task, job_id, kwargs, error, at) VALUES (?, ?, ?, ?, ?)",
                             (task, job_id, json.dumps(kwargs), error, time.time()))
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
