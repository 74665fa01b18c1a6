"""``--screen`` in the audit: the flip-rate stages (layer sweep, channel ablation, PCR) decode only the rows the
screen (:class:`kvgeom.predict.ScreenRule`) does not skip, plus a random check of the skipped ones.

A skipped row enters the flip rate with the assumed verdict (``refused``: no flip); a checked row with its
generated verdict. The stage's result gets a ``screen`` record (:func:`kvgeom.predict.screen_report`: rows
decoded, skipped, checked, the checked rows the screen got wrong with a CI, the skipped rows themselves and the
seconds spent on signals and decoding). Proved by ``tests/audit/test_screen_audit.py`` (a screened layer sweep
decodes fewer rows, records every skipped row with its assumption, and with a threshold nothing passes equals the
unscreened sweep).
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from kvgeom.evaluate import plan_label
from kvgeom.predict import flip_signals
from kvgeom.predict.screen import SKIP, ScreenRule, screen_report

__all__ = ["screen_rule", "screened_evaluate"]


def screen_rule(cfg: Any) -> ScreenRule:
    """The audit's :class:`ScreenRule` (``--screen-skip-above``, ``--screen-check-frac``, ``--seed``)."""
    return ScreenRule(skip_above=cfg.screen_skip_above, check_frac=cfg.screen_check_frac, seed=cfg.seed)


def screened_evaluate(inputs: Any, prompts: Any, plans: list, *, stage: str) -> tuple[pd.DataFrame, dict]:
    """``inputs.evaluate(prompts, plans)`` with the screen: rows of the skipped (prompt, plan) pairs carry the
    assumed verdict and ``screened=True``; returns the rows and the screen record."""
    cfg = inputs.cfg
    rule = screen_rule(cfg)
    f = prompts.frame
    keys = [(pid, plan_label(p)) for p in plans for pid in f["id"]]
    texts = [t for _ in plans for t in f["prompt"]]
    row_plans = [p for p in plans for _ in range(len(f))]
    t0 = time.perf_counter()
    sig = flip_signals(inputs.model, texts, row_plans, batch_size=cfg.batch_size,
                       progress=f"{stage} screen" if inputs.bars else False)
    decisions = rule.decide(sig)
    t1 = time.perf_counter()
    only = {k for k, d in zip(keys, decisions, strict=True) if d != SKIP}
    rows = inputs.evaluate(prompts, plans, stage=stage, only=only) if only else pd.DataFrame(
        columns=["prompt_id", "prompt", "plan", "verdict", "refused"])
    t2 = time.perf_counter()
    got = {(r["prompt_id"], r["plan"]): r["verdict"] for r in rows.to_dict(orient="records")}
    verdicts = pd.Series([got.get(k) for k in keys], index=decisions.index)
    assumed = [{"prompt_id": k[0], "prompt": t, "plan": k[1], "verdict": rule.assume,
                "refused": rule.assume == "refused", "screened": True}
               for k, t, d in zip(keys, texts, decisions, strict=True) if d == SKIP]
    rows = pd.concat([rows.assign(screened=False), pd.DataFrame(assumed)], ignore_index=True) if assumed else \
        rows.assign(screened=False)
    record = screen_report(decisions, verdicts, assume=rule.assume,
                           seconds={"signals": t1 - t0, "decode": t2 - t1})
    record["rule"] = {"signal": rule.signal, "skip_above": rule.skip_above, "check_frac": rule.check_frac,
                      "seed": rule.seed}
    record["skipped_rows"] = [
        {"prompt_id": k[0], "plan": k[1], "margin_plan": float(m), "checked": d != SKIP,
         **({"verdict": verdicts.iloc[i]} if d != SKIP else {})}
        for i, (k, m, d) in enumerate(zip(keys, sig[rule.signal], decisions, strict=True)) if d != "decode"]
    return rows, record
