"""Stage ``label``: the failure-mode label with its decision trace (:func:`kvgeom.taxonomy.classify`) from the
layer sweep, PCR and (when it ran) the channel ablation; its report section is the diagnosis card, first on the
page. Proved by ``tests/taxonomy/`` and ``tests/audit/test_audit.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from kvgeom.viz.card import label_card_html

from ..inputs import AuditInputs
from ..schema import STR, obj
from ..stage import Section, Stage, StageResults, register_stage


def diagnose(layer_sweep: Mapping[str, Any], pcr: Mapping[str, Any], ablation: Mapping[str, Any]) -> dict:
    """The label from stored stage results (``ablation`` may be ``{}``), as :meth:`Diagnosis.to_dict`."""
    from kvgeom.stats import BootstrapCI
    from kvgeom.taxonomy import classify

    p = pcr
    ci = BootstrapCI(**{k: p[k] if p[k] is not None else float("nan")
                        for k in ("estimate", "low", "high", "n_valid", "n_resamples", "confidence") if k in p})
    stage_flips = {"pcr per-tensor": p["flip_per_tensor"]["rate"] or 0.0,
                   "pcr per-channel": p["flip_per_channel"]["rate"] or 0.0}
    for r in ablation.get("rows", []):
        stage_flips[f"ablation {r['subset']} {r['fraction']} s{r['seed']}"] = r["flip"] or 0.0
    diag = classify(pd.DataFrame(layer_sweep["layers"]), layer_sweep["all_layer"]["flip"], ci,
                    stage_flips=stage_flips)
    return diag.to_dict()


def run(inputs: AuditInputs, results: StageResults) -> dict:
    return diagnose(results["layer_sweep"], results["pcr"], results.get("channel_ablation", {}))


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([{**t, "label_if_fired": t.get("label")} for t in r["trace"]]).drop(columns="label")


def render(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    return label_card_html(stage, stages)


STAGE = register_stage(Stage(
    name="label", order=70, run=run, requires=("layer_sweep", "pcr"), optional=("channel_ablation",), frame=frame,
    doc="the failure-mode label and its decision trace",
    section=Section("label", "Diagnosis", "", render, lead=True),
    schema=obj({"label": STR, "trace": {"type": "array"}}, critical_layer={"type": ["integer", "null"]},
               candidates={"type": "array"}),
))
