"""How far kvgeom's simulation agrees with a real engine: per-prompt verdicts and tokens, per format.

Input: one row per (comparison, prompt) with the engine's and kvgeom's verdicts and generated token ids (the
``rows`` of :func:`kvgeom.validate.validate_engine`). Per comparison (:func:`agreement_summary`):

* ``agree``: the share of prompts whose two verdicts are equal, ``k/n`` with a Wilson interval
  (:func:`kvgeom.stats.rate_ci`); ``target_met``: ``agree_rate >= target`` (default 0.9);
* ``identical``: the share whose generated tokens are equal (Wilson interval), and the first position where
  they differ (:func:`first_divergence`: the first unequal index, or the shorter length when one sequence is a
  prefix of the other; None when equal): median and minimum over the prompts that differ;
* each side's refusal rate, and each side's conditional flip rate against its own full-precision run (the
  engine: its f16 cache; kvgeom: its fp32 model), by :func:`kvgeom.stats.flip_stats`, so the format matrix
  reads side by side;
* ``prompt_tokens_equal``: the share of prompts the engine tokenized to kvgeom's ids.

Proved by ``tests/validate/test_validate_agreement.py`` (planted verdicts and tokens with known counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from kvgeom.judges import Verdict
from kvgeom.stats import flip_stats, rate_ci

__all__ = ["AGREEMENT_TARGET", "agreement_summary", "first_divergence"]

#: the per-prompt verdict agreement a quantized format should reach (issue #16)
AGREEMENT_TARGET = 0.9


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where ``a`` and ``b`` differ (the shorter length if one is a prefix), None if equal."""
    a, b = list(a), list(b)
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _side(frame: pd.DataFrame, base: pd.DataFrame | None, side: str, confidence: float) -> dict[str, Any]:
    verdicts = frame[f"{side}_verdict"]
    out = rate_ci(int((verdicts == Verdict.REFUSED.value).sum()), len(frame),
                  confidence=confidence).to_dict(prefix=f"{side}_refusal_")
    if base is not None:
        b = base.set_index("prompt_id")[f"{side}_verdict"]
        q = frame.set_index("prompt_id")[f"{side}_verdict"]
        common = [i for i in q.index if i in b.index]
        fs = flip_stats(b.loc[common].tolist(), q.loc[common].tolist(), confidence=confidence)
        out.update(fs.flip.to_dict(prefix=f"{side}_flip_"))
    return out


def agreement_summary(rows: pd.DataFrame, *, baselines: dict[str, str] | None = None,
                      target: float = AGREEMENT_TARGET, confidence: float = 0.95) -> pd.DataFrame:
    """One row per comparison (``rows["comparison"]``, first-seen order): verdict and token agreement with CIs,
    both sides' refusal and flip rates. ``baselines``: ``{"engine": comparison, "kvgeom": comparison}`` whose
    engine / kvgeom verdicts are each side's full-precision baseline (flip rates are left out without one)."""
    need = {"comparison", "prompt_id", "engine_verdict", "kvgeom_verdict", "engine_tokens", "kvgeom_tokens"}
    missing = need - set(rows.columns)
    if missing:
        raise ValueError(f"agreement rows lack the columns {sorted(missing)}")
    if not 0 < target <= 1:
        raise ValueError(f"the agreement target must be in (0, 1], got {target!r}")
    baselines = baselines or {}
    base = {side: rows[rows["comparison"] == c] for side, c in baselines.items()}
    out = []
    for comp, g in rows.groupby("comparison", sort=False):
        agree = g["engine_verdict"] == g["kvgeom_verdict"]
        div = [first_divergence(a, b) for a, b in zip(g["engine_tokens"], g["kvgeom_tokens"], strict=True)]
        diverged = [d for d in div if d is not None]
        rec: dict[str, Any] = {"comparison": comp, "n": len(g)}
        for col in ("format", "kvgeom_scheme", "kvgeom_query"):
            if col in g:
                rec[col] = g[col].iloc[0]
        rec.update(rate_ci(int(agree.sum()), len(g), confidence=confidence).to_dict(prefix="agree_"))
        rec["target"] = target
        rec["target_met"] = bool(len(g) and agree.mean() >= target)
        rec.update(rate_ci(len(div) - len(diverged), len(g), confidence=confidence).to_dict(prefix="identical_"))
        rec["first_divergence_median"] = float(np.median(diverged)) if diverged else None
        rec["first_divergence_min"] = int(min(diverged)) if diverged else None
        for side in ("engine", "kvgeom"):
            b = base.get(side)
            rec.update(_side(g, b if b is not None and len(b) else None, side, confidence))
        if "prompt_tokens_equal" in g:
            rec["prompt_tokens_equal"] = float(g["prompt_tokens_equal"].mean())
        out.append(rec)
    return pd.DataFrame(out)
