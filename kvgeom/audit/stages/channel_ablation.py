"""Stage ``channel_ablation``: at the critical layer, quantize only the top-f channels by magnitude ("outlier"),
only the non-outliers, or f random channels (several seeds); flips per subset and the causal ratio; the per-prompt
``verdicts`` of each subset (for the label's confidence: these flips count for the ``robust`` rule).
Proved by ``tests/audit/test_audit.py`` and ``tests/taxonomy/``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from kvgeom.stats import flip_summary
from kvgeom.viz import figures
from kvgeom.viz.markup import fig_html

from ..inputs import AuditInputs, plan_verdicts
from ..schema import INT, obj
from ..stage import Section, Stage, StageResults, register_stage
from .baseline import baseline_verdicts
from .outliers import outlier_table


def critical_layer_of(layer_sweep: Mapping[str, Any]) -> int:
    """The critical layer of a layer sweep's result (:func:`kvgeom.taxonomy.critical_layer`)."""
    from kvgeom.taxonomy import critical_layer

    return critical_layer(pd.DataFrame(layer_sweep["layers"]))


def run(inputs: AuditInputs, results: StageResults) -> dict:
    from kvgeom.taxonomy import ablation_summary

    cfg = inputs.cfg
    layer = critical_layer_of(results["layer_sweep"])
    tab = outlier_table(results["outliers"])
    at = tab[tab["layer"] == layer].sort_values("rank")
    chans = [(int(h), int(d)) for h, d in zip(at["head"], at["dim"], strict=True)]
    n_ch = len(chans)
    rng = np.random.default_rng(cfg.seed)
    specs: list[tuple[str, float | None, int | None, list]] = []
    for f in cfg.fractions:
        n = max(1, round(f * n_ch))
        specs.append(("outlier", f, None, chans[:n]))
        for s in range(cfg.n_seeds):
            pick = rng.choice(n_ch, size=n, replace=False)
            specs.append(("random", f, s, [chans[i] for i in sorted(pick)]))
    n_out = int(at["is_outlier"].sum())
    specs.append(("non-outlier", None, None, chans[n_out:]))
    plans = []
    for i, (_subset, _f, _s, quantized) in enumerate(specs):
        keep = sorted(set(chans) - set(quantized))  # quantize only `quantized`: protect the rest
        plans.append(inputs.plan(cfg.sweep_scheme, layers=(layer,), protect_channels={layer: keep}, name=f"abl{i}"))
    base = baseline_verdicts(results["baseline"])
    rows, screen = inputs.evaluate_flips(inputs.calibration, base, plans, stage="channel_ablation")
    out, verdicts = [], {}
    for i, (subset, f, s, quantized) in enumerate(specs):
        v = plan_verdicts(rows, f"abl{i}")
        fl = flip_summary(base, v)
        out.append({"subset": subset, "fraction": f, "seed": s, "n_channels": len(quantized), **fl})
        verdicts[" ".join(str(x) for x in (subset, f, s if s is None else f"s{s}") if x is not None)] = v.to_dict()
    summary = ablation_summary(pd.DataFrame(out))
    return {"layer": layer, "scheme": cfg.sweep_scheme, "rows": out, "summary": summary.to_dict(orient="records"),
            "verdicts": verdicts, **({"screen": screen} if screen is not None else {})}


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(r["rows"]).assign(layer=r["layer"])


def render(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    fig = figures.ablation_figure(pd.DataFrame(stage["rows"]), layer=stage.get("layer"))
    return fig_html(fig, "fig-ablation")


STAGE = register_stage(Stage(
    name="channel_ablation", order=50, run=run, requires=("baseline", "layer_sweep", "outliers"), frame=frame,
    doc="outlier vs random vs non-outlier channels quantized at the critical layer",
    section=Section("channel-ablation", "Channel ablation at the critical layer",
                    "Quantizing only the outlier channels vs as many random channels: a causal ratio well above 1 "
                    "means the outliers carry the damage.", render),
    schema=obj({"layer": INT, "rows": {"type": "array", "items": obj({"subset": {"type": "string"}})}},
               scheme={"type": "string"}, summary={"type": "array"}),
))
