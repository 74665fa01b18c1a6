"""Compare two ``audit.json`` files field by field, apart from timings and paths.

    python benchmarks/compare_audit.py BEFORE/audit.json AFTER/audit.json [--new-key judge] [--tol 0]

Ignored: every ``timings`` / ``seconds`` value, and strings that are absolute file paths (the model's cache
location differs between checkouts). ``--new-key K`` allows a top-level key that only AFTER has (a record added
on purpose, e.g. ``judge`` in kvgeom 0.2); ``--tol`` compares floats with that absolute tolerance (default 0:
exactly equal). Prints each difference with its JSON path and exits 1 if there is any, 0 if none.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

IGNORED_KEYS = {"timings", "seconds"}


def _is_path(x: Any) -> bool:
    return isinstance(x, str) and x.startswith("/") and len(x) > 1


def diff(a: Any, b: Any, path: str = "$", *, tol: float = 0.0) -> list[str]:
    """Differences between ``a`` and ``b`` as ``PATH: A != B`` lines."""
    if _is_path(a) and _is_path(b):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in IGNORED_KEYS:
                continue
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'after' if k in b else 'before'}")
                continue
            out += diff(a[k], b[k], f"{path}.{k}", tol=tol)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, f"{path}[{i}]", tol=tol)]
    if isinstance(a, float) and isinstance(b, float) and not isinstance(a, bool):
        if a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol:
            return []
        return [f"{path}: {a!r} != {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} != {b!r}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--new-key", action="append", default=[], help="top-level key only AFTER may have")
    p.add_argument("--tol", type=float, default=0.0)
    args = p.parse_args(argv)
    a, b = json.loads(args.before.read_text()), json.loads(args.after.read_text())
    for k in args.new_key:
        b.pop(k, None)
    lines = diff(a, b, tol=args.tol)
    n_stages = len(a.get("stages", {}))
    if lines:
        print(f"{len(lines)} difference(s) between {args.before} and {args.after}:")
        print("\n".join(lines))
        return 1
    print(f"identical apart from timings and paths: {n_stages} stages, "
          f"{sum(1 for _ in _leaves(a))} compared values ({args.before} vs {args.after})")
    return 0


def _leaves(x: Any):
    if isinstance(x, dict):
        for k, v in x.items():
            if k not in IGNORED_KEYS:
                yield from _leaves(v)
    elif isinstance(x, list):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


if __name__ == "__main__":
    sys.exit(main())
