"""Every completion an audit generated, with each judge's verdict: ``out/rows/STAGE.jsonl``, one JSON object a line.

A stage's evaluated rows (:meth:`kvgeom.audit.AuditInputs.record`) are judged by every judge of the run's
:class:`~kvgeom.judges.JudgePanel` (:func:`kvgeom.judges.rejudge`: the first decided the stage's numbers, the others
re-judge the same completions) and written next to the stage's result, atomically, when the stage finishes; a
resumed run reads them back (:func:`load_rows`), so ``kvgeom judges compare RUN_DIR`` and the ``judges`` stage
see every row of the run. Columns: :data:`kvgeom.audit.inputs.ROW_COLUMNS` plus ``verdict:KEY`` / ``error:KEY``
(and a judge's detail columns ``KEY:...``) for each judge.
Proved by ``tests/audit/test_audit_judges.py`` (rows saved and read back; a resumed run sees the same rows).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kvgeom.io import atomic_write_text, to_jsonable
from kvgeom.judges.panel import JudgePanel, rejudge

__all__ = ["judge_rows", "load_rows", "rows_path", "save_rows"]


def rows_path(out: str | os.PathLike, stage: str) -> Path:
    """Where a stage's rows live: ``out/rows/STAGE.jsonl``."""
    return Path(out) / "rows" / f"{stage}.jsonl"


def judge_rows(frames: Sequence[pd.DataFrame], panel: JudgePanel) -> pd.DataFrame:
    """The rows of ``frames`` (one stage's evaluations) with every judge's verdict (:func:`kvgeom.judges.rejudge`)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    rows = pd.concat(frames, ignore_index=True)
    nll = rows["nll"].tolist() if "nll" in rows else None
    judged = rejudge(panel, rows["prompt"].tolist(), rows["completion"].tolist(), nll=nll)
    return pd.concat([rows, judged], axis=1)


def save_rows(out: str | os.PathLike, stage: str, rows: pd.DataFrame) -> Path:
    """Write ``rows`` to ``out/rows/STAGE.jsonl`` atomically (NaN as null)."""
    lines = [json.dumps(to_jsonable(r), ensure_ascii=False, allow_nan=False) for r in rows.to_dict(orient="records")]
    return atomic_write_text(rows_path(out, stage), "".join(line + "\n" for line in lines))


def load_rows(out: str | os.PathLike, stages: Sequence[str] | None = None) -> pd.DataFrame:
    """Every saved row of the run in ``out`` (or of ``stages``), in stage-file order; empty when none was saved."""
    d = Path(out) / "rows"
    paths = sorted(d.glob("*.jsonl")) if stages is None else [rows_path(out, s) for s in stages]
    frames = [pd.read_json(p, lines=True, dtype=False) for p in paths if p.is_file() and p.stat().st_size]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
