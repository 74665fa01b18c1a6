"""How far judges agree on the same completions, and what flip rate each would have reported.

:func:`compare_judges` reads a table of judged rows (a run's ``rows/*.jsonl``: :func:`kvgeom.judges.rows.load_rows`,
or a sweep's ``rows.csv``) with one ``verdict:KEY`` column per judge (:func:`kvgeom.judges.rejudge`) and gives a
:class:`JudgeComparison`:

* ``pairs`` -- for the reference judge (the first) against each other judge: rows both judged, raw agreement,
  Cohen's kappa (:func:`sklearn.metrics.cohen_kappa_score` over the three verdicts) with a percentile bootstrap CI
  over rows (:func:`kvgeom.stats.bootstrap_ci`), and the rows left out because a judge gave no verdict (an
  ``error:KEY``). Kappa is **undefined** when either judge gives one verdict on every row: the chance agreement
  is then the observed one (0/0 when both are constant, and 0 whatever the other judge says when one is), so the
  number says nothing; ``kappa`` is then ``None`` with the reason in ``note``, never NaN printed as a number;
  resamples in which a judge is constant are dropped from the CI (``n_valid`` counts the rest);
* ``confusion`` -- per pair, the verdict cross-table (reference in rows);
* ``flips`` -- per (stage, plan) of the quantized rows, each judge's conditional flip rate against its *own*
  full-precision verdicts of the same prompts (plan ``"full"`` rows of the same split), side by side
  (:func:`kvgeom.stats.flip_summary`). In an audit, the quantized rows of the flip stages were generated only
  for the prompts the *deciding* judge refused at full precision (``refused_only``): another judge's rate is
  over those of them it refused too;
* ``disagreements`` -- every row on which two judges differ: stage, plan, prompt, completion and each verdict.

``kvgeom judges compare RUN_DIR`` prints it; the audit's ``judges`` stage puts it on the report page.
Tests: ``tests/test_judge_agreement.py`` (kappa against hand-computed values, undefined when constant, the CI,
confusion, flips per judge, disagreements, the CLI).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvgeom.judges import JudgePanel, Verdict, rejudge
from kvgeom.stats import bootstrap_ci, flip_summary

__all__ = ["JudgeComparison", "cohen_kappa", "compare_judges", "compare_run", "comparison_for_audit", "judged_keys",
           "load_judged_rows", "summary_text"]

LABELS = [v.value for v in Verdict]
FULL = "full"  # the full-precision plan's label (kvgeom.evaluate.FULL)


def _constant(values: np.ndarray) -> bool:
    return len(np.unique(values)) < 2


def cohen_kappa(a: Sequence[str], b: Sequence[str], *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Cohen's kappa of two judges' paired verdicts with a percentile bootstrap CI over rows:
    ``{"kappa", "low", "high", "n", "n_valid", "agreement", "note"}``; ``kappa`` is ``None`` (with ``note``) when
    there are no rows or a judge gives one verdict on every row (module docstring)."""
    from sklearn.metrics import cohen_kappa_score

    x, y = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    if len(x) != len(y):
        raise ValueError(f"got {len(x)} and {len(y)} verdicts: pass one pair per row")
    n = len(x)
    out: dict[str, Any] = {"kappa": None, "low": None, "high": None, "n": n, "n_valid": 0,
                           "agreement": float(np.mean(x == y)) if n else None, "note": None}
    if n == 0:
        out["note"] = "no row judged by both"
        return out
    const = [name for name, v in (("reference", x), ("other", y)) if _constant(v)]
    if const:
        which = " and ".join(f"the {c} judge" for c in const)
        out["note"] = (f"undefined: {which} gave one verdict ({x[0] if 'reference' in const else y[0]}) on every "
                       "row, so chance agreement equals the observed agreement")
        return out

    def stat(idx: np.ndarray) -> float:
        xs, ys = x[idx], y[idx]
        if _constant(xs) or _constant(ys):
            return math.nan
        return float(cohen_kappa_score(xs, ys, labels=LABELS))

    ci = bootstrap_ci(stat, n, n_resamples=n_resamples, seed=seed)
    out.update(kappa=ci.estimate, n_valid=ci.n_valid,
               low=None if math.isnan(ci.low) else ci.low, high=None if math.isnan(ci.high) else ci.high)
    if ci.n_valid < n_resamples:
        out["note"] = f"CI from {ci.n_valid} of {n_resamples} resamples (a judge was constant in the others)"
    return out


def judged_keys(rows: pd.DataFrame) -> list[str]:
    """The judges of a judged table: the ``KEY`` of each ``verdict:KEY`` column, in order."""
    return [c.split(":", 1)[1] for c in rows.columns if c.startswith("verdict:")]


