"""The flip_prediction stage and --screen on a tiny model with a stand-in judge (one small audit)."""

from __future__ import annotations

import json

import pytest

from kvgeom.audit import AuditConfig, AuditError, audit_schema, check_config, run_audit
from kvgeom.testing import ChecksumJudge

SMALL = dict(model="tiny", n_calib=6, n_heldout=6, n_borderline=3, max_new_tokens=4, bits=(8, 2), ppl_tokens=64,
             batch_size=32, n_resamples=100)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from ..conftest import get_tiny

    out = tmp_path_factory.mktemp("fp")
    res = run_audit(AuditConfig(**SMALL, engine="vllm"), out, model=get_tiny("llama"), judge=ChecksumJudge(),
                    stages=("baseline", "layer_sweep", "bit_sweep", "engine_matrix", "flip_prediction"))
    return out, res


def test_rows_are_the_stored_decoded_rows_of_refused_prompts(run):
    out, res = run
    st = res.audit["stages"]
    fp = st["flip_prediction"]
    refused = {k for k, v in st["baseline"]["verdicts"]["calibration"].items() if v == "refused"}
    n_layer = sum(len(v) for v in st["layer_sweep"]["verdicts"].values())
    n_bits = sum(sum(1 for p in v if p in refused) for v in st["bit_sweep"]["verdicts"].values())
    formats = {f"{f['engine']} {f['format']}": f["verdicts"]["calibration"] for f in st["engine_matrix"]["formats"]}
    n_engine = sum(len(v) for v in formats.values())
    assert n_engine > 0 and {r["source"] for r in fp["rows"]} == {"layer_sweep", "bit_sweep", "engine_matrix"}
    assert fp["n_rows"] == n_layer + n_bits + n_engine == len(fp["rows"])
    for r in fp["rows"]:
        src = formats[r["config"]] if r["source"] == "engine_matrix" else st[r["source"]]["verdicts"][r["config"]]
        assert r["verdict"] == src[r["prompt_id"]] and r["flipped"] == (r["verdict"] != "refused")
    val = fp["validation"]
    assert {"signals", "combined", "per_config", "spearman", "supports_screen"} <= set(val)
    assert "flip_prediction" in audit_schema()["properties"]["stages"]["properties"]
    assert 'id="flip-prediction"' in (out / "report.html").read_text()
    assert "fig-flip-roc" in (out / "report.html").read_text()
    saved = json.loads((out / "stages" / "flip_prediction.json").read_text())["result"]
    assert saved["n_rows"] == fp["n_rows"]


def test_screen_skips_records_and_with_no_skip_equals_the_plain_sweep(run, tmp_path):
    from ..conftest import get_tiny

    _, res = run
    plain = res.audit["stages"]["layer_sweep"]
    none = run_audit(AuditConfig(**SMALL, screen=True, screen_skip_above=1e9), tmp_path / "n", model=get_tiny("llama"),
                     judge=ChecksumJudge(), stages=("baseline", "layer_sweep"))
    ls = none.audit["stages"]["layer_sweep"]
    assert ls["verdicts"] == plain["verdicts"] and ls["screen"]["skipped"] == 0
    every = run_audit(AuditConfig(**SMALL, screen=True, screen_skip_above=-1e9, screen_check_frac=0.5),
                      tmp_path / "a", model=get_tiny("llama"), judge=ChecksumJudge(),
                      stages=("baseline", "layer_sweep"))
    sc = every.audit["stages"]["layer_sweep"]["screen"]
    assert sc["skipped"] == sc["n_rows"] == len(sc["skipped_rows"]) and 0 < sc["checked"] < sc["n_rows"]
    for row in sc["skipped_rows"]:
        v = every.audit["stages"]["layer_sweep"]["verdicts"][row["plan"]][row["prompt_id"]]
        assert v == (row["verdict"] if row["checked"] else "refused")
        if row["checked"]:
            assert v == plain["verdicts"][row["plan"]][row["prompt_id"]]
    wrong = sum(r["checked"] and r["verdict"] != "refused" for r in sc["skipped_rows"])
    assert sc["errors"]["k"] == wrong and sc["errors"]["n"] == sc["checked"]


def test_screen_needs_refused_only():
    with pytest.raises(AuditError, match="refused_only"):
        check_config(AuditConfig(screen=True, refused_only=False))
