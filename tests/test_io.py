"""The one atomic writer (kvgeom.io): umask permissions, nothing partial, no temporary file left."""

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from kvgeom.io import atomic_write_json, atomic_write_text, to_jsonable, umask_mode


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
