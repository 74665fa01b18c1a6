"""PCR (with a bootstrap CI), channel-ablation causal ratios and outlier channels (formulas: :mod:`kvgeom.taxonomy`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from kvgeom.stats import BootstrapCI, bootstrap_ci


def require_columns(frame: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing} (has {list(frame.columns)})")


# ------------------------------------------------------------------------------------------ PCR


def check_share(x: float, what: str) -> float:
    x = float(x)
    if math.isnan(x):
        return x
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{what} is a flip rate in [0, 1], got {x!r}")
    return x


def pcr(flip_per_channel: float, flip_per_tensor: float) -> float:
    """Per-channel recovery ``1 - flip(per-channel) / flip(per-tensor)``.

    NaN (undefined) when ``flip_per_tensor == 0`` (nothing to recover) or either input is NaN. Can be negative
    (per-channel worse than per-tensor). Raises ValueError for rates outside [0, 1].
    """
    c = check_share(flip_per_channel, "flip_per_channel")
    t = check_share(flip_per_tensor, "flip_per_tensor")
    if math.isnan(c) or math.isnan(t) or t == 0.0:
        return math.nan
    return 1.0 - c / t


def _flags(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of per-prompt booleans, got shape {a.shape}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{what} must hold booleans (or 0/1), got values {np.unique(a)[:5]}")
        a = a.astype(bool)
    return a


def pcr_with_ci(
    per_channel_flipped: Sequence[bool] | np.ndarray,
    per_tensor_flipped: Sequence[bool] | np.ndarray,
    *,
    baseline_refused: Sequence[bool] | np.ndarray | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapCI:
    """PCR with a percentile bootstrap CI over prompts (:func:`kvgeom.stats.bootstrap_ci`).

    ``per_channel_flipped[i]`` / ``per_tensor_flipped[i]``: did prompt ``i`` (refused at full precision) stop being
    refused under the per-channel / per-tensor scheme at the critical layer. Both arrays are paired by prompt. If
    ``baseline_refused`` is given, the arrays cover all prompts and each resample's flip rates are conditional on
    the resampled baseline-refused prompts: ``flip = #(flipped & refused) / #refused``. Resamples where
    ``flip(per-tensor) = 0`` give NaN and are dropped (``n_valid`` counts the rest).
    """
    c = _flags(per_channel_flipped, "per_channel_flipped")
    t = _flags(per_tensor_flipped, "per_tensor_flipped")
    if c.shape != t.shape:
        raise ValueError(f"per_channel_flipped has {c.size} prompts but per_tensor_flipped {t.size}: pair them")
    base = np.ones_like(c) if baseline_refused is None else _flags(baseline_refused, "baseline_refused")
    if base.shape != c.shape:
        raise ValueError(f"baseline_refused has {base.size} prompts, the flip arrays {c.size}")
    if (c & ~base).any() or (t & ~base).any():
        raise ValueError("a prompt not refused at baseline cannot flip: flipped implies baseline_refused")

    def stat(idx: np.ndarray) -> float:
        n = base[idx].sum()
        if n == 0:
            return math.nan
        return pcr(c[idx].sum() / n, t[idx].sum() / n)

    return bootstrap_ci(stat, c.size, n_resamples=n_resamples, seed=seed, confidence=confidence)


# ------------------------------------------------------------------------------------------ channel ablation


def causal_ratio(outlier_only_flip: float, random_matched_flips: Sequence[float] | float) -> float:
    """``outlier_only_flip / mean(random_matched_flips)``: how much more quantizing only the outlier channels
    flips than quantizing as many random channels. NaN when the random mean is 0 or there is no random run."""
    o = check_share(outlier_only_flip, "outlier_only_flip")
    r = np.atleast_1d(np.asarray(random_matched_flips, dtype=float))
    if r.size == 0:
        return math.nan
    for v in r:
        check_share(v, "random_matched_flips")
    mean = float(np.nanmean(r)) if not np.isnan(r).all() else math.nan
    if math.isnan(o) or math.isnan(mean) or mean == 0.0:
        return math.nan
    return o / mean


def ablation_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per fraction: outlier-only flip, random-matched mean/sd/count over seeds, non-outlier flip, causal ratio.

    ``rows`` columns: ``subset`` (``"outlier"``, ``"random"`` or ``"non-outlier"``), ``fraction``, ``flip``
    (``seed`` optional). Outlier and non-outlier rows may have no fraction of their own (NaN): they are then
    compared with every fraction. Returns columns ``fraction, outlier_flip, random_mean, random_sd, random_n,
    non_outlier_flip, causal_ratio``.
    """
    require_columns(rows, ("subset", "fraction", "flip"), "channel-ablation rows")
    unknown = set(rows["subset"]) - {"outlier", "random", "non-outlier"}
    if unknown:
        raise ValueError(f"unknown ablation subsets {sorted(unknown)}: use 'outlier', 'random', 'non-outlier'")
    rand = rows[rows["subset"] == "random"]
    fractions = sorted(set(rows["fraction"].dropna().astype(float)))

    def pick(subset: str, f: float) -> float:
        sub = rows[rows["subset"] == subset]
        at = sub[np.isclose(sub["fraction"].astype(float), f)]
        if at.empty:
            at = sub[sub["fraction"].isna()]
        return float(at["flip"].mean()) if not at.empty else math.nan

    out = []
    for f in fractions:
        r = rand[np.isclose(rand["fraction"].astype(float), f)]["flip"].astype(float)
        o = pick("outlier", f)
        out.append({
            "fraction": float(f), "outlier_flip": o,
            "random_mean": float(r.mean()) if len(r) else math.nan,
            "random_sd": float(r.std(ddof=1)) if len(r) > 1 else math.nan,
            "random_n": int(len(r)),
            "non_outlier_flip": pick("non-outlier", f),
            "causal_ratio": causal_ratio(o, r.to_numpy()) if len(r) and not math.isnan(o) else math.nan,
        })
    return pd.DataFrame(out, columns=["fraction", "outlier_flip", "random_mean", "random_sd", "random_n",
                                      "non_outlier_flip", "causal_ratio"])


