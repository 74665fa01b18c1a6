"""Geometry of refusal in the activations, and its sensitivity to KV-cache quantization.

* :mod:`~kvgeom.geometry.directions` — difference-of-means refusal directions per layer / position;
* :mod:`~kvgeom.geometry.selection` — Arditi et al.'s choice of the refusal direction and its causal check;
* :mod:`~kvgeom.geometry.subspace` — safety subspaces (PCA, effective rank) and linear probes;
* :mod:`~kvgeom.geometry.sensitivity` — per-layer sensitivity ratios with bootstrap CIs, and their figure.

Noise injection lives in :mod:`kvgeom.noise`. Formulas: ``docs/geometry.md``.
"""

from kvgeom.geometry.directions import RefusalDirections, as_matrix, capture_pair, refusal_directions
from kvgeom.geometry.selection import (
    CausalCheck,
    SelectionTrace,
    ablation_hooks,
    addition_hooks,
    direction_causal_check,
    select_direction,
)
from kvgeom.geometry.sensitivity import METRICS, SensitivityProfile, plot_sensitivity, sensitivity_profile
from kvgeom.geometry.subspace import (
    ProbeResult,
    SafetySubspace,
    SubspaceSet,
    linear_probe,
    safety_subspace,
    safety_subspaces,
)

__all__ = [
    "METRICS",
    "CausalCheck",
    "ProbeResult",
    "RefusalDirections",
    "SafetySubspace",
    "SelectionTrace",
    "SensitivityProfile",
    "SubspaceSet",
    "ablation_hooks",
    "addition_hooks",
    "as_matrix",
    "capture_pair",
    "direction_causal_check",
    "linear_probe",
    "plot_sensitivity",
    "refusal_directions",
    "safety_subspace",
    "safety_subspaces",
    "select_direction",
    "sensitivity_profile",
]
