"""Stage ``judges``: with ``--judge A,B[,...]``, how far the judges agree on the audit's own completions, and the
flip rates each would have reported (:func:`kvgeom.judge_agreement.compare_judges` over every stage's saved rows,
``out/rows/*.jsonl``); skipped with one judge. Runs last, so that it sees every stage's rows. Proved by
``tests/audit/test_audit_judges.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from kvgeom.judge_agreement import comparison_for_audit
from kvgeom.viz.judges import comparison_html

from ..inputs import AuditInputs
from ..schema import obj
from ..stage import Section, Stage, StageResults, register_stage


def run(inputs: AuditInputs, results: StageResults) -> dict:
    frames = [f for frames in (inputs.rows_log or {}).values() for f in frames if len(f)]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    keys = list(getattr(inputs.judge, "keys", ()) or ())
    return dict(comparison_for_audit(rows, keys, n_resamples=inputs.cfg.n_resamples, seed=inputs.cfg.seed))


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(r.get("pairs") or [dict(r)])


def render(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    return comparison_html(stage)


STAGE = register_stage(Stage(
    name="judges", order=200, run=run, frame=frame,
    doc="agreement of the --judge list on the audit's completions (skipped with one judge)",
    section=Section("judges", "Would another judge agree?",
                    "Every completion of the audit judged by each judge of --judge (the first decided the numbers "
                    "above): Cohen's kappa with a bootstrap CI over rows, the confusion matrix, the flip rate each "
                    "judge gives, and the rows they disagree on.", render, hide_unless_ran=True),
    schema=obj({"judges": {"type": "array"}, "pairs": {"type": "array"}, "flips": {"type": "array"},
                "disagreements": {"type": "array"}}),
))
