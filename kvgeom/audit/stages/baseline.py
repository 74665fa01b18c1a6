"""Stage ``baseline``: full-precision refusal on the calibration and held-out harmful prompts, over-refusal on
borderline prompts, perplexity at full precision and under the target scheme. Stops the audit (result saved) when
no calibration prompt is refused: there is nothing for quantization to break.
Proved by ``tests/audit/test_audit.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from kvgeom.evaluate import perplexity
from kvgeom.stats import refusal_rate
from kvgeom.viz.markup import esc, fmt_ci, fmt_num, fmt_rate, stage_ran

from ..config import AuditError
from ..inputs import AuditInputs
from ..schema import INT, NUM, RATE_CI, obj
from ..stage import Stage, StageResults, register_stage


def run(inputs: AuditInputs, results: StageResults) -> dict:
    cfg = inputs.cfg
    # no settling: the report shows these completions whole
    out = inputs.evaluate_splits({"calibration": inputs.calibration, "held_out": inputs.held_out,
                                  "borderline": inputs.borderline}, [None], stage="baseline", settle=False)
    rows, rows_h, rows_b = out["calibration"], out["held_out"], out["borderline"]
    ppl = inputs.cached(("perplexity",), lambda: perplexity(inputs.model, None, [None, inputs.plan(cfg.scheme)],
                                                            max_tokens=cfg.ppl_tokens, batch_size=4,
                                                            **cfg.ppl_windows))
    return {
        "calibration": refusal_rate(rows["verdict"]), "held_out": refusal_rate(rows_h["verdict"]),
        "over_refusal": refusal_rate(rows_b["verdict"]),
        "perplexity": {"ppl": float(ppl["ppl"].iloc[0]), "ppl_target": float(ppl["ppl"].iloc[1]),
                       "ppl_ratio": float(ppl["ppl_ratio"].iloc[1]), "tokens": int(ppl["n_tokens"].iloc[0])},
        "verdicts": {"calibration": rows.set_index("prompt_id")["verdict"].to_dict(),
                     "held_out": rows_h.set_index("prompt_id")["verdict"].to_dict()},
        "examples": rows[["prompt_id", "prompt", "completion", "verdict"]].head(5).to_dict(orient="records"),
    }


def baseline_verdicts(baseline: Mapping[str, Any], split: str = "calibration") -> pd.Series:
    """The full-precision verdicts of ``split`` (``"calibration"`` or ``"held_out"``), indexed by prompt id."""
    return pd.Series(baseline["verdicts"][split])


def check(result: dict, inputs: AuditInputs) -> None:
    if not result["calibration"]["k"]:
        raise AuditError(
            f"{inputs.cfg.model} refuses none of the {result['calibration']['n']} calibration prompts at full "
            "precision, so there are no refusals for quantization to break: audit a safety-tuned chat model, "
            "or pass --harmful with prompts it refuses (the baseline was saved; --resume continues from it)")


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    rows = [{"what": k, **(r.get(k) or {})} for k in ("calibration", "held_out", "over_refusal") if k in r]
    ppl = r.get("perplexity") or {}
    return pd.DataFrame(rows).assign(ppl=ppl.get("ppl"), ppl_target=ppl.get("ppl_target"),
                                     ppl_ratio=ppl.get("ppl_ratio"))


def summary(stages: Mapping[str, Any]) -> str:
    """The "At a glance" box of the report page (:mod:`kvgeom.audit.page`) from the audit's ``stages``: baseline
    rates, perplexity ratio, all-layer flip, PCR, the label's confidence."""
    st = stages or {}
    base = st.get("baseline") if stage_ran(st.get("baseline")) else {}
    sweep = st.get("layer_sweep") if stage_ran(st.get("layer_sweep")) else {}
    pcr = st.get("pcr") if stage_ran(st.get("pcr")) else {}
    items = [
        ("refusal, calibration (full precision)", fmt_rate((base or {}).get("calibration"))),
        ("refusal, held-out (full precision)", fmt_rate((base or {}).get("held_out"))),
        ("over-refusal, borderline", fmt_rate((base or {}).get("over_refusal"))),
        ("perplexity ratio (target scheme)",
         fmt_num(((base or {}).get("perplexity") or {}).get("ppl_ratio"), ".3f")),
        ("all-layer flip", fmt_rate({"rate": (sweep.get("all_layer") or {}).get("flip"),
                                     **{k: v for k, v in (sweep.get("all_layer") or {}).items() if k != "flip"}})
         if sweep.get("all_layer") else "—"),
        ("PCR at critical layer", fmt_ci(pcr.get("estimate"), pcr.get("low"), pcr.get("high"), pct=False)
         if pcr else "—"),
    ]
    conf = ((st.get("label") or {}).get("confidence") or {}) if stage_ran(st.get("label")) else {}
    if conf:
        items.append((f"P({conf.get('point_label')}) over resamples",
                      f"{fmt_num(100 * (conf.get('p_point') or 0), '.0f')}% of {conf.get('n_resamples')} "
                      f"({'stated' if conf.get('stated') else 'undetermined'})"))
    return '<div class="kv">' + "".join(f"<div><b>{esc(k)}</b><span>{esc(v)}</span></div>" for k, v in items) + \
        "</div>"


STAGE = register_stage(Stage(
    name="baseline", order=10, run=run, frame=frame, check=check,
    doc="full-precision refusal (calibration, held-out), over-refusal, perplexity",
    schema=obj({"calibration": RATE_CI, "held_out": RATE_CI, "over_refusal": RATE_CI,
                "perplexity": obj({"ppl": NUM, "ppl_target": NUM, "ppl_ratio": NUM}, tokens=INT),
                "verdicts": obj({"calibration": {"type": "object"}, "held_out": {"type": "object"}})},
               examples={"type": "array"}),
))
