"""The audit pipeline on a tiny model with a stand-in judge (random weights never really refuse)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvgeom.audit import STAGE_ORDER, AuditConfig, AuditError, family_of, per_channel_twin, run_audit
from kvgeom.cli import audit_summary
from kvgeom.testing import ChecksumJudge

SMALL = dict(model="tiny", n_calib=6, n_heldout=6, n_borderline=3, max_new_tokens=4, fractions=(0.05, 0.25),
             n_seeds=2, bits=(8, 4, 2), ppl_tokens=128, batch_size=32)


def _strip(audit):
    return {k: v for k, v in audit.items() if k != "timings"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from ..conftest import get_tiny

    out = tmp_path_factory.mktemp("audit")
    res = run_audit(AuditConfig(**SMALL), out, model=get_tiny("llama"), judge=ChecksumJudge())
    return out, res


def test_audit_writes_every_stage_and_report(full_run):
    out, res = full_run
    audit = json.loads((out / "audit.json").read_text())
    assert set(audit["stages"]) == set(STAGE_ORDER)
    for name in STAGE_ORDER:
        assert (out / "stages" / f"{name}.json").is_file()
    layers = audit["stages"]["layer_sweep"]["layers"]
    assert [r["layer"] for r in layers] == [0, 1, 2]
    assert audit["stages"]["label"]["label"] in {"robust", "outlier-as-safety", "mixed", "outlier-crushes-safety",
                                                 "multi-layer-dilution", "hyper-vulnerable", "undetermined"}
    assert audit["stages"]["label"]["trace"]
    html = (out / "report.html").read_text()
    assert audit["stages"]["label"]["label"] in html and "<script src=\"http" not in html
    text = audit_summary(audit)
    assert "LABEL" in text and "critical layer" in text
    # every candidate a QuantPlan can express was really run on both prompt splits
    for c in audit["stages"]["mitigation"]["candidates"]:
        if c["expressible_as_plan"]:
            assert {"calibration", "held_out"} <= set(c["results"]), c


def test_resume_gives_the_same_audit(full_run, tmp_path):
    from ..conftest import get_tiny

    out, res = full_run
    part = tmp_path / "part"
    cfg = AuditConfig(**SMALL)
    run_audit(cfg, part, model=get_tiny("llama"), judge=ChecksumJudge(), stages=STAGE_ORDER[:3])
    resumed = run_audit(cfg, part, model=get_tiny("llama"), judge=ChecksumJudge(), resume=True)
    assert _strip(json.loads((part / "audit.json").read_text())) == _strip(json.loads((out / "audit.json").read_text()))
    assert resumed.timings["baseline"] == json.loads((part / "stages" / "baseline.json").read_text())["seconds"]


def test_resume_refuses_other_settings(full_run):
    from ..conftest import get_tiny

    out, _ = full_run
    with pytest.raises(AuditError, match="other settings"):
        run_audit(AuditConfig(**{**SMALL, "n_calib": 5}), out, model=get_tiny("llama"), resume=True)


def test_resume_refuses_another_judge(full_run):
    from ..conftest import get_tiny

    out, _ = full_run
    saved = json.loads((out / "stages" / "_judge.json").read_text())
    assert saved["name"] == "checksum-test-judge" and saved["settings"] == {"modulus": 3}
    assert json.loads((out / "audit.json").read_text())["judge"] == saved
    with pytest.raises(AuditError, match="mix two judges"):
        run_audit(AuditConfig(**SMALL), out, model=get_tiny("llama"), judge=ChecksumJudge(5), resume=True)
    with pytest.raises(AuditError, match="mix two judges"):  # the default keyword judge is another judge too
        run_audit(AuditConfig(**SMALL), out, model=get_tiny("llama"), resume=True)


def test_resume_refuses_stages_without_a_judge_record(full_run, tmp_path):
    import shutil

    from ..conftest import get_tiny

    old = tmp_path / "old"
    shutil.copytree(full_run[0], old)
    (old / "stages" / "_judge.json").unlink()  # as written by kvgeom before the judge was recorded
    with pytest.raises(AuditError, match="no record of their judge"):
        run_audit(AuditConfig(**SMALL), old, model=get_tiny("llama"), judge=ChecksumJudge(), resume=True)


def test_unknown_judge_is_refused_before_any_work(tmp_path):
    with pytest.raises(AuditError, match="--judge: unknown judge 'nope'"):
        run_audit(AuditConfig(**SMALL), tmp_path / "x", judge="nope")
    assert not (tmp_path / "x").exists()


def test_outputs_get_the_umask_mode(full_run):
    out, _ = full_run
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    files = [out / "audit.json", out / "report.html", *sorted((out / "stages").glob("*.json"))]
    assert len(files) > 10
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: want for f in files}


_SCRIPT = """
import sys
from kvgeom.audit import AuditConfig, run_audit
from kvgeom.testing import ChecksumJudge, tiny_model
cfg = AuditConfig(**{small!r})
run_audit(cfg, sys.argv[1], model=tiny_model("llama"), judge=ChecksumJudge(), resume="--resume" in sys.argv)
"""


def test_kill_9_then_resume(full_run, tmp_path):
    """SIGKILL in the middle of the run, then --resume: same audit.json as the uninterrupted run."""
    out, _ = full_run
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(small=SMALL))
    target = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, str(script), str(target)], env=env)
    deadline = time.time() + 120
    while not (target / "stages" / "layer_sweep.json").exists():
        assert proc.poll() is None, "audit ended before it could be killed"
        assert time.time() < deadline, "audit did not reach layer_sweep in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (target / "audit.json").exists()
    assert not list((target / "stages").glob(".*.tmp"))  # atomic writes leave no partial files behind
    subprocess.run([sys.executable, str(script), str(target), "--resume"], env=env, check=True, timeout=300)
    resumed = json.loads((target / "audit.json").read_text())
    assert _strip(resumed) == _strip(json.loads((out / "audit.json").read_text()))


def test_bad_input_fails_before_work(tmp_path):
    with pytest.raises(AuditError, match="valid"):
        run_audit(AuditConfig(**{**SMALL, "scheme": "int9-token-asym"}), tmp_path / "x")
    with pytest.raises(AuditError, match="not found"):
        run_audit(AuditConfig(**{**SMALL, "harmful": str(tmp_path / "missing.csv")}), tmp_path / "x")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(AuditError, match="empty"):
        run_audit(AuditConfig(**{**SMALL, "harmful": str(empty)}), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_no_refusals_is_a_clear_error_and_keeps_the_baseline(tmp_path):
    from ..conftest import get_tiny

    with pytest.raises(AuditError, match="refuses none"):
        run_audit(AuditConfig(**SMALL), tmp_path, model=get_tiny("llama"))  # keyword judge: random text
    assert (tmp_path / "stages" / "baseline.json").is_file()


def test_helpers():
    assert per_channel_twin("int3-tensor-sym") == "int3-channel-sym"
    assert family_of("int4-token-asym") == "int{b}-token-asym"
    assert family_of("kivi2-g32-r32") == "kivi{b}-g32-r32"
    assert family_of("q4_0") == "q4_0"


def test_precision_search_and_its_export(tmp_path):
    from ..conftest import get_tiny

    cfg = AuditConfig(**{**SMALL, "search": True, "search_levels": ("int2-token-asym", "int8-token-asym")})
    res = run_audit(cfg, tmp_path, model=get_tiny("llama"), judge=ChecksumJudge(),
                    stages=("baseline", "layer_sweep", "outliers", "channel_ablation", "pcr", "label", "mitigation",
                            "export"))
    search = res.audit["stages"]["mitigation"]["search"]
    assert len(search["assignment"]) == 3 and search["steps"]
    if search["met"]:
        assert "precision search" in res.audit["stages"]["export"]["source"]


def test_agreement_stage(full_run, tmp_path):
    from ..conftest import get_tiny

    out, _ = full_run
    import shutil

    shutil.copytree(out, tmp_path / "a")
    res = run_audit(AuditConfig(**SMALL), tmp_path / "a", model=get_tiny("llama"), judge=ChecksumJudge(),
                    resume=True, stages=STAGE_ORDER + ("agreement",))
    ag = res.audit["stages"]["agreement"]
    assert ag["calibration"]["label"] == res.audit["stages"]["label"]["label"]
    assert ag["held_out"]["n"] == SMALL["n_heldout"] and isinstance(ag["agree"], bool)
    assert "calibration vs held-out" in audit_summary(res.audit)


def test_assignment_plan():
    from kvgeom.audit import assignment_plan

    cfg = AuditConfig(**SMALL)
    plan = assignment_plan(cfg, ["q4_0", None, "q4_0", "q8_0"])
    assert plan.quantizes(0) and not plan.quantizes(1) and plan.quantizes(3)
    assert str(plan.scheme_for(3)) == "q8_0" and str(plan.scheme_for(0)) == "q4_0"
    assert assignment_plan(cfg, [None, None]) is None


def test_refused_only_and_settle_keep_every_flip_rate(tmp_path):
    """The audit's savings (generate only baseline-refused prompts where a flip rate is conditional on them; stop
    settled rows) leave the flip rates unchanged; without them McNemar's p is measured too."""
    from kvgeom.audit import run_stage, stage_layer_sweep

    from ..conftest import get_tiny

    model = get_tiny("llama")
    judge = ChecksumJudge()
    fast = AuditConfig(**SMALL)
    results = {"baseline": run_stage("baseline", model, fast, {}, judge=judge)}
    a = run_stage("layer_sweep", model, fast, results, judge=judge)
    b = run_stage("layer_sweep", model, AuditConfig(**{**SMALL, "refused_only": False, "settle": False}), results,
                  judge=judge)
    # the pre-registry call (notebook 03's) still works, with a warning, and gives the same result
    with pytest.warns(DeprecationWarning, match="run_stage"):
        legacy = stage_layer_sweep(model, fast, {"_judge": judge, **results})
    assert legacy == a
    key = ("layer", "flip", "k", "n", "to_degenerate")
    assert [{k: r[k] for k in key} for r in a["layers"]] == [{k: r[k] for k in key} for r in b["layers"]]
    assert all(r["mcnemar_p"] is None for r in a["layers"])
    assert all(r["mcnemar_p"] is not None for r in b["layers"])


