"""The ``pacs-triage`` command: the composition root that gathers every part's subcommands.

It sits on the top floor of the import graph: it may import the gateway, the plugins and the
workers, while none of them imports it.  Heavy imports (torch) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any

from gateway import cli as gateway_cli
from gateway.errors import PacsTriageError
from gateway.logging import configure_logging
from gateway.settings import load_settings


def build_parser() -> argparse.ArgumentParser:
    common = gateway_cli.common_options()
    parser = argparse.ArgumentParser(
        prog="pacs-triage",
        description="AI triage gateway for breast imaging: receive DICOM, run models, return SR and heatmaps.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = subparsers.add_parser(
        "up", parents=[common],
        help="run everything on this machine: gateway, embedded queue and a worker (the main command)")
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
    for name in ("plugins.cli", "workers.commands"):
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a missing dependency inside the module is a real error
                raise
    return modules


def run_up(args: argparse.Namespace, settings: Any) -> int:
    """The embedded default: today the gateway with the configured dispatcher."""
    return gateway_cli.run_gateway(args, settings)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = args.overrides(args) if hasattr(args, "overrides") else {}
        settings = load_settings(args.config, overrides=overrides)
        configure_logging(settings.logging.level, json_output=settings.logging.json_output,
                          hash_key=settings.logging.hash_key)
        return int(args.func(args, settings) or 0)
    except PacsTriageError as exc:
        print(f"pacs-triage: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
