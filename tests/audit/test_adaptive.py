"""The adaptive mode (--until-stable, kvgeom.audit.adaptive): stops at the threshold, never draws a held-out
prompt, records its trajectory, and a resumed audit reuses the drawn calibration set."""

from __future__ import annotations

import pytest

import kvgeom.audit.adaptive as adaptive
from kvgeom.audit import AuditConfig, AuditError, run_audit, split_prompts
from kvgeom.audit.inputs import AuditInputs
from kvgeom.testing import ChecksumJudge

from .test_audit import SMALL, _strip


def test_pool_never_holds_a_held_out_or_calibration_prompt():
    cfg = AuditConfig()
    calib, held = split_prompts(cfg)
    pool = adaptive.calibration_pool(cfg, calib, held)
    assert not set(pool.ids) & set(held.ids) and not set(pool.ids) & set(calib.ids)
    assert not set(pool.prompts) & set(held.prompts)
    assert len(pool) == 170 - len(calib) - len(held)  # every other bundled harmful prompt


def test_grow_stops_at_the_threshold_and_records_the_trajectory(monkeypatch):
    cfg = AuditConfig(until_stable=True, grow_step=20)
    calib, held = split_prompts(cfg)
    inputs = AuditInputs(None, cfg, calib, held, calib, row_cache={})  # type: ignore[arg-type]
    seen = []

    def planted(inp):  # refuses every prompt; the label is stated once 60 prompts back it
        seen.append(list(inp.calibration.ids))
        n = len(inp.calibration)
        stated = n >= 60
        return {"label": {"label": "mixed" if stated else "undetermined", "point_label": "mixed",
                          "critical_layer": 3, "confidence": {"n_refused": n, "p_point": n / 75, "stated": stated,
                                                              "p_label": {"mixed": n / 75}}}}

    monkeypatch.setattr(adaptive, "_decide", planted)
    grown, rec = adaptive.grow_calibration(inputs)
    assert [len(s) for s in seen] == [20, 40, 60]
    assert rec["stopped"] == "stated" and len(grown.calibration) == 60
    assert [t["n_refused"] for t in rec["trajectory"]] == [20, 40, 60]
    assert not set(grown.calibration.ids) & set(held.ids)
    assert grown.calibration.ids[:20] == calib.ids and len(set(grown.calibration.ids)) == 60

    monkeypatch.setattr(adaptive, "_decide", lambda inp: {"label": {"label": "undetermined", "confidence": {
        "stated": False, "n_refused": len(inp.calibration)}}})
    _, rec = adaptive.grow_calibration(AuditInputs(None, AuditConfig(until_stable=True, max_calib=50), calib, held,
                                                   calib, row_cache={}))  # type: ignore[arg-type]
    assert rec["stopped"] == "prompt budget spent" and rec["trajectory"][-1]["n_calib"] == 50


def test_adaptive_audit_on_a_tiny_model_generates_each_row_once_and_resumes(tmp_path, monkeypatch):
    import kvgeom.audit.inputs as inputs_mod

    from ..conftest import get_tiny

    calls = []
    real = inputs_mod.evaluate

    def counting(model, prompts, plans, **kw):
        calls.extend((i, repr(p)) for i in prompts.ids for p in plans)
        return real(model, prompts, plans, **kw)

    monkeypatch.setattr(inputs_mod, "evaluate", counting)
    cfg = AuditConfig(**{**SMALL, "until_stable": True, "grow_step": 2, "max_calib": 10})
    res = run_audit(cfg, tmp_path, model=get_tiny("llama"), judge=ChecksumJudge(),
                    stages=("baseline", "layer_sweep", "pcr", "label"))
    rec = res.audit["calibration"]
    assert rec["trajectory"] and rec["stopped"] in ("stated", "prompt budget spent", "pool exhausted")
    assert len(rec["calibration_ids"]) == res.audit["stages"]["baseline"]["calibration"]["n"]
    assert len(calls) == len(set(calls)), "a (prompt, plan) row was generated twice"
    assert res.audit["stages"]["label"]["adaptive"]["n_calib"] == len(rec["calibration_ids"])
    assert (tmp_path / "stages" / "_calibration.json").is_file()
    assert "fig-trajectory" in (tmp_path / "report.html").read_text()
    _, held = split_prompts(cfg)
    assert not set(rec["calibration_ids"]) & set(held.ids)
    # resume: the same calibration set, the same audit
    (tmp_path / "stages" / "label.json").unlink()
    again = run_audit(cfg, tmp_path, model=get_tiny("llama"), judge=ChecksumJudge(), resume=True,
                      stages=("baseline", "layer_sweep", "pcr", "label"))
    assert _strip(again.audit)["stages"] == _strip(res.audit)["stages"]
    assert again.audit["calibration"]["calibration_ids"] == rec["calibration_ids"]
    assert again.audit["stages"]["label"]["label"] == res.audit["stages"]["label"]["label"]


def test_bad_budget_is_refused_before_work(tmp_path):
    with pytest.raises(AuditError, match="until-stable budget"):
        run_audit(AuditConfig(until_stable=True, max_calib=5), tmp_path)
    with pytest.raises(AuditError, match="--pool"):
        run_audit(AuditConfig(until_stable=True, pool=(str(tmp_path / "missing.txt"),)), tmp_path)
