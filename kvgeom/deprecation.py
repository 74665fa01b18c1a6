"""Names that moved: the old import path keeps working for one release, with a :class:`DeprecationWarning`
that names the new place.

A module whose names moved ends with ``__getattr__ = moved(__name__, {"name": "new.module", ...})`` (a
module-level ``__getattr__``, PEP 562, so ``from old import name`` works too); a module that moved whole
becomes ``__getattr__ = moved_module(__name__, "new.module")``. :data:`MOVED` lists every old path, so a test
(``tests/test_structure.py``) checks that no kvgeom module imports from one.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MOVED", "REMOVED_IN", "moved", "moved_module"]

#: The release that drops the old paths.
REMOVED_IN = "0.3"

#: old module -> {name: new module} (``"*"`` = every name: the module moved whole).
MOVED: dict[str, dict[str, str]] = {}


def _warn(old: str, name: str, new: str) -> None:
    warnings.warn(f"{old}.{name} moved to {new}.{name}; import it from there ({old}.{name} is removed in "
                  f"kvgeom {REMOVED_IN})", DeprecationWarning, stacklevel=3)


def moved(old: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` serving each moved ``name`` from its new module, with a warning."""
    MOVED.setdefault(old, {}).update(names)

    def __getattr__(name: str) -> Any:
        new = names.get(name)
        if new is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        _warn(old, name, new)
        return getattr(importlib.import_module(new), name)

    return __getattr__


def moved_module(old: str, new: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for a module that moved whole to ``new``."""
    MOVED.setdefault(old, {})["*"] = new

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        mod = importlib.import_module(new)
        if not hasattr(mod, name):
            raise AttributeError(f"module {old!r} (moved to {new!r}) has no attribute {name!r}")
        _warn(old, name, new)
        return getattr(mod, name)

    return __getattr__
