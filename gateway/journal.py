"""The SQLite journal (WAL mode) that records every instance and every study version.

The journal is the gateway's memory across crashes: an instance is acknowledged only after its
row is committed here, and on restart the assembler reads study state back from it.  Several
receiving processes may share one journal file.  Their write transactions queue on an ``flock``
of a lock file beside it, which wakes the next writer as soon as the lock is free; SQLite's own
busy handler would have it sleep and retry, milliseconds at a time, on every collision.

This module owns the journal's tables: :class:`Journal` writes them (the gateway), and
:class:`JournalReader` answers the questions other processes ask of them (the web service and
the metrics).  No other module runs SQL against them.
"""

from __future__ import annotations

import enum
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's busy handler alone serialises the processes
    fcntl = None  # type: ignore[assignment]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid      TEXT NOT NULL,
    version        INTEGER NOT NULL,
    state          TEXT NOT NULL,          -- receiving | complete | dispatched
    calling_ae     TEXT NOT NULL,
    modality       TEXT NOT NULL,
    priority       INTEGER NOT NULL,
    first_at       REAL NOT NULL,
    last_at        REAL NOT NULL,
    completed_at   REAL,
    completed_by   TEXT,
    dispatched_at  REAL,
    job_id         TEXT,
    duplicates     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (study_uid, version)
);
CREATE INDEX IF NOT EXISTS studies_state ON studies (state);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid          TEXT PRIMARY KEY,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    modality         TEXT NOT NULL,
    laterality       TEXT NOT NULL,
    view             TEXT NOT NULL,
    presentation     TEXT NOT NULL,
    path             TEXT NOT NULL,
    size             INTEGER NOT NULL,
    calling_ae       TEXT NOT NULL,
    study_version    INTEGER NOT NULL,
    received_at      REAL NOT NULL,
    content_digest   TEXT NOT NULL DEFAULT '',   -- sha256 hex[:32] of the stored bytes ('' if not kept)
    own_output       INTEGER NOT NULL DEFAULT 0  -- 1: an object we made, sent back (gateway.provenance)
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS events (
    study_uid   TEXT NOT NULL,
    version     INTEGER NOT NULL,
    at          REAL NOT NULL,
    event       TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_study ON events (study_uid, version);
CREATE TABLE IF NOT EXISTS refusals (       -- refused C-STOREs counted by reason, for /metrics
    reason   TEXT PRIMARY KEY,
    count    INTEGER NOT NULL,
    last_at  REAL NOT NULL
);
"""

#: Columns added to ``instances`` after its first release, appended in place to an older journal's
#: table when a gateway opens it; the rows it already holds take the default.
_INSTANCE_COLUMNS_ADDED = (
    ("content_digest", "TEXT NOT NULL DEFAULT ''"),
    ("own_output", "INTEGER NOT NULL DEFAULT 0"),
)


def add_missing_columns(db: sqlite3.Connection, table: str, columns: tuple[tuple[str, str], ...]) -> None:
    """The migration of our SQLite files (this journal, the workers' results store): columns a newer
    version added, appended to an older file's *table*; the rows it holds take each column's default."""
    have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    for name, kind in columns:
        if name not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    DISPATCHED = "dispatched"


class StoreOutcome(enum.StrEnum):
    """What recording an instance did."""

    NEW = "new"
    #: The same SOP Instance UID with identical bytes: kept once, reported.
    DUPLICATE = "duplicate"
    #: The same SOP Instance UID with different bytes: the new copy replaces the old one.
    REPLACED = "replaced"


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceRecord:
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str
    laterality: str
    view: str
    presentation: str
    path: str
    size: int
    calling_ae: str
    priority: int
    #: SHA-256 of the stored bytes, hex, first 32 characters ("" when not taken).
    content_digest: str = ""
    #: An object this project made, sent back to us: it never opens a study version.
    own_output: bool = False


@dataclass(frozen=True, slots=True)
class StudyRow:
    study_uid: str
    version: int
    state: str
    calling_ae: str
    modality: str
    priority: int
    first_at: float
    last_at: float
    completed_at: float | None
    completed_by: str | None
    dispatched_at: float | None
    job_id: str | None
    duplicates: int


class Journal:
    """A thread-safe handle on the journal database.

    :param path: The SQLite file; created with its tables if missing.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._writer_lock: int | None = (
            os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600) if fcntl is not None else None
        )
        self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before we acknowledge the C-STORE that caused it.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=60000")
        with self._transaction():
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(statement)
            # Inside the write lock: several receiving processes may open an older journal at once.
            add_missing_columns(self._db, "instances", _INSTANCE_COLUMNS_ADDED)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._writer_lock is not None:
                os.close(self._writer_lock)
                self._writer_lock = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._writer_lock is not None:
                fcntl.flock(self._writer_lock, fcntl.LOCK_EX)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if self._writer_lock is not None:
                    fcntl.flock(self._writer_lock, fcntl.LOCK_UN)

    # ---------------------------------------------------------------- instances

    def find_instance(self, sop_uid: str) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()

    def record_instance(self, rec: InstanceRecord, outcome: StoreOutcome, now: float | None = None) -> int:
        """Commit one stored instance and return the study version it joined.

        A study with no version still receiving gets a new version, so an instance that arrives
        after completion re-opens the study instead of being dropped.  A duplicate only bumps the
        study's duplicate counter.  Our own output never opens a version: it joins the study's
        newest one whatever its state, or version 0 when the gateway holds no version of the study.
        """
        return self.record_instances([(rec, outcome)], now)[0]

    def record_instances(
        self, items: list[tuple[InstanceRecord, StoreOutcome]], now: float | None = None
    ) -> list[int]:
        """Commit several stored instances in one transaction (one fsync) and return their study versions.

        Each item is recorded exactly as :meth:`record_instance` would, in order; if any fails,
        none is committed.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            return [self._record(db, rec, outcome, now) for rec, outcome in items]

    def _record(self, db: sqlite3.Connection, rec: InstanceRecord, outcome: StoreOutcome, now: float) -> int:
        current = db.execute(
            "SELECT version, state FROM studies WHERE study_uid = ? ORDER BY version DESC LIMIT 1",
            (rec.study_uid,),
        ).fetchone()
        if outcome is StoreOutcome.DUPLICATE and current is not None:
            db.execute(
                "UPDATE studies SET duplicates = duplicates + 1 WHERE study_uid = ? AND version = ?",
                (rec.study_uid, current["version"]),
            )
            return int(current["version"])
        if rec.own_output:
            # Neither a new version nor a later quiet-time completion: our results sent back
            # would otherwise be analysed again, and re-delivered.
            version = 0 if current is None else int(current["version"])
            if current is not None:
                self._event(db, rec.study_uid, version, now, "own_output_stored", "")
            self._insert_instance(db, rec, version, now)
            return version
        if current is not None and current["state"] == StudyState.RECEIVING:
            version = int(current["version"])
            db.execute(
                "UPDATE studies SET last_at = ?, priority = MIN(priority, ?) WHERE study_uid = ? AND version = ?",
                (now, rec.priority, rec.study_uid, version),
            )
        else:
            version = 1 if current is None else int(current["version"]) + 1
            db.execute(
                "INSERT INTO studies (study_uid, version, state, calling_ae, modality, priority, first_at, last_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.study_uid,
                    version,
                    StudyState.RECEIVING,
                    rec.calling_ae,
                    rec.modality,
                    rec.priority,
                    now,
                    now,
                ),
            )
            self._event(
                db, rec.study_uid, version, now, "first_instance", "reopened" if current is not None else ""
            )
        self._insert_instance(db, rec, version, now)
        return version

    @staticmethod
    def _insert_instance(db: sqlite3.Connection, rec: InstanceRecord, version: int, now: float) -> None:
        db.execute(
            "INSERT OR REPLACE INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax,"
            " modality, laterality, view, presentation, path, size, calling_ae, study_version, received_at,"
            " content_digest, own_output)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.sop_uid,
                rec.study_uid,
                rec.series_uid,
                rec.sop_class_uid,
                rec.transfer_syntax,
                rec.modality,
                rec.laterality,
                rec.view,
                rec.presentation,
                rec.path,
                rec.size,
                rec.calling_ae,
                version,
                now,
                rec.content_digest,
                int(rec.own_output),
            ),
        )

    def study_instances(self, study_uid: str) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(
                "SELECT * FROM instances WHERE study_uid = ? ORDER BY series_uid, received_at", (study_uid,)
            ).fetchall()

    # ---------------------------------------------------------------- studies

    def studies(self, state: StudyState | None = None) -> list[StudyRow]:
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM studies ORDER BY first_at").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM studies WHERE state = ? ORDER BY first_at", (str(state),)
                ).fetchall()
        return [StudyRow(**dict(r)) for r in rows]

    def study(self, study_uid: str, version: int) -> StudyRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM studies WHERE study_uid = ? AND version = ?", (study_uid, version)
            ).fetchone()
        return StudyRow(**dict(row)) if row else None

    def complete_study(
        self, study_uid: str, version: int, completed_by: str, now: float | None = None
    ) -> bool:
        """Mark a receiving study version complete; False if it was no longer receiving."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE studies SET state = ?, completed_at = ?, completed_by = ?"
                " WHERE study_uid = ? AND version = ? AND state = ?",
                (StudyState.COMPLETE, now, completed_by, study_uid, version, StudyState.RECEIVING),
            )
            if cur.rowcount:
                self._event(db, study_uid, version, now, "complete", completed_by)
            return bool(cur.rowcount)

    def mark_dispatched(self, study_uid: str, version: int, job_id: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute(
                "UPDATE studies SET state = ?, dispatched_at = ?, job_id = ? WHERE study_uid = ? AND version = ?",
                (StudyState.DISPATCHED, now, job_id, study_uid, version),
            )
            self._event(db, study_uid, version, now, "queued", job_id)

    @staticmethod
    def _event(
        db: sqlite3.Connection, study_uid: str, version: int, now: float, event: str, detail: str
    ) -> None:
        db.execute(
            "INSERT INTO events (study_uid, version, at, event, detail) VALUES (?, ?, ?, ?, ?)",
            (study_uid, version, now, event, detail),
        )

    # ---------------------------------------------------------------- refusals

    def record_refusal(self, reason: str, now: float | None = None) -> None:
        """Count one refused instance under *reason* (a fixed word, never patient data)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO refusals (reason, count, last_at) VALUES (?, 1, ?)"
                " ON CONFLICT(reason) DO UPDATE SET count = count + 1, last_at = excluded.last_at",
                (reason, time.time() if now is None else now),
            )


# -------------------------------------------------------------------------------- reading


def connect_existing(path: Path, tables: Sequence[str]) -> sqlite3.Connection | None:
    """Open an existing SQLite journal for reading, or ``None`` when it or its *tables* do not exist yet.

    Opened read-write without create (``mode=rw``): a read-only handle cannot join a WAL
    database whose ``-shm`` file the writer has not made, and a reader must not create the file
    (the web service may start before the gateway, or on a data directory not mounted yet).
    The caller closes the connection.
    """
    if not path.is_file():
        return None
    db = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=10.0, check_same_thread=False
    )
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout=10000")
    # The file appears a moment before the writer's schema transaction commits.
    found = db.execute(
        f"SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN "
        f"({','.join('?' * len(tables))})",
        tuple(tables),
    ).fetchone()[0]
    if found < len(tables):
        db.close()
        return None
    return db


@dataclass(frozen=True, slots=True)
class JournalEvent:
    """One entry of a study version's gateway timeline."""

    at: float
    event: str
    detail: str


@dataclass(frozen=True, slots=True)
class StudyArrival:
    """When a study version's first instance arrived, and where the gateway has it now."""

    study_uid: str
    version: int
    state: str
    first_at: float


@dataclass(frozen=True, slots=True)
class JournalCounts:
    """Totals since the journal was made, for the metrics."""

    #: Instances held (one per SOP Instance UID).
    stored: int
    #: Repeats of an instance already held, acknowledged and not stored again.
    duplicates: int
    #: Completed study versions by the rule that completed them.
    completed_by: dict[str, int]
    #: Refused C-STOREs by reason (fixed words, never patient data).
    refused: dict[str, int]


class ExistingDatabaseReader:
    """Read-only access to a SQLite file another process writes: opened per read, never created.

    A subclass names the tables it reads in ``_TABLES``; until they all exist, ``_read`` yields None.
    """

    _TABLES: tuple[str, ...] = ()

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection | None]:
        db = connect_existing(self.path, self._TABLES)
        try:
            yield db
        finally:
            if db is not None:
                db.close()


