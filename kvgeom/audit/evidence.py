"""The per-prompt evidence behind the label, read back from stored stage results: :func:`sweep_evidence` turns
the baseline's, the layer sweep's, PCR's and the channel ablation's verdicts into a
:class:`kvgeom.taxonomy.confidence.FlipEvidence`, and :func:`confidence_of` gives the label's bootstrap
confidence with the audit's settings. Nothing is regenerated. Proved by ``tests/audit/test_label_confidence.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from kvgeom.taxonomy.confidence import FlipEvidence, LabelConfidence, label_confidence

from .config import AuditConfig

__all__ = ["confidence_of", "per_channel_verdicts", "sweep_evidence"]


def per_channel_verdicts(pcr: Mapping[str, Any] | None) -> dict[int, pd.Series]:
    """PCR's per-channel verdicts by layer (``{}`` for a PCR stage that did not keep them)."""
    return {int(k): pd.Series(v) for k, v in ((pcr or {}).get("per_channel_verdicts") or {}).items()}


def sweep_evidence(base: pd.Series, layer_sweep: Mapping[str, Any], pcr: Mapping[str, Any] | None = None,
                   ablation: Mapping[str, Any] | None = None) -> FlipEvidence:
    """The flips of every refused prompt in ``base`` (full-precision verdicts by prompt id) under each stored
    plan: the sweep's layers and all-layer row, PCR's per-channel arms, the ablation's subsets."""
    v = layer_sweep["verdicts"]
    layers = {int(r["layer"]): pd.Series(v[f"L{r['layer']}"]) for r in layer_sweep["layers"]}
    stage = {f"ablation {k}": pd.Series(x) for k, x in ((ablation or {}).get("verdicts") or {}).items()}
    return FlipEvidence.from_verdicts(base, layers, pd.Series(v["all layers"]), per_channel=per_channel_verdicts(pcr),
                                      stage_flips=stage)


def confidence_of(cfg: AuditConfig, evidence: FlipEvidence, thresholds: Any = None) -> LabelConfidence:
    """:func:`kvgeom.taxonomy.confidence.label_confidence` with the audit's threshold, resamples and seed."""
    return label_confidence(evidence, thresholds, confidence=cfg.label_confidence, n_resamples=cfg.n_resamples,
                            seed=cfg.seed)
