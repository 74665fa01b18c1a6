"""Bit-width sweeps: refusal, flips and perplexity against bits, and where collapse begins.

``bit_sweep(model, families=("int{b}-token-asym",), bits=(8, 6, 5, 4, 3, 2))`` evaluates every
(family, bits) scheme plus full precision in *one* batched run (per-row plans), judges 32-token greedy
completions, measures perplexity under the same plans, and returns a DataFrame with one row per
scheme. A family without ``{b}`` (``"q4_0"``, ``"fp8_e5m2"``) is a single point. ``onset_bits`` is the
highest bit-width at which collapse has begun — conditional flip rate >= the collapse threshold *and*
the Wilson interval's lower bound above zero.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kvgeom.evaluate import FULL, evaluate, perplexity, summarize
from kvgeom.quant import Scheme
from kvgeom.quant.plan import QuantPlan
from kvgeom.stats import Thresholds

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from kvgeom.models import KVModel

__all__ = ["bit_sweep", "expand_family", "onset_bits", "plot_bit_sweep"]

KIVI_BITS = (4, 2)


def expand_family(family: str, bits: Sequence[int]) -> list[tuple[int | None, str]]:
    """``[(bits, scheme string)]`` of a family; KIVI families keep only b in {2, 4}."""
    if "{b}" not in family:
        Scheme.parse(family)  # validate
        return [(None, family)]
    out = []
    for b in bits:
        if family.startswith("kivi") and b not in KIVI_BITS:
            continue
        text = family.format(b=b)
        Scheme.parse(text)
        out.append((b, text))
    if not out:
        raise ValueError(f"family {family!r} has no valid bit-width among {list(bits)}")
    return out


def onset_bits(frame: pd.DataFrame, thresholds: Thresholds | None = None) -> int | None:
    """Highest ``bits`` whose flip rate >= ``collapse_at`` with the CI's lower bound above zero."""
    t = thresholds or Thresholds()
    hit = frame[(frame["bits"].notna()) & (frame["flip_rate"] >= t.collapse_at) & (frame["flip_low"] > 0)]
    return int(hit["bits"].max()) if len(hit) else None


def bit_sweep(
    model: KVModel,
    families: Sequence[str] = ("int{b}-token-asym",),
    bits: Sequence[int] = (8, 6, 5, 4, 3, 2),
    *,
    prompts: Any = "harmful",
    text: str | None = None,
    mode: str = "forward",
    site: str = "k",
    prefill: str = "quantized",
    modes: dict[str, dict] | None = None,
    max_new_tokens: int = 32,
    ppl_tokens: int | None = 4096,
    batch_size: int = 64,
    thresholds: Thresholds | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sweep schemes of ``families`` over ``bits``; returns ``(summary, rows)``.

    ``summary`` has one row per scheme (``family, bits, scheme, bits_per_element, refusal_*``,
    ``flip_*``, ``ppl``, ``ppl_ratio``, ``class``) plus the full-precision row; ``rows`` is the per-
    completion table from :func:`kvgeom.evaluate.evaluate`. ``modes`` optionally overrides
    ``mode/site/prefill`` per family (e.g. ``{"q4_0": {"mode": "cache", "site": "rot_k"}}``).
    ``summary.attrs["onset_bits"]`` maps family → onset bits, ``attrs["timings"]`` the wall times.
    """
    t0 = time.perf_counter()
    plans: list[QuantPlan | None] = [None]
    meta: list[dict] = [{"family": FULL, "bits": np.nan, "scheme": "none"}]
    for fam in families:
        opts = {"mode": mode, "site": site, "prefill": prefill, **((modes or {}).get(fam, {}))}
        if opts["mode"] == "cache":
            opts["site"] = "rot_k"
        for b, text_scheme in expand_family(fam, bits):
            plans.append(QuantPlan(text_scheme, mode=opts["mode"], site=opts["site"], prefill=opts["prefill"]))
            meta.append({"family": fam, "bits": b if b is not None else np.nan, "scheme": text_scheme,
                         "mode": opts["mode"], "site": opts["site"]})
    rows = evaluate(model, prompts, plans, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    progress=progress)
    t1 = time.perf_counter()
    summary = summarize(rows, thresholds=thresholds)
    ppl = perplexity(model, text, plans, max_tokens=ppl_tokens, batch_size=max(1, batch_size // 8),
                     progress=progress)
    t2 = time.perf_counter()
    labels = [p.label if p is not None else FULL for p in plans]
    info = pd.DataFrame(meta).assign(plan=labels)
    info["bits_per_element"] = [
        16.0 if p is None else Scheme.parse(str(p.scheme)).bits_per_element_for(
            d_head=model.d_head, n_kv_heads=model.n_kv_heads)
        for p in plans
    ]
    out = info.merge(summary, on="plan", how="left").merge(ppl[["plan", "ppl", "ppl_ratio"]], on="plan", how="left")
    out = out.rename(columns={"flip_rate": "flip_rate", "refusal_rate": "refusal_rate"})
    out.attrs["onset_bits"] = {fam: onset_bits(out[out["family"] == fam], thresholds)
                               for fam in families if "{b}" in fam}
    out.attrs["timings"] = {"evaluate_s": t1 - t0, "perplexity_s": t2 - t1, "total_s": t2 - t0}
    return out, rows


def plot_bit_sweep(summary: pd.DataFrame, title: str = "Refusal and perplexity against KV-cache bits") -> go.Figure:
    """The 'phase transition' picture: refusal rate (with 95% CI band) and perplexity ratio (second axis)
    against bits, one colour per family; single-point schemes as markers at their bits per element."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    fig = go.Figure()
    full = summary[summary["family"] == FULL]
    palette = qualitative.Plotly
    fams = [f for f in summary["family"].unique() if f != FULL]
    for i, fam in enumerate(fams):
        sub = summary[summary["family"] == fam].copy()
        colour = palette[i % len(palette)]
        x = sub["bits"].where(sub["bits"].notna(), sub["bits_per_element"])
        order = np.argsort(-x.to_numpy())
        sub, x = sub.iloc[order], x.iloc[order]
        fig.add_trace(go.Scatter(x=x, y=sub["refusal_rate"], mode="lines+markers", name=f"{fam} refusal",
                                 line={"color": colour},
                                 error_y={"type": "data", "symmetric": False,
                                          "array": sub["refusal_high"] - sub["refusal_rate"],
                                          "arrayminus": sub["refusal_rate"] - sub["refusal_low"]},
                                 hovertext=sub["scheme"]))
        fig.add_trace(go.Scatter(x=x, y=sub["ppl_ratio"], mode="lines+markers", name=f"{fam} ppl ratio",
                                 line={"color": colour, "dash": "dot"}, yaxis="y2", hovertext=sub["scheme"]))
    if len(full):
        fig.add_hline(y=float(full["refusal_rate"].iloc[0]), line_dash="dash", line_color="grey",
                      annotation_text="full-precision refusal")
    fig.update_layout(
        title=title, xaxis={"title": "bits (per element, before overhead)", "autorange": "reversed"},
        yaxis={"title": "refusal rate (95% Wilson CI)", "range": [0, 1.05]},
        yaxis2={"title": "perplexity ratio vs full precision", "overlaying": "y", "side": "right",
                "type": "log"},
        legend={"orientation": "h", "y": -0.2}, template="plotly_white",
    )
    return fig