def test_every_stage_has_a_table(full_run):
    import pandas as pd

    from kvgeom.audit import stage_frame

    _, res = full_run
    for name in STAGE_ORDER:
        f = res.frame(name)
        assert isinstance(f, pd.DataFrame) and len(f), name
    sweep = res.frame("layer_sweep")
    assert list(sweep["layer"]) == [0, 1, 2, "all layers"]
    assert res.frame("outliers")["is_outlier"].sum() == len(res.audit["stages"]["outliers"]["channels"])
    assert set(res.frame("mitigation")["split"]) <= {"calibration", "held_out"}
    with pytest.raises(ValueError, match="unknown stage"):
        stage_frame("nope", {})
    with pytest.raises(KeyError, match="was not run"):
        res.frame("agreement")


def test_bars_label_each_stage(tmp_path, capsys):
    from ..conftest import get_tiny

    run_audit(AuditConfig(**SMALL), None, model=get_tiny("llama"), judge=ChecksumJudge(),
              stages=("baseline", "layer_sweep"), bars=True)
    err = capsys.readouterr().err
    assert "baseline" in err and "layer_sweep" in err and "row" in err


def test_cli_audit_bad_scheme_is_clear_before_any_work(tmp_path, capsys):
    from kvgeom.cli import main

    assert main(["audit", "--scheme", "int9-bogus", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "scheme" in err and "int9-bogus" in err
    assert not (tmp_path / "a" / "stages").exists()


def test_rows_run_once_are_reused_consistently(full_run):
    """PCR's per-tensor arm is the layer sweep's critical-layer row; the bit sweep's target point is the
    mitigation stage's uniform row: the numbers must agree exactly."""
    _, res = full_run
    st = res.audit["stages"]
    crit = st["pcr"]["layer"]
    row = next(r for r in st["layer_sweep"]["layers"] if r["layer"] == crit)
    assert st["pcr"]["flip_per_tensor"]["k"] == row["k"] and st["pcr"]["flip_per_tensor"]["n"] == row["n"]
    target = next(r for r in st["bit_sweep"]["rows"] if r["scheme"] == res.audit["scheme"])
    assert target["refusal"] == st["mitigation"]["reference"]["calibration"]["uniform"]["rate"]
    assert set(st["baseline"]["verdicts"]["calibration"]) == set(
        st["mitigation"]["reference"]["calibration"]["uniform_verdicts"])


def test_full_precision_candidate_reuses_the_baseline(tmp_path, monkeypatch):
    """A prescription that keeps every layer in full precision (``to_plan`` gives None; seen on a 32-layer
    model whose every layer was critical) is reported from the baseline's verdicts: no flips, no generation,
    no crash."""
    import kvgeom.mitigation as mit

    from ..conftest import get_tiny

    real = mit.prescribe

    def with_fp16_everywhere(*a, **k):
        cands = real(*a, **k)
        n = cands[0].n_layers
        return [*cands, mit.Candidate("fp16 everywhere", (None,) * n, "test", "kvgeom", 16.0)]

    monkeypatch.setattr(mit, "prescribe", with_fp16_everywhere)
    res = run_audit(AuditConfig(**SMALL), tmp_path, model=get_tiny("llama"), judge=ChecksumJudge(),
                    stages=("baseline", "layer_sweep", "outliers", "channel_ablation", "pcr", "label", "mitigation",
                            "export"))
    cand = next(c for c in res.audit["stages"]["mitigation"]["candidates"] if c["name"] == "fp16 everywhere")
    ref = res.audit["stages"]["mitigation"]["reference"]
    for split in ("calibration", "held_out"):
        r = cand["results"][split]
        assert r["flip"]["rate"] in (0.0, None) and "baseline" in r["note"]
        assert r["refusal"]["rate"] == ref[split]["full"]["rate"]
    assert res.audit["stages"]["export"]["assignment"]


def test_audit_json_follows_the_stages_schema_fragments(full_run):
    jsonschema = pytest.importorskip("jsonschema")
    from kvgeom.audit import audit_schema

    out, _ = full_run
    audit = json.loads((out / "audit.json").read_text())
    jsonschema.validate(audit, audit_schema())
    broken = {**audit, "stages": {**audit["stages"], "pcr": {"layer": "two"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, audit_schema())
