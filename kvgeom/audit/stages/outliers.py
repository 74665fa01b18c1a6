"""Stage ``outliers``: key channels ranked by max |K| over the calibration prompts; the top ``top_frac`` of
each layer are outliers. :func:`outlier_table` rebuilds the ranked table from the stored result (what later
stages use). Proved by ``tests/taxonomy/`` and ``tests/audit/test_audit.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from kvgeom.viz import figures
from kvgeom.viz.markup import fig_html, fmt_pct

from ..inputs import AuditInputs
from ..schema import NUM, obj
from ..stage import Section, Stage, StageResults, register_stage


def run(inputs: AuditInputs, results: StageResults) -> dict:
    import torch

    from kvgeom.runtime.forward import capture
    from kvgeom.taxonomy import outlier_channels, outlier_heatmap

    cfg, model = inputs.cfg, inputs.model
    site = cfg.quant_site
    cap = capture(model, inputs.calibration.prompts, sites=[site], positions="all", batch_size=cfg.batch_size)
    kmax = torch.stack([
        torch.stack([x.abs().amax(dim=0) for x in cap[(site, la)]]).amax(dim=0) for la in range(model.n_layers)
    ])  # [layer, kv_head, d_head]
    table = outlier_channels(kmax.numpy(), top_frac=cfg.top_frac)
    outl = table[table["is_outlier"]]
    return {"top_frac": cfg.top_frac, "site": site, "heatmap": outlier_heatmap(table),
            "channels": outl[["layer", "head", "dim", "magnitude", "rank"]].to_dict(orient="records"),
            "magnitudes": table[["layer", "head", "dim", "magnitude", "rank"]].to_dict(orient="records")}


def outlier_table(result: Mapping[str, Any]) -> pd.DataFrame:
    """The ranked channel table (:func:`kvgeom.taxonomy.outlier_channels`) from the stage's stored magnitudes."""
    from kvgeom.taxonomy import outlier_channels

    mags = pd.DataFrame(result["magnitudes"])
    n_l, n_h, d = mags["layer"].max() + 1, mags["head"].max() + 1, mags["dim"].max() + 1
    k = np.zeros((n_l, n_h, d))
    k[mags["layer"], mags["head"], mags["dim"]] = mags["magnitude"]
    return outlier_channels(k, top_frac=result["top_frac"])


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    f = pd.DataFrame(r["magnitudes"])
    out = {(c["layer"], c["head"], c["dim"]) for c in r["channels"]}
    return f.assign(is_outlier=[(a, b, c) in out for a, b, c in zip(f["layer"], f["head"], f["dim"], strict=True)])


def render(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    fig = figures.outlier_heatmap_figure(stage["heatmap"])
    extra = f'<p class="how">Top {fmt_pct(stage.get("top_frac", 0.05))} of each layer\'s channels are outliers.</p>'
    return extra + fig_html(fig, "fig-outliers")


STAGE = register_stage(Stage(
    name="outliers", order=40, run=run, frame=frame,
    doc="key channels ranked by max |K|; the top share are outliers",
    section=Section("outliers", "Outlier key channels",
                    "Largest |K| per channel over the calibration prompts (log scale). Circles mark each layer's "
                    "outlier channels; a bright column means one channel dominates the layer's range.", render),
    schema=obj({"top_frac": NUM, "heatmap": {"type": "object"}, "channels": {"type": "array"},
                "magnitudes": {"type": "array"}}, site={"type": "string"}),
))
