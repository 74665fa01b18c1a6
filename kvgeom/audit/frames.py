"""Tables of the audit's stages: :func:`stage_frame` turns a stage's result (the ``audit.json`` dict) into a
DataFrame — one row per layer, channel, candidate... — through the stage's own ``Stage.frame`` (declared in its
file). Proved by ``tests/audit/test_audit.py`` (every stage of a real audit has a non-empty table)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from .stage import STAGE_REGISTRY

__all__ = ["stage_frame"]


def stage_frame(name: str, result: Mapping[str, Any]) -> pd.DataFrame:
    """A table of one stage's result (``audit["stages"][name]``).

    baseline: one row per rate (calibration, held-out, over-refusal) · layer_sweep: one row per layer plus
    ``all layers`` · sensitivity: one row per layer · outliers: one row per key channel (``is_outlier``) ·
    channel_ablation: one row per quantized subset · pcr: one row · label: one row per decision rule ·
    mitigation: one row per (candidate, split), with the full-precision and uniform references · export: one row
    per serving stack · bit_sweep: one row per bit-width · agreement: one row per prompt split. A stage added
    later documents its own.
    """
    stage = STAGE_REGISTRY.get(name)
    if stage is None:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_REGISTRY)}")
    return stage.frame(result)
