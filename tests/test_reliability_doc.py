"""docs/reliability.md stays in step with the tests (issue #17): every test its tables name exists (found by AST:
a module-level ``def test_...`` in that file), and every row names at least one."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
NODE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.name.startswith("test")}


def test_every_named_test_exists():
    named = NODE.findall(DOC.read_text())
    assert len(named) >= 40
    missing = [f"{f}::{t}" for f, t in named if not (ROOT / f).is_file() or t not in _tests(ROOT / f)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_every_row_names_a_test():
    rows = [line for line in DOC.read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| input", "| fault", "| property", "|---"))]
    assert len(rows) >= 35
    assert [r for r in rows if not NODE.search(r)] == []


def test_the_readme_links_it():
    assert "docs/reliability.md" in (ROOT / "README.md").read_text()
