"""The ``pacs-triage`` command: the composition root that gathers every part's subcommands.

It sits on the top floor of the import graph: it may import the gateway, the plugins and the
workers, while none of them imports it.  Heavy imports (torch) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
from pathlib import Path
from typing import Any

from gateway import cli as gateway_cli
from gateway.errors import PacsTriageError
from gateway.logging import configure_logging
from gateway.settings import Settings, load_settings


def build_parser() -> argparse.ArgumentParser:
    common = gateway_cli.common_options()
    parser = argparse.ArgumentParser(
        prog="pacs-triage",
        description="AI triage gateway for breast imaging: receive DICOM, run models, return SR and heatmaps.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = subparsers.add_parser(
        "up",
        parents=[common],
        help="run everything on this machine: gateway, embedded queue and a worker (the main command)",
    )
    gateway_cli._add_gateway_flags(up)
    up.set_defaults(func=run_up, overrides=gateway_cli.gateway_overrides)
    gateway_cli.register(subparsers, common)
    for module in _optional_command_modules():
        # A part's register() may take the shared options parent so its commands get --config too.
        if len(inspect.signature(module.register).parameters) == 2:
            module.register(subparsers, common)
        else:
            module.register(subparsers)
    return parser


def _optional_command_modules() -> list[Any]:
    import importlib

    modules = []
    for name in ("plugins.cli", "training.cli", "workers.commands", "workers.http_cli"):
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a missing dependency inside the module is a real error
                raise
    return modules


def make_dispatcher(settings: Settings) -> Any:
    """The dispatcher ``dispatch.kind`` names: Celery for the pipeline, logging for a gateway alone."""
    if settings.dispatch.kind == "logging":
        return None  # the gateway's own LoggingDispatcher
    from workers.app import configure_app
    from workers.dispatch import CeleryDispatcher

    return CeleryDispatcher(configure_app(settings))


def _die_with_parent() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGTERM): the worker goes when `up` goes, even after kill -9.
    import ctypes
    import signal

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def run_up(args: argparse.Namespace, settings: Settings) -> int:
    """The embedded default: the gateway and a worker on this machine, through the same code path.

    The worker is ``pacs-triage worker`` in a child process with the same configuration, so the
    only difference from a distributed set-up is where the processes run.
    """
    import os
    import subprocess

    from gateway.datalock import hold_data_dir

    settings = settings.model_copy(
        update={"dispatch": settings.dispatch.model_copy(update={"kind": "celery"})}
    )
    env = {**os.environ, "PACS_TRIAGE_GATEWAY__DATA_DIR": str(Path(settings.gateway.data_dir).resolve())}
    config = ["--config", args.config] if args.config else []
    commands = [["worker"]] + ([["serve-http"]] if settings.http.enabled else [])
    # A second `up` (or gateway) on this data directory stops here, before anything starts.
    hold_data_dir(settings.gateway.data_dir)
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *command, *config], env=env, preexec_fn=_die_with_parent
        )
        for command in commands
    ]
    names = {"worker": "worker", "serve-http": "web service (serve-http)"}
    companions = {names[command[0]]: child for command, child in zip(commands, children, strict=True)}
    try:
        return gateway_cli.run_gateway(args, settings, make_dispatcher(settings), companions=companions)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = args.overrides(args) if hasattr(args, "overrides") else {}
        settings = load_settings(getattr(args, "config", None), overrides=overrides)
        configure_logging(settings.logging.level, json_output=settings.logging.json_output)
        if args.func is gateway_cli.run_gateway:
            return int(gateway_cli.run_gateway(args, settings, make_dispatcher(settings)) or 0)
        return int(args.func(args, settings) or 0)
    except PacsTriageError as exc:
        print(f"pacs-triage: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
