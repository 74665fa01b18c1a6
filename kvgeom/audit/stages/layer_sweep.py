"""Stage ``layer_sweep``: one layer quantized at a time (default ``int3-tensor-sym``, mode ``forward``: the
paper's mechanistic setting) plus all layers, in one batched run of (layer × prompt) rows; conditional flip rate
per layer with Wilson CI. Proved by ``tests/audit/test_audit.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from kvgeom.prompts import PromptSet
from kvgeom.stats import flip_summary
from kvgeom.viz import figures
from kvgeom.viz.markup import fig_html

from ..inputs import AuditInputs, plan_verdicts
from ..schema import FLIP, STR, obj
from ..stage import Section, Stage, StageResults, register_stage
from .baseline import baseline_verdicts


def layer_sweep(inputs: AuditInputs, prompts: PromptSet, base: pd.Series, *, stage: str = "layer_sweep") -> dict:
    """The sweep on ``prompts`` against their baseline verdicts ``base`` (the agreement stage runs it on the
    held-out prompts)."""
    cfg, n_layers = inputs.cfg, inputs.model.n_layers
    plans = [inputs.plan(cfg.sweep_scheme, layers=(la,), name=f"L{la}") for la in range(n_layers)]
    plans.append(inputs.plan(cfg.sweep_scheme, name="all layers"))
    rows, screen = inputs.evaluate_flips(prompts, base, plans, stage=stage)
    layers = [{"layer": la, **flip_summary(base, plan_verdicts(rows, f"L{la}"))} for la in range(n_layers)]
    return {"scheme": cfg.sweep_scheme, "mode": cfg.mode, "site": cfg.site, "layers": layers,
            "all_layer": flip_summary(base, plan_verdicts(rows, "all layers")),
            "mean_refusal_score": rows.groupby("plan")["refusal_score"].mean().to_dict(),
            "verdicts": {p.label: plan_verdicts(rows, p.label).to_dict() for p in plans},
            **({"screen": screen} if screen is not None else {})}


def run(inputs: AuditInputs, results: StageResults) -> dict:
    return layer_sweep(inputs, inputs.calibration, baseline_verdicts(results["baseline"]))


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    f = pd.DataFrame(r["layers"]).assign(layer=lambda d: d["layer"].astype(object))
    return pd.concat([f, pd.DataFrame([{"layer": "all layers", **r["all_layer"]}])], ignore_index=True)


def figure(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> Any:
    """The layer-sweep figure (flip rate per layer, critical and candidate layers marked) of a stored result."""
    label = stages.get("label") or {}
    th = label.get("thresholds", {})
    return figures.layer_flip_figure(
        pd.DataFrame(stage["layers"]), critical_layer=label.get("critical_layer"),
        candidates=label.get("candidates", []), candidate_at=th.get("candidate_at", 0.10),
        robust_below=th.get("robust_below", 0.05), all_layer_flip=(stage.get("all_layer") or {}).get("flip"),
        scheme=stage.get("scheme"), tied=(label.get("confidence") or {}).get("tied_with_worst", ()))


def render(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    return fig_html(figure(stage, stages), "fig-layer-sweep")


STAGE = register_stage(Stage(
    name="layer_sweep", order=20, run=run, requires=("baseline",), frame=frame,
    doc="one layer quantized at a time: conditional flip rate per layer",
    section=Section("layer-sweep", "Where refusals break: one layer at a time",
                    "Each bar quantizes a single layer's K/V and measures the share of baseline refusals lost (95% "
                    "Wilson CI). The critical layer is red; candidate layers (≥ the candidate threshold) orange; "
                    "hatched layers are statistically indistinguishable from the critical one (exact McNemar on the "
                    "same prompts, p ≥ 0.05).",
                    render),
    schema=obj({"scheme": STR, "mode": STR, "layers": {"type": "array", "items": FLIP}, "all_layer": FLIP,
                "verdicts": {"type": "object"}}, site=STR, mean_refusal_score={"type": "object"}),
))
