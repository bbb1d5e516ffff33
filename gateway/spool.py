"""The durable spool: where received instances live, how they get there, and the UID rules.

Files reach their final name only by an atomic rename of a fully written, fsynced temporary
file in the same file system, so a crash leaves either the whole file or none.  File names are
hashes of validated UIDs: a UID is never used raw as a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from gateway.settings import DiskWatermark

# PS3.5 §9.1: components of digits without leading zeros (except "0"), separated by dots, at most 64 chars.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def uid_problem(value: object) -> str | None:
    """Return why *value* is not a valid UID, or ``None`` if it is one."""
    if value is None or value == "":
        return "missing"
    text = str(value)
    if len(text) > 64:
        return f"longer than 64 characters ({len(text)})"
    if not _UID_RE.match(text):
        return "not a dotted string of digits without leading zeros"
    return None


def _uid_hash(uid: str) -> str:
    return hashlib.sha256(uid.encode("ascii")).hexdigest()[:32]


def fsync_path(path: Path) -> None:
    """Flush a file or directory to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Hex characters of SHA-256 kept as a file's content digest (the workers' output UIDs use the same).
CONTENT_DIGEST_LENGTH = 32


def file_digest(path: Path) -> str:
    """A file's content digest: its SHA-256, hex, the first :data:`CONTENT_DIGEST_LENGTH` characters.

    Taken once, while the received bytes are still in the page cache; the journal keeps it, so a
    repeat is recognised and a worker learns the content without reading the file again.
    """
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:CONTENT_DIGEST_LENGTH]


@dataclass(frozen=True, slots=True)
class DiskStatus:
    free_bytes: int
    free_percent: float
    below_watermark: bool


class Spool:
    """The directory layout under ``data_dir``.

    ``incoming/`` holds partial receives (pynetdicom's spooled data sets, in one folder per
    receiving association), ``studies/`` the
    stored instances, ``quarantine/`` the bytes of undecodable datasets, and ``journal.sqlite``.
    """

    def __init__(self, data_dir: Path | str, watermark: DiskWatermark | None = None) -> None:
        self.root = Path(data_dir).resolve()
        self.incoming = self.root / "incoming"
        self.studies = self.root / "studies"
        self.quarantine_dir = self.root / "quarantine"
        self.journal_path = self.root / "journal.sqlite"
        self.watermark = watermark or DiskWatermark()
        for directory in (self.incoming, self.studies, self.quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def instance_path(self, study_uid: str, sop_uid: str) -> Path:
        """The final path of an instance; both UIDs must already be validated."""
        study = _uid_hash(study_uid)
        return self.studies / study[:2] / study / f"{_uid_hash(sop_uid)}.dcm"

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def place(self, temp_path: Path, final_path: Path) -> tuple[Path, ...]:
        """fsync *temp_path* and atomically rename it to *final_path*, creating its folders.

        The new name is durable only once the returned directories are fsynced: the file's
        folder, and the parent of every folder created here (a new study's folder is itself
        a new entry).  Callers fsync them, possibly once for many files (group commit).
        """
        fsync_path(temp_path)
        directory = final_path.parent
        if directory.is_dir():
            to_sync: tuple[Path, ...] = (directory,)
        else:
            missing = [directory, *(p for p in directory.parents if p.is_relative_to(self.studies))]
            missing = [p for p in missing if not p.is_dir()]
            directory.mkdir(parents=True, exist_ok=True)
            to_sync = (directory, *(p.parent for p in missing))
        os.replace(temp_path, final_path)
        return to_sync

    def quarantine(self, temp_path: Path, reason: str, context: dict[str, str]) -> Path:
        """Move undecodable bytes aside for inspection, with a JSON note of why."""
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        target = self.quarantine_dir / f"{name}.dcm"
        os.replace(temp_path, target)
        (self.quarantine_dir / f"{name}.json").write_text(json.dumps({"reason": reason, **context}, indent=2))
        return target

    def disk_status(self) -> DiskStatus:
        usage = shutil.disk_usage(self.root)
        percent = 100.0 * usage.free / usage.total if usage.total else 0.0
        below = usage.free < self.watermark.min_free_bytes or percent < self.watermark.min_free_percent
        return DiskStatus(usage.free, percent, below)

    def sweep_incoming(self) -> int:
        """Delete partial receives left by a crash; they were never acknowledged."""
        removed = 0
        for leftover in self.incoming.iterdir():
            if leftover.is_dir():  # one receiving association's folder
                removed += sum(1 for p in leftover.rglob("*") if p.is_file())
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.is_file():
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed
