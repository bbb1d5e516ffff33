"""The configuration schema: unknown keys and bad values stop start-up naming the key and the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.settings import load_settings
from tests.conftest import REPO


def test_default_and_production_example_configs_validate() -> None:
    default = load_settings(REPO / "configs" / "default.yaml", environ={})
    assert default.gateway.allowed_callers is None
    production = load_settings(REPO / "configs" / "production.example.yaml", environ={})
    assert production.gateway.allowed_callers and production.gateway.tls.require_client_certificate


def test_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("gateway:\n  prot: 104\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert "gateway.prot" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(("yaml", "key"), [
    ("gateway: {port: 70000}", "gateway.port"),
    ("gateway: {ae_title: 'WAY_TOO_LONG_FOR_AN_AE_TITLE'}", "gateway.ae_title"),
    ("gateway: {ae_title: '   '}", "gateway.ae_title"),
    ("gateway: {ae_title: 'BACK\\\\SLASH'}", "gateway.ae_title"),
    ("assembly: {quiet_seconds: -1}", "assembly.quiet_seconds"),
    ("gateway: {tls: {enabled: true}}", "gateway.tls"),
])
def test_bad_values_name_the_key(tmp_path: Path, yaml: str, key: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(yaml)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(path, environ={})


def test_environment_overrides_any_value() -> None:
    settings = load_settings(REPO / "configs" / "default.yaml", environ={
        "PACS_TRIAGE_GATEWAY__PORT": "11113",
        "PACS_TRIAGE_ASSEMBLY__QUIET_SECONDS": "2.5",
        "PACS_TRIAGE_TRIAGE__STAT_KEYWORDS": "[STAT, CITO]",
    })
    assert settings.gateway.port == 11113
    assert settings.assembly.quiet_seconds == 2.5
    assert settings.triage.stat_keywords == ("STAT", "CITO")
    assert "environment overrides" in settings.source


def test_bad_environment_value_names_the_variable_key() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.port"):
        load_settings(REPO / "configs" / "default.yaml", environ={"PACS_TRIAGE_GATEWAY__PORT": "many"})


def test_cli_flags_override_the_file_and_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("gateway: {colour: blue}\n")
    result = subprocess.run([sys.executable, "-m", "workers.cli", "gateway", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "gateway.colour: unknown key" in result.stderr and str(path) in result.stderr


def test_secrets_indirection_in_plugin_options(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    path = tmp_path / "site.yaml"
    path.write_text(f"plugins:\n  models:\n    m: {{options: {{a: {{$env: TOKEN_A}}, b: {{$file: {secret}}}}}}}\n")
    settings = load_settings(path, environ={})
    import os

    os.environ["TOKEN_A"] = "from-env"
    try:
        assert settings.plugin_config("m").options == {"a": "from-env", "b": "s3cret"}
    finally:
        del os.environ["TOKEN_A"]
