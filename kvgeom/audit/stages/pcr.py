"""Stage ``pcr``: Per-Channel Reduction at the critical layer, ``PCR = 1 - flip(per-channel) / flip(per-tensor)``
with a bootstrap CI (:func:`kvgeom.taxonomy.pcr_with_ci`). Proved by ``tests/taxonomy/`` and
``tests/audit/test_audit.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from kvgeom.prompts import PromptSet
from kvgeom.stats import flipped, rate_ci

from ..config import per_channel_twin
from ..inputs import AuditInputs, plan_verdicts
from ..schema import BOOT_CI, INT, RATE_CI, STR
from ..stage import Stage, StageResults, register_stage
from .baseline import baseline_verdicts
from .channel_ablation import critical_layer_of


def pcr_at(inputs: AuditInputs, prompts: PromptSet, base: pd.Series, layer: int,
           sweep: Mapping[str, Any] | None = None, *, stage: str = "pcr") -> dict:
    """PCR at ``layer``. The per-tensor arm is the layer sweep's own row for that layer (the same plan on the same
    prompts) when ``sweep`` holds its verdicts; only the per-channel arm is generated then."""
    from kvgeom.taxonomy import pcr_with_ci

    cfg = inputs.cfg
    twin = per_channel_twin(cfg.sweep_scheme)
    known = ((sweep or {}).get("verdicts") or {}).get(f"L{layer}")
    plans = [inputs.plan(twin, layers=(layer,), name="per-channel")]
    if known is None:
        plans.insert(0, inputs.plan(cfg.sweep_scheme, layers=(layer,), name="per-tensor"))
    rows = inputs.evaluate(inputs.flip_prompts(prompts, base), plans, stage=stage)
    tensor = pd.Series(known) if known is not None else plan_verdicts(rows, "per-tensor")
    refused, t_flip = flipped(base, tensor)
    _, c_flip = flipped(base, plan_verdicts(rows, "per-channel"))
    ci = pcr_with_ci(c_flip, t_flip, baseline_refused=refused, seed=cfg.seed)
    n_ref = int(refused.sum())
    return {"layer": layer, "scheme_per_tensor": cfg.sweep_scheme, "scheme_per_channel": twin,
            "flip_per_tensor": rate_ci(int(t_flip.sum()), n_ref).to_dict(),
            "flip_per_channel": rate_ci(int(c_flip.sum()), n_ref).to_dict(), **ci.to_dict()}


def run(inputs: AuditInputs, results: StageResults) -> dict:
    sweep = results["layer_sweep"]
    return pcr_at(inputs, inputs.calibration, baseline_verdicts(results["baseline"]), critical_layer_of(sweep),
                  sweep)


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([{"layer": r["layer"], "pcr": r.get("estimate"), "low": r.get("low"), "high": r.get("high"),
                          "flip_per_tensor": r["flip_per_tensor"]["rate"],
                          "flip_per_channel": r["flip_per_channel"]["rate"],
                          "scheme_per_tensor": r["scheme_per_tensor"],
                          "scheme_per_channel": r["scheme_per_channel"]}])


STAGE = register_stage(Stage(
    name="pcr", order=60, run=run, requires=("baseline", "layer_sweep"), frame=frame,
    doc="Per-Channel Reduction at the critical layer, bootstrap CI",
    schema={**BOOT_CI, "required": sorted({*BOOT_CI["required"], "layer", "scheme_per_tensor", "scheme_per_channel",
                                           "flip_per_tensor", "flip_per_channel"}),
            "properties": {**BOOT_CI["properties"], "layer": INT, "scheme_per_tensor": STR,
                           "scheme_per_channel": STR, "flip_per_tensor": RATE_CI, "flip_per_channel": RATE_CI}},
))
