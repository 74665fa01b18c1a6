"""benchmarks/compare_audit.py: finds every changed value, ignores timings and paths, allows declared new keys."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_audit.py"
spec = importlib.util.spec_from_file_location("compare_audit", SCRIPT)
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def test_diff_ignores_timings_and_paths_only():
    a = {"stages": {"x": {"rate": 0.5, "rows": [1, 2]}}, "timings": {"x": 1.0}, "model": {"path": "/a/b"}}
    b = {"stages": {"x": {"rate": 0.5, "rows": [1, 2]}}, "timings": {"x": 9.0}, "model": {"path": "/c/d"}}
    assert compare.diff(a, b) == []
    b["stages"]["x"]["rows"] = [1, 3]
    b["stages"]["x"]["rate"] = 0.5000001
    assert compare.diff(a, b) == ["$.stages.x.rate: 0.5 != 0.5000001", "$.stages.x.rows[1]: 2 != 3"]
    assert compare.diff({"n": 1}, {"n": 1.0}) == ["$.n: 1 != 1.0"]


def test_cli_exit_codes(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps({"stages": {"s": {"v": 1}}}))
    (tmp_path / "b.json").write_text(json.dumps({"stages": {"s": {"v": 1}}, "judge": {"name": "keyword"}}))
    args = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert compare.main(args) == 1 and "$.judge: only in after" in capsys.readouterr().out
    assert compare.main([*args, "--new-key", "judge"]) == 0
