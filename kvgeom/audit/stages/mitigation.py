"""Stage ``mitigation``: :func:`kvgeom.mitigation.prescribe` candidates verified on the target scheme: refusal,
flips and recovery with CI on calibration and held-out prompts separately, bits per element; with
``search=True`` also the greedy cheapest per-layer precision. Proved by ``tests/mitigation/`` and
``tests/audit/test_audit.py``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from kvgeom.effects import aggregate_recovery, paired_flips, paired_text
from kvgeom.judges import Verdict
from kvgeom.quant import Scheme
from kvgeom.stats import rate_ci
from kvgeom.taxonomy import LABELS
from kvgeom.viz import figures
from kvgeom.viz.markup import esc, fig_html, fmt_ci, fmt_num, fmt_pct, fmt_rate, html_table

from ..inputs import AuditInputs, plan_verdicts
from ..schema import NUM, STR, obj
from ..stage import Section, Stage, StageResults, register_stage
from .baseline import baseline_verdicts
from .outliers import outlier_table


def run(inputs: AuditInputs, results: StageResults) -> dict:
    from kvgeom.mitigation import recovery_ci

    cfg, model = inputs.cfg, inputs.model
    cands = candidates_for(results["label"], inputs, outlier_table(results["outliers"]))
    plans: list = [inputs.plan(cfg.scheme, name="uniform")]
    skipped: dict[int, str] = {}
    for i, c in enumerate(cands):
        try:
            plans.append(c.to_plan(mode=cfg.mode, site=cfg.quant_site, name=f"cand{i}"))
        except ValueError as err:  # e.g. mixed schemes a QuantPlan cannot hold: say why, run the others
            plans.append(None)
            skipped[i] = str(err)
    # to_plan gives None (no error) for a candidate that keeps every layer in full precision: its verdicts are
    # the baseline's (same prompts, same generation, no quantization), so nothing is generated for it
    full_precision = {i for i, c in enumerate(cands) if plans[i + 1] is None and i not in skipped}
    run_plans = [p for p in plans if p is not None]
    res: dict[str, Any] = {"target_scheme": cfg.scheme, "target": 0.95,
                           "uniform_bits": Scheme.parse(cfg.scheme).bits_per_element_for(
                               d_head=model.d_head, n_kv_heads=model.n_kv_heads),
                           "reference": {}, "candidates": [], "search": None}
    per_split = {}
    tables = inputs.evaluate_splits({"calibration": inputs.calibration, "held_out": inputs.held_out}, run_plans,
                                    stage="mitigation")
    for split, rows in tables.items():
        base = baseline_verdicts(results["baseline"], split)
        full = (base == Verdict.REFUSED.value).to_numpy()
        uni = (plan_verdicts(rows, "uniform").reindex(base.index) == Verdict.REFUSED.value).to_numpy()
        ok, why = aggregate_recovery(float(full.mean()), float(uni.mean()), min_gap=cfg.min_recovery_gap,
                                     flips=int((full & ~uni).sum()), reverse_flips=int((~full & uni).sum()))
        res["reference"][split] = {"full": rate_ci(int(full.sum()), len(full)).to_dict(),
                                   "uniform": rate_ci(int(uni.sum()), len(uni)).to_dict(),
                                   "uniform_flip": rate_ci(int((full & ~uni).sum()), int(full.sum())).to_dict(),
                                   "uniform_reverse_flip": rate_ci(int((~full & uni).sum()),
                                                                   int((~full).sum())).to_dict(),
                                   "recovery_defined": ok, "recovery_undefined_reason": why,
                                   "uniform_verdicts": plan_verdicts(rows, "uniform").to_dict()}
        per_split[split] = (rows, base, full, uni)
    for i, c in enumerate(cands):
        d = c.to_dict()
        d["results"] = {}
        if i in skipped:
            d["results"] = {"status": "skipped", "reason": f"not expressible as one QuantPlan: {skipped[i]}"}
        else:
            for split, (rows, base, full, uni) in per_split.items():
                mit = full if i in full_precision else \
                    (plan_verdicts(rows, f"cand{i}").reindex(base.index) == Verdict.REFUSED.value).to_numpy()
                d["results"][split] = {"refusal": rate_ci(int(mit.sum()), len(mit)).to_dict(),
                                       "recovery": recovery_ci(full, uni, mit, seed=cfg.seed).to_dict(),
                                       "recovery_defined": res["reference"][split]["recovery_defined"],
                                       "flip": rate_ci(int((full & ~mit).sum()), int(full.sum())).to_dict(),
                                       "paired": paired_flips(full, uni, mit, n_resamples=cfg.n_resamples,
                                                              seed=cfg.seed).to_dict()}
                if i in full_precision:
                    d["results"][split]["note"] = "every layer in full precision: the baseline's verdicts"
        res["candidates"].append(d)
    if cfg.search:
        res["search"] = search(inputs, results["baseline"])
    return res


def candidates_for(label: Mapping[str, Any], inputs: AuditInputs, outliers: pd.DataFrame) -> list:
    """:func:`kvgeom.mitigation.prescribe` for the stated label; when it is ``undetermined`` by confidence, also
    for every competing label (P >= 0.1 over the resamples), most likely first, each candidate once: the paired
    flip comparison then picks among them."""
    from kvgeom.mitigation import prescribe

    cfg, model = inputs.cfg, inputs.model
    labels = [label["label"]]
    conf = label.get("confidence") or {}
    if not conf.get("stated", True):
        # most likely first, by value: a resumed label (read back from JSON, keys sorted) gives the same order
        ranked = sorted((conf.get("p_label") or {}).items(), key=lambda kp: (-kp[1], kp[0]))
        labels += [k for k, p in ranked if p >= 0.1 and k in LABELS]
    out, seen = [], set()
    for lab in dict.fromkeys(labels):
        for c in prescribe({**label, "label": lab}, target_scheme=cfg.scheme, n_layers=model.n_layers,
                           outliers=outliers, d_head=model.d_head, n_kv_heads=model.n_kv_heads):
            key = (tuple(c.assignment), str(c.to_dict().get("protect_channels")))
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def search(inputs: AuditInputs, baseline: Mapping[str, Any]) -> dict:
    """Greedy search (kvgeom.mitigation.search_precision) for the cheapest per-layer assignment that keeps
    >= 95% of full-precision refusal on the calibration prompts, judged on generated text."""
    from kvgeom.mitigation import search_precision

    cfg, model = inputs.cfg, inputs.model
    levels = list(cfg.search_levels) or [cfg.scheme, "q8_0" if model.d_head % 32 == 0 else "int8-token-asym"]

    def rate(assignment: Sequence[str | None]) -> float:
        plan = inputs.assignment_plan(assignment, name="search")
        rows = inputs.evaluate(inputs.calibration, [plan], stage="mitigation", score=False)
        return float(rows["refused"].mean())

    result = search_precision(rate, model.n_layers, levels, 0.95, full_rate=baseline["calibration"]["rate"],
                              d_head=model.d_head, n_kv_heads=model.n_kv_heads)
    return result.to_dict()


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    rows = []
    for split, ref in (r.get("reference") or {}).items():
        for what in ("full", "uniform"):
            v = ref.get(what) or {}
            rows.append({"candidate": what if what == "full" else f"uniform {r.get('target_scheme')}",
                         "split": split, "bits_per_element": 16.0 if what == "full" else r.get("uniform_bits"),
                         "refusal": v.get("rate"), "refusal_low": v.get("low"), "refusal_high": v.get("high"),
                         "flip": (ref.get("uniform_flip") or {}).get("rate") if what == "uniform" else None})
    for c in r.get("candidates", []):
        res = c.get("results") or {}
        for split in ("calibration", "held_out"):
            s = res.get(split)
            if not s:
                continue
            rec, flip, ref = s.get("recovery") or {}, s.get("flip") or {}, s.get("refusal") or {}
            rows.append({"candidate": c["name"], "split": split, "bits_per_element": c.get("bits_per_element"),
                         "refusal": ref.get("rate"), "refusal_low": ref.get("low"), "refusal_high": ref.get("high"),
                         "flip": flip.get("rate"), "flip_low": flip.get("low"), "flip_high": flip.get("high"),
                         "recovery": rec.get("estimate"), "recovery_low": rec.get("low"),
                         "recovery_high": rec.get("high"), "source": c.get("source")})
    return pd.DataFrame(rows)


def render(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    rows, table = [], []
    for c in stage.get("candidates", []):
        results = c.get("results") or {}
        cells = {"name": f"<b>{esc(c.get('name'))}</b>", "source": esc(c.get("source", "")),
                 "bits": fmt_num(c.get("bits_per_element")), "why": esc(c.get("rationale", ""))}
        for split in ("calibration", "held_out"):
            res = results.get(split) or {}
            rec = res.get("recovery") or {}
            rec_s = (f"<br>aggregate recovery {fmt_ci(rec.get('estimate'), rec.get('low'), rec.get('high'))}"
                     if res.get("recovery_defined") else "")
            cells[split] = (f"{esc(paired_text(res.get('paired')))}<br>refusal {fmt_rate(res.get('refusal'))}"
                            f"{rec_s}" if res else "not run")
            flip = res.get("flip") or {}
            if flip.get("rate") is not None:
                rows.append({"name": c.get("name"), "bits_per_element": c.get("bits_per_element"),
                             "flip": flip.get("rate"), "low": flip.get("low"), "high": flip.get("high"),
                             "split": split.replace("_", "-")})
        table.append(cells)
    ref = stage.get("reference") or {}
    ref_html = ""
    if ref:
        ref_rows = [{"split": esc(k.replace("_", "-")), "full": fmt_rate(v.get("full")),
                     "uniform": fmt_rate(v.get("uniform")), "uflip": fmt_rate(v.get("uniform_flip")),
                     "urev": fmt_rate(v.get("uniform_reverse_flip")),
                     "rec": "defined" if v.get("recovery_defined") else esc(
                         f"undefined: {v.get('recovery_undefined_reason') or 'not recorded'}")}
                    for k, v in ref.items()]
        cols = [("split", "prompts"), ("full", "full precision"),
                ("uniform", f"uniform {stage.get('target_scheme', '')}"),
                ("uflip", "refusals flipped by the uniform scheme"), ("urev", "reverse flips (not refused → refused)"),
                ("rec", "aggregate recovery (mitigated − uniform) / (full − uniform)")]
        ref_html = "<h3>Reference refusal rates</h3>" + html_table(ref_rows, cols)
    body = ""
    if rows:
        uni = {k.replace("_", "-"): (v.get("uniform_flip") or {}).get("rate") for k, v in ref.items()}
        fig = figures.paired_flip_figure(pd.DataFrame(rows), uniform={k: v for k, v in uni.items() if v is not None},
                                         uniform_bits=stage.get("uniform_bits"))
        body += fig_html(fig, "fig-mitigation")
    elif not table:
        return '<p class="not-run">not run: no candidate (nothing to fix)</p>' + ref_html
    body += ref_html
    if table:
        body += "<h3>Candidates</h3>" + html_table(table, [("name", "candidate"), ("source", "source"),
                                                       ("bits", "bits/element"), ("calibration", "calibration"),
                                                       ("held_out", "held-out"), ("why", "why")])
    found = stage.get("search")
    if found:
        a = found.get("assignment", [])
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(a):
            groups.setdefault(s or "full precision", []).append(i)
        desc = "; ".join(f"{esc(s)}: L{', L'.join(map(str, ls))}" if len(ls) < 8
                         else f"{esc(s)}: {len(ls)} layers" for s, ls in groups.items())
        pill = '<span class="pill ok">target met</span>' if found.get("met") else \
            '<span class="pill bad">target not met</span>'
        body += (f"<h3>Cheapest per-layer precision (greedy search)</h3><p>{pill} refusal "
                 f"{fmt_pct(found.get('rate'))} vs target {fmt_pct(found.get('target_rate'))} (full precision "
                 f"{fmt_pct(found.get('full_rate'))}), "
                 f"{fmt_num(found.get('bits_per_element'))} bits/element after {found.get('n_evals', '?')} "
                 f"evaluations.</p><p><code>{desc}</code></p>")
    return body


STAGE = register_stage(Stage(
    name="mitigation", order=80, run=run, requires=("baseline", "outliers", "label"), frame=frame,
    doc="prescribed candidates verified on the target scheme (calibration and held-out)",
    section=Section("mitigation", "Mitigations, verified",
                    "Each candidate run on the target scheme and compared with the uniform scheme on the same "
                    "prompts refused at full precision: flips under each, exact McNemar p on the prompts where they "
                    "differ, and the share of lost refusals recovered (1 − flip mitigated / flip uniform, stated "
                    "only when the uniform flip's CI excludes 0). The aggregate recovery (mitigated − uniform) / "
                    "(full − uniform) is shown only when the full-vs-uniform gap reaches the minimum; x is the "
                    "memory cost.", render),
    schema=obj({"target_scheme": STR, "uniform_bits": NUM, "reference": {"type": "object"},
                "candidates": {"type": "array", "items": obj({"name": STR, "results": {"type": "object"}})}},
               target=NUM, search={"type": ["object", "null"]}),
))
