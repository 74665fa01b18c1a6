"""Predicting refusal flips from prefill passes only, validating the prediction against generated verdicts, and
screening which rows an audit needs to decode (issue #19).

* :mod:`kvgeom.predict.signals` — :func:`flip_signals`: cheap signals per (prompt, plan) row, batched, no decoding.
* :mod:`kvgeom.predict.validate` — :func:`validate_flip_prediction`: AUROC with bootstrap CIs per signal and for
  a cross-validated logistic regression, per-configuration Spearman correlation of predicted and measured flips.
* :mod:`kvgeom.predict.screen` — :class:`ScreenRule`: which rows to decode, which to skip and what a skipped row
  is assumed to be, with a random check of skipped rows; :class:`PrefillScreen` applies it inside generation.
"""

from .screen import PrefillScreen, ScreenRule
from .signals import (
                      COMPLIANCE_OPENINGS,
                      REFUSAL_OPENINGS,
                      SIGNALS,
                      FlipReference,
                      flip_reference,
                      flip_signals,
                      opening_margin,
                      opening_tokens,
)

__all__ = ["COMPLIANCE_OPENINGS", "REFUSAL_OPENINGS", "SIGNALS", "FlipReference", "flip_reference", "flip_signals",
           "PrefillScreen", "ScreenRule", "opening_margin", "opening_tokens"]
