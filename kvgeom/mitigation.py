"""Mitigations: prescriptions per label, recovery with CI, a cheapest-precision search, and serving exports.

A mitigation is a :class:`Candidate`: a per-layer scheme assignment (``None`` = full precision) plus optional key
channels kept in full precision. Its memory cost is the mean over layers of each layer's bits per element::

    bits(layer) = 16                                                  full precision
                = (k_bits' + v_bits) / 2                              quantized, with
      k_bits'   = (1 - m/C) * k_bits + (m/C) * 16                     m of C = n_kv_heads * d_head key channels kept
    bits_per_element = mean_layer bits(layer)

(``k_bits``/``v_bits`` from :meth:`kvgeom.quant.Scheme.bits_per_element_for`, which counts fp16 scale/zero-point
overhead; the index of kept channels is not counted.)

**Recovery** of a mitigation, from refusal rates on the same prompts::

    recovery = (mitigated - uniform) / (full - uniform)               undefined (NaN) when full = uniform

1 = the mitigation restores full-precision refusal, 0 = no better than the uniform target scheme.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from kvgeom.quant.scheme import (
    DEFAULT_D_HEAD,
    DEFAULT_N_KV_HEADS,
    BaseSpec,
    CastSpec,
    FP8Spec,
    GGMLSpec,
    IntSpec,
    KIVISpec,
    Scheme,
)
from kvgeom.stats import BootstrapCI, bootstrap_ci
from kvgeom.taxonomy import CRUSHES, DILUTION, HYPER, MIXED, OUTLIER_AS_SAFETY, ROBUST, UNDETERMINED, Diagnosis

__all__ = [
    "Candidate",
    "SearchResult",
    "assignment_bits",
    "export_settings",
    "prescribe",
    "protect_channels_from",
    "recovery",
    "recovery_ci",
    "regroup",
    "search_precision",
]

Assignment = tuple[str | None, ...]
_FULL_NAMES = ("none", "fp16", "bf16")
_NOMINAL_BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "iq4_nl": 4}


# ------------------------------------------------------------------------------------------ schemes & costs


def _canon(s: str | Scheme | None) -> str | None:
    """Canonical scheme string; ``None`` and ``"none"`` (identity) both mean full precision → ``None``."""
    if s is None:
        return None
    text = str(Scheme.parse(s))
    return None if text == "none" else text


def _channels(value: Any) -> tuple[tuple[int, tuple[tuple[int, int], ...]], ...]:
    """Normalise ``{layer: [(head, dim), ...]}`` (or QuantPlan's tuple form) to sorted tuples."""
    if not value:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for layer, chans in sorted((int(k), v) for k, v in items):
        pairs = tuple(sorted({(int(h), int(d)) for h, d in chans}))
        if pairs:
            out.append((layer, pairs))
    return tuple(out)


def assignment_bits(
    assignment: Sequence[str | Scheme | None],
    *,
    protect_channels: Any = None,
    d_head: int = DEFAULT_D_HEAD,
    n_kv_heads: int = DEFAULT_N_KV_HEADS,
) -> float:
    """Mean bits per element over layers (module docstring formula); full-precision layers count 16."""
    if len(assignment) == 0:
        raise ValueError("empty assignment: give one scheme (or None) per layer")
    chans = dict(_channels(protect_channels))
    n_ch = d_head * n_kv_heads
    total = 0.0
    for layer, s in enumerate(assignment):
        c = _canon(s)
        if c is None:
            total += 16.0
            continue
        sch = Scheme.parse(c)
        kb = sch.k.bits_per_element(d_head, n_kv_heads)
        vb = sch.v.bits_per_element(d_head, n_kv_heads)
        m = len(chans.get(layer, ()))
        if m > n_ch:
            raise ValueError(f"layer {layer}: {m} protected channels but only {n_ch} exist")
        kb = (1 - m / n_ch) * kb + (m / n_ch) * 16.0
        total += (kb + vb) / 2
    return total / len(assignment)


def _nominal_bits(base: BaseSpec) -> int:
    if isinstance(base, CastSpec):
        return 16
    if isinstance(base, IntSpec | KIVISpec):
        return base.bits
    if isinstance(base, GGMLSpec):
        return _NOMINAL_BITS[base.qtype]
    if isinstance(base, FP8Spec):
        return 8
    raise TypeError(f"unknown scheme part {base!r}")


def _regroup_base(base: BaseSpec, granularity: str, group_size: int | None) -> BaseSpec:
    if isinstance(base, CastSpec):
        return base
    sym = base.symmetric if isinstance(base, IntSpec) else False
    return IntSpec(_nominal_bits(base), granularity, sym, group_size)  # type: ignore[arg-type]


def regroup(scheme: str | Scheme, group_size: int = 64) -> Scheme:
    """The same bit width with ranges per group of ``group_size`` along ``d_head``: each quantized role becomes
    ``int{b}-group{G}-{sym|asym}`` (``b`` = nominal bits: q4_0 → 4, q8_0 → 8, fp8 → 8, kivi2 → 2; symmetry kept
    from ``int`` schemes, otherwise asym); fp16/bf16/none roles stay."""
    s = Scheme.parse(scheme)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return Scheme(_regroup_base(s.k, "group", group_size), _regroup_base(s.v, "group", group_size))


def _per_channel_keys(scheme: Scheme) -> Scheme:
    """Keys per channel (one range per (head, dim) over tokens), values unchanged."""
    return Scheme(_regroup_base(scheme.k, "channel", None), scheme.v)


# ------------------------------------------------------------------------------------------ candidates


@dataclass(frozen=True)
class Candidate:
    """A mitigation: per-layer schemes (``None`` = full precision) and key channels kept in full precision.

    ``source``: ``"paper"`` (the paper's prescription for the label) or ``"kvgeom"`` (beyond the paper).
    """

    name: str
    assignment: Assignment
    rationale: str
    source: Literal["paper", "kvgeom"]
    bits_per_element: float
    protect_channels: tuple = ()

    @property
    def n_layers(self) -> int:
        return len(self.assignment)

    def groups(self) -> list[tuple[tuple[int, ...], str | None]]:
        """``[(layers, scheme)]`` per distinct scheme (``None`` = full precision), in first-layer order."""
        seen: dict[str | None, list[int]] = {}
        for layer, s in enumerate(self.assignment):
            seen.setdefault(s, []).append(layer)
        return [(tuple(v), k) for k, v in seen.items()]

    @property
    def quantized_schemes(self) -> tuple[str, ...]:
        return tuple(s for _, s in self.groups() if s is not None)

    @property
    def expressible(self) -> bool:
        """Whether one :class:`~kvgeom.quant.plan.QuantPlan` runs it: at most one quantized scheme, or several when
        QuantPlan has per-layer ``layer_schemes``."""
        return len(self.quantized_schemes) <= 1 or _plan_has_layer_schemes()

    def to_plans(self, **plan_kwargs: Any) -> list:
        """One QuantPlan per quantized scheme, restricted to that scheme's layers (``[]``: all full precision).

        A batch row runs a single plan, so only a one-element list can be evaluated today (:meth:`to_plan`);
        several elements mean this candidate needs per-layer schemes in QuantPlan.
        """
        from kvgeom.quant.plan import QuantPlan

        out = []
        for layers, s in self.groups():
            if s is None:
                continue
            chans = {lay: list(p) for lay, p in self.protect_channels if lay in layers}
            label = self.name if self.expressible else f"{self.name} [{s}]"
            out.append(QuantPlan(s, layers=layers, protect_channels=chans, name=label, **plan_kwargs))
        return out

    def to_plan(self, **plan_kwargs: Any):
        """The single QuantPlan that runs this candidate (``None`` when every layer is full precision).

        The most common quantized scheme (ties: the first by layer) is the plan's ``scheme``; full-precision
        layers are ``protect_layers``; layers with another scheme become ``layer_schemes`` overrides. Raises
        ValueError for mixed schemes when QuantPlan has no ``layer_schemes``. ``plan_kwargs`` (``mode``,
        ``site``, ``prefill``, ``name``: default the candidate's name) pass through.
        """
        from kvgeom.quant.plan import QuantPlan

        schemes = self.quantized_schemes
        if not schemes:
            return None
        if len(schemes) > 1 and not _plan_has_layer_schemes():
            raise ValueError(f"candidate {self.name!r} uses {len(schemes)} schemes on different layers "
                             f"({', '.join(schemes)}); this QuantPlan has one scheme for all its layers. Use "
                             "to_plans() to see the parts, or a QuantPlan with per-layer schemes")
        counts = {s: sum(a == s for a in self.assignment) for s in schemes}
        base = max(schemes, key=lambda s: counts[s])  # max keeps the first of equal counts
        full = tuple(i for i, s in enumerate(self.assignment) if s is None)
        extra = {"layer_schemes": {i: s for i, s in enumerate(self.assignment) if s not in (None, base)}} \
            if len(schemes) > 1 else {}
        plan_kwargs.setdefault("name", self.name)
        return QuantPlan(base, protect_layers=full, protect_channels=dict(self.protect_channels), **extra,
                         **plan_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "assignment": list(self.assignment), "rationale": self.rationale,
                "source": self.source, "bits_per_element": self.bits_per_element,
                "protect_channels": {str(lay): [list(p) for p in pairs] for lay, pairs in self.protect_channels},
                "groups": [{"layers": list(ls), "scheme": s} for ls, s in self.groups()],
                "expressible_as_plan": self.expressible}


def _plan_has_layer_schemes() -> bool:
    from dataclasses import fields

    from kvgeom.quant.plan import QuantPlan

    return any(f.name == "layer_schemes" for f in fields(QuantPlan))


def _candidate(name: str, assignment: Sequence[str | None], rationale: str, source: str, *, d_head: int,
               n_kv_heads: int, protect_channels: Any = None) -> Candidate:
    a = tuple(_canon(s) for s in assignment)
    ch = _channels(protect_channels)
    return Candidate(name, a, rationale, source,  # type: ignore[arg-type]
                     assignment_bits(a, protect_channels=ch, d_head=d_head, n_kv_heads=n_kv_heads), ch)


def protect_channels_from(outliers: pd.DataFrame | Mapping[int, Sequence[Sequence[int]]],
                          layers: Sequence[int] | None = None) -> dict[int, list[tuple[int, int]]]:
    """``{layer: [(head, dim), ...]}`` of outlier channels, from :func:`kvgeom.taxonomy.outlier_channels` (rows
    with ``is_outlier``) or a mapping; restricted to ``layers`` when given."""
    if isinstance(outliers, pd.DataFrame):
        missing = {"layer", "head", "dim"} - set(outliers.columns)
        if missing:
            raise ValueError(f"outlier table lacks columns {sorted(missing)}")
        rows = outliers[outliers["is_outlier"]] if "is_outlier" in outliers else outliers
        out: dict[int, list[tuple[int, int]]] = {}
        for r in rows.itertuples():
            out.setdefault(int(r.layer), []).append((int(r.head), int(r.dim)))
    else:
        out = {int(k): [(int(h), int(d)) for h, d in v] for k, v in outliers.items()}
    if layers is not None:
        keep = {int(x) for x in layers}
        out = {k: v for k, v in out.items() if k in keep}
    return out


def prescribe(
    diagnosis: Diagnosis | Mapping[str, Any],
    *,
    target_scheme: str | Scheme,
    n_layers: int,
    outliers: pd.DataFrame | Mapping[int, Sequence[Sequence[int]]] | None = None,
    d_head: int = DEFAULT_D_HEAD,
    n_kv_heads: int = DEFAULT_N_KV_HEADS,
    group_size: int = 64,
    top_k: int | None = None,
    channel_layers: Literal["critical", "all"] = "critical",
) -> list[Candidate]:
    """Candidate mitigations for ``diagnosis`` on ``target_scheme`` (the paper's, then kvgeom's).

    ==========================  =======================================================================
    label                       candidates
    ==========================  =======================================================================
    robust                      none (nothing to fix)
    outlier-as-safety           paper: critical layer in full precision
    outlier-crushes-safety      paper: group-``G`` on all layers; group-``G`` + per-channel keys at the
                                critical layer (needs per-layer schemes)
    multi-layer-dilution        paper: the top-``k`` candidate layers in full precision (``k`` = all
                                candidates, or ``top_k``; if none reach the candidate threshold, the ``k``
                                worst layers, ``k`` = ``max_candidates``)
    hyper-vulnerable            paper: full precision everywhere
    mixed / undetermined        kvgeom: critical layer in full precision; group-``G`` on all layers
    any but robust              kvgeom (if ``outliers``): outlier key channels in full precision at the
                                critical layer (``channel_layers="critical"``) or at every layer
    ==========================  =======================================================================
    """
    diag = diagnosis if isinstance(diagnosis, Diagnosis) else Diagnosis.from_dict(diagnosis)
    target = Scheme.parse(target_scheme)
    t = _canon(target)
    if t is None:
        raise ValueError("target_scheme is full precision: there is nothing to mitigate")
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    crit = diag.critical_layer
    if crit is not None and not 0 <= crit < n_layers:
        raise ValueError(f"critical layer {crit} is out of range for a model with {n_layers} layers")
    kw = {"d_head": d_head, "n_kv_heads": n_kv_heads}
    uniform = [t] * n_layers
    label = diag.label
    out: list[Candidate] = []

    def keep_layers(layers: Sequence[int], name: str, why: str, source: str) -> Candidate:
        a = [None if i in set(layers) else t for i in range(n_layers)]
        return _candidate(name, a, why, source, **kw)

    grouped = str(regroup(target, group_size))
    if label == ROBUST:
        return []
    if label == HYPER:
        out.append(_candidate("full precision", [None] * n_layers, "every layer alone breaks refusals: do not "
                              "quantize the KV cache at this precision", "paper", **kw))
    elif label == OUTLIER_AS_SAFETY:
        out.append(keep_layers([crit], f"keep L{crit} fp16", f"the refusal signal lives in layer {crit}'s outlier "
                               "channel, which per-channel ranges do not protect: keep that layer in full precision",
                               "paper"))
    elif label == CRUSHES:
        out.append(_candidate(f"{grouped} all layers", [grouped] * n_layers, f"per-channel ranges remove the "
                              f"damage: group-{group_size} ranges stop one outlier setting the range of all "
                              "channels", "paper", **kw))
        a = [grouped] * n_layers
        a[crit] = str(_per_channel_keys(Scheme.parse(grouped)))
        out.append(_candidate(f"{grouped} + per-channel K at L{crit}", a, f"group-{group_size} everywhere and "
                              f"per-channel key ranges at the critical layer {crit}", "paper", **kw))
    elif label == DILUTION:
        layers = list(diag.candidates)
        if not layers:
            k = diag.thresholds.max_candidates
            layers = sorted(diag.layer_flips, key=lambda lay: (-diag.layer_flips[lay], lay))[:k]
        if top_k is not None:
            layers = layers[:top_k]
        out.append(keep_layers(layers, f"keep {len(layers)} layers fp16 (L{','.join(map(str, sorted(layers)))})",
                               "the damage accumulates over several layers: keep the most damaging ones in full "
                               "precision", "paper"))
    elif label in (MIXED, UNDETERMINED):
        out.append(keep_layers([crit], f"keep L{crit} fp16", "both mechanisms contribute: protect the critical "
                               "layer", "kvgeom"))
        out.append(_candidate(f"{grouped} all layers", [grouped] * n_layers, "both mechanisms contribute: finer "
                              "ranges limit the crushing part", "kvgeom", **kw))
    else:
        raise ValueError(f"unknown label {label!r}")
    if outliers is not None:
        layers = [crit] if channel_layers == "critical" else None
        if channel_layers not in ("critical", "all"):
            raise ValueError(f"channel_layers must be 'critical' or 'all', got {channel_layers!r}")
        chans = protect_channels_from(outliers, layers)
        if chans:
            n = sum(len(v) for v in chans.values())
            where = f"L{crit}" if channel_layers == "critical" else "all layers"
            out.append(_candidate(f"keep {n} outlier K channels fp16 ({where})", uniform, "beyond the paper: keep "
                                  "only the outlier key channels in full precision", "kvgeom",
                                  protect_channels=chans, **kw))
    unique: dict[tuple, Candidate] = {}
    for c in out:
        unique.setdefault((c.assignment, c.protect_channels), c)
    return list(unique.values())


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
    levels = sorted({_canon(s) for s in schemes_by_cost} - {None},
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


# ------------------------------------------------------------------------------------------ export


def _as_assignment(obj: Any, n_layers: int | None) -> tuple[Assignment, tuple]:
    from kvgeom.quant.plan import QuantPlan

    if isinstance(obj, Candidate):
        return obj.assignment, obj.protect_channels
    if isinstance(obj, SearchResult):
        return obj.assignment, ()
    if obj is None or isinstance(obj, str | Scheme):
        if n_layers is None:
            raise ValueError("a single scheme needs n_layers")
        return tuple([_canon(obj)] * n_layers), ()
    if isinstance(obj, QuantPlan):
        if n_layers is None:
            raise ValueError("a QuantPlan needs n_layers")
        s = _canon(obj.scheme)
        return tuple(s if obj.quantizes(i) else None for i in range(n_layers)), _channels(obj.protect_channels)
    a = tuple(_canon(s) for s in obj)
    if n_layers is not None and len(a) != n_layers:
        raise ValueError(f"assignment has {len(a)} entries but the model has {n_layers} layers")
    return a, ()


def _vllm_dtype(base: BaseSpec) -> tuple[str | None, bool]:
    if isinstance(base, CastSpec):
        return "auto", False
    if isinstance(base, FP8Spec):
        return f"fp8_{base.fmt}", base.dynamic
    return None, False


def _vllm(a: Assignment, channels: tuple, model: str) -> dict[str, Any]:
    notes = ["vLLM has one kv_cache_dtype for every quantized layer, shared by K and V; "
             "--kv-cache-dtype-skip-layers (recent vLLM, CacheConfig.kv_cache_dtype_skip_layers) keeps listed "
             "layers at the model's dtype. Older releases have no per-layer skip."]
    quant = sorted({s for s in a if s is not None})
    skip = [str(i) for i, s in enumerate(a) if s is None]
    out: dict[str, Any] = {"expressible": False, "exact": False, "kv_cache_dtype": None,
                           "kv_cache_dtype_skip_layers": [], "calculate_kv_scales": False, "python": None,
                           "cli": None, "notes": notes}
    if not quant:
        out.update(expressible=True, exact=True, kv_cache_dtype="auto",
                   python=f'LLM(model="{model}", kv_cache_dtype="auto")',
                   cli=f"vllm serve {model} --kv-cache-dtype auto")
        notes.append("every layer in full precision: no KV-cache quantization")
        return out
    if len(quant) > 1:
        notes.append(f"not expressible: the assignment uses {len(quant)} quantized schemes ({', '.join(quant)}) "
                     "on different layers")
        return out
    sch = Scheme.parse(quant[0])
    (kd, kdyn), (vd, vdyn) = _vllm_dtype(sch.k), _vllm_dtype(sch.v)
    if kd is None or vd is None or kd != vd or kdyn != vdyn:
        notes.append(f"not expressible: vLLM's quantized KV dtypes that kvgeom simulates are fp8_e4m3 and "
                     f"fp8_e5m2 (one dtype for K and V); {quant[0]} is not one of them. Newer vLLM dtypes "
                     "(int8/int4_per_token_head, nvfp4, turboquant_*) are not simulated by kvgeom")
        return out
    if channels:
        notes.append("not expressible: vLLM cannot keep individual key channels in full precision")
        return out
    if kd == "auto":
        notes.append(f"{quant[0]} is a cast only: 'auto' keeps the model's dtype")
    out.update(expressible=True, exact=True, kv_cache_dtype=kd, kv_cache_dtype_skip_layers=skip,
               calculate_kv_scales=kdyn)
    args = [f'kv_cache_dtype="{kd}"']
    cli = [f"vllm serve {model}", f"--kv-cache-dtype {kd}"]
    if skip:
        args.append(f"kv_cache_dtype_skip_layers={skip!r}")
        cli.append("--kv-cache-dtype-skip-layers " + " ".join(skip))
    if kdyn:
        args.append("calculate_kv_scales=True")
        cli.append("--calculate-kv-scales")
        notes.append("@amax ↔ calculate_kv_scales: kvgeom models vLLM's scales amax/200 (K) and amax/100 (V) "
                     "measured on the first prefill")
    elif kd.startswith("fp8"):
        notes.append("without calculate_kv_scales or a calibrated checkpoint, vLLM's fp8 scales are 1.0, as in "
                     "kvgeom's fp8 schemes without @amax; a checkpoint with calibrated k/v scales behaves "
                     "differently")
    out["python"] = f'LLM(model="{model}", ' + ", ".join(args) + ")"
    out["cli"] = " ".join(cli)
    return out


def _llama_type(base: BaseSpec) -> str | None:
    if isinstance(base, CastSpec):
        return "f16" if base.dtype in ("none", "fp16") else "bf16"
    if isinstance(base, GGMLSpec):
        return base.qtype
    return None


def _llama(a: Assignment, channels: tuple, d_head: int, model: str) -> dict[str, Any]:
    notes = ["llama.cpp's --cache-type-k/-ctk and --cache-type-v/-ctv are global: one type for all layers, "
             "chosen independently for K and V (f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1); it cannot "
             "keep single layers or channels in f16"]
    out: dict[str, Any] = {"expressible": False, "exact": False, "cache_type_k": None, "cache_type_v": None, "env": {},
                           "cli": None, "notes": notes}
    distinct = sorted({s or "none" for s in a})
    if len(distinct) > 1:
        notes.append(f"not expressible: the assignment differs across layers ({', '.join(distinct)}); the "
                     "uniform alternatives are the unmitigated scheme or f16 everywhere")
        return out
    if channels:
        notes.append("not expressible: protected channels")
        return out
    sch = Scheme.parse(distinct[0])
    kt, vt = _llama_type(sch.k), _llama_type(sch.v)
    if kt is None or vt is None:
        notes.append(f"not expressible: {distinct[0]} is not a llama.cpp cache type")
        return out
    rot = {r: b.rotate for r, b in (("k", sch.k), ("v", sch.v)) if isinstance(b, GGMLSpec)}
    if len(set(rot.values())) > 1:
        notes.append("not expressible: llama.cpp rotates every quantized cache (K and V) or none "
                     "(LLAMA_ATTN_ROT_DISABLE), not one of them")
        return out
    env: dict[str, str] = {}
    if rot and not any(rot.values()):
        env["LLAMA_ATTN_ROT_DISABLE"] = "1"
        notes.append("recent llama.cpp (PR #21038, 2026) Hadamard-rotates quantized K/V by default when head_dim "
                     "is a multiple of 64; LLAMA_ATTN_ROT_DISABLE=1 gives the unrotated types measured here "
                     "(older builds never rotate)")
    elif rot:
        notes.append("+rot needs a llama.cpp build with PR #21038 (rotation is then on by default for quantized "
                     "caches)" + ("" if d_head % 64 == 0 else f"; d_head {d_head} is not a multiple of 64, so "
                                  "llama.cpp will not rotate"))
    if vt not in ("f16", "bf16", "f32"):
        notes.append("a quantized V cache needs flash attention in llama.cpp (-fa on)")
    out.update(expressible=True, exact=True, cache_type_k=kt, cache_type_v=vt, env=env)
    prefix = " ".join(f"{k}={v}" for k, v in env.items())
    fa = " -fa on" if vt not in ("f16", "bf16", "f32") else ""
    cmd = f"llama-server -m {model} --cache-type-k {kt} --cache-type-v {vt}{fa}"
    out["cli"] = (prefix + " " if prefix else "") + cmd
    return out


def _hf_config(sch: Scheme) -> tuple[dict[str, Any] | None, list[str]]:
    if sch.k != sch.v:
        return None, [f"not expressible: HF's QuantizedCache quantizes K and V alike; {sch} differs"]
    b = sch.k
    if isinstance(b, KIVISpec):
        return ({"backend": "quanto", "nbits": b.bits, "axis_key": 0, "axis_value": 0, "q_group_size": b.group_size,
                 "residual_length": b.residual},
                ["approximate: HF quantizes keys and values with the same grouping (its docs: per channel, "
                 "q_group_size) and flushes its full-precision residual when it fills, while KIVI quantizes values "
                 "per token and keeps a sliding residual"])
    if isinstance(b, IntSpec) and b.granularity == "group":
        if b.bits in (2, 4):
            backend = "quanto"
        elif b.bits in (1, 3, 8):
            backend = "hqq"
        else:
            return None, [f"not expressible: HF backends take nbits 2/4 (quanto) or 1/2/3/4/8 (hqq), not {b.bits}"]
        return ({"backend": backend, "nbits": b.bits, "axis_key": 0, "axis_value": 0, "q_group_size": b.group_size,
                 "residual_length": 128},
                ["approximate: the backend's grouping axis, rounding and zero point differ from kvgeom's "
                 f"{b}, and HF keeps the newest <= residual_length tokens in full precision"])
    if isinstance(b, FP8Spec) and b.fmt == "e4m3":
        return ({"backend": "fp8"},
                ["approximate: HF's fp8 backend is e4m3 with a per-tensor scale amax/448 frozen at the first "
                 "update; kvgeom's fp8_e4m3 uses scale 1 (vLLM uncalibrated), @amax vLLM's amax/200 (K), /100 (V)"])
    return None, [f"not expressible: no HF QuantizedCache backend implements {sch}"]


def _hf(a: Assignment, channels: tuple, n_layers: int) -> dict[str, Any]:
    notes = ["HF transformers: generate(..., cache_implementation=\"quantized\", cache_config={...}) builds one "
             "QuantizedCache whose layers all share the config (transformers 4.x also accepted a "
             "QuantizedCacheConfig object); per-layer exceptions need a hand-built Cache(layers=[...]) passed as "
             "past_key_values (custom code, not a config). Like kvgeom's cache mode with prefill='full', "
             "each call attends to its own new tokens in full precision"]
    out: dict[str, Any] = {"expressible": False, "exact": False, "cache_implementation": None, "cache_config": None,
                           "python": None, "custom_code": None, "notes": notes}
    quant = sorted({s for s in a if s is not None})
    if not quant:
        out.update(expressible=True, exact=True, python="model.generate(**inputs)  # default DynamicCache")
        notes.append("every layer in full precision: no quantized cache")
        return out
    if channels:
        notes.append("not expressible: HF cannot keep individual key channels in full precision")
        return out
    if len(quant) > 1:
        notes.append(f"not expressible: the assignment uses {len(quant)} quantized schemes on different layers")
        return out
    cfg, extra = _hf_config(Scheme.parse(quant[0]))
    notes.extend(extra)
    if cfg is None:
        return out
    full = [i for i, s in enumerate(a) if s is None]
    out.update(cache_implementation="quantized", cache_config=cfg)
    if not full:
        out.update(expressible=True,
                   python=f'model.generate(**inputs, cache_implementation="quantized", cache_config={cfg!r})')
        return out
    notes.append(f"not expressible as a config: layers {full} must stay full precision; custom_code builds the "
                 "cache by hand (untested by kvgeom)")
    layer_cls = {"quanto": "QuantoQuantizedLayer", "hqq": "HQQQuantizedLayer", "fp8": "Fp8QuantizedLayer"}[
        cfg["backend"]]
    kwargs = ", ".join(f"{k}={v!r}" for k, v in cfg.items() if k != "backend")
    out["custom_code"] = (
        f"from transformers.cache_utils import Cache, DynamicLayer, {layer_cls}\n"
        f"keep = {set(full)!r}\n"
        f"cache = Cache(layers=[DynamicLayer() if i in keep else {layer_cls}({kwargs}) for i in range({n_layers})])\n"
        "model.generate(**inputs, past_key_values=cache)")
    return out


def export_settings(
    assignment: Any,
    n_layers: int | None = None,
    *,
    model: str = "MODEL",
    d_head: int = DEFAULT_D_HEAD,
    n_kv_heads: int = DEFAULT_N_KV_HEADS,
) -> dict[str, Any]:
    """Serving settings for an assignment, per stack, each with ``expressible`` and ``notes``.

    ``assignment``: per-layer schemes (``None`` = full precision), a :class:`Candidate`, a :class:`SearchResult`,
    a QuantPlan or a single scheme (these two need ``n_layers``). Returns ``{"assignment", "n_layers",
    "bits_per_element", "vllm", "llama_cpp", "hf"}`` (JSON-friendly):

    * ``vllm``: ``kv_cache_dtype`` (auto / fp8_e4m3 / fp8_e5m2), ``kv_cache_dtype_skip_layers`` (full-precision
      layers), ``calculate_kv_scales`` (``@amax``), ``python`` and ``cli`` lines;
    * ``llama_cpp``: ``cache_type_k`` / ``cache_type_v`` (global), ``env`` (rotation switch), ``cli``;
    * ``hf``: ``cache_implementation="quantized"`` and ``cache_config`` (backend, nbits, axis_key, axis_value,
      q_group_size, residual_length), ``python``, or ``custom_code`` for per-layer exceptions.
    """
    a, channels = _as_assignment(assignment, n_layers)
    n = len(a)
    return {"assignment": list(a), "n_layers": n,
            "protect_channels": {str(lay): [list(p) for p in pairs] for lay, pairs in channels},
            "bits_per_element": assignment_bits(a, protect_channels=channels, d_head=d_head, n_kv_heads=n_kv_heads),
            "vllm": _vllm(a, channels, model), "llama_cpp": _llama(a, channels, d_head, model),
            "hf": _hf(a, channels, n)}
