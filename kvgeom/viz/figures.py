"""Plotly figures of an audit, from DataFrames and dicts (no model needed).

Every function returns a ``plotly.graph_objects.Figure`` and raises ValueError naming the missing columns when its
input lacks them. Rates are shares in [0, 1]; the axes show percentages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvgeom.taxonomy import ablation_summary

__all__ = [
    "PALETTE",
    "ablation_figure",
    "bit_sweep_figure",
    "layer_flip_figure",
    "mitigation_figure",
    "outlier_heatmap_figure",
    "paired_flip_figure",
    "trajectory_figure",
    "sensitivity_figure",
]

#: Colours: critical layer, candidate layers, other layers, reference lines, and a cycle for traces.
PALETTE = {
    "critical": "#c0392b",
    "candidate": "#e67e22",
    "other": "#7f8fa6",
    "reference": "#34495e",
    "cycle": ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"),
}

_LAYOUT = {"template": "plotly_white", "margin": {"l": 70, "r": 30, "t": 60, "b": 60}, "height": 430,
           "font": {"size": 13}, "legend": {"orientation": "h", "y": -0.2}}


def _frame(data: pd.DataFrame | Sequence[Mapping[str, Any]], cols: Sequence[str], what: str) -> pd.DataFrame:
    frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data))
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: missing columns {missing} (has {list(frame.columns)})")
    if frame.empty:
        raise ValueError(f"{what}: no rows")
    return frame


def _errors(frame: pd.DataFrame, col: str) -> dict[str, Any] | None:
    """Asymmetric error bars from ``low``/``high`` columns (None when absent or all NaN)."""
    if "low" not in frame or "high" not in frame:
        return None
    y = frame[col].astype(float)
    lo = frame["low"].astype(float)
    hi = frame["high"].astype(float)
    if lo.isna().all() and hi.isna().all():
        return None
    return {"type": "data", "symmetric": False, "array": (hi - y).clip(lower=0).fillna(0).tolist(),
            "arrayminus": (y - lo).clip(lower=0).fillna(0).tolist(), "thickness": 1.2, "width": 3}


def layer_flip_figure(
    layer_flips: pd.DataFrame | Sequence[Mapping[str, Any]],
    *,
    critical_layer: int | None = None,
    candidates: Sequence[int] = (),
    candidate_at: float = 0.10,
    robust_below: float | None = 0.05,
    all_layer_flip: float | None = None,
    scheme: str | None = None,
    tied: Sequence[int] = (),
) -> go.Figure:
    """Per-layer conditional flip rate (quantizing one layer at a time) with Wilson CIs; the critical layer in red,
    candidates in orange, the layers statistically indistinguishable from the critical one (``tied``) hatched, the
    candidate threshold and the all-layer flip as lines. Columns: ``layer, flip`` (``low, high, n, k`` optional)."""
    f = _frame(layer_flips, ("layer", "flip"), "layer flips").sort_values("layer")
    cand = {int(x) for x in candidates}
    tie = {int(x) for x in tied} - ({critical_layer} if critical_layer is not None else set())
    colors = [PALETTE["critical"] if int(lay) == critical_layer else PALETTE["candidate"] if int(lay) in cand
              else PALETTE["other"] for lay in f["layer"]]
    hover = "layer %{x}<br>flip %{y:.1%}"
    custom = None
    if {"k", "n"} <= set(f.columns):
        custom = np.stack([f["k"].to_numpy(), f["n"].to_numpy()], axis=-1)
        hover += "<br>%{customdata[0]} / %{customdata[1]} refusals flipped"
    pattern = {"shape": ["/" if int(lay) in tie else "" for lay in f["layer"]]}
    fig = go.Figure(go.Bar(x=f["layer"], y=f["flip"].astype(float), marker={"color": colors, "pattern": pattern},
                           error_y=_errors(f, "flip"), customdata=custom, hovertemplate=hover + "<extra></extra>",
                           name="single-layer flip"))
    fig.add_hline(y=candidate_at, line_dash="dash", line_color=PALETTE["candidate"],
                  annotation_text=f"candidate ≥ {candidate_at:.0%}", annotation_position="top left")
    if robust_below is not None and robust_below != candidate_at:
        fig.add_hline(y=robust_below, line_dash="dot", line_color=PALETTE["other"],
                      annotation_text=f"robust < {robust_below:.0%}", annotation_position="bottom left")
    if all_layer_flip is not None and not math.isnan(all_layer_flip):
        fig.add_hline(y=all_layer_flip, line_dash="dashdot", line_color=PALETTE["reference"],
                      annotation_text=f"all layers quantized: {all_layer_flip:.0%}", annotation_position="top right")
    if critical_layer is not None and critical_layer in set(f["layer"].astype(int)):
        y = float(f.loc[f["layer"].astype(int) == critical_layer, "flip"].iloc[0])
        fig.add_annotation(x=critical_layer, y=y, text=f"critical L{critical_layer}", showarrow=True, arrowhead=2,
                           ay=-40, font={"color": PALETTE["critical"]})
    if tie:
        fig.add_annotation(xref="paper", yref="paper", x=1.0, y=1.08, showarrow=False, xanchor="right",
                           text=f"hatched: {len(tie)} layers indistinguishable from the critical one (McNemar)")
    title = "Refusal flips when one layer's KV cache is quantized" + (f" ({scheme})" if scheme else "")
    fig.update_layout(**_LAYOUT, title=title, showlegend=False, bargap=0.15)
    fig.update_xaxes(title="layer", dtick=1 if len(f) <= 48 else None)
    fig.update_yaxes(title="conditional flip rate", tickformat=".0%", rangemode="tozero")
    return fig


def sensitivity_figure(rows: pd.DataFrame | Sequence[Mapping[str, Any]], *, metric: str = "sensitivity",
                       critical_layer: int | None = None) -> go.Figure:
    """Per-layer sensitivity profile (any per-layer score, e.g. from the geometry stage). Columns: ``layer,
    value`` (``low, high`` optional)."""
    f = _frame(rows, ("layer", "value"), "sensitivity").sort_values("layer")
    colors = [PALETTE["critical"] if int(lay) == critical_layer else PALETTE["cycle"][0] for lay in f["layer"]]
    fig = go.Figure(go.Bar(x=f["layer"], y=f["value"].astype(float), marker_color=colors,
                           error_y=_errors(f, "value"), hovertemplate="layer %{x}<br>%{y:.3g}<extra></extra>"))
    fig.update_layout(**_LAYOUT, title=f"Per-layer {metric}", showlegend=False)
    fig.update_xaxes(title="layer", dtick=1 if len(f) <= 48 else None)
    fig.update_yaxes(title=metric)
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def bit_sweep_figure(rows: pd.DataFrame | Sequence[Mapping[str, Any]]) -> go.Figure:
    """Bit-width phase curve: refusal rate (line, CI band) and perplexity ratio to full precision (dashed, right
    axis) against bits per element, one colour per scheme family. Columns: ``family, bits, refusal`` (``low,
    high, ppl_ratio, scheme`` optional)."""
    f = _frame(rows, ("family", "bits", "refusal"), "bit sweep")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    has_ppl = "ppl_ratio" in f and f["ppl_ratio"].notna().any()
    for i, (family, g) in enumerate(f.groupby("family", sort=False)):
        g = g.sort_values("bits")
        color = PALETTE["cycle"][i % len(PALETTE["cycle"])]
        x = g["bits"].astype(float).tolist()
        if {"low", "high"} <= set(g.columns) and g["low"].notna().any():
            band_y = g["high"].astype(float).tolist() + g["low"].astype(float).tolist()[::-1]
            fig.add_trace(go.Scatter(x=x + x[::-1], y=band_y, fill="toself", fillcolor=_rgba(color, 0.15),
                                     mode="lines", line={"width": 0}, hoverinfo="skip", showlegend=False,
                                     legendgroup=str(family)),
                          secondary_y=False)
        text = g["scheme"].tolist() if "scheme" in g else None
        fig.add_trace(go.Scatter(x=x, y=g["refusal"].astype(float), mode="lines+markers", name=f"{family} refusal",
                                 line={"color": color, "width": 2.5}, legendgroup=str(family), text=text,
                                 hovertemplate="%{text}<br>%{x:.2f} bits<br>refusal %{y:.1%}<extra></extra>"
                                 if text is not None else None),
                      secondary_y=False)
        if has_ppl and "ppl_ratio" in g and g["ppl_ratio"].notna().any():
            fig.add_trace(go.Scatter(x=x, y=g["ppl_ratio"].astype(float), mode="lines+markers",
                                     name=f"{family} perplexity ratio", legendgroup=str(family),
                                     line={"color": color, "dash": "dash", "width": 1.5}, marker={"symbol": "x"}),
                          secondary_y=True)
    fig.update_layout(**_LAYOUT, title="Bit-width phase curve: refusal collapses before perplexity moves")
    fig.update_xaxes(title="bits per element (K and V mean, incl. scale overhead)")
    fig.update_yaxes(title="refusal rate (harmful prompts)", tickformat=".0%", range=[0, 1.02], secondary_y=False)
    if has_ppl:
        fig.update_yaxes(title="perplexity / full-precision perplexity", secondary_y=True, showgrid=False,
                         tickformat=".2f")
    return fig


def outlier_heatmap_figure(heatmap: Mapping[str, Any], *, log_scale: bool = True) -> go.Figure:
    """Layer × key-channel heatmap of ``max |K|`` (log10 by default), heads separated by lines, outliers marked.

    ``heatmap``: :func:`kvgeom.taxonomy.outlier_heatmap`'s dict (``z``, ``layers``, ``n_kv_heads``, ``d_head``,
    ``outliers``)."""
    for key in ("z", "layers", "d_head"):
        if key not in heatmap:
            raise ValueError(f"outlier heatmap: missing key {key!r}")
    z = np.asarray(heatmap["z"], dtype=float)
    if z.ndim != 2 or z.size == 0:
        raise ValueError(f"outlier heatmap: z must be a non-empty [layer, channel] matrix, got shape {z.shape}")
    d_head = int(heatmap["d_head"])
    n_heads = int(heatmap.get("n_kv_heads", z.shape[1] // d_head))
    layers = list(heatmap["layers"])
    shown = np.log10(np.clip(z, 1e-6, None)) if log_scale else z
    head_of = np.arange(z.shape[1]) // d_head
    dim_of = np.arange(z.shape[1]) % d_head
    custom = np.stack([np.broadcast_to(head_of, z.shape), np.broadcast_to(dim_of, z.shape), z], axis=-1)
    fig = go.Figure(go.Heatmap(z=shown, x=np.arange(z.shape[1]), y=layers, colorscale="Viridis", customdata=custom,
                               colorbar={"title": "log10 max|K|" if log_scale else "max|K|"},
                               hovertemplate="layer %{y}<br>head %{customdata[0]}, dim %{customdata[1]}<br>"
                                             "max|K| %{customdata[2]:.3g}<extra></extra>"))
    outs = heatmap.get("outliers") or []
    if outs:
        fig.add_trace(go.Scatter(x=[c for _, c in outs], y=[lay for lay, _ in outs], mode="markers",
                                 marker={"symbol": "circle-open", "color": "white", "size": 7, "line": {"width": 1.5}},
                                 name="outlier channel", hoverinfo="skip"))
    for h in range(1, n_heads):
        fig.add_vline(x=h * d_head - 0.5, line_color="white", line_width=2)
    fig.update_layout(**{**_LAYOUT, "height": max(380, 18 * len(layers) + 140)},
                      title="Key-channel magnitudes (max |K| over calibration prompts)")
    fig.update_xaxes(title=f"key channel (head × {d_head} + dim)")
    fig.update_yaxes(title="layer", range=[max(layers) + 0.5, min(layers) - 0.5],
                     dtick=1 if len(layers) <= 48 else None)
    fig.update_xaxes(range=[-0.5, z.shape[1] - 0.5])
    return fig


def ablation_figure(rows: pd.DataFrame | Sequence[Mapping[str, Any]], *, layer: int | None = None) -> go.Figure:
    """Channel ablation at the critical layer: flips when quantizing only the outlier channels, only the others, or
    random channel subsets of matched size (mean ± sd over seeds), by share of channels quantized; causal ratios
    annotated. Columns: ``subset, fraction, flip`` (``seed`` optional)."""
    f = _frame(rows, ("subset", "fraction", "flip"), "channel ablation")
    s = ablation_summary(f)
    if s.empty:
        raise ValueError("channel ablation: no fraction with a random or outlier run")
    x = [f"{v:.0%}" if v >= 0.01 else f"{v:.1%}" for v in s["fraction"]]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=x, y=s["random_mean"], name="random channels (mean ± sd over seeds)",
                         marker_color=PALETTE["other"],
                         error_y={"type": "data", "array": s["random_sd"].fillna(0).tolist(), "thickness": 1.2},
                         customdata=s["random_n"], hovertemplate="%{x}: %{y:.1%} (%{customdata} seeds)<extra></extra>"))
    fig.add_trace(go.Bar(x=x, y=s["outlier_flip"], name="outlier channels only", marker_color=PALETTE["critical"],
                         hovertemplate="%{x}: %{y:.1%}<extra></extra>"))
    if s["non_outlier_flip"].notna().any():
        fig.add_trace(go.Bar(x=x, y=s["non_outlier_flip"], name="non-outlier channels only",
                             marker_color=PALETTE["cycle"][0], hovertemplate="%{x}: %{y:.1%}<extra></extra>"))
    for xi, r in zip(x, s.itertuples(), strict=True):
        if not math.isnan(r.causal_ratio):
            top = np.nanmax([r.outlier_flip, r.random_mean + (0 if math.isnan(r.random_sd) else r.random_sd)])
            fig.add_annotation(x=xi, y=top, text=f"causal ratio {r.causal_ratio:.1f}×", showarrow=False, yshift=16)
    where = f" at layer {layer}" if layer is not None else ""
    fig.update_layout(**_LAYOUT, barmode="group", title=f"Channel ablation{where}: which channels carry the damage?")
    fig.update_xaxes(title="share of the layer's key channels quantized", type="category")
    fig.update_yaxes(title="conditional flip rate", tickformat=".0%", rangemode="tozero")
    return fig


def _cost_axis(fig: go.Figure, f: pd.DataFrame, uniform_bits: float | None) -> None:
    """The memory-cost x axis of the mitigation figures, with the uniform scheme's cost as a line."""
    lo, hi = float(f["bits_per_element"].min()), float(f["bits_per_element"].max())
    if uniform_bits is not None:
        lo = min(lo, float(uniform_bits))
        fig.add_vline(x=uniform_bits, line_dash="dot", line_color=PALETTE["other"],
                      annotation_text="uniform", annotation_position="bottom right")
    pad = max(0.5, 0.15 * (hi - lo))
    fig.update_xaxes(title="bits per element (mean over layers)", range=[lo - pad, hi + 3 * pad])


