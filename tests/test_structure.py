"""The shape of the code (issue #14): the import graph of ``kvgeom`` has no circle, no module is over 400 lines,
no private name is imported across packages, and no kvgeom module imports a name from its deprecated old place.

Every import counts as an edge: at module level, inside functions (a lazy import is still a dependency) and under
``if TYPE_CHECKING:`` (a name needed only for its type still ties the two modules: a lower module that needs a
higher one's type gets it from a module below both, e.g. a Protocol of what it reads). A module importing its own
ancestor package (``from kvgeom.quant import X`` inside ``kvgeom.quant.plan``) is not counted as an edge: the
package's ``__init__`` is the package's own front door.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import kvgeom
from kvgeom.deprecation import MOVED

ROOT = Path(kvgeom.__file__).parent
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODS = _modules()


def _package(mod: str) -> str:
    return mod if MODS[mod].name == "__init__.py" else mod.rsplit(".", 1)[0]


def _imports(mod: str, source: str | None = None) -> list[tuple[str, str | None, int]]:
    """(target module, imported name or None, line) of every import of ``mod`` into kvgeom (module level, lazy,
    and under ``if TYPE_CHECKING:``); ``source``: read this text as ``mod``'s instead of its file."""
    out = []
    for n in ast.walk(ast.parse(MODS[mod].read_text() if source is None else source)):
        if isinstance(n, ast.Import):
            out += [(a.name, None, n.lineno) for a in n.names if a.name.startswith("kvgeom")]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = _package(mod).split(".")
                base = base[: len(base) - n.level + 1]
                name = ".".join(base + ([n.module] if n.module else []))
            else:
                name = n.module or ""
            if not name.startswith("kvgeom"):
                continue
            for a in n.names:
                full = f"{name}.{a.name}"
                out.append((full, None, n.lineno) if full in MODS else (name, a.name, n.lineno))
    return out


def _resolve(target: str) -> str:
    while target not in MODS and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODS}
    for m in MODS:
        for target, _name, _line in _imports(m):
            t = _resolve(target)
            if t != m and not m.startswith(t + "."):
                g[m].add(t)
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    circles = _cycles(_graph())
    assert circles == [], f"modules that import each other in a loop: {circles}"


def test_the_checker_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_type_only_and_lazy_imports_are_edges():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from .formats import FP8Spec\n"
        "def f():\n"
        "    from kvgeom.runtime.hooks import kv_hooks\n"
    )
    assert sorted(_imports("kvgeom.quant.fp8", source)) == [
        ("kvgeom.quant.formats", "FP8Spec", 3), ("kvgeom.runtime.hooks", "kv_hooks", 5)]


def test_no_module_over_the_limit():
    long = {m: n for m, p in MODS.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these into subpackages: {long}"


def test_no_private_name_imported_across_packages():
    bad = []
    for m in MODS:
        for target, name, line in _imports(m):
            if name and name.startswith("_") and not name.startswith("__"):
                if _package(_resolve(target)) != _package(m):
                    bad.append(f"{MODS[m]}:{line}: {name} from {target}")
    assert bad == []


@pytest.fixture(scope="module")
def moved() -> dict[str, dict[str, str]]:
    for info in pkgutil.walk_packages(kvgeom.__path__, "kvgeom."):
        if "triton" in info.name:
            continue  # kernel modules import triton, which a CPU machine may lack
        importlib.import_module(info.name)
    return MOVED


def test_no_kvgeom_module_imports_an_old_path(moved):
    assert moved, "the deprecation shims registered nothing: were they imported?"
    bad = []
    for m in MODS:
        if m in moved and "*" in moved[m]:
            continue  # the shim itself
        for target, name, line in _imports(m):
            t = _resolve(target)
            entry = moved.get(t, {})
            if "*" in entry and t == target or (name and name in entry):
                bad.append(f"{MODS[m]}:{line}: {target}{'.' + name if name else ''} (moved: {entry})")
    assert bad == []
