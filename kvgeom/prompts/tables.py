"""Reading a prompt table from a file and standardizing it: the prompt / category columns are found among
:data:`PROMPT_COLUMNS` / :data:`CATEGORY_COLUMNS`, candidate by candidate (exact name, then case-insensitive)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kvgeom.prompts.sets import PromptLoadError

__all__ = ["CATEGORY_COLUMNS", "PROMPT_COLUMNS", "SUFFIXES", "read_table", "standardize"]

PROMPT_COLUMNS: tuple[str, ...] = ("goal", "prompt", "Behavior", "instruction")
CATEGORY_COLUMNS: tuple[str, ...] = ("category", "SemanticCategory", "type")
SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".json", ".txt")



def read_table(path: Path, suffix: str) -> pd.DataFrame:
    if suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    if suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return pd.DataFrame({"prompt": [ln for ln in lines if ln]})
    if suffix == ".jsonl":
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        rows = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(rows, dict):
        lists = [v for v in rows.values() if isinstance(v, list)]
        if len(lists) == 1 and len(rows) == 1:  # {"data": [...]}
            rows = lists[0]
        else:
            return pd.DataFrame(rows)
    if not isinstance(rows, list):
        raise PromptLoadError(f"{path}: expected a list of objects or strings, got {type(rows).__name__}")
    if rows and all(isinstance(r, str) for r in rows):
        return pd.DataFrame({"prompt": rows})
    if not all(isinstance(r, dict) for r in rows):
        raise PromptLoadError(f"{path}: expected every record to be an object (or every one a string)")
    return pd.DataFrame(rows)


def _find_column(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    """First candidate present: exact name, then case-insensitive, before moving to the next candidate."""
    for cand in candidates:
        if cand in columns:
            return cand
        for col in columns:
            if isinstance(col, str) and col.lower() == cand.lower():
                return col
    return None


def standardize(
    frame: pd.DataFrame, name: str, *, column: str | None, category: str | None = None, where: str = ""
) -> pd.DataFrame:
    """Rename the prompt / category columns to ``prompt`` / ``category`` and make an ``id`` column."""
    where = where or name
    cols = [str(c) for c in frame.columns]
    frame = frame.copy()
    frame.columns = cols
    if column is not None:
        if column not in cols:
            raise PromptLoadError(f"{where}: column {column!r} not found; columns found: {cols}")
        pcol = column
    else:
        pcol = _find_column(cols, PROMPT_COLUMNS)
        if pcol is None:
            raise PromptLoadError(
                f"{where}: no prompt column; expected one of {list(PROMPT_COLUMNS)} "
                f"(or pass column=...); columns found: {cols}"
            )
    ccol = category if category is not None and category in cols else _find_column(cols, CATEGORY_COLUMNS)
    if ccol == pcol:
        ccol = None
    id_col = "id" if "id" in cols else ("BehaviorID" if "BehaviorID" in cols else None)

    out = frame.rename(columns={c: f"original_{c}" for c in ("id", "prompt", "category")
                                if c in cols and c not in (pcol, ccol, id_col)})
    renames = {pcol: "prompt"}
    if ccol is not None:
        renames[ccol] = "category"
    if id_col is not None:
        renames[id_col] = "id"
    out = out.rename(columns=renames)
    prompts = out["prompt"]
    keep = prompts.notna() & prompts.astype(str).str.strip().ne("")
    out = out[keep].reset_index(drop=True)
    if out.empty:
        raise PromptLoadError(f"{where}: column {pcol!r} holds no non-empty prompt")
    out["prompt"] = out["prompt"].astype(str).str.strip()
    if id_col is None:
        out["id"] = [f"{name}-{i + 1:04d}" for i in range(len(out))]
    else:
        out["id"] = out["id"].astype(str)
    if ccol is None:
        out["category"] = pd.Series([pd.NA] * len(out), dtype="object")
    first = ["id", "prompt", "category"]
    return out[first + [c for c in out.columns if c not in first]]
