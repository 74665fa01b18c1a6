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

:func:`lock_folder` holds an exclusive ``fcntl.flock`` on ``FOLDER/.kvgeom.lock`` for the length of a run: a
second run on the same folder at the same time is refused with :class:`FolderLockedError` naming the holder's
PID and start time. The kernel drops the lock when its process ends, however it ends, so a crashed or killed
run never leaves a folder locked (the lock file it leaves is only a note). Proved by ``tests/test_io.py``
(a second lock is refused and names the holder; a SIGKILLed holder's lock does not block; a stale lock file with
a dead PID does not block). :func:`disk_full_error` words an ``ENOSPC``/``EDQUOT`` write failure: the folder, its
free space and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["LOCK_NAME", "FolderLockedError", "OutputDirError", "atomic_write_json", "atomic_write_text",
           "check_out_dir", "disk_full_error", "format_bytes", "free_bytes", "is_disk_full", "lock_folder",
           "to_jsonable", "umask_mode"]

#: the lock file :func:`lock_folder` holds in a run's folder
LOCK_NAME = ".kvgeom.lock"


class OutputDirError(ValueError):
    """An output folder that cannot be created or written; the message names the option, the path and the cause."""


class FolderLockedError(OutputDirError):
    """Another running process holds the folder's lock (:func:`lock_folder`); the message names it."""


def format_bytes(n: float) -> str:
    """``n`` bytes as ``"12.3 GiB"`` / ``"450.0 MiB"``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system of ``path`` (its first existing ancestor), None when it cannot be told."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write that failed for want of space (``ENOSPC``) or quota (``EDQUOT``)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_full_error(folder: str | os.PathLike, err: OSError, *, option: str = "--out", kept: str = "") -> str:
    """The message for a write into ``folder`` that found the disk full: the folder, its free space, what was
    kept and the fix."""
    free = free_bytes(folder)
    room = "unknown" if free is None else format_bytes(free)
    return (f"{option} {str(folder)!r}: the disk is full ({err.strerror or err}; {room} free there) while writing "
            f"{Path(err.filename).name if err.filename else 'a file'}{kept}; free some space, then run again with "
            "--resume")


@contextlib.contextmanager
def lock_folder(path: str | os.PathLike, *, option: str = "--out", what: str = "kvgeom audit") -> Iterator[Path]:
    """Hold the exclusive lock of folder ``path`` (created if needed) while the block runs; a folder another
    process holds is refused with :class:`FolderLockedError` naming it. Without ``fcntl`` (Windows) no lock is
    taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield Path(path)
        return
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    lock = d / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, umask_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            raise FolderLockedError(
                f"{option} {str(path)!r}: another {what} is writing to this folder now ({holder}; lock "
                f"{lock}); wait for it to finish, or pass another {option}. A crashed run leaves no lock: the "
                "system drops it when its process ends") from None
        note = f"pid {os.getpid()} on {os.uname().nodename}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode(), 0)
        yield d
    finally:
        os.close(fd)  # closing the descriptor releases the lock


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