def _candidate_points(rows: pd.DataFrame | Sequence[Mapping[str, Any]], col: str) -> tuple[pd.DataFrame, go.Figure]:
    """The mitigation figures' points: ``col`` (with its CI) of each candidate against its memory cost, one marker
    and colour per split; later splits are drawn shifted right by 0.05 bits so that they do not hide each other
    (hover shows the true cost)."""
    f = _frame(rows, ("name", "bits_per_element", col), "mitigation results")
    if "split" not in f:
        f = f.assign(split="all")
    fig = go.Figure()
    symbols = ("circle", "diamond", "square", "triangle-up")
    for i, (split, g) in enumerate(f.groupby("split", sort=False)):
        bits = g["bits_per_element"].astype(float)
        fig.add_trace(go.Scatter(
            x=bits + 0.05 * i, y=g[col].astype(float), mode="markers+text" if i == 0 else "markers",
            name=str(split), text=g["name"], textposition="middle right", error_y=_errors(g, col),
            customdata=bits, marker={"size": 11, "symbol": symbols[i % len(symbols)], "color": PALETTE["cycle"][i % 8]},
            hovertemplate=f"%{{text}}<br>%{{customdata:.2f}} bits/element<br>{col} %{{y:.0%}}<extra>{split}</extra>"))
    return f, fig


