"""Stage ``pcr``: Per-Channel Reduction at the critical layer, ``PCR = 1 - flip(per-channel) / flip(per-tensor)``
with a bootstrap CI (:func:`kvgeom.taxonomy.pcr_with_ci`), and its per-channel arm at every layer critical in at
least ``pcr_min_p`` of the bootstrap resamples (``per_layer``, ``per_channel_verdicts``: what the label's confidence
needs to recompute PCR on each resample). Proved by ``tests/taxonomy/`` and
``tests/audit/test_audit.py``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from kvgeom.io import to_jsonable
from kvgeom.prompts import PromptSet
from kvgeom.stats import flipped, rate_ci
from kvgeom.taxonomy.confidence import critical_layer_probabilities
from kvgeom.taxonomy.measures import pcr

from ..config import per_channel_twin
from ..evidence import sweep_evidence
from ..inputs import AuditInputs, plan_verdicts
from ..schema import BOOT_CI, INT, RATE_CI, STR
from ..stage import Stage, StageResults, register_stage
from .baseline import baseline_verdicts
from .channel_ablation import critical_layer_of


def pcr_layers(inputs: AuditInputs, base: pd.Series, sweep: Mapping[str, Any]) -> tuple[int, list[int], dict]:
    """The point critical layer, the further layers PCR is measured at (critical in at least ``pcr_min_p`` of the
    bootstrap resamples of the refused prompts, most likely first, ``pcr_max_layers`` in all) and ``P(critical
    = L)``, so that the label's confidence can recompute PCR at the critical layer of (nearly) every resample."""
    cfg = inputs.cfg
    point = critical_layer_of(sweep)
    p_crit = critical_layer_probabilities(sweep_evidence(base, sweep), n_resamples=cfg.n_resamples, seed=cfg.seed)
    extra = [la for la, p in p_crit.items() if p >= cfg.pcr_min_p and la != point][: cfg.pcr_max_layers - 1]
    return point, extra, p_crit


def pcr_at(inputs: AuditInputs, prompts: PromptSet, base: pd.Series, layer: int,
           sweep: Mapping[str, Any] | None = None, *, stage: str = "pcr", extra_layers: Sequence[int] = (),
           p_critical: Mapping[int, float] | None = None) -> dict:
    """PCR at ``layer`` (and its per-channel arm at ``extra_layers``, kept per prompt for the label's confidence).
    The per-tensor arm is the layer sweep's own row for that layer (the same plan on the same prompts) when
    ``sweep`` holds its verdicts; only the per-channel arms are generated then."""
    from kvgeom.taxonomy import pcr_with_ci

    cfg = inputs.cfg
    twin = per_channel_twin(cfg.sweep_scheme)
    known = ((sweep or {}).get("verdicts") or {}).get(f"L{layer}")
    plans = [inputs.plan(twin, layers=(layer,), name="per-channel")]
    plans += [inputs.plan(twin, layers=(la,), name=f"per-channel L{la}") for la in extra_layers]
    if known is None:
        plans.insert(0, inputs.plan(cfg.sweep_scheme, layers=(layer,), name="per-tensor"))
    rows, screen = inputs.evaluate_flips(prompts, base, plans, stage=stage)
    tensor = pd.Series(known) if known is not None else plan_verdicts(rows, "per-tensor")
    refused, t_flip = flipped(base, tensor)
    _, c_flip = flipped(base, plan_verdicts(rows, "per-channel"))
    ci = pcr_with_ci(c_flip, t_flip, baseline_refused=refused, seed=cfg.seed)
    n_ref = int(refused.sum())
    channel = {layer: plan_verdicts(rows, "per-channel"),
               **{la: plan_verdicts(rows, f"per-channel L{la}") for la in extra_layers}}
    per_layer = []
    for la, verdicts in channel.items():
        tv = pd.Series((sweep or {}).get("verdicts", {}).get(f"L{la}")) if la != layer else tensor
        _, tf = flipped(base, tv)
        _, cf = flipped(base, verdicts)
        per_layer.append({"layer": la, "p_critical": (p_critical or {}).get(la),
                          "flip_per_tensor": rate_ci(int(tf.sum()), n_ref).to_dict(),
                          "flip_per_channel": rate_ci(int(cf.sum()), n_ref).to_dict(),
                          "pcr": pcr(float(cf.sum()) / n_ref, float(tf.sum()) / n_ref) if n_ref else None})
    return {"layer": layer, "scheme_per_tensor": cfg.sweep_scheme, "scheme_per_channel": twin,
            "flip_per_tensor": rate_ci(int(t_flip.sum()), n_ref).to_dict(),
            "flip_per_channel": rate_ci(int(c_flip.sum()), n_ref).to_dict(), **ci.to_dict(),
            "per_layer": to_jsonable(per_layer), "min_p_critical": cfg.pcr_min_p,
            "per_channel_verdicts": {str(la): v.to_dict() for la, v in channel.items()},
            **({"screen": screen} if screen is not None else {})}


def run(inputs: AuditInputs, results: StageResults) -> dict:
    sweep = results["layer_sweep"]
    base = baseline_verdicts(results["baseline"])
    point, extra, p_crit = pcr_layers(inputs, base, sweep)
    return pcr_at(inputs, inputs.calibration, base, point, sweep, extra_layers=extra, p_critical=p_crit)


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
                           "scheme_per_channel": STR, "flip_per_tensor": RATE_CI, "flip_per_channel": RATE_CI,
                           "per_layer": {"type": "array"}, "per_channel_verdicts": {"type": "object"}}},
))
