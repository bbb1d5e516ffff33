"""The ``serve-http`` and ``conformance`` subcommands; ``workers.cli`` adds them to the console command.

FastAPI, uvicorn and pynetdicom are imported inside the handlers, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path
from typing import Any

from gateway.settings import Settings


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``serve-http`` and ``conformance``; each handler is ``func(args, settings) -> int``.

    :param subparsers: The console command's subparsers.
    :param common: The options every command takes (``--config``), as a parent parser.
    """
    serve = subparsers.add_parser(
        "serve-http",
        parents=[common],
        help="serve the triage worklist page, the JSON API and /metrics",
        description="The web service for the reading room and the administrators: the worklist sorted by "
        "risk with heatmaps, every study's timeline, dead letters with replay, /healthz, /readyz "
        "and Prometheus /metrics. Everything but health needs a token from http.tokens.",
    )
    serve.add_argument("--host", help="listening address (http.host)")
    serve.add_argument("--port", type=int, help="listening port (http.port)")
    serve.set_defaults(func=run_serve_http, overrides=http_overrides)

    conformance = subparsers.add_parser(
        "conformance",
        parents=[common],
        help="print the DICOM conformance statement of this configuration",
        description="Generate the DICOM conformance statement (Markdown) from the running configuration: "
        "AE titles, SOP classes, transfer syntaxes, TLS and the objects produced.",
    )
    conformance.add_argument("--output", type=Path, metavar="PATH", help="write it to PATH instead of stdout")
    conformance.set_defaults(func=run_conformance)


def http_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"http.host": args.host, "http.port": args.port}


def run_serve_http(args: argparse.Namespace, settings: Settings) -> int:
    import structlog
    import uvicorn

    from workers.http import create_app

    tokens = settings.http.tokens
    if not tokens:
        # Jupyter's way: usable at once on one machine, and nobody else knows the token.
        token = secrets.token_urlsafe(32)
        print(
            "pacs-triage: no http.tokens configured; this run accepts only this token "
            f"(set PACS_TRIAGE_HTTP__TOKENS to choose your own):\n    {token}",
            file=sys.stderr,
        )
        tokens = (token,)
    app = create_app(settings, tokens=tokens)
    structlog.get_logger(__name__).info(
        "http.listening",
        host=settings.http.host,
        port=settings.http.port,
        data_dir=str(Path(settings.gateway.data_dir).resolve()),
    )
    # log_config=None: uvicorn's loggers propagate to the root handler configure_logging set up,
    # so its access lines come out in the same JSON.  Paths hold job ids only, never patient data.
    uvicorn.run(app, host=settings.http.host, port=settings.http.port, log_config=None, server_header=False)
    return 0


def run_conformance(args: argparse.Namespace, settings: Settings) -> int:
    from workers.conformance import conformance_statement

    text = conformance_statement(settings)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"wrote the conformance statement to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
