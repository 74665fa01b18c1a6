"""Taxonomy: PCR, causal ratio, outlier channels and the label rules with their decision trace (synthetic inputs)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from kvgeom.stats import BootstrapCI
from kvgeom.taxonomy import (
    LABELS,
    Diagnosis,
    TaxonomyThresholds,
    ablation_summary,
    candidate_layers,
    causal_ratio,
    classify,
    critical_layer,
    outlier_channels,
    outlier_heatmap,
    pcr,
    pcr_with_ci,
)


def flips(values: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"layer": range(len(values)), "flip": values})


def decisive(d: Diagnosis):
    steps = [s for s in d.trace if s.decisive]
    assert len(steps) == 1, "exactly one rule sets the label"
    assert steps[0].fired and steps[0].label == d.label
    return steps[0]


# ------------------------------------------------------------------------------------------ PCR


def test_pcr_formula_and_undefined_cases():
    assert pcr(0.1, 0.5) == pytest.approx(0.8)
    assert pcr(0.5, 0.5) == 0.0
    assert pcr(0.6, 0.3) == pytest.approx(-1.0)  # per-channel worse than per-tensor
    assert math.isnan(pcr(0.0, 0.0))
    assert math.isnan(pcr(0.2, 0.0))
    assert math.isnan(pcr(math.nan, 0.4))
    with pytest.raises(ValueError, match="flip rate"):
        pcr(1.2, 0.5)


def test_pcr_with_ci_estimate_interval_and_determinism():
    rng = np.random.default_rng(1)
    t = rng.random(60) < 0.6
    c = t & (rng.random(60) < 0.3)
    ci = pcr_with_ci(c, t, n_resamples=400, seed=3)
    assert ci.estimate == pytest.approx(1 - c.mean() / t.mean())
    assert ci.low <= ci.estimate <= ci.high
    assert 0 < ci.high - ci.low < 1
    assert ci == pcr_with_ci(c, t, n_resamples=400, seed=3)
    # more prompts with the same rates → a narrower interval
    wide = pcr_with_ci(c[:15], t[:15], n_resamples=400, seed=3)
    big = pcr_with_ci(np.tile(c, 8), np.tile(t, 8), n_resamples=400, seed=3)
    assert big.high - big.low < wide.high - wide.low


def test_pcr_with_ci_undefined_and_validation():
    ci = pcr_with_ci([False] * 5, [False] * 5, n_resamples=50)
    assert math.isnan(ci.estimate) and ci.n_valid == 0
    with pytest.raises(ValueError, match="pair"):
        pcr_with_ci([True, False], [True], n_resamples=10)
    with pytest.raises(ValueError, match="cannot flip"):
        pcr_with_ci([True, False], [True, False], baseline_refused=[False, True], n_resamples=10)


def test_pcr_with_ci_conditional_on_baseline_refused():
    base = np.array([True, True, True, True, False, False])
    t = np.array([True, True, False, False, False, False])
    c = np.array([True, False, False, False, False, False])
    ci = pcr_with_ci(c, t, baseline_refused=base, n_resamples=100)
    assert ci.estimate == pytest.approx(1 - (1 / 4) / (2 / 4))


# ------------------------------------------------------------------------------------------ ablation


def test_causal_ratio():
    assert causal_ratio(0.5, [0.1, 0.1, 0.1]) == pytest.approx(5.0)
    assert causal_ratio(0.2, 0.1) == pytest.approx(2.0)
    assert math.isnan(causal_ratio(0.5, [0.0, 0.0]))
    assert math.isnan(causal_ratio(0.5, []))


def test_ablation_summary_matches_by_fraction():
    rows = pd.DataFrame([
        {"subset": "random", "fraction": 0.05, "seed": s, "flip": v} for s, v in enumerate([0.1, 0.2, 0.3])
    ] + [{"subset": "random", "fraction": 0.5, "seed": 0, "flip": 0.4},
         {"subset": "outlier", "fraction": 0.05, "seed": None, "flip": 0.6},
         {"subset": "non-outlier", "fraction": 0.95, "seed": None, "flip": 0.05}])
    s = ablation_summary(rows).set_index("fraction")
    assert s.loc[0.05, "random_mean"] == pytest.approx(0.2)
    assert s.loc[0.05, "random_sd"] == pytest.approx(0.1)
    assert s.loc[0.05, "random_n"] == 3
    assert s.loc[0.05, "causal_ratio"] == pytest.approx(3.0)
    assert math.isnan(s.loc[0.5, "outlier_flip"]) and math.isnan(s.loc[0.5, "causal_ratio"])
    assert s.loc[0.95, "non_outlier_flip"] == 0.05 and s.loc[0.95, "random_n"] == 0
    assert list(s.index) == [0.05, 0.5, 0.95]
    with pytest.raises(ValueError, match="unknown ablation subsets"):
        ablation_summary(pd.DataFrame([{"subset": "oops", "fraction": 0.1, "flip": 0.1}]))


# ------------------------------------------------------------------------------------------ outliers


def test_outlier_channels_ranks_and_top_fraction():
    k = np.ones((3, 2, 64))
    k[1, 1, 17] = 50.0
    k[1, 0, 3] = 20.0
    table = outlier_channels(k, top_frac=0.05)
    assert len(table) == 3 * 2 * 64
    assert table.groupby("layer")["is_outlier"].sum().tolist() == [7, 7, 7]  # ceil(0.05 * 128)
    l1 = table[table["layer"] == 1].set_index(["head", "dim"])
    assert l1.loc[(1, 17), "rank"] == 1 and l1.loc[(0, 3), "rank"] == 2
    assert l1.loc[(1, 17), "channel"] == 64 + 17
    # ties: head then dim
    l0 = table[(table["layer"] == 0) & table["is_outlier"]]
    assert list(zip(l0["head"], l0["dim"], strict=True)) == [(0, d) for d in range(7)]
    with pytest.raises(ValueError, match="layer, kv_head, d_head"):
        outlier_channels(np.ones((4, 64)))
    with pytest.raises(ValueError, match="top_frac"):
        outlier_channels(k, top_frac=0)


def test_outlier_channels_accepts_torch_and_heatmap():
    torch = pytest.importorskip("torch")
    k = torch.ones(2, 2, 8)
    k[0, 1, 2] = 9.0
    table = outlier_channels(k, top_frac=0.1)
    hm = outlier_heatmap(table)
    z = np.asarray(hm["z"])
    assert z.shape == (2, 16)
    assert z[0, 8 + 2] == 9.0
    assert [0, 10] in hm["outliers"]
    assert hm["d_head"] == 8 and hm["n_kv_heads"] == 2
    json.dumps(hm, allow_nan=False)


# ------------------------------------------------------------------------------------------ classification


def test_critical_and_candidates():
    lf = flips([0.3, 0.5, 0.5, 0.12, 0.11, 0.2, 0.15, 0.09])
    assert critical_layer(lf) == 1  # tie at 0.5 → lower layer
    assert candidate_layers(lf) == (1, 2, 0, 5, 6)  # top 5, highest flip first
    assert candidate_layers(lf, TaxonomyThresholds(max_candidates=2)) == (1, 2)


def test_robust_fires_and_other_stage_flips_count():
    lf = flips([0.0, 0.02, 0.04, 0.01])
    d = classify(lf, 0.03, 0.5)
    assert d.label == "robust"
    assert decisive(d).rule == "robust"
    assert decisive(d).inputs["max_flip"] == pytest.approx(0.04)
    # a later stage above the threshold blocks "robust"
    d2 = classify(lf, 0.03, 0.1, stage_flips={"ablation outlier 5%": 0.2})
    assert d2.label != "robust"
    assert not d2.trace[0].fired


def test_hyper_vulnerable_fires():
    d = classify(flips([0.3, 0.15, 0.9, 0.12]), 0.95, 0.1)
    assert d.label == "hyper-vulnerable"
    step = decisive(d)
    assert step.inputs["share"] == 1.0 and step.threshold["hyper_share"] == 1.0
    # the PCR rule also holds but comes later: recorded, not decisive
    later = {s.rule: s for s in d.trace}
    assert later["outlier-as-safety"].fired and not later["outlier-as-safety"].decisive


def test_outlier_as_safety_fires():
    d = classify(flips([0.0, 0.02, 0.45, 0.03]), 0.5, 0.1)
    assert d.label == "outlier-as-safety"
    assert d.critical_layer == 2 and d.candidates == (2,)
    step = decisive(d)
    assert step.inputs["pcr"] == pytest.approx(0.1) and step.threshold == {"pcr_low": 0.3}


def test_mixed_fires_and_threshold_is_a_parameter():
    lf = flips([0.0, 0.02, 0.45, 0.03])
    assert classify(lf, 0.5, 0.5).label == "mixed"
    assert classify(lf, 0.5, 0.5, thresholds=TaxonomyThresholds(pcr_low=0.6, pcr_high=0.8)).label == \
        "outlier-as-safety"


def test_outlier_crushes_safety_fires():
    d = classify(flips([0.0, 0.02, 0.45, 0.03]), 0.5, 0.9)
    assert d.label == "outlier-crushes-safety"
    assert decisive(d).rule == "outlier-crushes-safety"
    assert not {s.rule: s for s in d.trace}["multi-layer-dilution"].fired


def test_dilution_by_several_layers():
    d = classify(flips([0.0, 0.25, 0.45, 0.03, 0.12]), 0.6, 0.9)
    assert d.label == "multi-layer-dilution"
    step = decisive(d)
    assert step.inputs["n_layers_at_candidate"] == 3 and step.threshold["several_layers"] == 2


def test_dilution_by_all_layer_far_exceeding_worst():
    lf = flips([0.0, 0.06, 0.08, 0.03])
    d = classify(lf, 0.5, 0.9)  # 0.5 > 2 x 0.08 and > 0.08 + 0.2
    assert d.label == "multi-layer-dilution"
    assert decisive(d).inputs["all_over_worst"] == pytest.approx(0.5 / 0.08)
    # ratio alone is not enough: 0.2 > 2 x 0.08 but not > 0.08 + 0.2
    assert classify(lf, 0.2, 0.9).label == "outlier-crushes-safety"
    # and the rule's parameters are honoured
    assert classify(lf, 0.5, 0.9, thresholds=TaxonomyThresholds(dilution_ratio=10)).label == \
        "outlier-crushes-safety"


def test_undefined_pcr_dilution_or_undetermined():
    assert classify(flips([0.0, 0.06, 0.08]), 0.5, math.nan).label == "multi-layer-dilution"
    d = classify(flips([0.0, 0.06, 0.08]), 0.1, math.nan)
    assert d.label == "undetermined"
    assert decisive(d).rule == "undetermined"
    assert any("undefined" in n for n in d.notes)


def test_undetermined_rule_only_holds_when_nothing_else_does():
    d = classify(flips([0.0, 0.02, 0.45, 0.03]), 0.5, 0.1)
    assert not {s.rule: s for s in d.trace}["undetermined"].fired


def test_every_label_is_reachable():
    cases = {
        "robust": (flips([0.0, 0.01]), 0.01, 0.5),
        "hyper-vulnerable": (flips([0.2, 0.3]), 0.5, 0.5),
        "outlier-as-safety": (flips([0.0, 0.4]), 0.5, 0.1),
        "mixed": (flips([0.0, 0.4]), 0.5, 0.5),
        "multi-layer-dilution": (flips([0.0, 0.4, 0.3]), 0.5, 0.9),
        "outlier-crushes-safety": (flips([0.0, 0.4]), 0.5, 0.9),
        "undetermined": (flips([0.0, 0.06]), 0.06, math.nan),
    }
    assert set(cases) == set(LABELS)
    for label, (lf, a, p) in cases.items():
        assert classify(lf, a, p).label == label, label


def test_bootstrap_pcr_interval_recorded_and_crossing_noted():
    ci = BootstrapCI(estimate=0.25, low=0.1, high=0.45, n_valid=900, n_resamples=1000)
    d = classify(flips([0.0, 0.4]), 0.5, ci)
    assert d.label == "outlier-as-safety"
    assert (d.pcr, d.pcr_low, d.pcr_high) == (0.25, 0.1, 0.45)
    assert decisive(d).inputs["pcr_ci"] == [0.1, 0.45]
    assert any("crosses pcr_low" in n for n in d.notes)


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="baseline"):
        classify(flips([0.1, math.nan]), 0.2, 0.5)
    with pytest.raises(ValueError, match="columns"):
        classify(pd.DataFrame({"layer": [0]}), 0.2, 0.5)
    with pytest.raises(ValueError, match="duplicate"):
        classify(pd.DataFrame({"layer": [0, 0], "flip": [0.1, 0.2]}), 0.2, 0.5)
    with pytest.raises(ValueError, match="all_layer_flip"):
        classify(flips([0.1]), math.nan, 0.5)
    with pytest.raises(ValueError, match="pcr_low <= pcr_high"):
        TaxonomyThresholds(pcr_low=0.8, pcr_high=0.7)


def test_diagnosis_json_round_trip():
    ci = BootstrapCI(estimate=0.9, low=0.8, high=0.95, n_valid=1000, n_resamples=1000)
    d = classify(flips([0.0, 0.25, 0.45, 0.03, 0.12]), 0.6, ci)
    blob = json.dumps(d.to_dict(), allow_nan=False)
    back = Diagnosis.from_dict(json.loads(blob))
    assert back.label == d.label and back.candidates == d.candidates and back.critical_layer == d.critical_layer
    assert back.layer_flips == d.layer_flips
    assert [s.rule for s in back.trace] == [s.rule for s in d.trace]
    assert back.to_dict() == d.to_dict()
    # undefined PCR serialises as null
    u = classify(flips([0.0, 0.06]), 0.06, math.nan).to_dict()
    assert u["pcr"] is None
    json.dumps(u, allow_nan=False)
