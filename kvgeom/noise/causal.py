"""Causal ratios with noise at several layers at once: :func:`causal_ratio`, and the ratio statistic
:func:`ratio_ci` that :func:`kvgeom.geometry.sensitivity_profile` uses too.

For harmful prompts ``i`` and a set of layers ``L`` of one K/V site, every condition acts on all of ``L`` at
once (at every real prompt position with ``where="all"``, the default), each layer with its own noise of its
own norm (:mod:`kvgeom.noise.conditions`). With ``drop_i(kind)`` = clean minus noisy refusal score of prompt
``i`` (random draws averaged per prompt first)::

    drop(kind)   = mean_i drop_i(kind)                     kinds: quant, subspace (S), random, isotropic
    rho_causal   = drop(subspace) / drop(random)          (noise in S vs same-norm noise in random rank-k)
    rho_isotropic= drop(subspace) / drop(isotropic)       (noise in S vs same-norm noise in all of R^D)
    attribution  = drop(quant_in) / (drop(quant_in) + drop(quant_out))   (when both kinds are measured)

CIs: percentile bootstrap over prompts (:func:`kvgeom.stats.bootstrap_ci`, the same resampled prompts for
numerator and denominator). A ratio is **undefined** (NaN, ``defined=False``, the reason in ``note``) when the
denominator is within noise: its absolute mean is ``<= min_effect``, or its own bootstrap CI (``den_low``,
``den_high``; ``den_excludes_0``) includes 0 -- a ratio whose denominator cannot be told from no effect is never
a number to read (the project's rule; :mod:`kvgeom.geometry.sensitivity` uses the same function). Resamples
whose denominator falls within ``min_effect`` are dropped from a defined ratio's CI.

Tested in tests/noise/test_multilayer.py: a planted model whose readout ignores S gives rho_causal = 0 with
CI [0, 0] (test_planted_silent_subspace_gives_zero_ratio); S = all of R^D makes ``quant_in`` equal ``quant``
(test_full_basis_attributes_everything_to_s); shapes and columns (test_causal_ratio_shapes); the statistic is
the one the sensitivity profile reports (test_ratio_ci_matches_the_sensitivity_rule).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor

from kvgeom.runtime.forward import encode
from kvgeom.stats import bootstrap_ci

from .conditions import NoiseCondition, score_conditions
from .rows import Where, capture_padded, quant_error

if TYPE_CHECKING:
    from kvgeom.models import KVModel

CAUSAL_KINDS = ("quant", "subspace", "random", "isotropic")


@dataclass(frozen=True)
class RatioCI:
    """A ratio of mean effects with its bootstrap CI; NaN with ``note`` when undefined."""

    estimate: float
    low: float
    high: float
    defined: bool
    note: str = ""
    den_low: float = math.nan
    den_high: float = math.nan

    @property
    def den_excludes_0(self) -> bool:
        """Whether the denominator's own CI (over the same resamples of prompts) excludes 0."""
        return bool(self.den_low > 0 or self.den_high < 0)


def ratio_ci(num: np.ndarray, den: np.ndarray, *, min_effect: float = 1e-3, n_resamples: int = 1000, seed: int = 0,
             what: str = "the denominator has no effect") -> RatioCI:
    """``mean(num) / mean(den)`` over prompts (paired per-prompt effects) with a percentile bootstrap CI;
    undefined when the denominator is within noise: ``|mean(den)| <= min_effect`` or its own bootstrap CI
    (``den_low``/``den_high``, kept in the result) includes 0 (resamples with ``|mean(den)| <= min_effect`` are
    dropped from the ratio's CI)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if num.shape != den.shape or num.ndim != 1 or len(num) < 1:
        raise ValueError(f"num and den must be equal-length 1-d per-prompt arrays, got {num.shape} and {den.shape}")

    def stat(j: np.ndarray) -> float:
        a, b = num[j].mean(), den[j].mean()
        return a / b if abs(b) > min_effect and np.isfinite(a) else math.nan

    ci = bootstrap_ci(stat, len(num), n_resamples=n_resamples, seed=seed)
    dci = bootstrap_ci(lambda j: float(den[j].mean()), len(den), n_resamples=n_resamples, seed=seed)
    note = "" if abs(den.mean()) > min_effect else f"undefined: {what} (|drop| <= {min_effect})"
    if not note and dci.low <= 0.0 <= dci.high:
        note = f"undefined: {what} within noise (its CI [{dci.low:.3g}, {dci.high:.3g}] includes 0)"
    if note or not np.isfinite(ci.estimate):
        return RatioCI(math.nan, math.nan, math.nan, False, note or "undefined: zero denominator", dci.low, dci.high)
    return RatioCI(ci.estimate, ci.low, ci.high, True, "", dci.low, dci.high)


@dataclass(frozen=True)
class CausalRatio:
    """Result of :func:`causal_ratio`. ``scores``: one row per (condition, prompt) with ``kind, draw, prompt, score,
    clean, drop``; ``drops``: per kind the mean drop with its CI, the sd of the per-draw means and those means
    (``by_draw``); ``ratios``: ``rho_causal`` (and the others of
    the module doc) with CI, ``defined`` and ``note``; ``seconds``: wall time per phase."""

    scheme: str
    site: str
    layers: tuple[int, ...]
    where: str
    scores: pd.DataFrame = field(repr=False)
    drops: pd.DataFrame = field(repr=False)
    ratios: pd.DataFrame = field(repr=False)
    settings: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def rho_causal(self) -> RatioCI:
        r = self.ratios.set_index("ratio").loc["rho_causal"]
        return RatioCI(float(r["estimate"]), float(r["low"]), float(r["high"]), bool(r["defined"]), str(r["note"]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (drops, ratios, settings, seconds)."""
        return {"scheme": self.scheme, "site": self.site, "layers": list(self.layers), "where": self.where,
                "drops": self.drops.to_dict(orient="records"), "ratios": self.ratios.to_dict(orient="records"),
                "settings": self.settings, "seconds": self.seconds}


