"""Per-layer sensitivity of the safety subspace to a KV-quantization scheme, with bootstrap CIs.

At one K/V site (default ``rot_k``: the post-RoPE keys that forward-mode plans quantize) and layer
``l``, for harmful prompt ``i`` and post-instruction position ``p``: ``x`` the clean K (or V) vector
(heads concatenated), ``e = fake_quant(x) - x`` (ranges measured on the whole clean prompt), ``S`` the
layer's safety subspace (:func:`kvgeom.geometry.safety_subspace`), ``δ_p = mean harmful - mean harmless``
at ``p``. Norms over a prompt set are root-sums over its (prompt, position) vectors::

    rho_geo    = (||P_S e|| / ||P_S x||) / (||e|| / ||x||)
    rho_margin = (||P_S e||_rms / ||P_S δ||_rms) / (||e|| / ||x||)      (rms over vectors / positions)
    rho_margin_random: the same with S replaced by random rank-k subspaces (mean of n_random draws)

Causal ratios (noise injected with :func:`kvgeom.noise.noise_sweep`; "drop" = mean decrease of the
refusal score of the harmful prompts, clean minus noisy):

    rho_causal  = drop(noise in S) / drop(same-norm noise in a random rank-k subspace, mean of draws)
    attribution = drop(P_S e) / (drop(P_S e) + drop(P_S⊥ e))        (share of the scheme's effect in S)
    sp_subspace = drop(noise in S) / ΔNLL(noise in S)                  (refusal change per nat of NLL)
    sp_isotropic= drop(isotropic) / ΔNLL(isotropic);  sp_ratio = sp_subspace / sp_isotropic

CIs: percentile bootstrap over harmful prompts (:func:`kvgeom.stats.bootstrap_ci`); ``S``, ``δ`` and the
text NLL changes are held fixed. A ratio is **undefined** (NaN in the numeric column, ``False`` in
``{name}_defined`` and the reason in ``{name}_note``; never inf) when ``S`` is undefined (no separation),
when its denominator is zero (``||e|| = 0``, ``||P_S δ|| = 0``), or, for causal ratios, when the
denominator effect is below ``min_effect`` in absolute value.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from kvgeom.geometry.directions import ZERO_REL, as_matrix
from kvgeom.geometry.subspace import safety_subspace
from kvgeom.noise import capture_padded, noise_sweep, orthonormal, quant_error, ratio_ci
from kvgeom.runtime.forward import encode
from kvgeom.sites import KV_SITES
from kvgeom.stats import bootstrap_ci

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["METRICS", "SensitivityProfile", "plot_sensitivity", "sensitivity_profile"]

METRICS = ("rho_geo", "rho_margin", "rho_margin_random", "rho_causal", "attribution", "sp_subspace",
           "sp_isotropic", "sp_ratio")


@dataclass(frozen=True)
class SensitivityProfile:
    """Per-layer sensitivity (module doc). ``frame``: one row per layer with each metric, its ``_low``/``_high`` CI,
    ``_defined`` flag and ``_note``, plus the raw effects (``drop_*``, ``d_nll_*``); shows itself in Jupyter."""

    scheme: str
    site: str
    frame: pd.DataFrame = field(repr=False)
    settings: dict = field(default_factory=dict)
    subspaces: dict = field(default_factory=dict, repr=False)

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def _repr_html_(self) -> str:  # the per-layer table and plot_sensitivity (kvgeom.display)
        from kvgeom.display import result_html
        cols = [c for c in ("layer", "rho_geo", "rho_geo_low", "rho_geo_high", "rho_margin") if c in self.frame]
        return result_html(f"Sensitivity: {self.scheme}", self.frame[cols], plot_sensitivity(self), note=self.site)

    def max(self, metric: str) -> dict:
        """The layer with the largest defined value of ``metric`` and its CI."""
        f = self.frame[self.frame[f"{metric}_defined"]]
        if f.empty:
            return {"metric": metric, "layer": None, "value": math.nan, "low": math.nan, "high": math.nan}
        r = f.loc[f[metric].idxmax()]
        return {"metric": metric, "layer": int(r["layer"]), "value": float(r[metric]), "low": float(r[f"{metric}_low"]),
                "high": float(r[f"{metric}_high"])}


def _ci(stat: Callable[[np.ndarray], float], n: int, n_resamples: int, seed: int) -> tuple[float, float, float]:
    return (c := bootstrap_ci(stat, n, n_resamples=n_resamples, seed=seed)).estimate, c.low, c.high


def _safe_ratio(num: float, den: float, tol: float) -> float:
    return num / den if abs(den) > tol and np.isfinite(num) else math.nan


def _put(rec: dict, name: str, est_low_high: tuple[float, float, float], note: str = "") -> None:
    est, lo, hi = est_low_high
    ok = bool(np.isfinite(est)) and not note
    rec[name], rec[f"{name}_low"], rec[f"{name}_high"] = (est, lo, hi) if ok else (math.nan, math.nan, math.nan)
    rec[f"{name}_defined"] = ok
    rec[f"{name}_note"] = note if note else ("" if ok else "undefined: zero denominator")


def _workers(workers: int | None, n_layers: int, on_gpu: bool = False) -> int:
    """Per-layer statistics threads: automatic is 1 on a GPU (threads only contend there), else min(8, cpus)."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 (or None for automatic), got {workers}")
    auto = 1 if on_gpu else min(8, os.cpu_count() or 1)
    return max(1, min(n_layers, workers if workers is not None else auto))


