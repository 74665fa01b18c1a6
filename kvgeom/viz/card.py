"""The label card: the label badge, its headline numbers and the best mitigation, as an HTML fragment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvgeom.taxonomy import LABEL_DESCRIPTIONS

from .markup import esc, fmt_ci, fmt_compact, fmt_num, fmt_pct, stage_ran

__all__ = ["LABEL_COLORS", "confidence_html", "label_card_html"]

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
    tied = (label.get("confidence") or {}).get("tied_with_worst") or []
    parts = []
    if lab == "robust":
        parts.append("Quantizing the KV cache does not break refusals at this scheme: no stage reaches the flip "
                     "threshold.")
    elif crit is not None and worst is not None:
        alone = (f" ({len(tied) - 1} other layers are statistically indistinguishable from it)"
                 if len(tied) > 1 else "")
        parts.append(f"Quantizing only layer {crit} flips {fmt_pct(worst)} of refusals{alone}; all layers together "
                     f"flip {fmt_pct(label.get('all_layer_flip'))}.")
    best = _best_mitigation(stages.get("mitigation"))
    if best is not None:
        name, paired, bits = best
        fu, fm = paired["flip_uniform"], paired["flip_mitigated"]
        shr = paired.get("share_recovered")
        share = (f", recovering {fmt_ci(shr.get('estimate'), shr.get('low'), shr.get('high'))} of the lost refusals"
                 if shr else "")
        parts.append(f"Best verified fix: <b>{esc(name)}</b>, {fm['k']}/{fm['n']} held-out refusals lost vs "
                     f"{fu['k']}/{fu['n']} under the uniform scheme (McNemar p={paired['mcnemar_p']:.2g}){share}, at "
                     f"{fmt_num(bits)} bits per element.")
    return f'<p class="headline">{" ".join(parts)}</p>' if parts else ""


def _best_mitigation(mit: Any) -> tuple[str, Mapping[str, Any], float] | None:
    """The candidate with the fewest held-out flips (then fewest bits) and its paired comparison."""
    if not stage_ran(mit):
        return None
    best = None
    for c in mit.get("candidates", []) or []:
        res = (c.get("results") or {})
        split = res.get("held_out") or res.get("calibration") or {}
        paired = split.get("paired") or {}
        if not paired.get("n_refused"):
            continue
        key = (-float(paired["flip_mitigated"]["rate"]), -float(c.get("bits_per_element", 16)))
        if best is None or key > best[0]:
            best = (key, (c.get("name", "?"), paired, c.get("bits_per_element")))
    return best[1] if best else None


def confidence_html(conf: Mapping[str, Any]) -> str:
    """P(label) over the bootstrap resamples as a stacked bar, with the verdict in words."""
    p = dict(sorted((conf.get("p_label") or {}).items(), key=lambda kv: (-kv[1], kv[0])))
    if not p:
        return ""
    segs = "".join(
        f'<span title="{esc(k)} {v:.0%}" style="display:inline-block;height:14px;width:{100 * v:.2f}%;'
        f'background:{LABEL_COLORS.get(k, "#bdc3c7")}"></span>' for k, v in p.items() if v > 0)
    legend = ", ".join(f"{esc(k)} {v:.0%}" for k, v in p.items() if v >= 0.01)
    pill = ('<span class="pill ok">stated</span>' if conf.get("stated")
            else '<span class="pill bad">undetermined</span>')
    return (f'<div class="confidence"><p>{pill} <b>P(label)</b> over {conf.get("n_resamples")} bootstrap resamples '
            f'of {conf.get("n_refused")} refused prompts (threshold {fmt_pct(conf.get("confidence"))}): {legend}</p>'
            f'<div style="width:100%;border:1px solid #ccc;line-height:0">{segs}</div>'
            f'<p class="verdict">{esc(conf.get("sentence", ""))}</p></div>')


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
    conf = label.get("confidence") or {}
    crit = label.get("critical_layer")
    p_crit = (conf.get("p_critical") or {}).get(str(crit))
    crit_s = "—" if crit is None else f"L{crit}" + (f" (critical in {p_crit:.0%} of resamples)" if p_crit else "")
    kv = [
        ("critical layer", crit_s),
        ("indistinguishable from it", ", ".join(f"L{c}" for c in conf.get("tied_with_worst", []) if c != crit)
         or "none"),
        ("candidate layers", ", ".join(f"L{c}" for c in label.get("candidates", [])) or "none"),
        ("PCR (95% CI)", fmt_ci(label.get("pcr"), pcr_low, pcr_high, pct=False)),
        ("worst single-layer flip", fmt_pct(label.get("worst_layer_flip"))),
        ("all-layer flip", fmt_pct(label.get("all_layer_flip"))),
    ]
    point = (f'<p class="desc">rules on the observed prompts: <b>{esc(label["point_label"])}</b></p>'
             if label.get("point_label") not in (None, lab) else "")
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
            f'{esc(lab)}</span>{point}<p class="desc">{esc(desc)}</p></div><div class="kv">{kv_html}</div></div>'
            f'{confidence_html(conf)}{_headline(label, stages)}'
            f'{f"<ul class=notes>{notes}</ul>" if notes else ""}{trace}</div>')
