"""The ``pacs-triage plugins`` subcommands; ``workers.cli`` adds them to the console command.

torch is imported inside the handlers, so building the command's parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gateway.settings import Settings


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser | None = None,
) -> None:
    """Add ``plugins list`` to *subparsers*; each handler is ``func(args, settings) -> int``.

    :param common: The options every command takes (``--config``), as a parent parser.
    """
    parents = [common] if common is not None else []
    parser = subparsers.add_parser("plugins", help="inspect the model plugins")
    commands = parser.add_subparsers(dest="plugins_command", metavar="COMMAND", required=True)
    list_parser = commands.add_parser(
        "list",
        parents=parents,
        help="show each model: name, version, modalities, classes, weights (path and sha256, missing, demo)",
    )
    list_parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    list_parser.set_defaults(func=list_plugins)


def plugin_rows(settings: Settings) -> list[dict[str, Any]]:
    """One row per registered model, enabled or not."""
    from plugins.host import ModelHost
    from plugins.weights import describe_weights

    host = ModelHost(settings)
    return [
        {
            "name": plugin.name,
            "model_id": plugin.spec.model_id,
            "version": plugin.spec.version,
            "modalities": list(plugin.spec.modalities),
            "classes": list(plugin.spec.classes),
            "enabled": host.is_enabled(plugin.name),
            "weights": describe_weights(plugin.name, settings),
        }
        for plugin in host.registered_models
    ]


def list_plugins(args: argparse.Namespace, settings: Settings) -> int:
    rows = plugin_rows(settings)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("NAME", "VERSION", "MODALITIES", "CLASSES", "ENABLED", "WEIGHTS")
    table = [header] + [
        (
            row["name"],
            row["version"],
            ",".join(row["modalities"]),
            ",".join(row["classes"]),
            "yes" if row["enabled"] else "no",
            row["weights"],
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    for line in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + line[-1]
        )
    return 0
