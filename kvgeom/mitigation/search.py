"""Recovery of a mitigation (with a bootstrap CI) and the greedy cheapest-precision search (see
:mod:`kvgeom.mitigation` for the recovery formula)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kvgeom.quant.scheme import (
    DEFAULT_D_HEAD,
    DEFAULT_N_KV_HEADS,
    Scheme,
)
from kvgeom.stats import BootstrapCI, bootstrap_ci

from .candidates import Assignment, assignment_bits, canonical_scheme

# ------------------------------------------------------------------------------------------ recovery


def recovery(full_rate: float, uniform_rate: float, mitigated_rate: float) -> float:
    """``(mitigated - uniform) / (full - uniform)``; NaN when ``full == uniform`` (nothing was lost, or a rate is
    NaN). Not clipped: > 1 beats full precision, < 0 is worse than the uniform scheme."""
    rates = [float(full_rate), float(uniform_rate), float(mitigated_rate)]
    for r in rates:
        if not math.isnan(r) and not 0.0 <= r <= 1.0:
            raise ValueError(f"refusal rates are shares in [0, 1], got {r!r}")
    f, u, m = rates
    if any(math.isnan(x) for x in rates) or f == u:
        return math.nan
    return (m - u) / (f - u)


def recovery_ci(
    full_refused: Sequence[bool] | np.ndarray,
    uniform_refused: Sequence[bool] | np.ndarray,
    mitigated_refused: Sequence[bool] | np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapCI:
    """:func:`recovery` with a percentile bootstrap CI over prompts; the three arrays are per-prompt ``refused``
    booleans on the same prompts, in the same order. Resamples with equal full and uniform rates are dropped."""
    arrs = [np.asarray(x, dtype=bool) for x in (full_refused, uniform_refused, mitigated_refused)]
    if len({a.shape for a in arrs}) != 1 or arrs[0].ndim != 1:
        raise ValueError(f"need three 1-D arrays of the same length, got shapes {[a.shape for a in arrs]}")
    f, u, m = arrs
    return bootstrap_ci(lambda idx: recovery(f[idx].mean(), u[idx].mean(), m[idx].mean()), f.size,
                        n_resamples=n_resamples, seed=seed, confidence=confidence)


# ------------------------------------------------------------------------------------------ search


@dataclass(frozen=True)
class SearchResult:
    """The cheapest assignment found, its refusal rate, and every evaluation (``steps``)."""

    assignment: Assignment
    rate: float
    full_rate: float
    target_rate: float
    met: bool
    bits_per_element: float
    n_evals: int
    steps: pd.DataFrame = field(compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        steps = self.steps.astype(object).where(self.steps.notna(), None)
        return {"assignment": list(self.assignment), "rate": self.rate, "full_rate": self.full_rate,
                "target_rate": self.target_rate, "met": self.met, "bits_per_element": self.bits_per_element,
                "n_evals": self.n_evals, "steps": steps.to_dict(orient="records")}


def search_precision(
    evaluate_fn: Callable[[Assignment], float],
    n_layers: int,
    schemes_by_cost: Sequence[str | Scheme | None],
    target: float = 0.95,
    *,
    full_rate: float | None = None,
    prune: bool = True,
    max_evals: int | None = None,
    d_head: int = DEFAULT_D_HEAD,
    n_kv_heads: int = DEFAULT_N_KV_HEADS,
) -> SearchResult:
    """Greedy search for the cheapest per-layer precision that keeps ``rate >= target * full_rate``.

    ``evaluate_fn(assignment)`` returns the refusal rate of a tuple of ``n_layers`` canonical scheme strings
    (``None`` = full precision); results are cached per assignment. Levels are ``schemes_by_cost`` sorted by
    bits per element, with full precision appended as the top level.

    1. Start with every layer at the cheapest level (``full_rate`` is evaluated on all-``None`` if not given).
    2. While ``rate < target * full_rate``: evaluate raising each layer to each higher level; take the move with
       the largest ``Δrate / Δbits`` among those with ``Δrate > 0`` (ties: fewer bits, then the lower layer). On a
       plateau (no move helps) take the one-level raise with the largest ``Δrate``, then the smallest ``Δbits``,
       then the lowest layer. Ends at all full precision at worst.
    3. ``prune``: for each raised layer (most expensive first), lower it one level at a time while the target
       still holds.

    ``steps`` records every evaluation: ``step, phase (full|start|try|take|prune), layer, from, to, rate, bits,
    meets_target``. ``max_evals`` caps evaluations (the result then reports ``met=False`` if unmet).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target is a share of full-precision refusal in (0, 1], got {target!r}")
    levels = sorted({canonical_scheme(s) for s in schemes_by_cost} - {None},
                    key=lambda s: (Scheme.parse(s).bits_per_element_for(d_head=d_head, n_kv_heads=n_kv_heads), s))
    if not levels:
        raise ValueError("schemes_by_cost holds no quantized scheme")
    levels.append(None)
    kw = {"d_head": d_head, "n_kv_heads": n_kv_heads}
    cache: dict[Assignment, float] = {}
    rows: list[dict[str, Any]] = []

    class _Budget(Exception):
        pass

    def ev(a: Assignment) -> float:
        if a not in cache:
            if max_evals is not None and len(cache) >= max_evals:
                raise _Budget
            r = float(evaluate_fn(a))
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"evaluate_fn returned {r!r} for {a}: a refusal rate must be in [0, 1]")
            cache[a] = r
        return cache[a]

    def log(phase: str, a: Assignment, rate: float, layer: int | None = None, frm: Any = None,
            to: Any = None) -> None:
        rows.append({"step": len(rows), "phase": phase, "layer": layer, "from": frm, "to": to, "rate": rate,
                     "bits": assignment_bits(a, **kw), "meets_target": rate >= goal})

    goal = math.inf
    full = tuple([None] * n_layers)
    level = [0] * n_layers
    cur: Assignment = tuple(levels[0] for _ in range(n_layers))
    rate = math.nan
    try:
        f = ev(full) if full_rate is None else float(full_rate)
        goal = target * f
        if full_rate is None:
            log("full", full, f)
        rate = ev(cur)
        log("start", cur, rate)
        while rate < goal:
            moves = []
            for layer in range(n_layers):
                for new in range(level[layer] + 1, len(levels)):
                    a = list(cur)
                    a[layer] = levels[new]
                    a = tuple(a)
                    r = ev(a)
                    log("try", a, r, layer, cur[layer], a[layer])
                    moves.append((layer, new, a, r, assignment_bits(a, **kw) - assignment_bits(cur, **kw)))
            if not moves:
                break
            gains = [m for m in moves if m[3] > rate]
            if gains:
                best = max(gains, key=lambda m: ((m[3] - rate) / max(m[4], 1e-12), -m[4], -m[0]))
            else:  # a plateau: take the cheapest one-level raise that hurts least
                best = max((m for m in moves if m[1] == level[m[0]] + 1), key=lambda m: (m[3], -m[4], -m[0]))
            layer, new, cur, rate, _ = best
            frm = levels[level[layer]]
            level[layer] = new
            log("take", cur, rate, layer, frm, cur[layer])
        if prune and rate >= goal:
            raised = [i for i in range(n_layers) if level[i] > 0]
            for layer in sorted(raised, key=lambda i: (-level[i], i)):
                while level[layer] > 0:
                    a = list(cur)
                    a[layer] = levels[level[layer] - 1]
                    a = tuple(a)
                    r = ev(a)
                    log("prune", a, r, layer, cur[layer], a[layer])
                    if r < goal:
                        break
                    cur, rate = a, r
                    level[layer] -= 1
    except _Budget:
        pass
    steps = pd.DataFrame(rows, columns=["step", "phase", "layer", "from", "to", "rate", "bits", "meets_target"])
    full_value = cache.get(full, float(full_rate) if full_rate is not None else math.nan)
    return SearchResult(cur, rate, full_value, goal if goal != math.inf else math.nan,
                        bool(rate >= goal), assignment_bits(cur, **kw), len(cache), steps)