def _single_thread() -> None:
    """Pool-thread initializer: OpenMP thread counts are per calling thread, so each worker sets its own."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=1, user_api="openmp")


@contextlib.contextmanager
def _one_thread_per_op() -> Iterator[None]:
    """Torch and BLAS/OpenMP ops single-threaded while the layers run in threads (threads x per-op thread
    pools would oversubscribe the cores). Restored on exit, even on error."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def _layer_stats(la: int, *, xh_all: dict, xb_all: dict, mask: torch.Tensor, scheme: Any, site: str, n_post: int,
                 k: int | None, var: float) -> dict[str, Any]:
    """One layer's error, clean vectors, safety subspace and sums of squares (phase 1)."""
    x_full = xh_all[(site, la)]  # on the host, or on the model's GPU (then all of this runs there)
    e = as_matrix(quant_error(x_full, mask.to(x_full.device), scheme, site)[:, -n_post:], site).double()  # [n, P, D]
    x = as_matrix(x_full[:, -n_post:], site).double()
    xb = as_matrix(xb_all[(site, la)][:, -n_post:], site).double()
    sub = safety_subspace(x, xb, site="resid_pre", k=k, var=var, layer=la)
    ee, xx = (e ** 2).sum((1, 2)).cpu().numpy(), (x ** 2).sum((1, 2)).cpu().numpy()  # per prompt
    zero = ee.sum() <= ZERO_REL ** 2 * xx.sum()
    return {"layer": la, "e": e, "x": x, "xb": xb, "sub": sub, "ee": ee, "xx": xx, "dim": x.shape[-1],
            "zero_error": zero, "random": sub.defined and not zero}


def _layer_record(p: dict[str, Any], draws: list[torch.Tensor], *, scheme_s: str, site: str, n: int, n_post: int,
                  n_resamples: int, seed: int) -> dict[str, Any]:
    """One layer's geometric ratios with CIs (phase 3); ``draws``: the Gaussian matrices of its random subspaces."""
    la, e, x, xb, sub, ee, xx = p["layer"], p["e"], p["x"], p["xb"], p["sub"], p["ee"], p["xx"]
    rec: dict[str, Any] = {"layer": la, "site": site, "scheme": scheme_s, "k": sub.k, "dim": p["dim"],
                           "effective_rank": sub.effective_rank(), "subspace_note": sub.note}
    rec["rel_err"] = math.sqrt(ee.sum() / xx.sum()) if xx.sum() > 0 else math.nan
    delta = x.mean(0) - xb.mean(0)  # [P, D]
    tol = 1e-12
    if not sub.defined:
        for m in ("rho_geo", "rho_margin", "rho_margin_random"):
            _put(rec, m, (math.nan,) * 3, sub.note)
        return rec
    if p["zero_error"]:
        for m in ("rho_geo", "rho_margin", "rho_margin_random"):
            _put(rec, m, (math.nan,) * 3, "undefined: the scheme leaves these K/V unchanged (||e|| = 0)")
        return rec
    pe = (sub.project(e) ** 2).sum((1, 2)).cpu().numpy()
    px = (sub.project(x) ** 2).sum((1, 2)).cpu().numpy()
    sep = float((sub.project(delta) ** 2).sum(-1).mean().sqrt())

    def rel(i: np.ndarray) -> float:
        return math.sqrt(ee[i].sum() / xx[i].sum())

    def geo(i: np.ndarray) -> float:
        return _safe_ratio(math.sqrt(pe[i].sum() / max(px[i].sum(), 0.0)) if px[i].sum() > 0 else math.nan,
                           rel(i), tol)

    def margin(i: np.ndarray) -> float:
        if sep <= tol:
            return math.nan
        return _safe_ratio(math.sqrt(pe[i].sum() / (len(i) * n_post)) / sep, rel(i), tol)

    _put(rec, "rho_geo", _ci(geo, n, n_resamples, seed), "" if px.sum() > 0 else "undefined: ||P_S x|| = 0")
    _put(rec, "rho_margin", _ci(margin, n, n_resamples, seed),
         "" if sep > tol else "undefined: no harmful/harmless separation inside S")
    rand_pe, rand_sep = [], []
    for g in draws:
        r = orthonormal(g).to(e.device)  # = random_subspace(dim, k, gen) with the same draw
        rand_pe.append(((e @ r) ** 2).sum((1, 2)).cpu().numpy())
        rand_sep.append(float(((delta @ r) ** 2).sum(-1).mean().sqrt()))
    rpe, rsep = np.stack(rand_pe), np.array(rand_sep)

    def margin_rand(i: np.ndarray) -> float:
        vals = np.sqrt(rpe[:, i].sum(1) / (len(i) * n_post)) / np.maximum(rsep, 1e-300)
        return float(vals.mean()) / rel(i)

    _put(rec, "rho_margin_random", _ci(margin_rand, n, n_resamples, seed),
         "" if (rsep > tol).all() else "undefined: a random subspace has no separation")
    all_idx = np.arange(n)
    draws_ = np.sqrt(rpe.sum(1) / (n * n_post)) / np.maximum(rsep, 1e-300) / rel(all_idx)
    rec["rho_margin_random_sd"] = float(draws_.std(ddof=1)) if len(draws) > 1 else math.nan
    return rec


