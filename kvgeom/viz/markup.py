"""HTML building blocks of the report page: the stylesheet, escaping and number formats, sections, tables.

Each audit stage's report section (:class:`kvgeom.audit.Section`) is drawn with these; a section whose stage did not
run shows "not run", one whose data is malformed shows the error in place (``tests/report/test_report.py``)."""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import plotly.graph_objects as go

__all__ = ["CSS", "esc", "fig_html", "fmt_ci", "fmt_compact", "fmt_num", "fmt_pct", "fmt_rate", "guarded_section",
           "html_section", "html_table", "not_run_html", "stage_ran"]

CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
 background:#f4f6f8;color:#1c2833;line-height:1.45}
main{max-width:1200px;margin:0 auto;padding:24px 32px 64px}
header{background:#1c2833;color:#fff;padding:22px 32px}
header h1{margin:0 0 4px;font-size:26px} header p{margin:0;color:#d5dbdb}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);margin:22px 0;padding:18px 24px}
h2{margin:0 0 6px;font-size:20px} h3{font-size:16px;margin:14px 0 6px}
p.how{color:#566573;margin:0 0 10px;font-size:14px}
.not-run{color:#7f8c8d;font-style:italic;background:#f2f3f4;border:1px dashed #bfc9ca;padding:14px;border-radius:6px}
.error{color:#922b21;background:#fdedec;border:1px solid #e6b0aa;padding:12px;border-radius:6px}
.card{display:flex;gap:28px;align-items:flex-start;flex-wrap:wrap}
.badge{display:inline-block;color:#fff;font-weight:700;font-size:24px;padding:10px 18px;border-radius:8px}
.desc{font-size:16px;max-width:760px;margin:10px 0}
.headline{font-size:17px;background:#fef9e7;border-left:4px solid #f1c40f;padding:10px 14px;margin:10px 0}
.kv{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px;margin:12px 0;flex:1}
.kv div{background:#f8f9f9;border-radius:6px;padding:8px 12px}
.kv b{display:block;font-size:12px;color:#566573;text-transform:uppercase;letter-spacing:.04em}
.kv span{font-size:18px}
table{border-collapse:collapse;width:100%;font-size:13px;margin:8px 0}
th,td{border-bottom:1px solid #e5e8e8;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#f2f4f4}
tr.decisive td{background:#fdf2e9;font-weight:600}
td.yes{color:#1e8449;font-weight:700} td.no{color:#a6acaf}
code,pre{font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
pre{background:#1c2833;color:#ecf0f1;padding:10px 12px;border-radius:6px;overflow-x:auto;white-space:pre-wrap}
ul.notes{margin:4px 0 10px 18px;padding:0;font-size:13px;color:#566573}
.grid3{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:16px}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.pill.ok{background:#d5f5e3;color:#1e8449} .pill.bad{background:#fadbd8;color:#922b21}
footer{color:#7f8c8d;font-size:12px;text-align:center;margin-top:30px}
"""


# ------------------------------------------------------------------------------------------ helpers


def stage_ran(stage: Any) -> bool:
    """True when a stage entry holds data: not missing, not None, not ``{"status": "skipped"|"failed"}``."""
    if stage is None:
        return False
    if isinstance(stage, Mapping):
        return stage.get("status") not in ("skipped", "failed", "not run") and len(stage) > 0
    return True


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt_pct(x: Any, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{float(x):.{digits}%}"


def fmt_num(x: Any, fmt: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(float(x), fmt)


def fmt_ci(est: Any, low: Any, high: Any, pct: bool = True) -> str:
    f = fmt_pct if pct else fmt_num
    if low is None or high is None:
        return f(est)
    return f"{f(est)} [{f(low)}, {f(high)}]"


def fmt_rate(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "—"
    rate = d.get("rate", d.get("estimate"))
    s = fmt_ci(rate, d.get("low"), d.get("high"))
    if d.get("k") is not None and d.get("n") is not None:
        s += f" ({d['k']}/{d['n']})"
    return s


def fig_html(fig: go.Figure, div_id: str) -> str:
    height = fig.layout.height or 430
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, default_height=f"{height}px",
                       default_width="100%", config={"displaylogo": False, "responsive": True})


def not_run_html(stage: Any) -> str:
    reason = ""
    if isinstance(stage, Mapping) and stage.get("reason"):
        reason = f": {stage['reason']}"
    return f'<p class="not-run">not run{esc(reason)}</p>'


def html_section(sid: str, title: str, how: str, body: str) -> str:
    how_html = f'<p class="how">{how}</p>' if how else ""
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{how_html}{body}</section>'


def guarded_section(sid: str, title: str, how: str, stage: Any, build: Callable[[Any], str]) -> str:
    if not stage_ran(stage):
        return html_section(sid, title, how, not_run_html(stage))
    try:
        body = build(stage)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        warnings.warn(f"report section {sid!r} could not be drawn: {exc}", stacklevel=2)
        body = f'<p class="error">could not draw this section: {esc(type(exc).__name__)}: {esc(exc)}</p>'
    return html_section(sid, title, how, body)


def html_table(rows: list[Mapping[str, Any]], cols: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for _, h in cols)
    body = "".join("<tr>" + "".join(f"<td>{r.get(k, '')}</td>" for k, _ in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def fmt_compact(v: Any) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.3g}"
    if v is None:
        return "—"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={fmt_compact(x)}" for k, x in v.items()) or "—"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(fmt_compact(x) for x in v) + "]"
    return str(v)
