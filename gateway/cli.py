"""The gateway's subcommands: ``gateway``, ``echo``, ``send`` and ``config``.

``workers/cli.py`` gathers these with the other parts' subcommands into one ``pacs-triage``.
Each handler has the signature ``func(args, settings) -> int``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gateway.errors import PacsTriageError, StartupError
from gateway.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]


def common_options() -> argparse.ArgumentParser:
    """Options every command takes."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config",
        metavar="PATH",
        help="YAML configuration (default: $PACS_TRIAGE_CONFIG or configs/default.yaml)",
    )
    return parent


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    gw = subparsers.add_parser(
        "gateway",
        parents=[common],
        help="run the DICOM Storage/Verification SCP only",
        description="Receive DICOM into the durable spool, assemble studies and dispatch them. "
        "Flags override the config file for quick trials.",
    )
    _add_gateway_flags(gw)
    gw.set_defaults(func=run_gateway, overrides=gateway_overrides)

    echo = subparsers.add_parser(
        "echo", parents=[common], help="C-ECHO a DICOM node (the gateway by default)"
    )
    _add_peer_flags(echo)
    echo.set_defaults(func=run_echo)

    send = subparsers.add_parser("send", parents=[common], help="C-STORE files or folders to a DICOM node")
    send.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders (recursed)")
    _add_peer_flags(send)
    send.set_defaults(func=run_send)

    cfg = subparsers.add_parser(
        "config", parents=[common], help="validate and print the effective configuration"
    )
    cfg.set_defaults(func=run_config)


def _add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="listening port (gateway.port)")
    parser.add_argument("--ae-title", help="called AE title (gateway.ae_title)")
    parser.add_argument("--data-dir", type=Path, help="spool and journal directory (gateway.data_dir)")


def gateway_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "gateway.port": args.port,
        "gateway.ae_title": args.ae_title,
        "gateway.data_dir": str(args.data_dir) if args.data_dir else None,
    }


def _add_peer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="peer host (default: this gateway, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="peer port (default: gateway.port)")
    parser.add_argument("--called-ae", default=None, help="peer AE title (default: gateway.ae_title)")
    parser.add_argument("--calling-ae", default="PACS_TRIAGE_SCU", help="our AE title")


def _peer(args: argparse.Namespace, settings: Settings) -> tuple[str, int, str]:
    return (
        args.host or "127.0.0.1",
        args.port or settings.gateway.port,
        args.called_ae or settings.gateway.ae_title,
    )


def run_gateway(
    args: argparse.Namespace,
    settings: Settings,
    dispatcher: Any = None,
    companions: dict[str, Any] | None = None,
) -> int:
    """Run the gateway until SIGINT/SIGTERM.

    :param companions: Child processes started beside it (``up``: the worker, the web service),
        by the name a user knows them by.  If one of them exits, everything stops, with a message
        that names it, and the status is 1.
    """
    from gateway.service import GatewayService

    service = GatewayService(settings, dispatcher)
    if not companions:
        service.serve_forever()
        return 0
    return _serve_with(service, companions)


def _serve_with(service: Any, companions: dict[str, Any]) -> int:
    import signal
    import threading

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        service.start()
    except PacsTriageError as exc:
        raise StartupError(f"the gateway cannot start: {exc}") from exc
    try:
        while not done.wait(0.5):
            for name, child in companions.items():
                code = child.poll()
                if code is not None:
                    print(
                        f"pacs-triage up: error: the {name} could not start or has stopped "
                        f"(exit status {code}); "
                        "stopping everything",
                        file=sys.stderr,
                    )
                    return 1
        return 0
    finally:
        service.stop()


def _associate(args: argparse.Namespace, settings: Settings, contexts: list[Any]) -> Any:
    from pynetdicom import AE

    host, port, called = _peer(args, settings)
    ae = AE(ae_title=args.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts:
        ae.add_requested_context(*cx)
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted or unreachable"
        print(f"error: association with {called}@{host}:{port} {reason}", file=sys.stderr)
        return None
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def run_echo(args: argparse.Namespace, settings: Settings) -> int:
    assoc = _associate(args, settings, [("1.2.840.10008.1.1",)])  # Verification
    if assoc is None:
        return 2
    status = assoc.send_c_echo()
    assoc.release()
    code = int(getattr(status, "Status", -1))
    print(f"C-ECHO status 0x{code:04X}" if code >= 0 else "C-ECHO got no response")
    return 0 if code == 0 else 1


def _dicom_files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def run_send(args: argparse.Namespace, settings: Settings) -> int:
    """C-STORE every file; report each one that cannot be read or that the peer refuses, and go on.

    Exit status: 0 when every file was stored, 1 when some were not (each is named on stderr, then
    a summary), 2 when nothing could be sent at all (no DICOM file, no association).
    """
    from tqdm import tqdm

    from gateway.inflate import read_header

    files, contexts, problems = [], set(), 0
    for path in _dicom_files(args.paths):
        try:
            header = read_header(path)  # a deflated file is never inflated whole to learn its class
            contexts.add((str(header.SOPClassUID), str(header.file_meta.TransferSyntaxUID)))
            files.append(path)
        except Exception as exc:  # any unreadable file is reported and skipped, never a traceback
            problems += 1
            print(f"{path}: not sent, not a readable DICOM file ({type(exc).__name__})", file=sys.stderr)
    if not files:
        print("error: no DICOM files to send", file=sys.stderr)
        return 2
    if len(contexts) > 128:
        print(
            "error: more than 128 SOP class/transfer syntax pairs; send in smaller batches", file=sys.stderr
        )
        return 2
    assoc = _associate(args, settings, [(sop, [tsx]) for sop, tsx in sorted(contexts)])
    if assoc is None:
        return 2
    stored = 0
    try:
        for path in tqdm(files, unit="file", desc="C-STORE", disable=not sys.stderr.isatty()):
            if not assoc.is_established:
                problems += 1
                print(f"{path}: not sent, the association ended", file=sys.stderr)
                continue
            try:
                status = assoc.send_c_store(path)
            except Exception as exc:  # pynetdicom could not read or encode this file
                problems += 1
                print(f"{path}: not sent, cannot be read or encoded ({type(exc).__name__})", file=sys.stderr)
                continue
            code = int(getattr(status, "Status", -1))
            if code == 0:
                stored += 1
                continue
            problems += 1
            print(
                f"{path}: refused, status 0x{code & 0xFFFF:04X}" if code >= 0 else f"{path}: no response",
                file=sys.stderr,
            )
    finally:
        if assoc.is_established:
            assoc.release()
    total = stored + problems
    print(f"sent {stored} of {total} files" + (f"; {problems} not stored (listed above)" if problems else ""))
    return 0 if problems == 0 else 1


def run_config(args: argparse.Namespace, settings: Settings) -> int:
    print(f"# {settings.source}: valid")
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0
