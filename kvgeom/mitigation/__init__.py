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

from .candidates import Candidate, assignment_bits, prescribe, protect_channels_from, regroup
from .export import export_settings
from .search import SearchResult, recovery, recovery_ci, search_precision

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
