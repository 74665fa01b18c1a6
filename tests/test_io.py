"""The one atomic writer (kvgeom.io): umask permissions, nothing partial, no temporary file left."""

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from kvgeom.io import OutputDirError, atomic_write_json, atomic_write_text, check_out_dir, to_jsonable, umask_mode


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_mode_follows_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert umask_mode() == 0o666 & ~mask
        p = atomic_write_text(tmp_path / "deep" / "a.txt", "x")
    finally:
        os.umask(old)
    assert p.read_text() == "x" and p.stat().st_mode & 0o777 == 0o666 & ~mask


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_text(p, object())  # write fails after the temporary file exists
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]


def test_json_round_trip_and_jsonable(tmp_path):
    data = {"nan": math.nan, "np": np.float32(0.5), "arr": np.arange(3), "df": pd.DataFrame({"x": [1]}),
            "t": (1, 2), "b": np.bool_(True)}
    atomic_write_json(tmp_path / "d.json", data)
    back = json.loads((tmp_path / "d.json").read_text())
    assert back == {"nan": None, "np": 0.5, "arr": [0, 1, 2], "df": [{"x": 1}], "t": [1, 2], "b": True}
    assert to_jsonable(back) == back


# ---- check_out_dir: an output folder checked before any work (issue #17) ---------------------------------
def test_check_out_dir_creates_the_folder_and_leaves_no_probe(tmp_path):
    d = check_out_dir(tmp_path / "a" / "b")
    assert d.is_dir() and list(d.iterdir()) == []
    assert check_out_dir(d) == d  # an existing folder is fine


def test_check_out_dir_names_the_option_the_path_and_the_cause(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(OutputDirError, match=rf"^--dir '{tmp_path / 'f.txt'}': cannot create the output folder: it "
                                             r"is a file, not a folder; pass --dir a folder"):
        check_out_dir(tmp_path / "f.txt", option="--dir")
    with pytest.raises(OutputDirError, match=rf"it is under {tmp_path / 'f.txt'}, which is a file"):
        check_out_dir(tmp_path / "f.txt" / "x" / "y")


def test_check_out_dir_reports_the_os_cause(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(OutputDirError, match=rf"^--out '{tmp_path / 'new'}': cannot create the output folder: "
                                             rf"Permission denied \({tmp_path / 'new'}\); pass --out"):
        check_out_dir(tmp_path / "new")


_HOLD = """
import sys, time
from kvgeom.io import lock_folder
with lock_folder(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_lock_is_refused_and_names_the_holder(tmp_path):
    from kvgeom.io import FolderLockedError, lock_folder

    with lock_folder(tmp_path):
        with pytest.raises(FolderLockedError) as err:
            with lock_folder(tmp_path, option="--out"):
                pass
    msg = str(err.value)
    assert f"--out {str(tmp_path)!r}: another kvgeom audit is writing to this folder now (pid {os.getpid()}" in msg
    assert "pass another --out" in msg and "A crashed run leaves no lock" in msg
    with lock_folder(tmp_path):  # released when the first block ended
        pass


def test_a_killed_holder_does_not_block(tmp_path):
    """SIGKILL the process holding the lock: the kernel drops it, the next run takes the folder."""
    import signal
    import subprocess
    import sys

    from kvgeom.io import FolderLockedError, lock_folder

    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError, match=f"pid {proc.pid}"):
            with lock_folder(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with lock_folder(tmp_path):
        pass


def test_a_stale_lock_file_with_a_dead_pid_does_not_block(tmp_path):
    from kvgeom.io import LOCK_NAME, lock_folder

    (tmp_path / LOCK_NAME).write_text("pid 999999 on elsewhere, started 2020-01-01 00:00:00")
    with lock_folder(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()


def test_disk_full_message_names_the_folder_and_free_space(tmp_path):
    import errno

    from kvgeom.io import disk_full_error, free_bytes, is_disk_full

    err = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.json"))
    assert is_disk_full(err) and not is_disk_full(OSError(errno.EACCES, "denied"))
    msg = disk_full_error(tmp_path, err)
    assert f"--out {str(tmp_path)!r}: the disk is full (No space left on device;" in msg
    assert "free there) while writing x.json" in msg and "--resume" in msg
    assert free_bytes(tmp_path / "not" / "yet") == free_bytes(tmp_path) > 0
