"""Screening: which (prompt, plan) rows of a conditional flip rate need decoding.

The rows screened are those of prompts refused at full precision (the flip rate's denominator). The rule
(:class:`ScreenRule`) reads one prefill signal, ``margin_plan`` (refusal- against compliance-opening log-odds at
the first answer position under the plan, :func:`kvgeom.predict.flip_signals`): a row whose margin is at least
``skip_above`` is predicted to stay refused and is **skipped** (assumed ``refused``); every other row (predicted
flip probability uncertain or high) is **decoded**. Each skipped row is decoded anyway with probability
``check_frac`` (**checked**), by a draw keyed by the row (seed, prompt id, plan label), so a row gets the same
decision in any batch, order or process: :func:`screen_report` counts the checked rows that were in fact not
refused, with a Wilson CI — the screen's error rate on the rows it skips.

:class:`PrefillScreen` applies the rule inside generation (:func:`kvgeom.evaluate.evaluate`'s ``screen=``): the
margin is read from the first-position logits of the prefill that generation runs anyway, and a skipped row
leaves the batch there, so the screen costs no pass of its own (before, a separate planned prefill of every
row). Rows whose prefill does not read quantized K/V (full precision; cache mode with ``prefill="full"``, where
the prompt attends to itself at full precision) are never skipped: their first logits say nothing of the plan.

The threshold is a parameter; :func:`threshold_table` gives, on validation rows (generated verdicts), the share
of rows each threshold would skip and the flips it would miss, which is what the default is set from.

Proved by ``tests/predict/test_screen.py`` (a row above the threshold is skipped and assumed refused, below it is
decoded; the checked sample is drawn from the skipped rows only, reproducibly; errors are counted on the checked
rows; bad settings are refused with the fix).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from kvgeom.evaluate import plan_label
from kvgeom.judges import Verdict
from kvgeom.quant.plan import QuantPlan
from kvgeom.stats import rate_ci

from .signals import opening_margin, opening_tokens

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["PrefillScreen", "ScreenRule", "screen_report", "threshold_table"]

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

    def draw(self, prompt_id: Any, plan: str) -> float:
        """The row's check draw in [0, 1): a hash of (seed, prompt id, plan label), the same in every process."""
        h = hashlib.blake2b(f"{self.seed}\x1f{prompt_id}\x1f{plan}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2.0 ** 64

    def decide_one(self, value: float, prompt_id: Any, plan: str) -> str:
        """``decode`` / ``skip`` / ``check`` for one row with signal ``value`` (NaN: decoded)."""
        if not (math.isfinite(value) and value >= self.skip_above):
            return DECODE
        return CHECK if self.draw(prompt_id, plan) < self.check_frac else SKIP

    def decide(self, signals: pd.DataFrame) -> pd.Series:
        """``decode`` / ``skip`` / ``check`` per row of ``signals`` (a NaN signal is decoded); rows are keyed by
        their ``prompt_id`` (else ``prompt``) and ``plan`` columns, else by their index."""
        idcol = "prompt_id" if "prompt_id" in signals else "prompt" if "prompt" in signals else None
        ids = signals[idcol].tolist() if idcol else signals.index.tolist()
        plans = signals["plan"].tolist() if "plan" in signals else [""] * len(signals)
        out = [self.decide_one(float(v), i, p) for v, i, p in
               zip(signals[self.signal].to_numpy(float), ids, plans, strict=True)]
        return pd.Series(out, index=signals.index, name="screen", dtype=object)


def reads_quantized_prefill(plan: QuantPlan | None) -> bool:
    """Whether the prefill's first-position logits already see the plan's quantized K/V."""
    return plan is not None and not (plan.mode == "cache" and plan.prefill == "full")


@dataclass(frozen=True)
class PrefillScreen:
    """A :class:`ScreenRule` applied to generation's own prefill (:func:`kvgeom.evaluate.evaluate`'s ``screen=``):
    ``margin_plan`` from the first-position logits and the opening token ids ``refusal`` / ``compliance``."""

    rule: ScreenRule
    refusal: tuple[int, ...]
    compliance: tuple[int, ...]

    @classmethod
    def for_model(cls, model: KVModel, rule: ScreenRule | None = None) -> PrefillScreen:
        """The screen with ``model``'s opening tokens (:func:`kvgeom.predict.opening_tokens`)."""
        r, c = opening_tokens(model)
        return cls(rule or ScreenRule(), r, c)

    @property
    def assume(self) -> str:
        return self.rule.assume

    def margins(self, first_logits: Tensor) -> list[float]:
        """``margin_plan`` per row of first-position logits ``[rows, vocab]``."""
        lp = torch.log_softmax(first_logits.float(), -1)
        return opening_margin(lp, torch.tensor(self.refusal), torch.tensor(self.compliance)).tolist()

    def decide(self, first_logits: Tensor, prompt_ids: Sequence[Any],
               plans: Sequence[QuantPlan | None]) -> list[dict[str, Any]]:
        """One record per row: ``screen`` (``decode``/``skip``/``check``) and ``margin_plan``."""
        out = []
        for m, pid, plan in zip(self.margins(first_logits), prompt_ids, plans, strict=True):
            d = self.rule.decide_one(m, pid, plan_label(plan)) if reads_quantized_prefill(plan) else DECODE
            out.append({"screen": d, "margin_plan": m})
        return out


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