class JournalReader(ExistingDatabaseReader):
    """The journal's answers for the web service and the metrics, read without the gateway.

    Each call opens the file and closes it again, so a reader never holds the journal open
    between requests; a journal the gateway has not made yet reads as empty.

    :param path: The gateway's ``journal.sqlite``.
    """

    _TABLES = ("studies", "instances", "events", "refusals")

    def first_instance_path(self, study_uid: str) -> str | None:
        """The stored path (relative to the data directory) of one instance of the study, if any."""
        with self._read() as db:
            row = (
                None
                if db is None
                else db.execute(
                    "SELECT path FROM instances WHERE study_uid = ? LIMIT 1", (study_uid,)
                ).fetchone()
            )
        return None if row is None else str(row["path"])

    def newest_studies(self, limit: int) -> list[StudyRow]:
        """Up to *limit* study versions, the most recently begun first."""
        with self._read() as db:
            rows = (
                []
                if db is None
                else db.execute("SELECT * FROM studies ORDER BY first_at DESC LIMIT ?", (limit,)).fetchall()
            )
        return [StudyRow(**dict(r)) for r in rows]

    def study_by_job_id(self, job_id: str) -> StudyRow | None:
        """The dispatched study version queued under *job_id*."""
        with self._read() as db:
            row = (
                None
                if db is None
                else db.execute("SELECT * FROM studies WHERE job_id = ?", (job_id,)).fetchone()
            )
        return None if row is None else StudyRow(**dict(row))

    def undispatched_studies(self, version: int) -> list[StudyRow]:
        """Study versions numbered *version* that have no job id yet (receiving or complete)."""
        with self._read() as db:
            rows = (
                []
                if db is None
                else db.execute(
                    "SELECT * FROM studies WHERE job_id IS NULL AND version = ?", (version,)
                ).fetchall()
            )
        return [StudyRow(**dict(r)) for r in rows]

    def events(self, study_uid: str, version: int) -> list[JournalEvent]:
        """The gateway's timeline of one study version, oldest first."""
        with self._read() as db:
            rows = (
                []
                if db is None
                else db.execute(
                    "SELECT at, event, detail FROM events WHERE study_uid = ? AND version = ? ORDER BY at",
                    (study_uid, version),
                ).fetchall()
            )
        return [JournalEvent(float(r["at"]), str(r["event"]), str(r["detail"])) for r in rows]

    def instance_count(self, study_uid: str, version: int) -> int:
        """How many instances joined this study version."""
        with self._read() as db:
            row = (
                None
                if db is None
                else db.execute(
                    "SELECT count(*) FROM instances WHERE study_uid = ? AND study_version = ?",
                    (study_uid, version),
                ).fetchone()
            )
        return 0 if row is None else int(row[0])

    def arrivals(self) -> list[StudyArrival]:
        """Every study version with its state, the first to arrive first."""
        with self._read() as db:
            rows = (
                []
                if db is None
                else db.execute(
                    "SELECT study_uid, version, state, first_at FROM studies ORDER BY first_at"
                ).fetchall()
            )
        return [
            StudyArrival(str(r["study_uid"]), int(r["version"]), str(r["state"]), float(r["first_at"]))
            for r in rows
        ]

    def counts(self) -> JournalCounts:
        """Instances held and repeated, completions by rule and refusals by reason."""
        with self._read() as db:
            if db is None:
                return JournalCounts(stored=0, duplicates=0, completed_by={}, refused={})
            stored = db.execute("SELECT count(*) FROM instances").fetchone()[0]
            duplicates = db.execute("SELECT coalesce(sum(duplicates), 0) FROM studies").fetchone()[0]
            completed = db.execute(
                "SELECT completed_by, count(*) AS n FROM studies"
                " WHERE completed_at IS NOT NULL GROUP BY completed_by"
            ).fetchall()
            refused = db.execute("SELECT reason, count FROM refusals ORDER BY reason").fetchall()
        return JournalCounts(
            stored=int(stored),
            duplicates=int(duplicates),
            completed_by={str(r["completed_by"] or "unknown"): int(r["n"]) for r in completed},
            refused={str(r["reason"]): int(r["count"]) for r in refused},
        )
