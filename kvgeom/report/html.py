"""One self-contained HTML page from an audit dict (the audit.json schema: see :mod:`kvgeom.report`).

Plotly's JavaScript is inlined once in ``<head>``; each figure is a ``<div>`` from
``fig.to_html(full_html=False, include_plotlyjs=False, div_id=...)`` with a stable id (``fig-<section>``), so the
same audit gives the same page. A section whose stage is absent, ``None`` or ``{"status": "skipped"|"failed",
"reason": ...}`` shows "not run"; a section whose data is malformed shows the error in place (and warns) instead of
failing the whole page.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from plotly.offline import get_plotlyjs

from . import figures
from .card import label_card_html
from .markup import _CSS, _ci, _e, _fig_html, _guarded, _not_run, _num, _pct, _rate, _section, _table, stage_ran

__all__ = ["render_html", "report_html"]


# ------------------------------------------------------------------------------------------ sections
def _summary(audit: Mapping[str, Any]) -> str:
    st = audit.get("stages", {}) or {}
    base = st.get("baseline") if stage_ran(st.get("baseline")) else {}
    sweep = st.get("layer_sweep") if stage_ran(st.get("layer_sweep")) else {}
    pcr = st.get("pcr") if stage_ran(st.get("pcr")) else {}
    items = [
        ("refusal, calibration (full precision)", _rate((base or {}).get("calibration"))),
        ("refusal, held-out (full precision)", _rate((base or {}).get("held_out"))),
        ("over-refusal, borderline", _rate((base or {}).get("over_refusal"))),
        ("perplexity ratio (target scheme)", _num(((base or {}).get("perplexity") or {}).get("ppl_ratio"), ".3f")),
        ("all-layer flip", _rate({"rate": (sweep.get("all_layer") or {}).get("flip"),
                                  **{k: v for k, v in (sweep.get("all_layer") or {}).items() if k != "flip"}})
         if sweep.get("all_layer") else "—"),
        ("PCR at critical layer", _ci(pcr.get("estimate"), pcr.get("low"), pcr.get("high"), pct=False)
         if pcr else "—"),
    ]
    return '<div class="kv">' + "".join(f"<div><b>{_e(k)}</b><span>{_e(v)}</span></div>" for k, v in items) + "</div>"


def _layer_sweep(stage: Mapping[str, Any], label: Mapping[str, Any]) -> str:
    th = (label or {}).get("thresholds", {})
    fig = figures.layer_flip_figure(
        pd.DataFrame(stage["layers"]), critical_layer=(label or {}).get("critical_layer"),
        candidates=(label or {}).get("candidates", []), candidate_at=th.get("candidate_at", 0.10),
        robust_below=th.get("robust_below", 0.05), all_layer_flip=(stage.get("all_layer") or {}).get("flip"),
        scheme=stage.get("scheme"))
    return _fig_html(fig, "fig-layer-sweep")


def _sensitivity(stage: Mapping[str, Any], label: Mapping[str, Any]) -> str:
    fig = figures.sensitivity_figure(pd.DataFrame(stage["layers"]), metric=stage.get("metric", "sensitivity"),
                                     critical_layer=(label or {}).get("critical_layer"))
    return _fig_html(fig, "fig-sensitivity")


def _outliers(stage: Mapping[str, Any]) -> str:
    fig = figures.outlier_heatmap_figure(stage["heatmap"])
    extra = f'<p class="how">Top {_pct(stage.get("top_frac", 0.05))} of each layer\'s channels are outliers.</p>'
    return extra + _fig_html(fig, "fig-outliers")


def _ablation(stage: Mapping[str, Any]) -> str:
    fig = figures.ablation_figure(pd.DataFrame(stage["rows"]), layer=stage.get("layer"))
    return _fig_html(fig, "fig-ablation")


def _mitigation(stage: Mapping[str, Any]) -> str:
    rows, table = [], []
    for c in stage.get("candidates", []):
        results = c.get("results") or {}
        cells = {"name": f"<b>{_e(c.get('name'))}</b>", "source": _e(c.get("source", "")),
                 "bits": _num(c.get("bits_per_element")), "why": _e(c.get("rationale", ""))}
        for split in ("calibration", "held_out"):
            res = results.get(split) or {}
            rec = res.get("recovery") or {}
            rec_s = _ci(rec.get("estimate"), rec.get("low"), rec.get("high"))
            flip_s = f"<br>flips {_rate(res['flip'])}" if res.get("flip") else ""
            cells[split] = f"{_rate(res.get('refusal'))}<br>recovery {rec_s}{flip_s}" if res else "not run"
            if rec.get("estimate") is not None:
                rows.append({"name": c.get("name"), "bits_per_element": c.get("bits_per_element"),
                             "recovery": rec.get("estimate"), "low": rec.get("low"), "high": rec.get("high"),
                             "split": split.replace("_", "-")})
        table.append(cells)
    ref = stage.get("reference") or {}
    ref_html = ""
    if ref:
        ref_rows = [{"split": _e(k.replace("_", "-")), "full": _rate(v.get("full")), "uniform": _rate(v.get("uniform")),
                     "uflip": _rate(v.get("uniform_flip"))} for k, v in ref.items()]
        cols = [("split", "prompts"), ("full", "full precision"),
                ("uniform", f"uniform {stage.get('target_scheme', '')}"),
                ("uflip", "refusals flipped by the uniform scheme")]
        ref_html = "<h3>Reference refusal rates</h3>" + _table(ref_rows, cols)
    body = ""
    if rows:
        fig = figures.mitigation_figure(pd.DataFrame(rows), uniform_bits=stage.get("uniform_bits"),
                                        target=stage.get("target", 0.95))
        body += _fig_html(fig, "fig-mitigation")
    elif not table:
        return '<p class="not-run">not run: no candidate (nothing to fix)</p>' + ref_html
    body += ref_html
    if table:
        body += "<h3>Candidates</h3>" + _table(table, [("name", "candidate"), ("source", "source"),
                                                       ("bits", "bits/element"), ("calibration", "calibration"),
                                                       ("held_out", "held-out"), ("why", "why")])
    search = stage.get("search")
    if search:
        a = search.get("assignment", [])
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(a):
            groups.setdefault(s or "full precision", []).append(i)
        desc = "; ".join(f"{_e(s)}: L{', L'.join(map(str, ls))}" if len(ls) < 8 else f"{_e(s)}: {len(ls)} layers"
                         for s, ls in groups.items())
        pill = '<span class="pill ok">target met</span>' if search.get("met") else \
            '<span class="pill bad">target not met</span>'
        body += (f"<h3>Cheapest per-layer precision (greedy search)</h3><p>{pill} refusal {_pct(search.get('rate'))} "
                 f"vs target {_pct(search.get('target_rate'))} (full precision {_pct(search.get('full_rate'))}), "
                 f"{_num(search.get('bits_per_element'))} bits/element after {search.get('n_evals', '?')} "
                 f"evaluations.</p><p><code>{desc}</code></p>")
    return body


def _export(stage: Mapping[str, Any]) -> str:
    blocks = []
    for key, title in (("vllm", "vLLM"), ("llama_cpp", "llama.cpp"), ("hf", "HF transformers")):
        s = stage.get(key)
        if not s:
            continue
        pill = ('<span class="pill ok">expressible</span>' if s.get("expressible")
                else '<span class="pill bad">not expressible</span>')
        if s.get("expressible") and not s.get("exact", True):
            pill += ' <span class="pill bad">approximate</span>'
        code = s.get("cli") or s.get("python") or s.get("custom_code")
        extra = ""
        if s.get("cli") and s.get("python"):
            extra = f"<pre>{_e(s['python'])}</pre>"
        if s.get("custom_code") and code != s.get("custom_code"):
            extra += f"<pre>{_e(s['custom_code'])}</pre>"
        if key == "hf" and s.get("cache_config") and not s.get("python") and not s.get("custom_code"):
            extra += f"<pre>cache_config = {_e(json.dumps(s['cache_config']))}</pre>"
        notes = "".join(f"<li>{_e(n)}</li>" for n in s.get("notes", []))
        blocks.append(f"<div><h3>{title} {pill}</h3>{f'<pre>{_e(code)}</pre>' if code else ''}{extra}"
                      f"<ul class=notes>{notes}</ul></div>")
    src = f"<p>Settings for <b>{_e(stage['source'])}</b>.</p>" if stage.get("source") else ""
    return src + f'<div class="grid3">{"".join(blocks)}</div>'


def _bit_sweep(stage: Mapping[str, Any]) -> str:
    return _fig_html(figures.bit_sweep_figure(pd.DataFrame(stage["rows"])), "fig-bit-sweep")


def _agreement(stage: Mapping[str, Any]) -> str:
    rows = []
    for split in ("calibration", "held_out"):
        d = stage.get(split) or {}
        rows.append({"split": split.replace("_", "-"), "n": _e(d.get("n", "—")), "label": _e(d.get("label", "—")),
                     "pcr": _ci(d.get("pcr"), d.get("pcr_low"), d.get("pcr_high"), pct=False),
                     "critical": _e(d.get("critical_layer", "—"))})
    agree = stage.get("agree")
    pill = ('<span class="pill ok">labels agree</span>' if agree else '<span class="pill bad">labels differ</span>'
            if agree is not None else "")
    return f"<p>{pill}</p>" + _table(rows, [("split", "prompts"), ("n", "n"), ("label", "label"), ("pcr", "PCR"),
                                            ("critical", "critical layer")])


def _timings(audit: Mapping[str, Any]) -> str:
    t = audit.get("timings") or {}
    rows = [{"stage": _e(k), "s": _num(v, ".1f")} for k, v in t.items()]
    if t:
        total = sum(float(v) for v in t.values() if v is not None)
        rows.append({"stage": "<b>total</b>", "s": f"<b>{_num(total, '.1f')}</b>"})
    vers = audit.get("versions") or {}
    vrows = [{"k": _e(k), "v": _e(v)} for k, v in vers.items()]
    left = _table(rows, [("stage", "stage"), ("s", "seconds")]) if rows else '<p class="not-run">not run</p>'
    right = _table(vrows, [("k", "package"), ("v", "version")]) if vrows else ""
    return f'<div class="grid3"><div>{left}</div><div>{right}</div></div>'


# ------------------------------------------------------------------------------------------ page


def render_html(audit: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write :func:`report_html` of ``audit`` to ``path`` atomically (parent directories created); returns it."""
    out = Path(path)
    _write_atomic(out, report_html(audit))
    return out


