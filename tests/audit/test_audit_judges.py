"""An audit with several judges: every completion saved with each judge's verdict, the judges stage, the judge list
in audit.json and in the --resume check."""

from __future__ import annotations

import json

import pytest

from kvgeom.audit import AuditConfig, AuditError, run_audit
from kvgeom.judges.rows import load_rows
from kvgeom.testing import ChecksumJudge

SMALL = dict(model="tiny", n_calib=6, n_heldout=6, n_borderline=3, max_new_tokens=4, ppl_tokens=64, batch_size=32)
STAGES = ("baseline", "layer_sweep", "judges")


def test_several_judges(tmp_path):
    from ..conftest import get_tiny

    m = get_tiny("llama")
    judges = [ChecksumJudge(), "keyword", "keyword:phrases=jbb"]
    res = run_audit(AuditConfig(**SMALL), tmp_path, model=m, judge=judges, stages=STAGES)
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert [j["key"] for j in audit["judges"]] == ["checksum-test-judge", "keyword", "keyword:phrases=jbb"]
    assert audit["judge"]["name"] == "checksum-test-judge"
    rows = load_rows(tmp_path)
    assert set(rows["stage"]) == {"baseline", "layer_sweep"} and len(rows) == len(res.rows)
    assert (rows["verdict"] == rows["verdict:checksum-test-judge"]).all()  # the first judge decided
    assert {"calibration", "held_out", "borderline"} <= set(rows["split"])
    jd = audit["stages"]["judges"]
    assert [p["judge"] for p in jd["pairs"]] == ["keyword", "keyword:phrases=jbb"]
    assert "Would another judge agree?" in (tmp_path / "report.html").read_text()
    # resume: same judges accepted (rows read back), other judges refused
    again = run_audit(AuditConfig(**SMALL), tmp_path, model=m, judge=judges, stages=STAGES, resume=True)
    assert len(again.rows) == len(rows)
    with pytest.raises(AuditError, match="judged by the judges"):
        run_audit(AuditConfig(**SMALL), tmp_path, model=m, judge=judges[:2], stages=STAGES, resume=True)


def test_one_judge_skips_the_judges_stage(tmp_path):
    from ..conftest import get_tiny

    res = run_audit(AuditConfig(**SMALL), tmp_path, model=get_tiny("llama"), judge=ChecksumJudge(),
                    stages=("baseline", "judges"))
    assert res.audit["stages"]["judges"]["status"] == "skipped"
    assert len(load_rows(tmp_path)) == 15
