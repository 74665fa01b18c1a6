"""Stage ``sensitivity``: geometric sensitivity of the target scheme per layer (``rho_geo`` with CI,
:func:`kvgeom.geometry.sensitivity_profile`). Proved by ``tests/geometry/`` and ``tests/audit/test_audit.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from kvgeom.viz import figures
from kvgeom.viz.markup import fig_html

from ..inputs import AuditInputs
from ..schema import INT, NUM, STR, obj
from ..stage import Section, Stage, StageResults, register_stage


def run(inputs: AuditInputs, results: StageResults) -> dict:
    from kvgeom.geometry import sensitivity_profile

    cfg = inputs.cfg
    calib = inputs.calibration.head(cfg.sensitivity_prompts)
    prof = sensitivity_profile(inputs.model, cfg.scheme, calib.prompts, inputs.harmless_pairs(calib), site=cfg.key_site,
                               causal_layers=[], n_resamples=200, seed=cfg.seed)
    rows = []
    for r in prof.to_frame().to_dict(orient="records"):
        rows.append({"layer": int(r["layer"]), "value": r.get("rho_geo"), "low": r.get("rho_geo_low"),
                     "high": r.get("rho_geo_high"), "defined": bool(r.get("rho_geo_defined", True)),
                     "note": r.get("rho_geo_note", ""), "rho_margin": r.get("rho_margin"),
                     "rho_margin_random": r.get("rho_margin_random"), "k": r.get("k")})
    return {"metric": "rho_geo", "scheme": cfg.scheme, "site": cfg.key_site, "layers": rows,
            **({"n_prompts": len(calib)} if len(calib) < len(inputs.calibration) else {})}


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(r["layers"])


def render(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    fig = figures.sensitivity_figure(pd.DataFrame(stage["layers"]), metric=stage.get("metric", "sensitivity"),
                                     critical_layer=(stages.get("label") or {}).get("critical_layer"))
    return fig_html(fig, "fig-sensitivity")


STAGE = register_stage(Stage(
    name="sensitivity", order=30, run=run, frame=frame,
    doc="per-layer geometric sensitivity of the target scheme (rho_geo)",
    section=Section("sensitivity", "Per-layer sensitivity",
                    "A per-layer score from the geometry stage; higher means the layer's K/V matter more for "
                    "refusal.", render),
    schema=obj({"metric": STR, "layers": {"type": "array", "items": obj({"layer": INT, "value": NUM})}},
               scheme=STR, site=STR),
))
