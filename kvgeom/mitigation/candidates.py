"""Mitigation candidates: per-layer scheme assignments, their memory cost, and the prescriptions per label
(see :mod:`kvgeom.mitigation` for the cost formula)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd

from kvgeom.quant.formats import int_twin
from kvgeom.quant.plan import normalise_channels
from kvgeom.quant.scheme import DEFAULT_D_HEAD, DEFAULT_N_KV_HEADS, Scheme
from kvgeom.taxonomy import CRUSHES, DILUTION, HYPER, MIXED, OUTLIER_AS_SAFETY, ROBUST, UNDETERMINED, Diagnosis

Assignment = tuple[str | None, ...]


# ------------------------------------------------------------------------------------------ schemes & costs


def canonical_scheme(s: str | Scheme | None) -> str | None:
    """Canonical scheme string; ``None`` and ``"none"`` (identity) both mean full precision → ``None``."""
    if s is None:
        return None
    text = str(Scheme.parse(s))
    return None if text == "none" else text


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
    chans = dict(normalise_channels(protect_channels))
    n_ch = d_head * n_kv_heads
    total = 0.0
    for layer, s in enumerate(assignment):
        c = canonical_scheme(s)
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


def regroup(scheme: str | Scheme, group_size: int = 64) -> Scheme:
    """The same bit width with ranges per group of ``group_size`` along ``d_head``: each quantized role becomes
    ``int{b}-group{G}-{sym|asym}`` (``b`` = nominal bits: q4_0 → 4, q8_0 → 8, fp8 → 8, kivi2 → 2; symmetry kept
    from ``int`` schemes, otherwise asym); fp16/bf16/none roles stay."""
    s = Scheme.parse(scheme)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return Scheme(int_twin(s.k, "group", group_size), int_twin(s.v, "group", group_size))


def _per_channel_keys(scheme: Scheme) -> Scheme:
    """Keys per channel (one range per (head, dim) over tokens), values unchanged."""
    return Scheme(int_twin(scheme.k, "channel", None), scheme.v)


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
    a = tuple(canonical_scheme(s) for s in assignment)
    ch = normalise_channels(protect_channels)
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
    t = canonical_scheme(target)
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
