"""The gates: ruff (lint and format) and mypy pass over the project's packages.

They run as tests so that the README's test command (and so CI, which runs exactly that command) runs
them too.  Each tool comes from the environment running the tests, pinned by the ``dev`` extra, and reads
its configuration from pyproject.toml; its cache lives under pytest's temporary directory, never in the
checkout.  A failure shows the tool's own report.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: The packages the gates cover (those that exist: the layout may be mid-move).
PACKAGES = [name for name in ("gateway", "plugins", "workers", "training") if (REPO / name).is_dir()]
#: Characters of a tool's report shown in a failure: enough for every finding of a normal change.
REPORT_LIMIT = 20_000


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("static-check-caches")


def _run(tool: str, *args: str, fix: str, env: dict[str, str] | None = None) -> None:
    """Run ``python -m <tool> <args>`` in the repository root; if it fails, fail with its report and *fix*."""
    command = [sys.executable, "-m", tool, *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, check=False)
    if done.returncode == 0:
        return
    if f"No module named {tool}" in done.stderr:
        pytest.fail(f"{tool} is not installed in {sys.prefix}; .ci/bootstrap installs it", pytrace=False)
    report = (done.stdout + done.stderr).strip()
    if len(report) > REPORT_LIMIT:
        report = report[:REPORT_LIMIT] + f"\n... ({len(report) - REPORT_LIMIT} more characters)"
    pytest.fail(f"{' '.join([tool, *args])} failed (exit {done.returncode}); {fix}\n{report}", pytrace=False)


def test_ruff_check_passes(cache_dir: Path) -> None:
    _run(
        "ruff",
        "check",
        "--no-fix",
        *PACKAGES,
        fix="`ruff check --fix` repairs some",
        env={**os.environ, "RUFF_CACHE_DIR": str(cache_dir / "ruff")},
    )


def test_ruff_format_leaves_the_code_as_it_is(cache_dir: Path) -> None:
    _run(
        "ruff",
        "format",
        "--check",
        "--diff",
        *PACKAGES,
        fix="`ruff format` applies this diff",
        env={**os.environ, "RUFF_CACHE_DIR": str(cache_dir / "ruff")},
    )


@pytest.mark.slow
def test_mypy_passes(cache_dir: Path) -> None:
    _run("mypy", "--cache-dir", str(cache_dir / "mypy"), *PACKAGES, fix="the type errors are listed below")


def test_no_test_connects_to_a_service_on_its_default_port() -> None:
    # The suite starts every peer it needs on a free port (tests/peers.py).  Something on a default
    # port belongs to someone else, and a test that flushed or filled it would damage their data.
    default_ports = {
        6379: "the broker",
        4242: "the PACS (DICOM)",
        8042: "the PACS (REST)",
        11112: "the gateway",
    }
    loopback = re.compile(r"(127\.0\.0\.1|localhost):(\d+)\b")
    offenders = [
        f"{path.relative_to(REPO)}:{number} ({default_ports[int(match.group(2))]})"
        for path in sorted((REPO / "tests").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        for match in loopback.finditer(line)
        if int(match.group(2)) in default_ports
    ]
    assert offenders == []