def sensitivity_profile(
    model: KVModel,
    scheme: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    site: str = "rot_k",
    layers: Sequence[int] | None = None,
    causal_layers: Sequence[int] | None = None,
    k: int | None = None,
    var: float = 0.9,
    n_random: int = 8,
    where: str = "post",
    text: str | bool | None = None,
    n_text_tokens: int = 512,
    window: int = 128,
    min_effect: float = 1e-3,
    n_resamples: int = 1000,
    seed: int = 0,
    chunk: int = 64,
    progress: bool = False,
    capture_cache: dict | None = None,
    n_causal: int | None = None,
    workers: int | None = None,
) -> SensitivityProfile:
    """Per-layer geometric (``layers``, default all) and causal (``causal_layers``, default = ``layers``;
    ``[]`` skips them) sensitivity of ``site`` to ``scheme``; see the module doc for the formulas.

    ``text=True`` uses the bundled text (:func:`kvgeom.prompts.load_text`) for the safety-vs-perplexity
    ratios, cut to ``n_text_tokens`` tokens. ``capture_cache``: a dict shared between calls (e.g. one
    per scheme) so that the clean activations of the same prompts are captured once. ``n_causal``: run the
    causal (noise) rows on the first ``n_causal`` harmful prompts only (CPU budget). ``workers``: threads for
    the per-layer statistics (default ``min(8, cpu_count)``); the numbers do not depend on it.
    """
    from kvgeom.quant import Scheme

    if site not in KV_SITES:
        raise ValueError(f"sensitivity is measured at a K/V site ({', '.join(KV_SITES)}), got {site!r}")
    scheme_s = str(Scheme.parse(scheme)) if isinstance(scheme, str) else str(scheme)
    layers = list(range(model.n_layers)) if layers is None else [int(la) for la in layers]
    causal_layers = list(layers) if causal_layers is None else [int(la) for la in causal_layers]
    bh, bb = encode(model, list(harmful)), encode(model, list(harmless))
    n_post = bh.n_post[0]
    if set(bh.n_post) != {n_post} or set(bb.n_post) != {n_post}:
        raise ValueError("all prompts must have the same number of post-instruction tokens")
    cache = {} if capture_cache is None else capture_cache
    key = (id(model), tuple(harmful), tuple(harmless), site, tuple(layers))
    if key not in cache:
        keep = model.device if model.device.type == "cuda" else "cpu"  # GPU: the statistics run there too
        cache[key] = tuple(capture_padded(model, b, [site], layers, chunk=chunk, device=keep) for b in (bh, bb))
    xh_all, xb_all = cache[key]
    # Per-layer statistics in three phases so that threads can share the host-side float64 work (PCA, QR,
    # bootstrap) without changing a number: subspaces in parallel, the random draws serially in layer order
    # (one generator, as a plain loop would draw them), then the statistics in parallel.
    n = len(bh)
    stats = functools.partial(_layer_stats, xh_all=xh_all, xb_all=xb_all, mask=bh.mask, scheme=scheme, site=site,
                              n_post=n_post, k=k, var=var)
    record = functools.partial(_layer_record, scheme_s=scheme_s, site=site, n=n, n_post=n_post,
                               n_resamples=n_resamples, seed=seed)
    gen = torch.Generator().manual_seed(seed)

    def draw(parts: list[dict[str, Any]]) -> list[list[torch.Tensor]]:
        return [[torch.randn(p["dim"], p["sub"].k, generator=gen, dtype=torch.float64) for _ in range(n_random)]
                if p["random"] else [] for p in parts]

    n_workers = _workers(workers, len(layers), on_gpu=bool(layers) and xh_all[(site, layers[0])].is_cuda)
    if n_workers == 1:  # the plain loop, in the calling thread with its usual op threads
        parts = [stats(la) for la in layers]
        recs = list(map(record, parts, draw(parts)))
    else:
        with ThreadPoolExecutor(max_workers=n_workers, initializer=_single_thread) as pool, _one_thread_per_op():
            parts = list(pool.map(stats, layers))
            recs = list(pool.map(record, parts, draw(parts)))
    subspaces = {p["layer"]: p["sub"] for p in parts}
    frame = pd.DataFrame(recs)
    causal = [la for la in causal_layers if subspaces[la].defined] if causal_layers else []
    for m in ("rho_causal", "attribution", "sp_subspace", "sp_isotropic", "sp_ratio"):
        for la in layers:
            i = layers.index(la)
            note = (subspaces[la].note if not subspaces[la].defined else
                    "not measured (layer not in causal_layers)" if la not in causal_layers else "")
            for suffix, v in (("", math.nan), ("_low", math.nan), ("_high", math.nan), ("_defined", False),
                              ("_note", note)):
                frame.loc[i, f"{m}{suffix}"] = v
    if causal:
        if text is True:
            from kvgeom.prompts import load_text

            text = load_text()
        hc = list(harmful)[:n_causal] if n_causal else list(harmful)
        nc = len(hc)
        res = noise_sweep(model, scheme, hc, {la: subspaces[la].basis for la in causal}, site=site,
                          n_random=n_random, where=where, text=text or None, n_text_tokens=n_text_tokens,
                          window=window, seed=seed, chunk=chunk, progress=progress,
                          text_kinds=("isotropic", "subspace"))
        s = res.scores
        for la in causal:
            i = layers.index(la)
            per = {kind: s[(s["kind"] == kind) & (s["layer"] == la)].groupby("prompt")["drop"].mean().sort_index()
                   .to_numpy() for kind in ("quant", "isotropic", "subspace", "random", "quant_in", "quant_out")}
            for kind, v in per.items():
                frame.loc[i, f"drop_{kind}"] = float(v.mean())
            rec = {}
            for name, r in (("rho_causal", ratio_ci(per["subspace"], per["random"], min_effect=min_effect,
                                                    n_resamples=n_resamples, seed=seed,
                                                    what="random-subspace noise has no effect")),
                            ("attribution", ratio_ci(per["quant_in"], per["quant_in"] + per["quant_out"],
                                                     min_effect=min_effect, n_resamples=n_resamples, seed=seed,
                                                     what="the projected errors have no effect"))):
                _put(rec, name, (r.estimate, r.low, r.high), r.note)
            if res.text is not None:
                t = res.text[res.text["layer"] == la]
                dn = {kind: float(t[t["kind"] == kind]["d_nll"].mean()) for kind in ("isotropic", "subspace")}
                for kind in dn:
                    frame.loc[i, f"d_nll_{kind}"] = dn[kind]
                    frame.loc[i, f"kl_{kind}"] = float(t[t["kind"] == kind]["kl"].mean())
                ntol = 1e-5
                for kind, name in (("subspace", "sp_subspace"), ("isotropic", "sp_isotropic")):
                    _put(rec, name, _ci(lambda j, p=per[kind], d=dn[kind]: _safe_ratio(p[j].mean(), d, ntol), nc,  # noqa: B023
                                        n_resamples, seed),
                         "" if abs(dn[kind]) > ntol else f"undefined: |ΔNLL| <= {ntol}")
                def sp_ratio(j: np.ndarray, p=per, d=dn, t=ntol) -> float:
                    return _safe_ratio(_safe_ratio(p["subspace"][j].mean(), d["subspace"], t),
                                       _safe_ratio(p["isotropic"][j].mean(), d["isotropic"], t), 1e-12)

                _put(rec, "sp_ratio", _ci(sp_ratio, nc, n_resamples, seed),
                     "" if min(abs(dn["subspace"]), abs(dn["isotropic"])) > ntol else "undefined: |ΔNLL| too small")
            else:
                for name in ("sp_subspace", "sp_isotropic", "sp_ratio"):
                    _put(rec, name, (math.nan,) * 3, "not measured (no text)")
            for key, v in rec.items():
                frame.loc[i, key] = v
    for m in METRICS:
        frame[f"{m}_defined"] = frame[f"{m}_defined"].astype(bool)
    settings = {"scheme": scheme_s, "site": site, "k": k, "var": var, "n_random": n_random, "where": where,
                "n_harmful": n, "n_harmless": len(bb), "n_causal": n_causal or n, "n_post": n_post,
                "causal_layers": causal_layers,
                "n_text_tokens": n_text_tokens if text else 0, "window": window, "n_resamples": n_resamples,
                "seed": seed, "min_effect": min_effect}
    return SensitivityProfile(scheme_s, site, frame, settings, subspaces)


