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
