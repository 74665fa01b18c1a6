"""HTML of a judge comparison (:meth:`kvgeom.judge_agreement.JudgeComparison.to_dict`): the report's "Judges"
section and the comparison's ``_repr_html_``. Kappa that is undefined is written as the reason, never as "nan".
Proved by ``tests/test_judge_agreement.py::test_html``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvgeom.viz.markup import esc, fmt_num, html_table

__all__ = ["comparison_html"]


def _kappa(p: Mapping[str, Any]) -> str:
    if p.get("kappa") is None:
        return f"undefined ({esc(p.get('note') or 'no rows')})"
    ci = (f" [{fmt_num(p['low'], '.2f')}, {fmt_num(p['high'], '.2f')}]" if p.get("low") is not None else "")
    return f"{fmt_num(p['kappa'], '.2f')}{ci}"


def _flip(rec: Mapping[str, Any], key: str) -> str:
    rate = rec.get(f"flip:{key}")
    if rate is None:
        return "undefined"
    return f"{fmt_num(100 * rate, '.0f')}% ({rec.get(f'k:{key}')}/{rec.get(f'n:{key}')})"


def comparison_html(cmp: Mapping[str, Any], *, max_disagreements: int = 20) -> str:
    """Pairs (agreement, kappa with CI), confusion matrices, flip rates per judge side by side, and the first
    ``max_disagreements`` rows on which the judges differ (prompt, completion, each verdict)."""
    keys = list(cmp.get("judges") or [])
    errs = cmp.get("errors") or {}
    parts = [f"<p>{esc(cmp.get('n_rows', 0))} completions judged by {len(keys)} judges; the first, "
             f"<code>{esc(cmp.get('reference'))}</code>, decided the audit's numbers."
             + (" Rows without a verdict (malformed answers): " + esc(", ".join(f"{k} {v}" for k, v in errs.items()))
                + "." if any(errs.values()) else "") + "</p>"]
    rows = [{"pair": f"<code>{esc(p['reference'])}</code> vs <code>{esc(p['judge'])}</code>", "n": esc(p["n"]),
             "agree": fmt_num(100 * p["agreement"], ".1f") + "%" if p.get("agreement") is not None else "—",
             "kappa": _kappa(p), "out": esc(p.get("left_out", 0))} for p in cmp.get("pairs") or []]
    parts.append(html_table(rows, [("pair", "judges"), ("n", "rows"), ("agree", "agreement"),
                                   ("kappa", "Cohen's kappa [95% CI]"), ("out", "rows left out")]))
    for key, m in (cmp.get("confusion") or {}).items():
        labels = m["labels"]
        body = [{"ref": f"<b>{esc(r)}</b>", **{lab: esc(c) for lab, c in zip(labels, counts, strict=True)}}
                for r, counts in zip(m["rows"], m["counts"], strict=True)]
        parts.append(f"<p>{esc(cmp.get('reference'))} (rows) × {esc(key)} (columns)</p>"
                     + html_table(body, [("ref", ""), *[(lab, lab) for lab in labels]]))
    flips = cmp.get("flips") or []
    if flips:
        frows = [{"what": f"{esc(r.get('stage'))} · {esc(r.get('plan'))}", **{k: _flip(r, k) for k in keys}}
                 for r in flips]
        parts.append("<p>Conditional flip rate each judge gives (against its own full-precision verdicts):</p>"
                     + html_table(frows, [("what", "stage · plan"), *[(k, k) for k in keys]]))
    dis = (cmp.get("disagreements") or [])[:max_disagreements]
    if dis:
        drows = [{"where": esc(f"{r.get('stage', '')} {r.get('plan', '')} {r.get('prompt_id', '')}"),
                  "prompt": esc(str(r.get("prompt", ""))[:200]), "completion": esc(str(r.get("completion", ""))[:300]),
                  **{k: esc(r.get(k)) for k in keys}} for r in dis]
        parts.append(f"<p>{esc(cmp.get('n_disagreements', len(dis)))} rows on which the judges disagree; the first "
                     f"{len(dis)}:</p>" + html_table(drows, [("where", "stage · plan · prompt"), ("prompt", "prompt"),
                                                             ("completion", "completion"), *[(k, k) for k in keys]]))
    return "".join(parts)
