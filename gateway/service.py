"""The running gateway: receiving SCP process(es), journal and assembler, started and stopped together."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import structlog

from gateway.assembly import Assembler
from gateway.datalock import hold_data_dir, release_data_dir
from gateway.dispatch import Dispatcher, LoggingDispatcher
from gateway.journal import Journal, StudyState
from gateway.logging import configure_logging
from gateway.scp import start_scp
from gateway.settings import Settings
from gateway.spool import Spool

log = structlog.get_logger(__name__)


def _receiver_main(settings: Settings, parent_pid: int) -> None:
    """A child receiving process: same port (SO_REUSEPORT), same spool and journal, no assembler."""
    configure_logging(settings.logging.level, json_output=settings.logging.json_output)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    spool = Spool(settings.gateway.data_dir, settings.gateway.disk_watermark)
    journal = Journal(spool.journal_path)
    start_scp(settings.gateway, spool, journal, settings.triage.stat_keywords, reuse_port=True)
    # A receiver must not outlive its parent, even after a kill -9 of the parent.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


class GatewayService:
    """Owns everything ``pacs-triage gateway`` runs.

    :param settings: The validated configuration.
    :param dispatcher: Where completed studies go; the logging dispatcher when ``None``.
    """

    def __init__(self, settings: Settings, dispatcher: Dispatcher | None = None) -> None:
        self.settings = settings
        self.spool = Spool(settings.gateway.data_dir, settings.gateway.disk_watermark)
        self.dispatcher = dispatcher or LoggingDispatcher()
        self.journal: Journal | None = None
        self.assembler: Assembler | None = None
        self._ae: Any = None
        self._server: Any = None
        self._owns_lock = False
        self._children: list[Any] = []
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        return int(self._server.server_address[1]) if self._server else self.settings.gateway.port

    def start(self) -> None:
        gw = self.settings.gateway
        # Before recovery touches anything: a second gateway on this directory stops here.
        self._owns_lock = hold_data_dir(gw.data_dir)
        try:
            self._start_locked()
        except BaseException:
            self.stop()  # what started stops, and the lock goes
            raise

    def _start_locked(self) -> None:
        gw = self.settings.gateway
        swept = self.spool.sweep_incoming()
        self.journal = Journal(self.spool.journal_path)
        pending = {
            state: len(self.journal.studies(state)) for state in (StudyState.RECEIVING, StudyState.COMPLETE)
        }
        log.info(
            "gateway.recovery",
            partial_files_removed=swept,
            studies_receiving=pending[StudyState.RECEIVING],
            studies_undispatched=pending[StudyState.COMPLETE],
        )
        if gw.allowed_callers is None:
            log.warning(
                "gateway.open_to_any_caller",
                hint="set gateway.allowed_callers to accept only known modalities",
            )
        reuse = gw.receive_processes > 1
        self._ae, self._server = start_scp(
            gw, self.spool, self.journal, self.settings.triage.stat_keywords, reuse_port=reuse
        )
        if reuse:
            # Children bind the port the parent bound, so a configured port of 0 stays one port.
            child_settings = self.settings.model_copy(
                update={"gateway": gw.model_copy(update={"port": self.port})}
            )
            ctx = multiprocessing.get_context("spawn")
            for index in range(gw.receive_processes - 1):
                child = ctx.Process(
                    target=_receiver_main,
                    args=(child_settings, os.getpid()),
                    name=f"receiver-{index + 1}",
                    daemon=True,
                )
                child.start()
                self._children.append(child)
        self.assembler = Assembler(
            self.journal, self.dispatcher, self.settings.assembly, str(self.spool.root)
        )
        self.assembler.tick()  # dispatch what a previous run completed but never queued
        self.assembler.start()
        log.info(
            "gateway.listening",
            ae_title=gw.ae_title,
            host=gw.host,
            port=self.port,
            data_dir=str(self.spool.root),
            receive_processes=gw.receive_processes,
            tls=gw.tls.enabled,
        )

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        for child in self._children:
            child.terminate()
        for child in self._children:
            child.join(timeout=5)
        if self._server is not None:
            self._server.shutdown()
        if self._ae is not None:
            self._ae.shutdown()
        if self.assembler is not None:
            self.assembler.stop()
        if self.journal is not None:
            self.journal.close()
        if self._owns_lock:
            release_data_dir(self.settings.gateway.data_dir)
        log.info("gateway.stopped")

    def serve_forever(self) -> None:
        """Block until SIGINT or SIGTERM, then stop cleanly."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        try:
            done.wait()
        finally:
            self.stop()
