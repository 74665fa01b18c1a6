"""How sure the label is: the whole decision recomputed on bootstrap resamples of the refused prompts.

:func:`label_confidence` takes the per-prompt flips the audit already stored (:class:`FlipEvidence`: the layer
sweep's rows, the all-layer row, the per-channel PCR arm at the layers where it was measured, other stages' rows)
and, on each of ``B`` resamples of the prompts refused at full precision, recomputes the per-layer flips, the
critical layer, the candidate layers, PCR, the label (:func:`kvgeom.taxonomy.rules.fired_rules`, the rules
:func:`~kvgeom.taxonomy.classify` uses) and the prescribed fix. It reports ``P(label)`` for every label,
``P(critical layer = L)`` for every layer, the layers statistically indistinguishable from the worst (exact McNemar
on the paired flips), and states the label only when its probability reaches ``confidence`` (default 0.8);
otherwise the stated label is ``undetermined`` with the competing labels, and a projection (resamples of ``k × n``
prompts drawn from the observed ones) says how many more refused prompts would likely settle it.

A resample whose critical layer has no per-channel measurement gets its label only if every PCR value gives the
same label; otherwise it counts as :data:`UNMEASURED` (reported, never silently assigned).

Proved by ``tests/taxonomy/test_confidence.py`` (planted known label → P near 1; planted tie → undetermined;
point label = :func:`classify`'s; the projection settles a tie-free planted case).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Bool

from kvgeom.judges import Verdict
from kvgeom.stats import mcnemar_exact

from .labels import CRUSHES, DILUTION, HYPER, MIXED, OUTLIER_AS_SAFETY, ROBUST, UNDETERMINED, TaxonomyThresholds
from .rules import fired_rules, first_label

__all__ = ["UNMEASURED", "FlipEvidence", "LabelConfidence", "critical_layer_probabilities", "label_confidence",
           "prescription_key"]

#: The outcome of a resample whose label depends on a PCR that was not measured at its critical layer.
UNMEASURED = "unmeasured (PCR not run at that critical layer)"

#: Multiples of the observed number of refused prompts tried by the "how many more would settle it" projection.
PROJECTION = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


@dataclass(frozen=True)
class FlipEvidence:
    """Per-prompt flips behind a label; rows are the prompts refused at full precision, in one order.

    ``layer_flips[i, j]``: prompt ``i`` flipped with only layer ``layers[j]`` quantized; ``all_layer[i]``: with
    every layer quantized; ``per_channel[L][i]``: under the per-channel twin at layer ``L`` (PCR's other arm);
    ``stage_flips[name][i]``: further stages' flips that count for the ``robust`` rule.
    """

    layers: tuple[int, ...]
    layer_flips: Bool[np.ndarray, "prompt layer"]
    all_layer: Bool[np.ndarray, " prompt"]
    per_channel: Mapping[int, Bool[np.ndarray, " prompt"]] = field(default_factory=dict)
    stage_flips: Mapping[str, Bool[np.ndarray, " prompt"]] = field(default_factory=dict)
    prompt_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        f = np.asarray(self.layer_flips, dtype=bool)
        if f.ndim != 2 or f.shape[1] != len(self.layers):
            raise ValueError(f"layer_flips must be [prompt, layer] with {len(self.layers)} layers, got {f.shape}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be sorted and unique, got {list(self.layers)}")
        if f.shape[0] == 0:
            raise ValueError("no prompt was refused at full precision: flips (and the label) are undefined; check "
                             "the baseline refusal rate or add harmful prompts")
        object.__setattr__(self, "layer_flips", f)
        n = f.shape[0]

        def flags(x: Any, what: str) -> np.ndarray:
            a = np.asarray(x, dtype=bool)
            if a.shape != (n,):
                raise ValueError(f"{what} must hold one flag per refused prompt ({n}), got shape {a.shape}")
            return a

        object.__setattr__(self, "all_layer", flags(self.all_layer, "all_layer"))
        bad = sorted(set(self.per_channel) - set(self.layers))
        if bad:
            raise ValueError(f"per_channel has layers {bad} that the layer sweep does not: {list(self.layers)}")
        object.__setattr__(self, "per_channel", {int(k): flags(v, f"per_channel[{k}]")
                                                 for k, v in sorted(self.per_channel.items())})
        object.__setattr__(self, "stage_flips", {str(k): flags(v, f"stage_flips[{k!r}]")
                                                 for k, v in self.stage_flips.items()})
        if self.prompt_ids and len(self.prompt_ids) != n:
            raise ValueError(f"prompt_ids has {len(self.prompt_ids)} ids for {n} refused prompts")

    @property
    def n(self) -> int:
        """The number of refused prompts (the denominator of every flip rate here)."""
        return int(self.layer_flips.shape[0])

    @classmethod
    def from_verdicts(cls, base: pd.Series, layers: Mapping[int, pd.Series], all_layer: pd.Series, *,
                      per_channel: Mapping[int, pd.Series] | None = None,
                      stage_flips: Mapping[str, pd.Series] | None = None) -> FlipEvidence:
        """From verdict strings indexed by prompt id: ``base`` at full precision, the others under each plan.
        A refused prompt with no verdict under a plan raises (a flip cannot be assumed); one whose verdict under
        some plan is ``nonfinite`` (NaN/inf logits) is left out, as :mod:`kvgeom.stats` leaves it out of rates."""
        ids = base.index[base == Verdict.REFUSED.value]
        every = [*layers.values(), all_layer, *(per_channel or {}).values(), *(stage_flips or {}).values()]
        bad = {i for q in every for i in q.index[q == Verdict.NONFINITE.value]}
        ids = ids[~ids.isin(list(bad))] if bad else ids

        def flips(q: pd.Series, what: str) -> np.ndarray:
            v = q.reindex(ids)
            if v.isna().any():
                raise ValueError(f"{what} has no verdict for refused prompts {list(v.index[v.isna()])[:5]}: "
                                 "rerun that stage on every refused prompt")
            return (v != Verdict.REFUSED.value).to_numpy()

        order = sorted(int(k) for k in layers)
        return cls(tuple(order), np.stack([flips(layers[k], f"layer {k}") for k in order], axis=1)
                   if order else np.zeros((len(ids), 0), bool), flips(all_layer, "all layers"),
                   {int(k): flips(v, f"per-channel layer {k}") for k, v in (per_channel or {}).items()},
                   {k: flips(v, k) for k, v in (stage_flips or {}).items()}, tuple(str(i) for i in ids))


def prescription_key(label: str, critical_layer: int | None, candidates: Sequence[int]) -> str:
    """What :func:`kvgeom.mitigation.prescribe`'s paper candidate depends on, in words: the label and the layers
    it keeps in full precision (the critical layer, or the candidate layers for dilution, as a set)."""
    if label == ROBUST:
        return "robust: nothing to fix"
    if label == HYPER:
        return "hyper-vulnerable: full precision everywhere"
    if label == CRUSHES:
        return "outlier-crushes-safety: group-wise ranges on all layers"
    if label == DILUTION:
        return f"multi-layer-dilution: keep {', '.join(f'L{x}' for x in sorted(candidates)) or 'the worst layers'} fp16"
    if label in (OUTLIER_AS_SAFETY, MIXED, UNDETERMINED):
        return f"{label}: keep L{critical_layer} fp16"
    return label


def _weights(rng: np.random.Generator, n: int, m: int, b: int) -> np.ndarray:
    """``b`` bootstrap resamples of ``m`` prompts out of ``n`` as multiplicity counts ``[b, n]``."""
    return rng.multinomial(m, np.full(n, 1.0 / n), size=b).astype(float)


@dataclass(frozen=True)
class _Decisions:
    labels: np.ndarray
    critical: np.ndarray
    fixes: np.ndarray


def _decide(ev: FlipEvidence, w: np.ndarray, th: TaxonomyThresholds) -> _Decisions:
    m = w.sum(axis=1)
    flips = (w @ ev.layer_flips.astype(float)) / m[:, None]
    crit_idx = np.argmax(flips, axis=1)  # ties: the lowest layer, as classify
    layers = np.asarray(ev.layers)
    crit = layers[crit_idx]
    worst = flips[np.arange(len(w)), crit_idx]
    n_cand = (flips >= th.candidate_at).sum(axis=1)
    a = (w @ ev.all_layer.astype(float)) / m
    smax = np.maximum(worst, a)
    for f in ev.stage_flips.values():
        smax = np.maximum(smax, (w @ f.astype(float)) / m)
    pcr = np.full(len(w), np.nan)
    measured = worst == 0  # PCR is undefined there whatever the per-channel arm does
    for layer, c in ev.per_channel.items():
        sel = (crit == layer) & (worst > 0)
        pcr[sel] = 1.0 - ((w[sel] @ c.astype(float)) / m[sel]) / worst[sel]
        measured |= crit == layer
    labels = first_label(fired_rules(worst, a, n_cand, len(layers), pcr, smax, th))
    if not measured.all():
        mid = 0.5 * (th.pcr_low + th.pcr_high)
        alts = [first_label(fired_rules(worst, a, n_cand, len(layers), np.full(len(w), v), smax, th))
                for v in (np.nan, th.pcr_low - 1.0, mid, th.pcr_high + 1.0)]
        same = np.all([x == alts[0] for x in alts], axis=0)
        labels = np.where(measured, labels, np.where(same, alts[0], UNMEASURED))
    order = np.argsort(-flips, axis=1, kind="stable")
    fixes = []
    for i in range(len(w)):
        cands = [int(layers[j]) for j in order[i] if flips[i, j] >= th.candidate_at][: th.max_candidates]
        fixes.append(prescription_key(str(labels[i]), int(crit[i]), cands))
    return _Decisions(labels.astype(object), crit, np.asarray(fixes, dtype=object))


def _shares(values: np.ndarray) -> dict[Any, float]:
    keys, counts = np.unique(values.astype(str) if values.dtype == object else values, return_counts=True)
    total = counts.sum()
    pairs = sorted(zip(keys.tolist(), (counts / total).tolist(), strict=True), key=lambda kv: (-kv[1], str(kv[0])))
    return dict(pairs)


def _top(shares: Mapping[str, float], k: int = 10) -> dict[str, float]:
    """The ``k`` most likely entries, the rest summed as ``"other"``."""
    items = list(shares.items())
    out = dict(items[:k])
    rest = sum(v for _, v in items[k:])
    if rest > 0:
        out["other"] = rest
    return out


def critical_layer_probabilities(evidence: FlipEvidence, *, n_resamples: int = 1000,
                                 seed: int = 0) -> dict[int, float]:
    """``P(critical layer = L)`` over bootstrap resamples of the refused prompts (the same resamples
    :func:`label_confidence` draws with this seed), highest first; layers never critical are left out."""
    w = _weights(np.random.default_rng(seed), evidence.n, evidence.n, n_resamples)
    flips = w @ evidence.layer_flips.astype(float)
    crit = np.asarray(evidence.layers)[np.argmax(flips, axis=1)]
    return {int(k): v for k, v in _shares(crit).items()}


@dataclass(frozen=True)
class LabelConfidence:
    """The label as stated (``label``: the point label when ``P >= confidence``, else ``undetermined``) with the
    evidence: ``p_label``, ``p_critical``, ``p_fix`` (shares of resamples; the ten likeliest prescriptions and
    ``other``), ``point_fix`` with ``p_point_fix`` (the observed prompts' prescription and its share),
    ``tied_with_worst`` (layers whose paired
    flips do not differ from the point critical layer's at ``alpha``), and ``settle`` (the projection)."""

    label: str
    point_label: str
    point_critical_layer: int
    p_label: Mapping[str, float]
    p_critical: Mapping[int, float]
    p_fix: Mapping[str, float]
    tied_with_worst: tuple[int, ...]
    n_refused: int
    confidence: float
    n_resamples: int
    alpha: float
    seed: int
    settle: Mapping[str, Any] | None
    projection: tuple[Mapping[str, Any], ...] = ()
    point_fix: str = ""
    p_point_fix: float = 0.0

    @property
    def stated(self) -> bool:
        """True when the point label reached the confidence threshold."""
        return self.p_point >= self.confidence

    @property
    def p_point(self) -> float:
        """P(the point label) over the resamples."""
        return float(self.p_label.get(self.point_label, 0.0))

    def competing(self, min_share: float = 0.05) -> list[tuple[str, float]]:
        """Labels other than the stated one reaching ``min_share`` of the resamples, most likely first."""
        return [(k, v) for k, v in self.p_label.items() if v >= min_share and k != self.label]

    def sentence(self) -> str:
        """The verdict in words, e.g. ``multi-layer-dilution, 62% of resamples; mixed 31%: undetermined at 11
        refused prompts; about 40 more would settle it``."""
        parts = [f"{k} {v:.0%}" for k, v in self.p_label.items() if v >= 0.01]
        head = f"{self.point_label}, {self.p_point:.0%} of {self.n_resamples} resamples"
        others = "; ".join(p for p in parts if not p.startswith(f"{self.point_label} "))
        head += f"; {others}" if others else ""
        if self.stated:
            return f"{head}: stated at {self.n_refused} refused prompts (threshold {self.confidence:.0%})"
        tail = f"undetermined at {self.n_refused} refused prompts (threshold {self.confidence:.0%})"
        if self.settle:
            tail += (f"; about {self.settle['more']} more refused prompts would likely settle it "
                     f"(on {self.settle['label']}, projected from the observed flips)")
        else:
            tail += (f"; even {int(PROJECTION[-1])}x as many refused prompts drawn like these would likely not "
                     "settle it: the label sits on a threshold")
        return f"{head}: {tail}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: the ``confidence`` entry of ``audit.json``'s label stage."""
        return {"label": self.label, "point_label": self.point_label, "stated": self.stated,
                "p_point": self.p_point, "point_critical_layer": self.point_critical_layer,
                "p_label": dict(self.p_label), "p_critical": {str(k): v for k, v in self.p_critical.items()},
                "p_fix": dict(self.p_fix), "point_fix": self.point_fix, "p_point_fix": self.p_point_fix,
                "tied_with_worst": list(self.tied_with_worst),
                "competing": [{"label": k, "p": v} for k, v in self.competing()],
                "n_refused": self.n_refused, "confidence": self.confidence, "n_resamples": self.n_resamples,
                "alpha": self.alpha, "seed": self.seed, "settle": dict(self.settle) if self.settle else None,
                "projection": [dict(p) for p in self.projection], "sentence": self.sentence()}


def tied_with_worst(evidence: FlipEvidence, critical: int, alpha: float = 0.05) -> tuple[int, ...]:
    """Layers whose per-prompt flips do not differ from layer ``critical``'s (two-sided exact McNemar on the
    paired flips, ``p >= alpha``), ``critical`` included."""
    f = evidence.layer_flips
    c = f[:, evidence.layers.index(critical)]
    out = []
    for j, layer in enumerate(evidence.layers):
        b, cc = int((c & ~f[:, j]).sum()), int((~c & f[:, j]).sum())
        if layer == critical or mcnemar_exact(b, cc) >= alpha:
            out.append(int(layer))
    return tuple(out)


def label_confidence(
    evidence: FlipEvidence,
    thresholds: TaxonomyThresholds | None = None,
    *,
    confidence: float = 0.8,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    projection: Sequence[float] = PROJECTION,
) -> LabelConfidence:
    """The label's bootstrap confidence (see the module docstring). Costs milliseconds per thousand resamples."""
    if not 0.5 < confidence <= 1.0:
        raise ValueError(f"confidence is the share of resamples a label needs, in (0.5, 1], got {confidence!r}")
    if n_resamples < 100:
        raise ValueError(f"n_resamples={n_resamples} is too few to state a probability; use >= 100 (default 1000)")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    th = thresholds or TaxonomyThresholds()
    n = evidence.n
    rng = np.random.default_rng(seed)
    point = _decide(evidence, np.ones((1, n)), th)
    point_label, point_crit, point_fix = str(point.labels[0]), int(point.critical[0]), str(point.fixes[0])
    d = _decide(evidence, _weights(rng, n, n, n_resamples), th)
    p_label = _shares(d.labels)
    p_point = p_label.get(point_label, 0.0)
    stated = point_label if p_point >= confidence else UNDETERMINED
    settle, proj = None, []
    if p_point < confidence:
        for k in projection:
            m = int(math.ceil(k * n))
            dk = _decide(evidence, _weights(rng, n, m, n_resamples), th)
            top, p_top = next(iter(_shares(dk.labels).items()))
            proj.append({"n_refused": m, "label": top, "p": p_top})
            if p_top >= confidence and top != UNMEASURED:
                settle = {"n_refused": m, "more": m - n, "label": top, "p": p_top}
                break
    return LabelConfidence(
        label=stated, point_label=point_label, point_critical_layer=point_crit, p_label=p_label,
        p_critical={int(k): v for k, v in _shares(d.critical).items()}, p_fix=_top(_shares(d.fixes)),
        point_fix=point_fix, p_point_fix=float(np.mean(d.fixes == point_fix)),
        tied_with_worst=tied_with_worst(evidence, point_crit, alpha), n_refused=n, confidence=confidence,
        n_resamples=n_resamples, alpha=alpha, seed=seed, settle=settle, projection=tuple(proj))
