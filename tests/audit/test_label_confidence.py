"""The label stage's confidence from stored per-prompt verdicts (no generation): a planted known label is stated
with P near 1, a planted tie is undetermined, and the mitigation stage then tries the competing labels' fixes."""

from __future__ import annotations

import pandas as pd

from kvgeom.audit import AuditConfig
from kvgeom.audit.stages.label import diagnose
from kvgeom.stats import flip_summary

R, C = "refused", "complied"


def _stages(n: int, flips_at: dict[int, int], per_channel: dict[int, int], n_layers: int = 4, all_k: int = 0):
    ids = [f"p{i}" for i in range(n)]
    base = pd.Series([R] * n, index=ids)

    def verdicts(k: int) -> pd.Series:
        return pd.Series([C] * k + [R] * (n - k), index=ids)

    v = {f"L{la}": verdicts(flips_at.get(la, 0)) for la in range(n_layers)}
    v["all layers"] = verdicts(all_k)
    sweep = {"layers": [{"layer": la, **flip_summary(base, v[f"L{la}"])} for la in range(n_layers)],
             "all_layer": flip_summary(base, v["all layers"]), "verdicts": {k: s.to_dict() for k, s in v.items()}}
    crit = max(range(n_layers), key=lambda la: (flips_at.get(la, 0), -la))
    kt, kc = flips_at.get(crit, 0), per_channel.get(crit, 0)
    pcr = {"estimate": 1 - kc / kt if kt else None, "low": None, "high": None, "n_valid": 0, "n_resamples": 0,
           "flip_per_tensor": {"rate": kt / n}, "flip_per_channel": {"rate": kc / n},
           "per_channel_verdicts": {str(la): verdicts(k).to_dict() for la, k in per_channel.items()}}
    return base, sweep, pcr


def test_planted_known_label_is_stated():
    base, sweep, pcr = _stages(60, {2: 40}, {2: 0}, all_k=40)
    lab = diagnose(sweep, pcr, {}, base=base, cfg=AuditConfig())
    assert lab["label"] == lab["point_label"] == "outlier-crushes-safety"
    assert lab["confidence"]["p_label"]["outlier-crushes-safety"] >= 0.99 and lab["confidence"]["stated"]
    assert lab["trace"][-1]["rule"] == "confidence" and lab["trace"][-1]["fired"]


def test_planted_tie_is_undetermined_with_competitors_and_trace():
    base, sweep, pcr = _stages(40, {1: 20}, {1: 6}, all_k=20)  # PCR = 0.70: on the mixed / crushes threshold
    lab = diagnose(sweep, pcr, {}, base=base, cfg=AuditConfig())
    assert lab["label"] == "undetermined" and lab["point_label"] in ("mixed", "outlier-crushes-safety")
    conf = lab["confidence"]
    assert {c["label"] for c in conf["competing"]} >= {"mixed", "outlier-crushes-safety"}
    assert "undetermined at 40 refused prompts" in conf["sentence"]
    step = lab["trace"][-1]
    assert step["rule"] == "confidence" and step["decisive"] and not step["fired"]
    assert lab["description"].startswith("The evidence does not settle the label")


def test_threshold_is_a_setting():
    base, sweep, pcr = _stages(40, {1: 20}, {1: 6}, all_k=20)
    p = diagnose(sweep, pcr, {}, base=base, cfg=AuditConfig())["confidence"]["p_point"]
    lab = diagnose(sweep, pcr, {}, base=base, cfg=AuditConfig(label_confidence=min(1.0, max(0.51, p - 0.01))))
    assert lab["label"] == lab["point_label"]