@dataclass
class JudgeComparison:
    """What :func:`compare_judges` returns (module docstring); ``to_dict()`` is JSON-friendly."""

    keys: list[str]
    pairs: pd.DataFrame
    confusion: dict[str, pd.DataFrame]
    flips: pd.DataFrame
    disagreements: pd.DataFrame
    errors: dict[str, int] = field(default_factory=dict)
    n_rows: int = 0

    @property
    def reference(self) -> str:
        return self.keys[0]

    def to_dict(self, *, max_disagreements: int | None = 200) -> dict[str, Any]:
        from kvgeom.io import to_jsonable

        dis = self.disagreements if max_disagreements is None else self.disagreements.head(max_disagreements)
        return to_jsonable({
            "judges": self.keys, "reference": self.reference, "n_rows": self.n_rows, "errors": self.errors,
            "pairs": self.pairs.to_dict(orient="records"),
            "confusion": {k: {"labels": list(v.columns), "rows": list(v.index), "counts": v.to_numpy().tolist()}
                          for k, v in self.confusion.items()},
            "flips": self.flips.to_dict(orient="records"), "n_disagreements": len(self.disagreements),
            "disagreements": dis.to_dict(orient="records")})

    def _repr_html_(self) -> str:
        from kvgeom.viz.judges import comparison_html

        return comparison_html(self.to_dict(max_disagreements=20))


