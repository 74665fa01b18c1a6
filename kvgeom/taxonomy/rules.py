"""The label rules as one vectorized decision: :func:`fired_rules` evaluates every rule of the decision list on
arrays (one entry per model, or per bootstrap resample) and :func:`first_label` picks the first that holds.

:func:`kvgeom.taxonomy.classify` calls these on one model (and adds the trace); :func:`kvgeom.taxonomy.
label_confidence` calls them on thousands of resamples at once. One copy of the rules, so the label a resample
gets is the label :func:`classify` would give on that resample: proved by
``tests/taxonomy/test_confidence.py::test_point_label_equals_classify``.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Bool, Float

from .labels import CRUSHES, DILUTION, HYPER, MIXED, OUTLIER_AS_SAFETY, ROBUST, UNDETERMINED, TaxonomyThresholds

#: The rules' labels in decision order (the first that holds sets the label).
RULE_ORDER = (ROBUST, HYPER, OUTLIER_AS_SAFETY, MIXED, DILUTION, CRUSHES, UNDETERMINED)


def fired_rules(
    worst: Float[np.ndarray, " b"] | float,
    all_layer: Float[np.ndarray, " b"] | float,
    n_at_candidate: Float[np.ndarray, " b"] | int,
    n_layers: int,
    pcr: Float[np.ndarray, " b"] | float,
    stage_max: Float[np.ndarray, " b"] | float,
    thresholds: TaxonomyThresholds,
) -> dict[str, Bool[np.ndarray, " b"]]:
    """Whether each rule holds, as a boolean array per label in :data:`RULE_ORDER` (NaN PCR = undefined).

    ``worst`` = worst single-layer flip ``W``, ``all_layer`` = all-layer flip ``A``, ``n_at_candidate`` = number of
    layers with flip ``>= candidate_at``, ``stage_max`` = ``max(W, A, other stages' flips)``; see
    :func:`kvgeom.taxonomy.classify` for the rules in words.
    """
    th = thresholds
    w, a, p, smax = (np.atleast_1d(np.asarray(x, dtype=float)) for x in (worst, all_layer, pcr, stage_max))
    n_cand = np.atleast_1d(np.asarray(n_at_candidate, dtype=float))
    defined = ~np.isnan(p)
    with np.errstate(invalid="ignore"):
        far = (a > th.dilution_ratio * w) & (a > w + th.dilution_margin)
        out = {
            ROBUST: smax < th.robust_below,
            HYPER: n_cand / n_layers >= th.hyper_share,
            OUTLIER_AS_SAFETY: defined & (p < th.pcr_low),
            MIXED: defined & (p >= th.pcr_low) & (p <= th.pcr_high),
            DILUTION: (~defined | (p > th.pcr_high)) & ((n_cand >= th.several_layers) | far),
            CRUSHES: defined & (p > th.pcr_high),
        }
    out = {k: np.broadcast_to(v, np.broadcast_shapes(*(x.shape for x in out.values()))) for k, v in out.items()}
    out[UNDETERMINED] = ~np.any(np.stack(list(out.values())), axis=0)
    return out


def first_label(fired: dict[str, Bool[np.ndarray, " b"]]) -> np.ndarray:
    """The label of each entry: the first rule of :data:`RULE_ORDER` that holds (``undetermined`` always can)."""
    stack = np.stack([fired[k] for k in RULE_ORDER])
    return np.asarray(RULE_ORDER, dtype=object)[np.argmax(stack, axis=0)]