# ------------------------------------------------------------------------------------------ outlier channels


def outlier_channels(kmax: np.ndarray | Any, top_frac: float = 0.05) -> pd.DataFrame:
    """Rank each layer's key channels by magnitude and flag the top ``top_frac`` as outliers.

    Args:
        kmax: ``[layer, kv_head, d_head]`` array (numpy or torch) of ``max |K|`` over the calibration prompts.
        top_frac: share of each layer's ``C = kv_head * d_head`` channels flagged; ``n_out = max(1, ceil(top_frac
            * C))`` (5% of 128 channels → 7).

    Returns:
        One row per (layer, head, dim): ``layer, head, dim, channel (= head * d_head + dim), magnitude, rank``
        (1 = largest within the layer; ties broken by head then dim) and ``is_outlier`` (``rank <= n_out``).
    """
    if hasattr(kmax, "detach"):
        kmax = kmax.detach().cpu().numpy()
    k = np.asarray(kmax, dtype=float)
    if k.ndim != 3:
        raise ValueError(f"kmax must be [layer, kv_head, d_head], got shape {k.shape}")
    if not 0.0 < top_frac <= 1.0:
        raise ValueError(f"top_frac must be in (0, 1], got {top_frac!r}")
    if np.isnan(k).any() or (k < 0).any():
        raise ValueError("kmax holds max |K| magnitudes: it must be finite and >= 0")
    n_layers, n_heads, d_head = k.shape
    n_ch = n_heads * d_head
    n_out = max(1, math.ceil(top_frac * n_ch - 1e-9))
    layer, head, dim = np.meshgrid(np.arange(n_layers), np.arange(n_heads), np.arange(d_head), indexing="ij")
    frame = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "dim": dim.ravel(),
                          "channel": (head * d_head + dim).ravel(), "magnitude": k.ravel()})
    frame = frame.sort_values(["layer", "magnitude", "head", "dim"], ascending=[True, False, True, True],
                              kind="mergesort")
    frame["rank"] = frame.groupby("layer").cumcount() + 1
    frame["is_outlier"] = frame["rank"] <= n_out
    frame.attrs.update({"top_frac": top_frac, "n_out": n_out, "n_kv_heads": n_heads, "d_head": d_head})
    return frame.sort_values(["layer", "head", "dim"]).reset_index(drop=True)


def outlier_heatmap(table: pd.DataFrame) -> dict[str, Any]:
    """Heatmap data from :func:`outlier_channels`: ``{"z": [layer][channel] magnitudes, "layers", "n_kv_heads",
    "d_head", "outliers": [[layer, channel], ...]}`` (JSON-friendly)."""
    require_columns(table, ("layer", "head", "dim", "magnitude", "is_outlier"), "outlier table")
    n_heads = int(table["head"].max()) + 1
    d_head = int(table["dim"].max()) + 1
    layers = sorted(int(x) for x in table["layer"].unique())
    z = np.full((len(layers), n_heads * d_head), np.nan)
    pos = {lay: i for i, lay in enumerate(layers)}
    rows = table["layer"].map(pos).to_numpy()
    cols = (table["head"] * d_head + table["dim"]).to_numpy()
    z[rows, cols] = table["magnitude"].to_numpy(dtype=float)
    out = table[table["is_outlier"]]
    return {"z": z.tolist(), "layers": layers, "n_kv_heads": n_heads, "d_head": d_head,
            "outliers": [[int(r.layer), int(r.head) * d_head + int(r.dim)] for r in out.itertuples()]}
