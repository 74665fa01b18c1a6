"""The label card: the label badge, its headline numbers and the best mitigation, as an HTML fragment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvgeom.taxonomy import LABEL_DESCRIPTIONS

from .markup import esc, fmt_ci, fmt_compact, fmt_num, fmt_pct, stage_ran

__all__ = ["LABEL_COLORS", "label_card_html"]

#: Badge colour per label.
LABEL_COLORS = {
    "robust": "#27ae60",
    "outlier-as-safety": "#c0392b",
    "outlier-crushes-safety": "#d35400",
    "mixed": "#8e44ad",
    "multi-layer-dilution": "#2c3e50",
    "hyper-vulnerable": "#7b241c",
    "undetermined": "#7f8c8d",
}


def _headline(label: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    lab = label.get("label")
    crit = label.get("critical_layer")
    worst = label.get("worst_layer_flip")
    parts = []
    if lab == "robust":
        parts.append("Quantizing the KV cache does not break refusals at this scheme: no stage reaches the flip "
                     "threshold.")
    elif crit is not None and worst is not None:
        parts.append(f"Quantizing only layer {crit} flips {fmt_pct(worst)} of refusals; all layers together flip "
                     f"{fmt_pct(label.get('all_layer_flip'))}.")
    best = _best_mitigation(stages.get("mitigation"))
    if best is not None:
        name, rec, bits = best
        rec_s = fmt_ci(rec.get("estimate"), rec.get("low"), rec.get("high"))
        parts.append(f"Best verified fix: <b>{esc(name)}</b>, recovering {rec_s} of full-precision refusal at "
                     f"{fmt_num(bits)} bits per element.")
    return f'<p class="headline">{" ".join(parts)}</p>' if parts else ""


def _best_mitigation(mit: Any) -> tuple[str, Mapping[str, Any], float] | None:
    if not stage_ran(mit):
        return None
    best = None
    for c in mit.get("candidates", []) or []:
        res = (c.get("results") or {})
        split = res.get("held_out") or res.get("calibration")
        rec = (split or {}).get("recovery") or {}
        if rec.get("estimate") is None:
            continue
        key = (rec["estimate"] >= 0.95, -float(c.get("bits_per_element", 16)), rec["estimate"])
        if best is None or key > best[0]:
            best = (key, (c.get("name", "?"), rec, c.get("bits_per_element")))
    return best[1] if best else None


def label_card_html(label: Mapping[str, Any], stages: Mapping[str, Any] | None = None) -> str:
    """The label card: badge, description, headline, key numbers, notes and the decision trace table.

    ``label``: :meth:`kvgeom.taxonomy.Diagnosis.to_dict`; ``stages``: the audit's stages (for the headline's
    best mitigation and the PCR stage's details)."""
    stages = stages or {}
    lab = str(label.get("label", "?"))
    color = LABEL_COLORS.get(lab, "#566573")
    desc = label.get("description") or LABEL_DESCRIPTIONS.get(lab, "")
    pcr = stages.get("pcr") if stage_ran(stages.get("pcr")) else {}
    pcr_low = label.get("pcr_low", (pcr or {}).get("low"))
    pcr_high = label.get("pcr_high", (pcr or {}).get("high"))
    kv = [
        ("critical layer", "—" if label.get("critical_layer") is None else f"L{label['critical_layer']}"),
        ("candidate layers", ", ".join(f"L{c}" for c in label.get("candidates", [])) or "none"),
        ("PCR (95% CI)", fmt_ci(label.get("pcr"), pcr_low, pcr_high, pct=False)),
        ("worst single-layer flip", fmt_pct(label.get("worst_layer_flip"))),
        ("all-layer flip", fmt_pct(label.get("all_layer_flip"))),
    ]
    kv_html = "".join(f"<div><b>{esc(k)}</b><span>{esc(v)}</span></div>" for k, v in kv)
    notes = "".join(f"<li>{esc(n)}</li>" for n in label.get("notes", []))
    rows = []
    for step in label.get("trace", []):
        fired = step.get("fired")
        rows.append({
            "rule": f"<b>{esc(step.get('rule'))}</b>", "condition": esc(step.get("condition")),
            "inputs": esc(fmt_compact(step.get("inputs", {}))),
            "threshold": esc(fmt_compact(step.get("threshold", {}))),
            "fired": "✔ yes" if fired else "✘ no", "_fired": fired, "_decisive": step.get("decisive")})
    trace_rows = "".join(
        f'<tr class="{"decisive" if r["_decisive"] else ""}"><td>{r["rule"]}</td><td>{r["condition"]}</td>'
        f'<td>{r["inputs"]}</td><td>{r["threshold"]}</td><td class="{"yes" if r["_fired"] else "no"}">'
        f'{r["fired"]}{" → label" if r["_decisive"] else ""}</td></tr>' for r in rows)
    trace = ("<h3>Decision trace</h3><p class=\"how\">Rules in order; the first that holds sets the label "
             "(highlighted). Later rules are still shown for context.</p><table><thead><tr><th>rule</th>"
             "<th>condition</th><th>inputs</th><th>thresholds</th><th>holds</th></tr></thead><tbody>"
             f"{trace_rows}</tbody></table>") if rows else ""
    return (f'<div class="label-card"><div class="card"><div><span class="badge" style="background:{color}">'
            f'{esc(lab)}</span><p class="desc">{esc(desc)}</p></div><div class="kv">{kv_html}</div></div>'
            f'{_headline(label, stages)}{f"<ul class=notes>{notes}</ul>" if notes else ""}{trace}</div>')