def report_html(audit: Mapping[str, Any]) -> str:
    """One self-contained HTML page for ``audit`` (see :mod:`kvgeom.report` for the schema)."""
    if not isinstance(audit, Mapping):
        raise TypeError(f"audit must be a dict (the audit.json content), got {type(audit).__name__}")
    st = audit.get("stages") or {}
    label = st.get("label") if stage_ran(st.get("label")) else None
    model = audit.get("model") or {}
    model_name = model.get("name", "?") if isinstance(model, Mapping) else str(model)
    scheme = audit.get("scheme", "?")
    sub = f"target scheme <code>{_e(scheme)}</code> · seed {_e(audit.get('seed', '—'))}"
    if isinstance(model, Mapping) and model.get("n_layers"):
        sub += (f" · {model['n_layers']} layers, {model.get('n_kv_heads', '?')} KV heads, "
                f"d_head {model.get('d_head', '?')}")
    sub += f" · kvgeom {_e((audit.get('versions') or {}).get('kvgeom', '?'))}"

    sections = [
        _section("label", "Diagnosis", "", label_card_html(label, st) if label else _not_run(st.get("label"))),
        _section("summary", "At a glance", "", _summary(audit)),
        _guarded("layer-sweep", "Where refusals break: one layer at a time",
                 "Each bar quantizes a single layer's K/V and measures the share of baseline refusals lost (95% "
                 "Wilson CI). The critical layer is red; candidate layers (≥ the candidate threshold) orange.",
                 st.get("layer_sweep"), lambda s: _layer_sweep(s, label or {})),
        _guarded("sensitivity", "Per-layer sensitivity",
                 "A per-layer score from the geometry stage; higher means the layer's K/V matter more for refusal.",
                 st.get("sensitivity"), lambda s: _sensitivity(s, label or {})),
        _guarded("outliers", "Outlier key channels",
                 "Largest |K| per channel over the calibration prompts (log scale). Circles mark each layer's "
                 "outlier channels; a bright column means one channel dominates the layer's range.",
                 st.get("outliers"), _outliers),
        _guarded("channel-ablation", "Channel ablation at the critical layer",
                 "Quantizing only the outlier channels vs as many random channels: a causal ratio well above 1 "
                 "means the outliers carry the damage.", st.get("channel_ablation"), _ablation),
        _guarded("mitigation", "Mitigations, verified",
                 "Each candidate run on the target scheme: recovery = (mitigated − uniform) / (full − uniform) "
                 "refusal rate, with a bootstrap CI over prompts; x is the memory cost.",
                 st.get("mitigation"), _mitigation),
        _guarded("export", "Serving settings",
                 "How to run the chosen fix in each serving stack, and what each stack cannot express.",
                 st.get("export"), _export),
        _guarded("bit-sweep", "Bit-width phase curve",
                 "Refusal rate (band: 95% CI) and perplexity ratio against bits per element, per scheme family.",
                 st.get("bit_sweep"), _bit_sweep),
        _guarded("agreement", "Calibration vs held-out prompts",
                 "Does the 20-prompt calibration set give the same diagnosis as the held-out prompts?",
                 st.get("agreement"), _agreement),
        _section("timings", "Run details", "", _timings(audit)),
    ]
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>kvgeom audit: {_e(model_name)} ({_e(scheme)})</title><style>{_CSS}</style>"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
        f"<header><h1>kvgeom audit — {_e(model_name)}</h1><p>{sub}</p></header><main>"
        + "".join(sections)
        + "<footer>Generated by kvgeom from audit.json. Rates are conditional flip rates unless stated; "
        "intervals are 95%.</footer></main></body></html>\n"
    )
    return page


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
