"""One self-contained HTML page from an audit dict (the audit.json schema: see :mod:`kvgeom.report`).

The page is the registered stages' report sections (:class:`kvgeom.audit.Section`, each declared in its stage's
file): the lead section (the diagnosis), the "At a glance" box (:func:`kvgeom.audit.stages.baseline.summary`), then
the other sections in pipeline order, then the run details. Plotly's JavaScript is inlined once in ``<head>``; each
figure is a ``<div>`` with a stable id (``fig-<section>``), so the same audit gives the same page. A section whose
stage is absent, ``None`` or ``{"status": "skipped"|"failed", "reason": ...}`` shows "not run"; a section whose
data is malformed shows the error in place (and warns) instead of failing the whole page. Proved by
``tests/report/test_report.py``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from plotly.offline import get_plotlyjs

from kvgeom.io import atomic_write_text
from kvgeom.viz.markup import CSS, esc, fmt_num, guarded_section, html_section, html_table, stage_ran

from .stage import STAGE_REGISTRY
from .stages.baseline import summary

__all__ = ["nonfinite_lines", "render_html", "report_html"]


def _timings(audit: Mapping[str, Any]) -> str:
    t = audit.get("timings") or {}
    rows = [{"stage": esc(k), "s": fmt_num(v, ".1f")} for k, v in t.items()]
    if t:
        total = sum(float(v) for v in t.values() if v is not None)
        rows.append({"stage": "<b>total</b>", "s": f"<b>{fmt_num(total, '.1f')}</b>"})
    vers = audit.get("versions") or {}
    vrows = [{"k": esc(k), "v": esc(v)} for k, v in vers.items()]
    left = html_table(rows, [("stage", "stage"), ("s", "seconds")]) if rows else '<p class="not-run">not run</p>'
    right = html_table(vrows, [("k", "package"), ("v", "version")]) if vrows else ""
    return f'<div class="grid3"><div>{left}</div><div>{right}</div></div>'


def _stage_sections(stages: Mapping[str, Any], *, lead: bool) -> list[str]:
    out = []
    def place(stage: Any) -> float:
        sec = stage.section
        return stage.order if sec is None or sec.position is None else sec.position

    for stage in sorted(STAGE_REGISTRY.values(), key=place):
        sec = stage.section
        if sec is None or sec.lead != lead or (sec.hide_unless_ran and not stage_ran(stages.get(stage.name))):
            continue
        out.append(guarded_section(sec.id, sec.title, sec.how, stages.get(stage.name),
                                   lambda result, render=sec.render: render(result, stages)))
    return out


def nonfinite_lines(audit: Mapping[str, Any]) -> list[str]:
    """The summary's line on rows with NaN/inf logits (``audit["nonfinite"]``); none when there were none."""
    bad = audit.get("nonfinite") or {}
    if not bad.get("rows"):
        return []
    by = ", ".join(f"{k} {v}" for k, v in (bad.get("by_stage") or {}).items())
    return [f"  NONFINITE              {bad['rows']} generated rows had NaN/inf logits ({by}): their verdict is "
            "'nonfinite', left out of every rate and test (never counted as refused or complied); run in fp32 or "
            "with a milder scheme to judge them"]


def render_html(audit: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write :func:`report_html` of ``audit`` to ``path`` atomically (parent directories created; the file gets
    the umask's permissions); returns it."""
    return atomic_write_text(path, report_html(audit))


def report_html(audit: Mapping[str, Any]) -> str:
    """One self-contained HTML page for ``audit`` (see :mod:`kvgeom.report` for the schema)."""
    if not isinstance(audit, Mapping):
        raise TypeError(f"audit must be a dict (the audit.json content), got {type(audit).__name__}")
    st = audit.get("stages") or {}
    model = audit.get("model") or {}
    model_name = model.get("name", "?") if isinstance(model, Mapping) else str(model)
    scheme = audit.get("scheme", "?")
    sub = f"target scheme <code>{esc(scheme)}</code> · seed {esc(audit.get('seed', '—'))}"
    if isinstance(model, Mapping) and model.get("n_layers"):
        sub += (f" · {model['n_layers']} layers, {model.get('n_kv_heads', '?')} KV heads, "
                f"d_head {model.get('d_head', '?')}")
    sub += f" · kvgeom {esc((audit.get('versions') or {}).get('kvgeom', '?'))}"

    warn = [html_section("nonfinite", "Rows with NaN/inf logits", "", f"<p><b>{esc(line.strip())}</b></p>")
            for line in nonfinite_lines(audit)]
    sections = [
        *warn,
        *_stage_sections(st, lead=True),
        html_section("summary", "At a glance", "", summary(st)),
        *_stage_sections(st, lead=False),
        html_section("timings", "Run details", "", _timings(audit)),
    ]
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>kvgeom audit: {esc(model_name)} ({esc(scheme)})</title><style>{CSS}</style>"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
        f"<header><h1>kvgeom audit — {esc(model_name)}</h1><p>{sub}</p></header><main>"
        + "".join(sections)
        + "<footer>Generated by kvgeom from audit.json. Rates are conditional flip rates unless stated; "
        "intervals are 95%.</footer></main></body></html>\n"
    )
    return page
