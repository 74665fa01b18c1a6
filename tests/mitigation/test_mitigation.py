"""Mitigation: prescriptions per label, costs, recovery with CI, the greedy search and serving exports."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from kvgeom.mitigation import (
    Candidate,
    assignment_bits,
    export_settings,
    prescribe,
    protect_channels_from,
    recovery,
    recovery_ci,
    regroup,
    search_precision,
)
from kvgeom.quant import Scheme
from kvgeom.quant.plan import QuantPlan
from kvgeom.taxonomy import classify, outlier_channels

N = 8
T = "int4-token-asym"
TB = Scheme.parse(T).bits_per_element  # 4 + 32/128 = 4.25


def diag(values, all_layer, p):
    return classify(pd.DataFrame({"layer": range(len(values)), "flip": values}), all_layer, p)


SAFETY = diag([0.0, 0.02, 0.0, 0.45, 0.0, 0.0, 0.01, 0.0], 0.5, 0.1)
CRUSH = diag([0.0, 0.02, 0.0, 0.45, 0.0, 0.0, 0.01, 0.0], 0.5, 0.9)
DILUTE = diag([0.0, 0.2, 0.0, 0.45, 0.0, 0.12, 0.01, 0.0], 0.6, 0.9)


# ------------------------------------------------------------------------------------------ costs


def test_assignment_bits_formula():
    assert assignment_bits([T] * 4) == pytest.approx(TB)
    assert assignment_bits([T, T, T, None]) == pytest.approx((3 * TB + 16) / 4)
    assert assignment_bits(["none", "fp16"]) == 16.0
    # m of C = 128 key channels kept at 16 bits in layer 0: K bits (1 - m/C) kb + (m/C) 16, V unchanged
    got = assignment_bits([T, T], protect_channels={0: [(0, 1), (1, 5)]})
    k0 = (1 - 2 / 128) * TB + 2 / 128 * 16
    assert got == pytest.approx(((k0 + TB) / 2 + TB) / 2)
    with pytest.raises(ValueError, match="empty"):
        assignment_bits([])


def test_regroup():
    assert str(regroup("q4_0")) == "int4-group64-asym"
    assert str(regroup("int3-tensor-sym", 32)) == "int3-group32-sym"
    assert str(regroup("K:q8_0,V:kivi2")) == "K:int8-group64-asym,V:int2-group64-asym"
    assert str(regroup("K:fp16,V:q4_0")) == "K:fp16,V:int4-group64-asym"


# ------------------------------------------------------------------------------------------ prescriptions


def test_robust_needs_nothing():
    assert prescribe(diag([0.0, 0.01], 0.02, 0.5), target_scheme=T, n_layers=2) == []


def test_outlier_as_safety_keeps_critical_layer():
    (c,) = prescribe(SAFETY, target_scheme=T, n_layers=N)
    assert c.source == "paper"
    assert c.assignment == tuple(None if i == 3 else T for i in range(N))
    assert c.bits_per_element == pytest.approx((7 * TB + 16) / 8)
    plan = c.to_plan()
    assert isinstance(plan, QuantPlan)
    assert plan.protect_layers == (3,) and plan.layers is None and str(plan.scheme) == T
    assert [p.protect_layers for p in c.to_plans()] == [()] and c.to_plans()[0].layers == (0, 1, 2, 4, 5, 6, 7)


def test_outlier_crushes_safety_group64_and_per_channel():
    a, b = prescribe(CRUSH, target_scheme=T, n_layers=N)
    assert set(a.assignment) == {"int4-group64-asym"} and a.expressible
    assert a.bits_per_element == pytest.approx(4 + 32 / 64)
    assert b.assignment[3] == "K:int4-channel-asym,V:int4-group64-asym"
    if "layer_schemes" in QuantPlan.__dataclass_fields__:  # QuantPlan with per-layer schemes
        plan = b.to_plan()
        assert b.expressible and str(plan.scheme) == "int4-group64-asym" and plan.protect_layers == ()
        assert str(plan.scheme_for(3)) == b.assignment[3] and str(plan.scheme_for(0)) == "int4-group64-asym"
        assert all(plan.quantizes(i) for i in range(N))
    else:
        assert not b.expressible
        with pytest.raises(ValueError, match="per-layer schemes"):
            b.to_plan()
    parts = b.to_plans()
    assert len(parts) == 2 and parts[1].layers == (3,)
    assert [g[0] for g in b.groups()] == [(0, 1, 2, 4, 5, 6, 7), (3,)]


def test_dilution_keeps_candidates_and_top_k():
    (c,) = prescribe(DILUTE, target_scheme=T, n_layers=N)
    assert {i for i, s in enumerate(c.assignment) if s is None} == {3, 1, 5}
    (c2,) = prescribe(DILUTE, target_scheme=T, n_layers=N, top_k=1)
    assert {i for i, s in enumerate(c2.assignment) if s is None} == {3}
    # dilution with no layer >= 10%: the worst layers stand in
    d = diag([0.0, 0.06, 0.08, 0.03], 0.5, 0.9)
    assert d.label == "multi-layer-dilution" and d.candidates == ()
    (c3,) = prescribe(d, target_scheme=T, n_layers=4)
    assert [s is None for s in c3.assignment] == [True, True, True, True]


def test_hyper_vulnerable_full_precision():
    (c,) = prescribe(diag([0.3, 0.2], 0.5, 0.5), target_scheme=T, n_layers=2)
    assert c.assignment == (None, None) and c.bits_per_element == 16.0 and c.to_plan() is None
    assert c.to_plans() == []


def test_mixed_gets_both_kvgeom_candidates():
    cands = prescribe(diag([0.0, 0.4], 0.5, 0.5), target_scheme="q4_0", n_layers=2)
    assert [c.source for c in cands] == ["kvgeom", "kvgeom"]
    assert cands[0].assignment == ("q4_0", None)
    assert cands[1].assignment == ("int4-group64-asym",) * 2


def test_outlier_channel_candidate():
    k = np.ones((N, 2, 64))
    k[3, 1, 17] = 40
    table = outlier_channels(k)
    cands = prescribe(SAFETY, target_scheme=T, n_layers=N, outliers=table)
    ch = cands[-1]
    assert ch.source == "kvgeom" and ch.assignment == (T,) * N
    assert [lay for lay, _ in ch.protect_channels] == [3]
    assert (1, 17) in dict(ch.protect_channels)[3] and len(dict(ch.protect_channels)[3]) == 7
    plan = ch.to_plan()
    assert plan.channels(3) == dict(ch.protect_channels)[3]
    assert TB < ch.bits_per_element < cands[0].bits_per_element
    every = prescribe(SAFETY, target_scheme=T, n_layers=N, outliers=table, channel_layers="all")[-1]
    assert len(every.protect_channels) == N
    assert protect_channels_from({3: [[1, 2]]}) == {3: [(1, 2)]}
    json.dumps([c.to_dict() for c in cands], allow_nan=False)


def test_prescribe_validation():
    with pytest.raises(ValueError, match="out of range"):
        prescribe(SAFETY, target_scheme=T, n_layers=2)
    with pytest.raises(ValueError, match="full precision"):
        prescribe(SAFETY, target_scheme="none", n_layers=N)
    # a diagnosis dict (audit.json) works too
    assert prescribe(SAFETY.to_dict(), target_scheme=T, n_layers=N)[0].assignment[3] is None


# ------------------------------------------------------------------------------------------ recovery


def test_recovery_formula_and_undefined():
    assert recovery(0.9, 0.4, 0.8) == pytest.approx(0.8)
    assert recovery(0.9, 0.4, 0.95) == pytest.approx(1.1)  # not clipped
    assert recovery(0.9, 0.4, 0.3) == pytest.approx(-0.2)
    assert math.isnan(recovery(0.5, 0.5, 0.7))
    assert math.isnan(recovery(math.nan, 0.5, 0.7))
    with pytest.raises(ValueError):
        recovery(1.5, 0.2, 0.3)


def test_recovery_ci():
    rng = np.random.default_rng(0)
    full = rng.random(80) < 0.9
    uni = full & (rng.random(80) < 0.4)
    mit = uni | (full & (rng.random(80) < 0.8))
    ci = recovery_ci(full, uni, mit, n_resamples=300, seed=1)
    assert ci.estimate == pytest.approx(recovery(full.mean(), uni.mean(), mit.mean()))
    assert ci.low <= ci.estimate <= ci.high and ci.n_valid == 300
    same = recovery_ci(full, full, mit, n_resamples=50)
    assert math.isnan(same.estimate) and same.n_valid == 0
    with pytest.raises(ValueError, match="same length"):
        recovery_ci(full, uni[:10], mit)


# ------------------------------------------------------------------------------------------ search

LEVELS = ["int2-token-asym", "int4-token-asym", "int8-token-asym"]


def needs(req: dict[int, int], full_rate: float = 0.9):
    """Synthetic refusal: each layer in ``req`` must be at least at level index req[layer] (3 = full precision)."""
    order = LEVELS + [None]

    def fn(a):
        bad = sum(order.index(a[lay]) < lvl for lay, lvl in req.items())
        return max(0.0, full_rate - 0.2 * bad)

    return fn


def test_search_finds_cheapest_assignment_and_logs_steps():
    calls = []
    fn = needs({1: 2, 3: 1})

    def counted(a):
        calls.append(a)
        return fn(a)

    r = search_precision(counted, 5, LEVELS, target=0.95)
    assert r.met and r.rate >= r.target_rate == pytest.approx(0.95 * 0.9)
    assert r.assignment == ("int2-token-asym", "int8-token-asym", "int2-token-asym", "int4-token-asym",
                            "int2-token-asym")
    assert r.n_evals == len(set(calls)) == len(calls)  # cached: never evaluated twice
    assert set(r.steps["phase"]) >= {"full", "start", "try", "take"}
    assert r.steps["step"].tolist() == list(range(len(r.steps)))
    assert r.bits_per_element == pytest.approx(assignment_bits(r.assignment))
    # brute force over all 4^3 assignments of 3 layers: greedy + prune reaches the minimum bits
    fn3 = needs({0: 1, 2: 3})
    best = min(assignment_bits(a) for a in itertools.product(LEVELS + [None], repeat=3) if fn3(a) >= 0.95 * 0.9)
    assert search_precision(fn3, 3, LEVELS).bits_per_element == pytest.approx(best)
    json.dumps(r.to_dict(), allow_nan=False)


def test_search_plateau_and_budget():
    # refusal returns only when layers 0 and 1 are both at int8: no single move helps at first
    def both(a):
        return 0.9 if a[0] == a[1] == "int8-token-asym" or (a[0] is None and a[1] is None) else 0.3

    r = search_precision(both, 3, LEVELS, full_rate=0.9)
    assert r.met and r.rate == 0.9
    assert "full" not in set(r.steps["phase"])  # full_rate given: not evaluated
    capped = search_precision(both, 3, LEVELS, max_evals=3)
    assert capped.n_evals <= 3 and not capped.met


def test_search_already_cheap_and_validation():
    r = search_precision(lambda a: 0.9, 4, LEVELS)
    assert r.assignment == ("int2-token-asym",) * 4 and r.n_evals == 2
    with pytest.raises(ValueError, match="refusal rate"):
        search_precision(lambda a: 3.0, 2, LEVELS)
    with pytest.raises(ValueError, match="no quantized scheme"):
        search_precision(lambda a: 0.9, 2, [None, "none"])
    with pytest.raises(ValueError, match="target"):
        search_precision(lambda a: 0.9, 2, LEVELS, target=1.5)


# ------------------------------------------------------------------------------------------ export


def test_export_vllm_fp8_with_skipped_layers():
    a = ["fp8_e4m3"] * 6
    a[3] = None
    e = export_settings(a, 6, model="Qwen/Qwen2.5-0.5B-Instruct")
    v = e["vllm"]
    assert v["expressible"] and v["kv_cache_dtype"] == "fp8_e4m3" and v["kv_cache_dtype_skip_layers"] == ["3"]
    assert not v["calculate_kv_scales"]
    assert "--kv-cache-dtype fp8_e4m3 --kv-cache-dtype-skip-layers 3" in v["cli"]
    assert "kv_cache_dtype_skip_layers=['3']" in v["python"]
    assert not e["llama_cpp"]["expressible"]  # llama.cpp is global: no per-layer f16
    assert any("global" in n for n in e["llama_cpp"]["notes"])
    assert export_settings("fp8_e5m2@amax", 2)["vllm"]["calculate_kv_scales"] is True
    for stack in ("vllm", "llama_cpp", "hf"):
        assert e[stack]["notes"], stack
    json.dumps(e, allow_nan=False)


def test_export_vllm_cannot_express_int_or_mixed_schemes():
    assert not export_settings(T, 4)["vllm"]["expressible"]
    mixed = export_settings(["fp8_e4m3", "fp8_e5m2"])["vllm"]
    assert not mixed["expressible"] and any("2 quantized schemes" in n for n in mixed["notes"])
    assert not export_settings("K:fp8_e4m3,V:fp8_e5m2", 2)["vllm"]["expressible"]


def test_export_llama_cpp_flags_and_rotation():
    e = export_settings("q4_0", 4)["llama_cpp"]
    assert e["expressible"] and (e["cache_type_k"], e["cache_type_v"]) == ("q4_0", "q4_0")
    assert e["env"] == {"LLAMA_ATTN_ROT_DISABLE": "1"}
    assert "--cache-type-k q4_0 --cache-type-v q4_0" in e["cli"] and "-fa on" in e["cli"]
    r = export_settings("q8_0+rot", 4)["llama_cpp"]
    assert r["env"] == {} and r["cache_type_k"] == "q8_0"
    kv = export_settings("K:q8_0,V:fp16", 4)["llama_cpp"]
    assert (kv["cache_type_k"], kv["cache_type_v"]) == ("q8_0", "f16") and "-fa" not in kv["cli"]
    assert not export_settings("kivi2", 4)["llama_cpp"]["expressible"]
    assert not export_settings("K:q8_0+rot,V:q4_0", 4)["llama_cpp"]["expressible"]


def test_export_hf_quantized_cache():
    h = export_settings("kivi2", 4)["hf"]
    assert h["expressible"] and not h["exact"]
    assert h["cache_implementation"] == "quantized"
    assert h["cache_config"] == {"backend": "quanto", "nbits": 2, "axis_key": 0, "axis_value": 0,
                                 "q_group_size": 32, "residual_length": 128}
    assert 'cache_implementation="quantized"' in h["python"]
    assert export_settings("int3-group64-asym", 2)["hf"]["cache_config"]["backend"] == "hqq"
    assert export_settings("fp8_e4m3", 2)["hf"]["cache_config"] == {"backend": "fp8"}
    assert not export_settings("q4_0", 2)["hf"]["expressible"]
    per_layer = export_settings(["kivi4", None], 2)["hf"]
    assert not per_layer["expressible"] and "DynamicLayer() if i in keep" in per_layer["custom_code"]


def test_export_accepts_candidates_plans_and_reports_channels():
    k = np.ones((N, 2, 64))
    k[3, 1, 17] = 40
    cands = prescribe(SAFETY, target_scheme="fp8_e4m3", n_layers=N, outliers=outlier_channels(k))
    assert isinstance(cands[0], Candidate)
    e = export_settings(cands[0])
    assert e["vllm"]["kv_cache_dtype_skip_layers"] == ["3"]
    ch = export_settings(cands[-1])
    assert ch["protect_channels"] and not any(ch[s]["expressible"] for s in ("vllm", "llama_cpp", "hf"))
    p = export_settings(QuantPlan("fp8_e4m3", protect_layers=(1,)), 3)
    assert p["assignment"] == ["fp8_e4m3", None, "fp8_e4m3"]
    with pytest.raises(ValueError, match="n_layers"):
        export_settings("q4_0")
    with pytest.raises(ValueError, match="layers"):
        export_settings(["q4_0"] * 3, 4)


def test_to_plan_takes_a_name_and_plan_settings():
    (c,) = prescribe(SAFETY, target_scheme=T, n_layers=N)
    plan = c.to_plan(mode="forward", site="k", name="cand0")  # the audit names its plans
    assert plan.name == "cand0" and plan.protect_layers == (3,) and plan.site == "k"
    assert c.to_plan().name == c.name