def _per_prompt(scores: pd.DataFrame, kind: str) -> np.ndarray:
    return scores[scores["kind"] == kind].groupby("prompt")["drop"].mean().sort_index().to_numpy()


def causal_ratio(
    model: KVModel,
    scheme: Any,
    prompts: Sequence[str],
    bases: Mapping[int, Float[Tensor, "d k"]],
    *,
    site: str = "rot_k",
    kinds: Sequence[str] = CAUSAL_KINDS,
    n_random: int = 8,
    n_draws: int = 1,
    where: Where = "all",
    min_effect: float = 1e-3,
    n_resamples: int = 1000,
    seed: int = 0,
    chunk: int = 64,
    progress: bool = False,
) -> CausalRatio:
    """Refusal-score drops and ``rho_causal`` (module doc) with noise at all layers of ``bases`` (``{layer:
    orthonormal S basis [D, k]}``, e.g. ``kvgeom.geometry.sensitivity_profile(...).subspaces[la].basis``) at once.

    Rows: ``none``, then each of ``kinds`` on every layer of ``bases`` at once (``random``: ``n_random`` draws, a
    fresh random rank-k subspace per layer per draw; ``subspace`` and ``isotropic``: ``n_draws`` draws), for every
    prompt, in batched passes of ``chunk`` rows. Draws are averaged per prompt before the bootstrap.
    """
    from kvgeom.quant import Scheme

    t0 = time.perf_counter()
    layers = tuple(sorted(int(la) for la in bases))
    if not layers:
        raise ValueError("bases is empty: give {layer: basis} for at least one layer")
    missing = [la for la in layers if bases[la] is None]
    if missing and set(kinds) & {"subspace", "random", "quant_in", "quant_out"}:
        raise ValueError(f"no basis at layers {missing} (S undefined there): leave those layers out of bases")
    if ("random" in kinds and n_random < 1) or n_draws < 1:
        raise ValueError(f"n_random and n_draws must be >= 1, got {n_random} and {n_draws}")
    batch = encode(model, list(prompts))
    n = len(batch)
    clean = capture_padded(model, batch, [site], list(layers), chunk=chunk)
    errors = {key: quant_error(x, batch.mask, scheme, site) for key, x in clean.items()}
    seconds = {"capture": time.perf_counter() - t0}
    conds = [NoiseCondition("none", layers=layers, site=site)]
    for kind in kinds:
        conds += [NoiseCondition(kind, layers=layers, site=site, draw=d)
                  for d in range(n_random if kind == "random" else n_draws if kind in ("subspace", "isotropic") else 1)]
    t = time.perf_counter()
    k_random = {la: int(bases[la].shape[1]) if bases[la] is not None else 1 for la in layers}
    score = score_conditions(model, batch, conds, errors, bases, where=where, k_random=k_random, seed=seed,
                             chunk=chunk, progress=progress).numpy()
    seconds["rows"] = time.perf_counter() - t
    t = time.perf_counter()
    clean_score = score[0]
    scores = pd.DataFrame([{"kind": c.kind, "draw": c.draw, "prompt": i, "score": float(score[ci, i]),
                            "clean": float(clean_score[i]), "drop": float(clean_score[i] - score[ci, i])}
                           for ci, c in enumerate(conds) for i in range(n)])
    per = {kind: _per_prompt(scores, kind) for kind in kinds}
    drops = []
    for kind in kinds:
        v = per[kind]
        ci = bootstrap_ci(lambda j, v=v: float(v[j].mean()), n, n_resamples=n_resamples, seed=seed)
        g = scores[scores["kind"] == kind]
        drops.append({"kind": kind, "drop": ci.estimate, "low": ci.low, "high": ci.high, "n_prompts": n,
                      "n_draws": int(g["draw"].nunique()),
                      "sd_draws": float(g.groupby("draw")["drop"].mean().std(ddof=0)),
                      "by_draw": [float(v) for v in g.groupby("draw")["drop"].mean().sort_index()]})
    drops_f = pd.DataFrame(drops)
    pairs = [("rho_causal", "subspace", "random", "random-subspace noise has no effect"),
             ("rho_isotropic", "subspace", "isotropic", "isotropic noise has no effect"),
             ("attribution", "quant_in", "quant_in+quant_out", "the projected errors have no effect")]
    if "quant_in" in per and "quant_out" in per:
        per["quant_in+quant_out"] = per["quant_in"] + per["quant_out"]
    ratios = []
    for name, a, b, what in pairs:
        if a in per and b in per:
            r = ratio_ci(per[a], per[b], min_effect=min_effect, n_resamples=n_resamples, seed=seed, what=what)
            ratios.append({"ratio": name, "numerator": a, "denominator": b, **vars(r),
                           "den_excludes_0": r.den_excludes_0})
    ratios_f = pd.DataFrame(ratios, columns=["ratio", "numerator", "denominator", "estimate", "low", "high", "defined",
                                             "note", "den_low", "den_high", "den_excludes_0"])
    seconds["stats"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    settings = {"n_prompts": n, "n_random": n_random, "n_draws": n_draws, "kinds": list(kinds), "k": k_random,
                "min_effect": min_effect,
                "n_resamples": n_resamples, "seed": seed, "chunk": chunk, "n_rows": len(conds) * n,
                "clean_mean": float(clean_score.mean())}
    return CausalRatio(str(Scheme.parse(scheme)) if isinstance(scheme, str) else str(scheme), site, layers, where,
                       scores, drops_f, ratios_f, settings, seconds)
