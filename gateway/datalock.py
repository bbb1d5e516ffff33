"""One gateway per data directory: an exclusive lock taken before the journal is touched.

Two gateways on one data directory would each run crash recovery on the other's live journal and
sweep the other's half-received files.  The lock is an ``flock`` on ``<data_dir>/gateway.lock``,
held for the life of the process (the kernel drops it when the process dies, even by kill -9).
Within one process it is taken once: ``up`` takes it before it starts anything, and the gateway
it then runs finds it already held.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from gateway.errors import StartupError

LOCK_NAME = "gateway.lock"

_held: dict[Path, int] = {}
_guard = threading.Lock()


def hold_data_dir(data_dir: Path | str) -> bool:
    """Take the data directory's lock for this process (again is a no-op).

    :returns: Whether this call took it (False: this process already held it).
    :raises StartupError: if another process holds it; the message names that process.
    """
    root = Path(data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    with _guard:
        if root in _held:
            return False
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise StartupError(
                f"the data directory {root} is in use by a running gateway (pid {holder}); "
                "stop it first, or give this one another gateway.data_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        _held[root] = fd
    return True


def release_data_dir(data_dir: Path | str) -> None:
    """Drop this process's lock on *data_dir* (tests start and stop gateways in one process)."""
    root = Path(data_dir).resolve()
    with _guard:
        fd = _held.pop(root, None)
    if fd is not None:
        os.close(fd)
