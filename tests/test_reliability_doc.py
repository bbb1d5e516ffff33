"""Keeps ``docs/reliability.md`` true: its table names every fault and soak test, and only real tests."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "reliability.md"
_REFERENCE = re.compile(r"tests/(test_\w+)\.py::(test_\w+)")
_OWNED = re.compile(r"test_faults_\w+|test_soak")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
    }


def _table_references() -> set[tuple[str, str]]:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("|")]
    return {(m.group(1), m.group(2)) for row in rows for m in _REFERENCE.finditer(row)}


def test_every_fault_and_soak_test_is_in_the_table_and_every_row_names_a_real_test() -> None:
    referenced = _table_references()
    defined = {
        (path.stem, name)
        for path in sorted((REPO / "tests").glob("test_*.py"))
        if _OWNED.fullmatch(path.stem)
        for name in _tests_in(path)
    }
    owned_referenced = {ref for ref in referenced if _OWNED.fullmatch(ref[0])}
    missing = sorted(f"tests/{f}.py::{t}" for f, t in defined - owned_referenced)
    stale = sorted(f"tests/{f}.py::{t}" for f, t in owned_referenced - defined)
    assert not missing, f"tests missing from the table in docs/reliability.md: {missing}"
    assert not stale, f"rows of docs/reliability.md name tests that do not exist: {stale}"
    # The existing tests the table reuses must exist too.
    for module, name in sorted(referenced - owned_referenced):
        path = REPO / "tests" / f"{module}.py"
        assert path.exists() and name in _tests_in(path), (
            f"docs/reliability.md names tests/{module}.py::{name}"
        )