def mitigation_figure(rows: pd.DataFrame | Sequence[Mapping[str, Any]], *, uniform_bits: float | None = None,
                      target: float | None = 0.95) -> go.Figure:
    """Recovery of each candidate mitigation (with bootstrap CI) against its memory cost; 1 = full-precision
    refusal, 0 = the uniform target scheme. Columns: ``name, bits_per_element, recovery`` (``low, high, split``
    optional: one colour per split, e.g. calibration / held-out; later splits are drawn shifted right by 0.05 bits
    per split so that they do not hide each other; hover shows the true cost)."""
    f, fig = _candidate_points(rows, "recovery")
    fig.add_hline(y=1.0, line_dash="dash", line_color=PALETTE["reference"], annotation_text="full precision",
                  annotation_position="top left")
    fig.add_hline(y=0.0, line_dash="dash", line_color=PALETTE["other"], annotation_text="uniform target scheme",
                  annotation_position="bottom left")
    if target is not None:
        fig.add_hline(y=target, line_dash="dot", line_color=PALETTE["cycle"][2],
                      annotation_text=f"target {target:.0%}", annotation_position="bottom right")
    _cost_axis(fig, f, uniform_bits)
    fig.update_layout(**_LAYOUT, title="Mitigations: refusal recovered vs memory cost")
    fig.update_yaxes(title="recovery of full-precision refusal", tickformat=".0%")
    return fig


