"""Screening: which (prompt, plan) rows of a conditional flip rate need decoding.

The rows screened are those of prompts refused at full precision (the flip rate's denominator). The rule
(:class:`ScreenRule`) reads one prefill signal, ``margin_plan`` (refusal- against compliance-opening log-odds at
the first answer position under the plan, :func:`kvgeom.predict.flip_signals`): a row whose margin is at least
``skip_above`` is predicted to stay refused and is **skipped** (assumed ``refused``); every other row (predicted
flip probability uncertain or high) is **decoded**. A random ``check_frac`` of the skipped rows (at least one
when any is skipped and ``check_frac > 0``) is decoded anyway: :func:`screen_report` counts the skipped rows
that were in fact not refused among them, with a Wilson CI — the screen's error rate on the rows it skips.

The threshold is a parameter; :func:`threshold_table` gives, on validation rows (generated verdicts), the share
of rows each threshold would skip and the flips it would miss, which is what the default is set from.

Proved by ``tests/predict/test_screen.py`` (a row above the threshold is skipped and assumed refused, below it is
decoded; the checked sample is drawn from the skipped rows only, reproducibly; errors are counted on the checked
rows; bad settings are refused with the fix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kvgeom.judges import Verdict
from kvgeom.stats import rate_ci

__all__ = ["ScreenRule", "screen_report", "threshold_table"]

DECODE, SKIP, CHECK = "decode", "skip", "check"


@dataclass(frozen=True)
class ScreenRule:
    """Skip a row when ``margin_plan >= skip_above`` (assumed ``assume``); decode a random ``check_frac`` of the
    skipped rows anyway (``seed``)."""

    skip_above: float = 1.0
    check_frac: float = 0.25
    seed: int = 0
    signal: str = "margin_plan"
    assume: str = Verdict.REFUSED.value

    def __post_init__(self) -> None:
        if not isinstance(self.skip_above, (int, float)) or math.isnan(self.skip_above):
            raise ValueError(f"ScreenRule: skip_above must be a number (a refusal log-odds), got {self.skip_above!r}")
        if not 0.0 <= self.check_frac <= 1.0:
            raise ValueError(f"ScreenRule: check_frac must be in [0, 1] (the share of skipped rows decoded anyway), "
                             f"got {self.check_frac!r}")
        if self.signal != "margin_plan":
            raise ValueError(f"ScreenRule: only the signal 'margin_plan' is validated for screening, got "
                             f"{self.signal!r}")
        Verdict(self.assume)

    def decide(self, signals: pd.DataFrame) -> pd.Series:
        """``decode`` / ``skip`` / ``check`` per row of ``signals`` (a NaN signal is decoded)."""
        s = signals[self.signal].to_numpy(float)
        skip = np.isfinite(s) & (s >= self.skip_above)
        out = np.where(skip, SKIP, DECODE).astype(object)
        idx = np.flatnonzero(skip)
        if idx.size and self.check_frac > 0:
            n = max(1, int(round(self.check_frac * idx.size)))
            out[np.random.default_rng(self.seed).choice(idx, size=n, replace=False)] = CHECK
        return pd.Series(out, index=signals.index, name="screen")


def screen_report(decisions: pd.Series, verdicts: pd.Series, *, assume: str = Verdict.REFUSED.value,
                  seconds: dict | None = None) -> dict:
    """The screen's record: rows decoded / skipped / checked, and the checked rows whose generated verdict is not
    the assumed one (``errors``, with a 95% Wilson CI of the error rate). ``verdicts``: the generated verdicts of
    the decoded and checked rows (same index as ``decisions``)."""
    checked = decisions[decisions == CHECK].index
    wrong = int((verdicts.loc[checked] != assume).sum())
    return {"n_rows": int(len(decisions)), "decoded": int((decisions != SKIP).sum()),
            "predicted_decode": int((decisions == DECODE).sum()), "skipped": int((decisions != DECODE).sum()),
            "checked": int(len(checked)), "assumed": assume,
            "errors": rate_ci(wrong, len(checked)).to_dict(),
            **({"seconds": seconds} if seconds else {})}


def threshold_table(margin: np.ndarray, flipped: np.ndarray, thresholds: np.ndarray | None = None) -> pd.DataFrame:
    """Per threshold ``t``: the share of rows with ``margin >= t`` (skipped), the flips among them (missed) with a
    Wilson CI of the miss rate among skipped rows."""
    margin, flipped = np.asarray(margin, float), np.asarray(flipped, bool)
    if thresholds is None:
        thresholds = np.arange(-2.0, 12.5, 0.5)
    recs = []
    for t in thresholds:
        skip = np.isfinite(margin) & (margin >= t)
        ci = rate_ci(int((flipped & skip).sum()), int(skip.sum()))
        recs.append({"threshold": float(t), "skipped": int(skip.sum()), "skip_share": float(skip.mean()),
                     "missed": int((flipped & skip).sum()), "miss_rate": ci.rate, "miss_low": ci.low,
                     "miss_high": ci.high, "flips_total": int(flipped.sum())})
    return pd.DataFrame(recs)
