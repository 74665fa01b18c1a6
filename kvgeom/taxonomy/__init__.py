"""The failure-mode taxonomy: PCR, outlier channels, channel-ablation ratios and the label with its decision trace.

Everything here is model-free: it takes the numbers the audit stages measured (per-layer flip rates, per-prompt
flip booleans, per-channel key magnitudes) and turns them into a :class:`Diagnosis`.

Formulas (``flip`` is the conditional flip rate of :mod:`kvgeom.stats`: among prompts refused at full precision,
the share no longer refused under quantization):

* **PCR** (per-channel recovery) at the critical layer, same bit width::

      PCR = 1 - flip(per-channel) / flip(per-tensor)            undefined (NaN) when flip(per-tensor) = 0

  PCR ≈ 1: per-channel ranges remove the damage (an outlier channel sets the per-tensor range and crushes the
  rest); PCR ≈ 0: per-channel ranges do not help (the damage is to the outlier itself); PCR < 0: per-channel is
  worse than per-tensor.
* **Causal ratio** of a channel ablation at a fraction ``f`` of the channels::

      causal_ratio(f) = flip(quantize only the outlier channels) / mean_s flip(quantize f random channels, seed s)

  undefined (NaN) when the random mean is 0.
* **Outlier channels**: per layer, the ``C = n_kv_heads * d_head`` key channels ``(head, dim)`` ranked by
  ``max |K|`` over the calibration prompts (rank 1 = largest; ties by head, then dim); the top
  ``n_out = max(1, ceil(top_frac * C))`` are outliers.
* **Label**: an ordered decision list over the inputs (see :func:`classify`); thresholds are fields of
  :class:`TaxonomyThresholds` with the paper's defaults.
"""

from .classify import Diagnosis, TraceStep, candidate_layers, classify, critical_layer
from .labels import (
    CRUSHES,
    DILUTION,
    HYPER,
    LABEL_DESCRIPTIONS,
    LABELS,
    MIXED,
    OUTLIER_AS_SAFETY,
    ROBUST,
    UNDETERMINED,
    TaxonomyThresholds,
)
from .measures import ablation_summary, causal_ratio, outlier_channels, outlier_heatmap, pcr, pcr_with_ci

__all__ = [
    "CRUSHES",
    "DILUTION",
    "HYPER",
    "LABELS",
    "LABEL_DESCRIPTIONS",
    "MIXED",
    "OUTLIER_AS_SAFETY",
    "ROBUST",
    "UNDETERMINED",
    "Diagnosis",
    "TaxonomyThresholds",
    "TraceStep",
    "ablation_summary",
    "candidate_layers",
    "causal_ratio",
    "classify",
    "critical_layer",
    "outlier_channels",
    "outlier_heatmap",
    "pcr",
    "pcr_with_ci",
]