def _flip_table(rows: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    if "plan" not in rows or not (rows["plan"] == FULL).any():
        return pd.DataFrame()
    split = rows["split"] if "split" in rows else pd.Series("all", index=rows.index)
    rows = rows.assign(split=split.fillna("all"))
    full = rows[rows["plan"] == FULL].drop_duplicates(["split", "prompt_id"])
    out = []
    stage_col = rows["stage"] if "stage" in rows else pd.Series("", index=rows.index)
    quant = rows.assign(stage=stage_col.fillna(""))[rows["plan"] != FULL]
    for (stage, plan, sp), grp in quant.groupby(["stage", "plan", "split"], sort=False):
        base_rows = full[full["split"] == sp].set_index("prompt_id")
        rec: dict[str, Any] = {"stage": stage, "plan": plan, "split": sp, "n_rows": len(grp)}
        for k in keys:
            base = base_rows[f"verdict:{k}"].dropna()
            q = grp.set_index("prompt_id")[f"verdict:{k}"].dropna()
            s = flip_summary(base, q) if len(base.index.intersection(q.index)) else {"flip": None, "k": 0, "n": 0}
            rec[f"flip:{k}"] = s["flip"]
            rec[f"k:{k}"], rec[f"n:{k}"] = s["k"], s["n"]
        out.append(rec)
    return pd.DataFrame(out)


def compare_judges(rows: pd.DataFrame, keys: Sequence[str] | None = None, *, n_resamples: int = 1000,
                   seed: int = 0) -> JudgeComparison:
    """Agreement of the judges ``keys`` (default: every ``verdict:KEY`` column; the first is the reference) on
    the judged ``rows`` (module docstring)."""
    keys = list(keys) if keys is not None else judged_keys(rows)
    missing = [k for k in keys if f"verdict:{k}" not in rows]
    if missing:
        raise ValueError(f"no verdict column for judges {missing}; judged here: {judged_keys(rows) or 'none'} "
                         "(pass --judge to re-judge the saved completions)")
    if len(keys) < 2:
        raise ValueError(f"comparing judges needs at least two, got {keys}: pass --judge A,B (e.g. "
                         "keyword,keyword:phrases=jbb) to re-judge the saved completions")
    ref = keys[0]
    pairs, confusion = [], {}
    errors = {k: int(rows[f"error:{k}"].notna().sum()) if f"error:{k}" in rows else 0 for k in keys}
    for k in keys[1:]:
        both = rows[[f"verdict:{ref}", f"verdict:{k}"]].dropna()
        a, b = both[f"verdict:{ref}"].to_numpy(), both[f"verdict:{k}"].to_numpy()
        kap = cohen_kappa(a, b, n_resamples=n_resamples, seed=seed)
        pairs.append({"reference": ref, "judge": k, **kap, "left_out": len(rows) - len(both)})
        confusion[k] = pd.crosstab(pd.Categorical(a, categories=LABELS), pd.Categorical(b, categories=LABELS),
                                   rownames=[ref], colnames=[k], dropna=False)
    vcols = [f"verdict:{k}" for k in keys]
    shown = rows[vcols].astype(object).where(rows[vcols].notna(), "error")  # a row without a verdict says so
    differ = shown.nunique(axis=1) > 1
    show = [c for c in ("stage", "split", "prompt_id", "plan", "prompt", "completion") if c in rows]
    dis = pd.concat([rows.loc[differ, show], shown.loc[differ]], axis=1)
    dis = dis.rename(columns={f"verdict:{k}": k for k in keys}).reset_index(drop=True)
    return JudgeComparison(keys=keys, pairs=pd.DataFrame(pairs), confusion=confusion,
                           flips=_flip_table(rows, keys), disagreements=dis, errors=errors, n_rows=len(rows))


def load_judged_rows(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The saved rows of a run: an audit's ``rows/*.jsonl`` or a sweep's ``rows.csv``; refused (``ValueError``,
    naming the fix) when ``run_dir`` holds neither."""
    from kvgeom.judges.rows import load_rows

    d = Path(run_dir)
    if not d.is_dir():
        raise ValueError(f"{d} is not a directory: pass the --out folder of a kvgeom audit or sweep")
    rows = load_rows(d)
    if not len(rows) and (d / "rows.csv").is_file():
        rows = pd.read_csv(d / "rows.csv", keep_default_na=False, na_values={"nll": [""]})
        for c in rows.columns:
            if c.startswith(("verdict:", "error:")):
                rows[c] = rows[c].replace("", None)
    if not len(rows):
        raise ValueError(f"{d} holds no saved completions (rows/*.jsonl of an audit, rows.csv of a sweep): audits "
                         "made before kvgeom saved them cannot be re-judged; run the audit again (same --out, "
                         "without --resume)")
    if not judged_keys(rows) and "verdict" in rows:  # one judge, recorded before verdict columns were kept
        rows = rows.assign(**{"verdict:run": rows["verdict"], "error:run": None})
    return rows


def compare_run(run_dir: str | os.PathLike, judges: str | Sequence[Any] | None = None, *,
                n_resamples: int = 1000, seed: int = 0) -> JudgeComparison:
    """:func:`compare_judges` on a saved run (what ``kvgeom judges compare RUN_DIR`` does): the judges the run
    recorded, or ``judges`` (``"A,B"``, specs or judge objects) re-judging its saved completions."""
    rows = load_judged_rows(run_dir)
    if judges is None:
        return compare_judges(rows, n_resamples=n_resamples, seed=seed)
    panel = JudgePanel.from_spec(judges)
    nll = pd.to_numeric(rows["nll"], errors="coerce").tolist() if "nll" in rows else None  # NaN where unknown
    judged = rejudge(panel, rows["prompt"].astype(str).tolist(), rows["completion"].astype(str).tolist(), nll=nll)
    base = rows[[c for c in rows.columns if not c.startswith(("verdict:", "error:"))]]
    return compare_judges(pd.concat([base, judged], axis=1), list(panel.keys), n_resamples=n_resamples, seed=seed)


def summary_text(cmp: JudgeComparison, *, max_rows: int = 10) -> str:
    """The terminal view of a comparison (what ``kvgeom judges compare`` prints)."""
    lines = [f"judges: {', '.join(cmp.keys)} (reference {cmp.reference}); {cmp.n_rows} rows"]
    if any(cmp.errors.values()):
        lines.append("rows without a verdict (malformed answers): "
                     + ", ".join(f"{k} {v}" for k, v in cmp.errors.items()))
    for p in cmp.pairs.to_dict(orient="records"):
        kap = (f"kappa {p['kappa']:.3f} [{p['low']:.3f}, {p['high']:.3f}]" if p["kappa"] is not None
               and p["low"] is not None else f"kappa {p['note']}" if p["kappa"] is None else f"kappa {p['kappa']:.3f}")
        lines.append(f"  {p['reference']} vs {p['judge']}: agreement {p['agreement']:.3f} on {p['n']} rows; {kap}")
        lines.append("    " + cmp.confusion[p["judge"]].to_string().replace("\n", "\n    "))
    if len(cmp.flips):
        lines.append("flip rates (each judge against its own full-precision verdicts):")
        cols = ["stage", "plan", "split"] + [f"flip:{k}" for k in cmp.keys]
        lines.append(cmp.flips[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="undefined"))
    lines.append(f"{len(cmp.disagreements)} rows on which the judges disagree"
                 + (f"; the first {min(max_rows, len(cmp.disagreements))}:" if len(cmp.disagreements) else ""))
    for r in cmp.disagreements.head(max_rows).to_dict(orient="records"):
        verdicts = ", ".join(f"{k}={r[k]}" for k in cmp.keys)
        lines.append(f"  [{r.get('stage', '')} {r.get('plan', '')} {r.get('prompt_id', '')}] {verdicts}")
        lines.append(f"    completion: {str(r.get('completion', ''))[:160]!r}")
    return "\n".join(lines)


def comparison_for_audit(rows: pd.DataFrame, keys: Sequence[str], *, n_resamples: int = 1000,
                         seed: int = 0) -> Mapping[str, Any]:
    """The ``judges`` stage's result: :meth:`JudgeComparison.to_dict` of every judge of the run, or a skip."""
    if len(keys) < 2:
        return {"status": "skipped", "reason": "one judge: pass --judge A,B to compare judges on the same "
                "completions"}
    if not len(rows):
        return {"status": "skipped", "reason": "no completions were saved"}
    return compare_judges(rows, keys, n_resamples=n_resamples, seed=seed).to_dict(max_disagreements=100)
