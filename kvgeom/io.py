"""Atomic file writes: the one writer every kvgeom module uses (stage files, ``audit.json``, the report,
registry stamps).

:func:`atomic_write_text` writes to a temporary file in the target's folder, flushes and fsyncs it, gives it
the permissions a plain ``open(path, "w")`` would (``0o666`` less the process umask, so a results folder
shared by a group stays readable to it), then renames it over the target. A reader sees the old file or the
new one, never a partial one; a failure leaves no temporary file behind.
Proved by ``tests/test_io.py`` (mode follows the umask; a failed write keeps the old file and leaves no
temporary file; JSON round trip; :func:`to_jsonable` of NaN, numpy and pandas values).

:func:`check_out_dir` is run before any work by every command that writes a folder: it creates the folder and
writes a probe file there, so a path that cannot be created or written is one error naming the option, the path
and the cause (``tests/test_io.py``), not an ``[Errno 2]`` after the work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["OutputDirError", "atomic_write_json", "atomic_write_text", "check_out_dir", "to_jsonable", "umask_mode"]


class OutputDirError(ValueError):
    """An output folder that cannot be created or written; the message names the option, the path and the cause."""


def _blocker(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` (or ``path`` itself) that is not a directory."""
    for p in [*reversed(path.parents), path]:
        if p.exists() and not p.is_dir():
            return p
    return None


def check_out_dir(path: str | os.PathLike, *, option: str = "--out") -> Path:
    """Create the folder ``path`` (and its parents) and check a file can be written in it, before any work.

    Raises :class:`OutputDirError` naming ``option``, the path and the cause (a file in the way, no permission,
    a read-only or full file system) and the fix. Returns the folder."""
    d = Path(path).expanduser()
    fix = f"pass {option} a folder you can create and write to"
    blocker = _blocker(d)
    if blocker is not None:
        what = "is a file" if blocker == d else f"is under {blocker}, which is a file"
        raise OutputDirError(f"{option} {str(path)!r}: cannot create the output folder: it {what}, not a folder; "
                             f"{fix}")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"{option} {str(path)!r}: cannot create the output folder: {err.strerror or err} "
                             f"({err.filename or d}); {fix}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=d, prefix=".kvgeom-write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputDirError(f"{option} {str(path)!r}: the output folder exists but cannot be written: "
                             f"{err.strerror or err}; {fix}") from None
    return d


def umask_mode() -> int:
    """``0o666`` less the current umask: the mode ``open(path, "w")`` gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (fsync, umask permissions, rename); create missing parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding=encoding) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """:func:`atomic_write_text` of ``json.dumps(to_jsonable(data), indent=2, sort_keys=True)``."""
    return atomic_write_text(path, json.dumps(to_jsonable(data), indent=2, sort_keys=True))


def to_jsonable(obj: Any) -> Any:
    """Recursively convert to JSON-friendly values: NaN/±inf → None, numpy scalars/arrays → Python, tuples →
    lists, DataFrames → lists of records, objects with ``to_dict()`` and dataclasses → dicts."""
    if obj is None or isinstance(obj, str | bool):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(obj, pd.DataFrame):
        return [to_jsonable(r) for r in obj.to_dict(orient="records")]
    if isinstance(obj, pd.Series):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if obj is pd.NA:
        return None
    return str(obj)

