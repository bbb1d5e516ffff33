"""The DICOM conformance statement follows the configuration, and docs/conformance.md is the default's."""

from __future__ import annotations

import argparse
import ast
import inspect
from pathlib import Path

import pytest
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from gateway.cli import common_options
from gateway.scp import ACCEPTED_TRANSFER_SYNTAXES, STANDARD_STORAGE_CLASSES, storage_sop_classes
from gateway.settings import Settings, load_settings
from workers import http_cli
from workers.conformance import conformance_statement

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "configs" / "default.yaml"
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.9999.7"


def settings_with(**overrides: object) -> Settings:
    return load_settings(DEFAULT, environ={}, overrides=overrides)


def test_docs_copy_is_the_statement_of_the_default_configuration() -> None:
    expected = conformance_statement(load_settings(DEFAULT, environ={}))
    assert (REPO / "docs" / "conformance.md").read_text() == expected, (
        "docs/conformance.md is stale; regenerate it with "
        "`pacs-triage conformance --config configs/default.yaml --output docs/conformance.md`")


def test_statement_lists_every_accepted_sop_class_and_transfer_syntax() -> None:
    settings = settings_with(**{"gateway.private_sop_classes": [PRIVATE_SOP_CLASS]})
    text = conformance_statement(settings)
    accepted = storage_sop_classes(settings.gateway)
    assert PRIVATE_SOP_CLASS in accepted
    for uid in accepted:
        assert f"| {uid} |" in text, uid
    assert f"| {PRIVATE_SOP_CLASS} | configured private class |" in text
    assert f"Storage ({len(STANDARD_STORAGE_CLASSES) + 1} SOP classes)" in text
    for syntax in ACCEPTED_TRANSFER_SYNTAXES:
        assert f"| {syntax} |" in text, syntax
    # The objects we produce, with their SOP classes, and what we propose for them.
    assert f"| Comprehensive SR | {ComprehensiveSRStorage} |" in text
    assert f"| Secondary Capture Image | {SecondaryCaptureImageStorage} |" in text


def test_statement_follows_ae_titles_allow_list_tls_and_destinations() -> None:
    plain = conformance_statement(settings_with())
    assert "Any calling AE title is accepted" in plain and "TLS: off" in plain
    assert "No destination is configured" in plain

    settings = settings_with(**{
        "gateway.ae_title": "TRIAGE_SITE2", "gateway.port": 11119, "gateway.max_pdu_size": 65536,
        "gateway.allowed_callers": [{"ae_title": "MAMMO_ROOM1", "hosts": ["10.20.0.15"]},
                                    {"ae_title": "PACS_MAIN"}],
        "gateway.tls": {"enabled": True, "certificate": "/tls/gw.crt", "private_key": "/tls/gw.key",
                        "ca_certificates": "/tls/ca.pem", "require_client_certificate": True},
        "delivery.destinations": [{"ae_title": "PACS_MAIN", "host": "10.20.0.5", "port": 104,
                                   "tls": {"enabled": True, "certificate": "/tls/us.crt",
                                           "private_key": "/tls/us.key", "ca_certificates": "/tls/ca.pem"}}],
    })
    text = conformance_statement(settings)
    assert "| Receiving gateway | `TRIAGE_SITE2` | Storage SCP, Verification SCP | 11119" in text
    assert "The called AE title must be `TRIAGE_SITE2`" in text
    assert "| `MAMMO_ROOM1` | 10.20.0.15 |" in text and "| `PACS_MAIN` | any |" in text
    assert "Maximum PDU size received: 65536 bytes" in text
    assert "client certificates required and verified against the configured CA (mutual TLS)" in text
    assert ("| `PACS_MAIN` | 10.20.0.5 | 104 | on, TLS 1.2 or newer; the PACS certificate is verified "
            "against the configured CA; our certificate is presented (mutual TLS) |") in text
    assert "Any calling AE title" not in text


def test_conformance_command_prints_and_writes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="pacs-triage")
    http_cli.register(parser.add_subparsers(dest="command"), common_options())
    settings = load_settings(DEFAULT, environ={})
    args = parser.parse_args(["conformance"])
    assert args.func(args, settings) == 0
    assert capsys.readouterr().out == conformance_statement(settings)
    target = tmp_path / "out" / "conformance.md"
    args = parser.parse_args(["conformance", "--config", str(DEFAULT), "--output", str(target)])
    assert args.func(args, settings) == 0
    assert target.read_text() == conformance_statement(settings)


def test_serve_http_flags_override_the_configuration() -> None:
    parser = argparse.ArgumentParser(prog="pacs-triage")
    http_cli.register(parser.add_subparsers(dest="command"), common_options())
    args = parser.parse_args(["serve-http", "--host", "0.0.0.0", "--port", "8099"])
    assert args.overrides(args) == {"http.host": "0.0.0.0", "http.port": 8099}
    settings = load_settings(DEFAULT, environ={}, overrides=args.overrides(args))
    assert (settings.http.host, settings.http.port) == ("0.0.0.0", 8099)


def test_every_status_the_store_handler_returns_has_a_row_in_the_statement() -> None:
    import gateway.handlers as handlers

    # Every ``return STATUS_...`` in the handler module, read from its source.
    returned = {getattr(handlers, node.value.id) for node in ast.walk(ast.parse(inspect.getsource(handlers)))
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Name)
                and node.value.id.startswith("STATUS_")}
    documented = {status for status, _ in handlers.STORE_STATUSES}
    assert returned and returned <= documented
    text = conformance_statement(settings_with())
    for status, meaning in handlers.STORE_STATUSES:
        assert f"| 0x{status:04X} | {meaning} |" in text
