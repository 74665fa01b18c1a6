"""Stage ``agreement`` (opt-in, ``kvgeom audit --agreement``): label and PCR from the held-out prompts (their own
layer sweep, critical layer and PCR) against those from the calibration prompts: does the paper's 20-prompt
calibration suffice? Channel ablation is not repeated, so the held-out label's robustness rule sees the sweep and
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
from .channel_ablation import critical_layer_of
from .label import diagnose
from .layer_sweep import layer_sweep
from .pcr import pcr_at

_BRIEF = ("label", "pcr", "pcr_low", "pcr_high", "critical_layer", "candidates", "worst_layer_flip", "all_layer_flip")


def run(inputs: AuditInputs, results: StageResults) -> dict:
    base = baseline_verdicts(results["baseline"], "held_out")
    if not (base == Verdict.REFUSED.value).any():
        return {"status": "skipped", "reason": "no held-out prompt refused at full precision"}
    sweep = layer_sweep(inputs, inputs.held_out, base, stage="agreement")
    layer = critical_layer_of(sweep)
    pcr = pcr_at(inputs, inputs.held_out, base, layer, sweep, stage="agreement")
    held_label = diagnose(sweep, pcr, {})
    cal = {k: results["label"].get(k) for k in _BRIEF}
    hel = {k: held_label.get(k) for k in _BRIEF}
    return {"calibration": {"n": results["baseline"]["calibration"]["n"], **cal},
            "held_out": {"n": len(inputs.held_out), **hel, "layer_sweep": sweep["layers"]},
            "agree": cal["label"] == hel["label"],
            "same_critical_layer": cal["critical_layer"] == hel["critical_layer"]}


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    if "agree" not in r:
        return pd.DataFrame([r])
    return pd.DataFrame([{"split": s, **{k: v for k, v in r[s].items() if k != "layer_sweep"}}
                         for s in ("calibration", "held_out")]).assign(agree=r["agree"])


def render(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    rows = []
    for split in ("calibration", "held_out"):
        d = stage.get(split) or {}
        rows.append({"split": split.replace("_", "-"), "n": esc(d.get("n", "—")), "label": esc(d.get("label", "—")),
                     "pcr": fmt_ci(d.get("pcr"), d.get("pcr_low"), d.get("pcr_high"), pct=False),
                     "critical": esc(d.get("critical_layer", "—"))})
    agree = stage.get("agree")
    pill = ('<span class="pill ok">labels agree</span>' if agree else '<span class="pill bad">labels differ</span>'
            if agree is not None else "")
    return f"<p>{pill}</p>" + html_table(rows, [("split", "prompts"), ("n", "n"), ("label", "label"),
                                                ("pcr", "PCR"), ("critical", "critical layer")])


STAGE = register_stage(Stage(
    name="agreement", order=110, run=run, requires=("baseline", "label"), frame=frame, default=False,
    doc="label and PCR from the held-out prompts against the calibration prompts (opt-in)",
    section=Section("agreement", "Calibration vs held-out prompts",
                    "Does the 20-prompt calibration set give the same diagnosis as the held-out prompts?", render),
    schema=obj({"calibration": {"type": "object"}, "held_out": {"type": "object"}, "agree": {"type": "boolean"}}),
))
