"""Bit-width sweeps: refusal, flips and perplexity against bits, and where collapse begins.

``bit_sweep(model, families=("int{b}-token-asym",), bits=(8, 6, 5, 4, 3, 2))`` evaluates every
(family, bits) scheme plus full precision in *one* batched run (per-row plans), judges 32-token greedy
completions, measures perplexity under the same plans, and returns a DataFrame with one row per
scheme. A family without ``{b}`` (``"q4_0"``, ``"fp8_e5m2"``) is a single point. ``onset_bits`` is the
highest bit-width at which collapse has begun — conditional flip rate >= the collapse threshold *and*
the Wilson interval's lower bound above zero.

This is the one bit sweep: ``kvgeom sweep`` and the audit's ``bit_sweep`` stage both call :func:`bit_sweep`; the
audit passes its own plans (mode, site), judge and settling, its full-precision verdicts and perplexity
(``baseline``, ``full_ppl``) and what other stages already generated (``known_verdicts``, ``known_ppl_ratio``), so
nothing is generated twice. Proved by ``tests/test_bitwidth.py`` (reuse gives the same summary as generating).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kvgeom.evaluate import FULL, evaluate, perplexity, summarize
from kvgeom.quant import Scheme
from kvgeom.quant.plan import QuantPlan
from kvgeom.quant.scheme import expand_family
from kvgeom.stats import Thresholds

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from kvgeom.models import KVModel

__all__ = ["bit_sweep", "expand_family", "onset_bits", "plot_bit_sweep"]


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
    progress: bool | str = False,
    plan: Callable[[str], QuantPlan] | None = None,
    judge: Any = None,
    settle: bool = False,
    baseline: pd.Series | None = None,
    known_verdicts: Mapping[str, Mapping[str, str]] | None = None,
    full_ppl: float | None = None,
    known_ppl_ratio: Mapping[str, float] | None = None,
    ppl_batch_size: int | None = None,
    ppl_windows: Mapping[str, int] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sweep schemes of ``families`` over ``bits``; returns ``(summary, rows)``.

    ``summary`` has one row per scheme (``family, bits, scheme, bits_per_element, refusal_*``,
    ``flip_*``, ``ppl``, ``ppl_ratio``, ``class``) plus the full-precision row; ``rows`` is the per-
    completion table from :func:`kvgeom.evaluate.evaluate`. ``modes`` optionally overrides
    ``mode/site/prefill`` per family (e.g. ``{"q4_0": {"mode": "cache", "site": "rot_k"}}``).
    ``summary.attrs["onset_bits"]`` maps family → onset bits, ``attrs["timings"]`` the wall times.

    Reuse (what the audit passes): ``plan(scheme) -> QuantPlan`` builds each point's plan (instead of
    ``mode/site/prefill/modes``); ``judge``/``settle`` as in :func:`~kvgeom.evaluate.evaluate`; ``baseline``:
    full-precision verdicts by prompt id (the full-precision row is then not generated); ``known_verdicts``:
    canonical scheme → verdicts by prompt id already generated on the same prompts with the same plan;
    ``full_ppl``: the full-precision perplexity (then not measured; ratios are ``ppl / full_ppl``);
    ``known_ppl_ratio``: canonical scheme → perplexity ratio already measured; ``ppl_batch_size`` (default
    ``batch_size // 8``); ``ppl_windows``: ``window``/``stride`` of :func:`kvgeom.evaluate.perplexity` (default its
    own).
    """
    t0 = time.perf_counter()
    plans: list[QuantPlan | None] = [None]
    meta: list[dict] = [{"family": FULL, "bits": np.nan, "scheme": "none"}]
    for fam in families:
        opts = {"mode": mode, "site": site, "prefill": prefill, **((modes or {}).get(fam, {}))}
        if opts["mode"] == "cache":
            opts["site"] = "rot_k"
        for b, text_scheme in expand_family(fam, bits):
            p = plan(text_scheme) if plan is not None else QuantPlan(text_scheme, mode=opts["mode"],
                                                                     site=opts["site"], prefill=opts["prefill"])
            plans.append(p)
            meta.append({"family": fam, "bits": b if b is not None else np.nan, "scheme": text_scheme,
                         "mode": p.mode, "site": p.site})
    known = {k: dict(v) for k, v in (known_verdicts or {}).items()}
    baseline = pd.Series(baseline) if baseline is not None and not isinstance(baseline, pd.Series) else baseline
    labels = [p.label if p is not None else FULL for p in plans]
    gen = [p for p in plans if not ((p is None and baseline is not None) or
                                    (p is not None and str(p.scheme) in known))]
    if gen:
        rows = evaluate(model, prompts, gen, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        judge=judge, settle=settle, progress=progress)
    else:
        rows = pd.DataFrame(columns=["plan", "prompt_id", "verdict"])
    given = [pd.DataFrame({"plan": FULL, "prompt_id": list(baseline.index), "verdict": list(baseline.values)})
             ] if baseline is not None else []
    given += [pd.DataFrame({"plan": label, "prompt_id": list(known[str(p.scheme)]),
                            "verdict": list(known[str(p.scheme)].values())})
              for p, label in zip(plans, labels, strict=True) if p is not None and p not in gen]
    rows = pd.concat([*given[:1], rows, *given[1:]], ignore_index=True) if given else rows
    t1 = time.perf_counter()
    summary = summarize(rows, thresholds=thresholds)
    ratios = dict(known_ppl_ratio or {})
    todo = [p for p in plans if not ((p is None and full_ppl is not None) or
                                     (p is not None and str(p.scheme) in ratios))]
    ppl_bs = ppl_batch_size or max(1, batch_size // 8)
    ppl = perplexity(model, text, todo, max_tokens=ppl_tokens, batch_size=ppl_bs, **dict(ppl_windows or {}),
                     progress=progress if isinstance(progress, bool) else False) \
        if todo else pd.DataFrame(columns=["plan", "ppl", "ppl_ratio"])
    if full_ppl is not None:
        ppl = ppl.assign(ppl_ratio=ppl["ppl"] / full_ppl)
    extra = [{"plan": label, "ppl": np.nan, "ppl_ratio": ratios[str(p.scheme)]}
             for p, label in zip(plans, labels, strict=True) if p is not None and p not in todo]
    if full_ppl is not None:
        extra.append({"plan": FULL, "ppl": full_ppl, "ppl_ratio": 1.0})
    if extra:
        ppl = pd.concat([ppl[["plan", "ppl", "ppl_ratio"]], pd.DataFrame(extra)], ignore_index=True)
    t2 = time.perf_counter()
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
