"""The terminal summary of an audit: :func:`audit_summary` (``kvgeom audit`` prints it; the deployment table
first, :func:`kvgeom.audit.deployment.deployment_text`). Proved by ``tests/audit/test_audit.py`` and
``tests/audit/test_engine_matrix.py``."""

from __future__ import annotations

__all__ = ["audit_summary"]


def _fmt_rate(d: dict | None) -> str:
    if not d or d.get("rate") is None:
        return "undefined"
    return f"{d['rate']:.2f} [{d['low']:.2f}, {d['high']:.2f}] ({d['k']}/{d['n']})"


def audit_summary(audit: dict) -> str:
    """The terminal summary of an audit (label, PCR, critical layers, flips, perplexity, fix, timings)."""
    from kvgeom.audit.deployment import deployment_text
    from kvgeom.audit.page import nonfinite_lines
    from kvgeom.effects import paired_text

    st = audit["stages"]
    lines = [f"kvgeom audit: {audit['model']['name']} under {audit['scheme']}", *nonfinite_lines(audit)]
    if "engine_matrix" in st and st["engine_matrix"].get("formats"):
        lines.append(deployment_text(st["engine_matrix"]))
    if "baseline" in st:
        b = st["baseline"]
        lines.append(f"  full-precision refusal  calibration {_fmt_rate(b['calibration'])}, "
                     f"held-out {_fmt_rate(b['held_out'])}; over-refusal {_fmt_rate(b['over_refusal'])}")
        pp = b["perplexity"]
        lines.append(f"  perplexity             {pp['ppl']:.2f} full, {pp['ppl_target']:.2f} under {audit['scheme']} "
                     f"(ratio {pp['ppl_ratio']:.3f})")
    if "label" in st:
        lab = st["label"]
        pcr = lab.get("pcr")
        pcr_s = "undefined" if pcr is None else f"{pcr:.2f} [{lab.get('pcr_low') or float('nan'):.2f}, " \
            f"{lab.get('pcr_high') or float('nan'):.2f}]"
        lines.append(f"  LABEL                  {lab['label']}  (PCR {pcr_s})")
        conf = lab.get("confidence") or {}
        if conf.get("sentence"):
            lines.append(f"  confidence             {conf['sentence']}")
        tied = [x for x in conf.get("tied_with_worst", []) if x != lab.get("critical_layer")]
        lines.append(f"  critical layer         {lab.get('critical_layer')}"
                     + (f" (indistinguishable: {tied})" if tied else "") + f"; candidates {lab.get('candidates')}")
        worst = lab.get("worst_layer_flip")
        allf = lab.get("all_layer_flip")
        w_s = "undefined" if worst is None else f"{worst:.3f}"
        a_s = "undefined" if allf is None else f"{allf:.3f}"
        lines.append(f"  flips ({st.get('layer_sweep', {}).get('scheme', '?')})  worst single layer {w_s}, "
                     f"all layers {a_s}")
    if "mitigation" in st:
        for c in st["mitigation"]["candidates"]:
            held = (c.get("results") or {}).get("held_out") or {}
            lines.append(f"  fix: {c['name']:<40} {c['bits_per_element']:.2f} bits/elem, held-out "
                         f"{paired_text(held.get('paired')) if held else 'not run'}")
    if "agreement" in st and "agree" in st["agreement"]:
        ag = st["agreement"]
        lines.append(f"  calibration vs held-out {ag['calibration']['label']} vs {ag['held_out']['label']} "
                     f"({'agree' if ag['agree'] else 'DISAGREE'}; critical layer {ag['calibration']['critical_layer']}"
                     f" vs {ag['held_out']['critical_layer']})")
    jd = st.get("judges") or {}
    for p in jd.get("pairs") or []:
        kap = "undefined" if p.get("kappa") is None else f"{p['kappa']:.2f}"
        lines.append(f"  judges                 {p['reference']} vs {p['judge']}: agreement "
                     f"{p['agreement']:.2f} on {p['n']} rows, kappa {kap}")
    if "export" in st:
        lines.append(f"  export                 {st['export'].get('source')}")
    t = audit.get("timings", {})
    lines.append("  time per stage         " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))
    return "\n".join(lines)