def paired_flip_figure(rows: pd.DataFrame | Sequence[Mapping[str, Any]], *, uniform: Mapping[str, float],
                       uniform_bits: float | None = None) -> go.Figure:
    """Each candidate's conditional flip rate (Wilson CI) on the prompts refused at full precision against its
    memory cost, with the uniform scheme's flip rate on the same prompts as a line per split: a flip rate is
    bounded in [0, 1], so no axis can be driven by a noisy denominator. Columns: ``name, bits_per_element, flip``
    (``low, high, split`` optional); ``uniform``: split → the uniform scheme's flip rate."""
    f, fig = _candidate_points(rows, "flip")
    for i, split in enumerate(f["split"].drop_duplicates()):
        color = PALETTE["cycle"][i % 8]
        u = uniform.get(str(split))
        if u is not None and not math.isnan(float(u)):
            fig.add_hline(y=float(u), line_dash="dash", line_color=color,
                          annotation_text=f"uniform scheme, {split}: {float(u):.0%}", annotation_position="top left")
    _cost_axis(fig, f, uniform_bits)
    fig.update_layout(**_LAYOUT, title="Mitigations: refusals still lost vs memory cost (0 = full precision)")
    fig.update_yaxes(title="conditional flip rate (refused prompts)", tickformat=".0%", range=[-0.02, 1.02])
    return fig


def trajectory_figure(trajectory: Sequence[Mapping[str, Any]], *, threshold: float = 0.8) -> go.Figure:
    """The adaptive mode's trajectory: P(label) for each label against the number of refused calibration
    prompts, with the confidence threshold. ``trajectory``: rows with ``n_refused`` and ``p_label``."""
    labels = sorted({k for t in trajectory for k in (t.get("p_label") or {})})
    fig = go.Figure()
    for i, lab in enumerate(labels):
        fig.add_trace(go.Scatter(x=[t.get("n_refused") for t in trajectory],
                                 y=[(t.get("p_label") or {}).get(lab, 0.0) for t in trajectory], mode="lines+markers",
                                 name=lab, line={"color": PALETTE["cycle"][i % 8]}))
    fig.add_hline(y=threshold, line_dash="dash", line_color=PALETTE["reference"],
                  annotation_text=f"stated at {threshold:.0%}", annotation_position="top left")
    fig.update_layout(**_LAYOUT, title="Label confidence as calibration prompts are added")
    fig.update_xaxes(title="refused calibration prompts")
    fig.update_yaxes(title="share of bootstrap resamples", tickformat=".0%", range=[0, 1.02])
    return fig
