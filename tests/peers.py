"""Real peers for tests: an Orthanc PACS, a DCMTK storescp, a Redis broker and an MLLP listener (a RIS), each
on free loopback ports.

All run as child processes with temporary storage and are stopped with ``terminate`` (then ``kill``) on
exit.  ``TCP_NODELAY=1`` is set in the DICOM peers' environment, as in production.  The suite connects
only to peers it started here, so it needs nothing running on the machine and never flushes a Redis that
someone else uses.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp

ORTHANC_BINARY = "/usr/sbin/Orthanc"
_issued_ports: set[int] = set()


def get_free_port() -> int:
    """A free TCP port on 127.0.0.1, never the same twice in one test process.

    The port is bound to 0 and released, so another process could still take it; not handing
    it out twice at least keeps two peers of one test apart.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _issued_ports:
            _issued_ports.add(port)
            return port
    raise RuntimeError("no free loopback port found")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


class Orthanc:
    """A running Orthanc with its DICOM and REST ports on loopback."""

    def __init__(self, workdir: Path, *, aet: str = "ORTHANC", startup_timeout: float = 30.0) -> None:
        """Start Orthanc with a config and storage under *workdir*; wait for its REST API.

        :param workdir: An empty directory for the config, storage, index and log.
        :param aet: Orthanc's DICOM AE title.
        :param startup_timeout: Seconds to wait for ``/system`` to answer.
        """
        if shutil.which(ORTHANC_BINARY) is None:
            raise FileNotFoundError(f"{ORTHANC_BINARY} is not installed")
        self.workdir = workdir
        self.aet = aet
        self.dicom_port = get_free_port()
        self.http_port = get_free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        storage = workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pacs-triage-test",
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "Plugins": [],
            "HttpDescribeErrors": True,
            "SaveJobs": False,
            "StorageCompression": False,
            "DicomScpTimeout": 30,
        }
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = workdir / "orthanc.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [ORTHANC_BINARY, str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                cwd=workdir,
            )
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with code {self.process.returncode}:\n{_tail(self.log_path)}"
                )
            try:
                self.get_json("/system")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
                continue
            if _port_open(self.dicom_port):
                return
            time.sleep(0.1)
        raise TimeoutError(f"Orthanc did not answer within {timeout} s:\n{_tail(self.log_path)}")

    def get(self, path: str) -> bytes:
        """GET *path* from the REST API and return the body."""
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return bytes(response.read())

    def get_json(self, path: str) -> Any:
        """GET *path* from the REST API and decode it as JSON."""
        return json.loads(self.get(path))

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.get_json("/instances"))

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of one instance."""
        return self.get(f"/instances/{orthanc_id}/file")

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """The Orthanc id of the instance with this SOP Instance UID, if stored."""
        request = urllib.request.Request(
            self.url + "/tools/lookup", data=sop_instance_uid.encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            matches = json.loads(response.read())
        for match in matches:
            if match.get("Type") == "Instance":
                return str(match["ID"])
        return None

    def stop(self) -> None:
        """Terminate Orthanc (kill it if it does not stop in time)."""
        _stop(self.process)

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class StoreSCP:
    """A DCMTK ``storescp`` that writes every received instance into a directory."""

    def __init__(self, workdir: Path, *, aet: str = "STORESCP", startup_timeout: float = 15.0,
                 port: int | None = None) -> None:
        """Start ``storescp`` on *port* (a free one by default), storing into ``workdir/received``.

        :param workdir: A directory for received files and the log.
        :param aet: The AE title storescp answers to.
        :param startup_timeout: Seconds to wait for its port to open.
        """
        binary = shutil.which("storescp")
        if binary is None:
            raise FileNotFoundError("storescp (DCMTK) is not installed")
        self.aet = aet
        self.port = port or get_free_port()
        self.output_dir = workdir / "received"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "storescp.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, "--aetitle", aet, "--output-directory", str(self.output_dir),
                 "--unique-filenames", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(),
            )
        deadline = time.monotonic() + startup_timeout
        while not _port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"storescp did not start:\n{_tail(self.log_path)}")
            time.sleep(0.05)

    def received_files(self) -> list[Path]:
        """Files received so far, oldest first."""
        return sorted(self.output_dir.iterdir(), key=lambda path: path.stat().st_mtime)

    def stop(self) -> None:
        """Terminate storescp."""
        _stop(self.process)

    def __enter__(self) -> StoreSCP:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RedisServer:
    """A private ``redis-server`` on a free loopback port, its files under *workdir*.

    :param workdir: Its working directory (the append-only file and the log live here).
    :param persistent: ``appendonly yes`` with ``appendfsync always``: a kill -9 loses no acknowledged write.
    :param startup_timeout: Seconds to wait for its port to open.
    """

    def __init__(self, workdir: Path, *, persistent: bool = True, startup_timeout: float = 20.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed; .ci/bootstrap --test-peers installs it")
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = get_free_port()
        self.persistent = persistent
        self.startup_timeout = startup_timeout
        self.log_path = workdir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """The broker URL of database 0."""
        return self.url_of(0)

    def url_of(self, db: int) -> str:
        """The broker URL of database *db*."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """Start (or restart, on the same port and files) the server and wait for its port."""
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--dir",
                    str(self.workdir),
                    *persistence,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.startup_timeout
        while not _port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start:\n{_tail(self.log_path)}")
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9: what a crashed or OOM-killed Redis does."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """Terminate the server (kill it if it does not stop in time)."""
        if self.process is not None:
            _stop(self.process)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class MllpListener:
    """A RIS stand-in: python-hl7's asyncio MLLP server, answering each message with ``answer``."""

    def __init__(self, answer: str = "AA") -> None:
        #: ``AA``/``AE``/``AR`` answers with that ACK code; ``silent`` reads and never answers.
        self.answer = answer
        self.received: list[hl7.Message] = []
        #: The ACKs it answered with, in order: the proof a sender was told its message arrived.
        self.acks: list[hl7.Message] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    async def _serve(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while True:
                message = await reader.readmessage()
                self.received.append(message)
                if self.answer != "silent":
                    ack = message.create_ack(self.answer)
                    writer.writemessage(ack)
                    await writer.drain()
                    self.acks.append(ack)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the sender hung up
        finally:
            writer.close()  # also when cancelled at shutdown: the loop is still running then

    async def _start(self) -> asyncio.Server:
        return await hl7.mllp.start_hl7_server(self._serve, "127.0.0.1", 0, encoding="utf-8")

    def __enter__(self) -> MllpListener:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def texts(self) -> list[str]:
        return [str(m) for m in self.received]


@contextmanager
def running_orthanc(workdir: Path, **kwargs: Any) -> Iterator[Orthanc]:
    """Run an :class:`Orthanc` for the duration of a ``with`` block."""
    orthanc = Orthanc(workdir, **kwargs)
    try:
        yield orthanc
    finally:
        orthanc.stop()


@contextmanager
def running_storescp(workdir: Path, **kwargs: Any) -> Iterator[StoreSCP]:
    """Run a :class:`StoreSCP` for the duration of a ``with`` block."""
    scp = StoreSCP(workdir, **kwargs)
    try:
        yield scp
    finally:
        scp.stop()
