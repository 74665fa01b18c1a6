"""``--screen`` in the audit: the flip-rate stages (layer sweep, channel ablation, PCR) decode only the rows the
screen (:class:`kvgeom.predict.ScreenRule`) does not skip, plus a random check of the skipped ones.

The screen reads ``margin_plan`` from the prefill that generation runs anyway
(:class:`kvgeom.predict.PrefillScreen`): a skipped row stops after its prefill and enters the flip rate with the
assumed verdict (``refused``: no flip); a checked row is decoded and enters with its generated verdict. Skipped
rows are not handed to other judges (they have no completion). The stage's result gets a ``screen`` record
(:func:`kvgeom.predict.screen_report`: rows decoded, skipped, checked, the checked rows the screen got wrong
with a CI, the skipped rows themselves and the seconds spent). Proved by
``tests/audit/test_flip_prediction.py::test_screen_skips_records_and_with_no_skip_equals_the_plain_sweep`` (every
skipped row recorded with its assumption, checked rows carry their generated verdict, and with a threshold
nothing passes the screened sweep equals the unscreened one).
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from kvgeom.predict.screen import DECODE, SKIP, PrefillScreen, ScreenRule, screen_report

__all__ = ["screen_rule", "screened_evaluate"]


def screen_rule(cfg: Any) -> ScreenRule:
    """The audit's :class:`ScreenRule` (``--screen-skip-above``, ``--screen-check-frac``, ``--seed``)."""
    return ScreenRule(skip_above=cfg.screen_skip_above, check_frac=cfg.screen_check_frac, seed=cfg.seed)


def screened_evaluate(inputs: Any, prompts: Any, plans: list, *, stage: str) -> tuple[pd.DataFrame, dict]:
    """``inputs.evaluate(prompts, plans)`` with the prefill screen: skipped rows carry the assumed verdict and
    ``screened=True``; returns the rows and the screen record."""
    rule = screen_rule(inputs.cfg)
    screen = inputs.cached(("prefill_screen", rule), lambda: PrefillScreen.for_model(inputs.model, rule))
    t0 = time.perf_counter()
    rows = inputs.evaluate(prompts, plans, stage=stage, screen=screen)
    seconds = time.perf_counter() - t0
    decisions = rows["screen"].astype(object)
    verdicts = rows["verdict"].where(decisions != SKIP, None)
    record = screen_report(decisions, verdicts, assume=rule.assume,
                           seconds={"signals": 0.0, "decode": seconds})
    record["rule"] = {"signal": rule.signal, "skip_above": rule.skip_above, "check_frac": rule.check_frac,
                      "seed": rule.seed, "where": "prefill of generation"}
    record["skipped_rows"] = [
        {"prompt_id": r["prompt_id"], "plan": r["plan"], "margin_plan": float(r["margin_plan"]),
         "checked": r["screen"] != SKIP, **({"verdict": r["verdict"]} if r["screen"] != SKIP else {})}
        for r in rows.to_dict(orient="records") if r["screen"] != DECODE]
    return rows, record