def plot_sensitivity(
    profile: SensitivityProfile | pd.DataFrame,
    *,
    critical_layers: Sequence[int] = (),
    metrics: Sequence[str] = ("rho_geo", "rho_margin", "rho_margin_random", "rho_causal"),
    title: str | None = None,
) -> Any:
    """Plotly figure: each metric per layer on a log y axis with its CI band; undefined (or non-positive,
    which a log axis cannot show) values are left out of the line and shown as ``x`` markers along the
    bottom whose hover says ``undefined`` and why; ``critical_layers`` are marked with vertical lines."""
    import plotly.graph_objects as go

    f = profile.frame if isinstance(profile, SensitivityProfile) else profile
    fig = go.Figure()
    colors = ["#1f77b4", "#ff7f0e", "#7f7f7f", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    pos_vals = [v for m in metrics if m in f for v in f[m] if v == v and v > 0]
    floor = min(pos_vals) / 3 if pos_vals else 0.1
    for ci, m in enumerate(metrics):
        if m not in f:
            continue
        col = colors[ci % len(colors)]
        ok = f[f"{m}_defined"] & (f[m] > 0)
        y = [float(v) if good else None for v, good in zip(f[m], ok, strict=True)]
        lo = [float(v) if good and v > 0 else None for v, good in zip(f[f"{m}_low"], ok, strict=True)]
        hi = [float(v) if good else None for v, good in zip(f[f"{m}_high"], ok, strict=True)]
        layers = f["layer"].tolist()
        fig.add_trace(go.Scatter(x=layers, y=hi, mode="lines", line={"width": 0}, showlegend=False,
                                 legendgroup=m, hoverinfo="skip", connectgaps=False))
        fig.add_trace(go.Scatter(x=layers, y=lo, mode="lines", line={"width": 0}, fill="tonexty",
                                 fillcolor=_rgba(col, 0.2), showlegend=False, legendgroup=m, hoverinfo="skip"))
        hover = [f"{m} L{la}: {v:.3g} [{lw:.3g}, {hh:.3g}]" if good else "" for la, v, lw, hh, good in
                 zip(layers, f[m], f[f"{m}_low"], f[f"{m}_high"], ok, strict=True)]
        fig.add_trace(go.Scatter(x=layers, y=y, mode="lines+markers", name=m, legendgroup=m, line={"color": col},
                                 hovertext=hover, hoverinfo="text", connectgaps=False))
        bad = [(la, note, v) for la, note, v, good in zip(layers, f[f"{m}_note"], f[m], ok, strict=True) if not good]
        if bad:
            fig.add_trace(go.Scatter(
                x=[b[0] for b in bad], y=[floor] * len(bad), mode="markers", name=f"{m} undefined",
                legendgroup=m, showlegend=False, marker={"symbol": "x", "color": col, "size": 7},
                hovertext=[f"{m} L{la}: undefined ({note or 'value <= 0, not on a log axis: ' + f'{v:.3g}'})"
                           for la, note, v in bad], hoverinfo="text"))
    for la in critical_layers:
        fig.add_vline(x=la, line_dash="dash", line_color="red", annotation_text=f"critical L{la}")
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray")
    scheme, site = (profile.scheme, profile.site) if isinstance(profile, SensitivityProfile) else ("", "")
    fig.update_layout(title=title or f"Per-layer sensitivity of the safety subspace: {scheme} at {site}",
                      xaxis_title="layer", yaxis_title="ratio (log scale)", yaxis_type="log", hovermode="closest")
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"
