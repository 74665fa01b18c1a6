"""Stage ``agreement`` (opt-in, ``kvgeom audit --agreement``): label and PCR from the held-out prompts (their own
layer sweep, critical layer and PCR) against those from the calibration prompts, each with its bootstrap confidence
(the same machinery, :func:`kvgeom.audit.stages.label.with_confidence`): does the paper's 20-prompt calibration
suffice? Channel ablation is not repeated, so the held-out label's robustness rule sees the sweep and
PCR flips only. Proved by ``tests/audit/test_audit.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from kvgeom.judges import Verdict
from kvgeom.viz.markup import esc, fmt_ci, html_table

from ..inputs import AuditInputs
from ..schema import obj
from ..stage import Section, Stage, StageResults, register_stage
from .baseline import baseline_verdicts
from .label import diagnose
from .layer_sweep import layer_sweep
from .pcr import pcr_at, pcr_layers

_BRIEF = ("label", "point_label", "pcr", "pcr_low", "pcr_high", "critical_layer", "candidates", "worst_layer_flip",
          "all_layer_flip")


def run(inputs: AuditInputs, results: StageResults) -> dict:
    base = baseline_verdicts(results["baseline"], "held_out")
    if not (base == Verdict.REFUSED.value).any():
        return {"status": "skipped", "reason": "no held-out prompt refused at full precision"}
    sweep = layer_sweep(inputs, inputs.held_out, base, stage="agreement")
    layer, extra, p_crit = pcr_layers(inputs, base, sweep)
    pcr = pcr_at(inputs, inputs.held_out, base, layer, sweep, stage="agreement", extra_layers=extra,
                 p_critical=p_crit)
    held_label = diagnose(sweep, pcr, {}, base=base, cfg=inputs.cfg)
    cal = {k: results["label"].get(k) for k in _BRIEF}
    hel = {k: held_label.get(k) for k in _BRIEF}
    p_cal = (results["label"].get("confidence") or {}).get("p_label") or {}
    p_hel = held_label["confidence"]["p_label"]
    return {"calibration": {"n": results["baseline"]["calibration"]["n"], **cal, "p_label": p_cal},
            "held_out": {"n": len(inputs.held_out), **hel, "p_label": p_hel, "layer_sweep": sweep["layers"],
                         "confidence": held_label["confidence"]},
            "agree": cal["label"] == hel["label"],
            "same_critical_layer": cal["critical_layer"] == hel["critical_layer"],
            "p_same_label": sum(p * p_hel.get(k, 0.0) for k, p in p_cal.items()) if p_cal else None}


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    if "agree" not in r:
        return pd.DataFrame([r])
    return pd.DataFrame([{"split": s, **{k: v for k, v in r[s].items() if k != "layer_sweep"}}
                         for s in ("calibration", "held_out")]).assign(agree=r["agree"])


def render(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    rows = []
    for split in ("calibration", "held_out"):
        d = stage.get(split) or {}
        pl = dict(sorted((d.get("p_label") or {}).items(), key=lambda kv: -kv[1]))
        rows.append({"split": split.replace("_", "-"), "n": esc(d.get("n", "—")), "label": esc(d.get("label", "—")),
                     "p": esc(", ".join(f"{k} {v:.0%}" for k, v in pl.items() if v >= 0.05) or "—"),
                     "pcr": fmt_ci(d.get("pcr"), d.get("pcr_low"), d.get("pcr_high"), pct=False),
                     "critical": esc(d.get("critical_layer", "—"))})
    agree = stage.get("agree")
    pill = ('<span class="pill ok">labels agree</span>' if agree else '<span class="pill bad">labels differ</span>'
            if agree is not None else "")
    same = stage.get("p_same_label")
    same_s = (f" Two independent resamples, one of each split, give the same label with probability "
              f"{same:.0%}." if same is not None else "")
    return f"<p>{pill}{esc(same_s)}</p>" + html_table(rows, [("split", "prompts"), ("n", "n"), ("label", "label"),
                                                           ("p", "P(label) over resamples"), ("pcr", "PCR"),
                                                           ("critical", "critical layer")])


STAGE = register_stage(Stage(
    name="agreement", order=110, run=run, requires=("baseline", "label"), frame=frame, default=False,
    doc="label and PCR from the held-out prompts against the calibration prompts (opt-in)",
    section=Section("agreement", "Calibration vs held-out prompts",
                    "Does the 20-prompt calibration set give the same diagnosis as the held-out prompts?", render),
    schema=obj({"calibration": {"type": "object"}, "held_out": {"type": "object"}, "agree": {"type": "boolean"}}),
))
