"""How kvgeom's results show themselves in Jupyter: a compact table plus the key figure (``_repr_html_``).

:func:`table_html` renders records or a DataFrame as a small HTML table (NaN and ``None`` as "—", never "nan");
:func:`figure_html` a plotly figure. No internet is assumed at run time: like ``report.html`` (which inlines
:func:`plotly.offline.get_plotlyjs`), the first figure a Python process shows carries plotly's JavaScript inline,
and later figures of that process reuse it (``include_plotlyjs=False``), so a notebook holds the library once.
:func:`result_html` joins a title, a table and a figure. It imports nothing of kvgeom, so any module may use it
(``Scheme``, ``FlipStats``, ``SensitivityProfile``, ``AuditResult``, ``JudgeComparison``).
Proved by ``tests/test_display.py``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["figure_html", "result_html", "table_html"]

_STATE = {"plotlyjs_sent": False}


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}"
    return html.escape(str(v))


def table_html(rows: Any, *, max_rows: int = 30) -> str:
    """An HTML table of a DataFrame, a list of dicts or one dict (one row per key: ``field | value``)."""
    import pandas as pd

    if isinstance(rows, Mapping):
        rows = [{"field": k, "value": v} for k, v in rows.items()]
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    more = len(frame) - max_rows
    frame = frame.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>"
                   for r in frame.itertuples(index=False))
    tail = f"<p>… {more} more rows</p>" if more > 0 else ""
    return f'<table class="kvgeom"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{tail}'


def figure_html(fig: Any) -> str:
    """A plotly figure as HTML; the first one of the process carries plotly's JavaScript inline (no CDN)."""
    first = not _STATE["plotlyjs_sent"]
    _STATE["plotlyjs_sent"] = True
    return fig.to_html(full_html=False, include_plotlyjs=True if first else False, default_height="420px",
                       config={"displaylogo": False})


def result_html(title: str, table: Any = None, figure: Any = None, *, note: str = "",
                extra: Sequence[str] = ()) -> str:
    """``<h4>title</h4>``, an optional note, :func:`table_html` of ``table``, :func:`figure_html` of ``figure``."""
    parts = [f"<h4>{html.escape(title)}</h4>"]
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    if table is not None:
        parts.append(table_html(table))
    parts += list(extra)
    if figure is not None:
        parts.append(figure_html(figure))
    return "<div>" + "".join(parts) + "</div>"
