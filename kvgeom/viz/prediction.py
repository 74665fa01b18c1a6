"""Plotly figures of the flip-prediction stage: ROC curves per signal and predicted against measured flip rates
per configuration (from the stage's stored dicts; no model needed). Proved by
``tests/audit/test_flip_prediction.py`` (the report section renders both)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import plotly.graph_objects as go

__all__ = ["predicted_vs_measured_figure", "roc_figure"]


def roc_figure(validation: Mapping[str, Any]) -> go.Figure:
    """One ROC curve per signal (AUROC and CI in the legend), the combined model in bold, the chance diagonal."""
    fig = go.Figure()
    stats = {s["signal"]: s for s in validation["signals"]}
    stats["combined"] = validation["combined"]
    for name, pts in validation["roc"].items():
        if not pts["fpr"]:
            continue
        s = stats.get(name, {})
        auc = "—" if s.get("auroc") is None else f"{s['auroc']:.2f}"
        ci = "" if s.get("low") is None else f" [{s['low']:.2f}, {s['high']:.2f}]"
        fig.add_trace(go.Scatter(x=pts["fpr"], y=pts["tpr"], mode="lines", name=f"{name} {auc}{ci}",
                                 line={"width": 4 if name == "combined" else 1.5}))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line={"dash": "dot", "color": "grey"}))
    fig.update_layout(title="Flip prediction from prefill signals: ROC (AUROC [95% prompt-bootstrap CI])",
                      xaxis={"title": "false-positive rate", "range": [0, 1]},
                      yaxis={"title": "true-positive rate", "range": [0, 1.02]}, template="plotly_white", height=480)
    return fig


def predicted_vs_measured_figure(per_config: pd.DataFrame) -> go.Figure:
    """Measured flip rate and predicted (mean out-of-fold probability) per configuration: layer-sweep rows by
    layer, other sources after them."""
    need = {"source", "config", "measured", "predicted"}
    if not need <= set(per_config.columns):
        raise ValueError(f"predicted_vs_measured_figure: missing columns {sorted(need - set(per_config.columns))}")
    f = per_config.copy()
    f["x"] = [c if s == "layer_sweep" else f"{s}: {c}" for s, c in zip(f["source"], f["config"], strict=True)]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=f["x"], y=f["measured"], name="measured flip rate (decoded)", marker_color="#9ecae1"))
    fig.add_trace(go.Scatter(x=f["x"], y=f["predicted"], mode="markers", name="predicted (out of fold)",
                             marker={"color": "#d62728", "size": 9}))
    fig.update_layout(title="Predicted vs measured flip rate per configuration", yaxis={"title": "flip rate",
                      "range": [0, 1.05], "tickformat": ".0%"}, template="plotly_white", height=430,
                      legend={"orientation": "h", "y": -0.35})
    return fig
