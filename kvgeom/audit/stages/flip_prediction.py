"""Stage ``flip_prediction`` (issue #19): how well prefill-only signals predict the flips the audit decoded.

Reads the stored per-prompt verdicts of the stages that decode (prompt, plan) rows — the layer sweep, the bit
sweep and the engine matrix (each format's calibration rows, in cache mode as the stage ran them); another stage
adds its rows with :func:`register_row_source` — keeps the rows of prompts refused at full
precision (a flip is refused → not refused), recomputes each row's plan, scores every row with
:func:`kvgeom.predict.flip_signals` in batched prefill passes (nothing is generated again) against the refusal
directions and safety subspaces of the calibration prompts (:func:`kvgeom.predict.flip_reference`), and
validates them (:func:`kvgeom.predict.validate.validate_flip_prediction`): AUROC per signal and for the
cross-validated logistic regression with prompt-bootstrap CIs, predicted against measured flip rates per
configuration (Spearman), and the screen's threshold table (:func:`kvgeom.predict.screen.threshold_table`).
Proved by ``tests/audit/test_flip_prediction.py`` (rows rebuilt from stored verdicts; resumable; schema; report
section) and ``tests/predict/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from kvgeom.judges import Verdict
from kvgeom.predict import SIGNALS, flip_reference, flip_signals
from kvgeom.predict.screen import threshold_table
from kvgeom.predict.validate import validate_flip_prediction
from kvgeom.quant.plan import QuantPlan
from kvgeom.viz.markup import esc, fig_html, fmt_num
from kvgeom.viz.prediction import predicted_vs_measured_figure, roc_figure

from ..inputs import AuditInputs
from ..schema import obj
from ..stage import Section, Stage, StageResults, register_stage
from .baseline import baseline_verdicts

__all__ = ["ROW_SOURCES", "register_row_source"]

#: stage name -> fn(inputs, stage result) -> [(prompt id, QuantPlan, verdict)]: the decoded rows of that stage.
ROW_SOURCES: dict[str, Callable[[AuditInputs, Mapping[str, Any]], list[tuple]]] = {}


def register_row_source(stage: str, rows: Callable[[AuditInputs, Mapping[str, Any]], list[tuple]]) -> None:
    """Let the stage ``stage`` contribute its decoded rows (declare it in this stage's ``optional`` too)."""
    ROW_SOURCES[stage] = rows


def _layer_sweep_rows(inputs: AuditInputs, r: Mapping[str, Any]) -> list[tuple]:
    out = []
    for label, verdicts in r["verdicts"].items():
        layers = None if label == "all layers" else (int(label[1:]),)
        plan = inputs.plan(r["scheme"], layers=layers, name=label)
        screened = {(s["prompt_id"], s["plan"]) for s in (r.get("screen") or {}).get("skipped_rows", [])
                    if not s.get("checked")}
        out += [(pid, plan, v) for pid, v in verdicts.items() if (pid, label) not in screened]
    return out


def _bit_sweep_rows(inputs: AuditInputs, r: Mapping[str, Any]) -> list[tuple]:
    return [(pid, inputs.plan(scheme, name=scheme), v) for scheme, vs in (r.get("verdicts") or {}).items()
            for pid, v in vs.items()]


def _engine_matrix_rows(inputs: AuditInputs, r: Mapping[str, Any]) -> list[tuple]:
    out, seen = [], set()
    for f in r.get("formats") or []:
        key = (f["scheme"], f["prefill"])
        if key in seen:  # one format offered by two engines: its rows once
            continue
        seen.add(key)
        plan = QuantPlan(f["scheme"], mode="cache", site="rot_k", prefill=f["prefill"],
                         name=f"{f['engine']} {f['format']}")
        out += [(pid, plan, v) for pid, v in (f.get("verdicts") or {}).get("calibration", {}).items()]
    return out


register_row_source("layer_sweep", _layer_sweep_rows)
register_row_source("bit_sweep", _bit_sweep_rows)
register_row_source("engine_matrix", _engine_matrix_rows)


def run(inputs: AuditInputs, results: StageResults) -> dict:
    cfg = inputs.cfg
    base = baseline_verdicts(results["baseline"])
    text = dict(zip(inputs.calibration.frame["id"], inputs.calibration.frame["prompt"], strict=True))
    recs, plans = [], []
    for source, rows_of in ROW_SOURCES.items():
        if source not in results:
            continue
        for pid, plan, verdict in rows_of(inputs, results[source]):
            if pid in text and base.get(pid) == Verdict.REFUSED.value:
                recs.append({"source": source, "config": plan.label, "prompt_id": pid, "verdict": verdict,
                             "flipped": verdict != Verdict.REFUSED.value})
                plans.append(plan)
    if not recs:
        return {"n_rows": 0, "reason": "no decoded rows of refused prompts to validate against"}
    calib = inputs.calibration.head(cfg.sensitivity_prompts)
    t0 = time.perf_counter()
    parts, per_layer, refs, openings = [], [], {}, None
    for site in dict.fromkeys(p.site for p in plans):  # one site per flip_signals call (forward: cfg's; cache: rot_k)
        idx = [i for i, p in enumerate(plans) if p.site == site]
        refs[site] = ref = flip_reference(inputs.model, calib.prompts, inputs.harmless_pairs(calib), site=site,
                                          batch_size=cfg.batch_size)
        got = flip_signals(inputs.model, [text[recs[i]["prompt_id"]] for i in idx], [plans[i] for i in idx],
                           reference=ref, batch_size=cfg.batch_size,
                           progress="flip_prediction" if inputs.bars else False)
        per_layer.append(got.attrs["per_layer"].assign(site=site))
        openings = got.attrs["openings"]
        got = got.set_axis(idx)
        got.attrs = {}  # pandas compares attrs on concat, and these hold frames
        parts.append(got)
    sig = pd.concat(parts).sort_index()
    seconds = time.perf_counter() - t0
    frame = pd.concat([pd.DataFrame(recs), sig[list(SIGNALS)]], axis=1)
    val = validate_flip_prediction(frame, n_resamples=cfg.n_resamples, seed=cfg.seed)
    frame["p_flip"] = val.pop("p_flip")
    thresholds = threshold_table(frame["margin_plan"].to_numpy(float), frame["flipped"].to_numpy(bool))
    per_layer = (pd.concat(per_layer).groupby(["site", "layer"])[["dir", "sub", "rho_geo", "rel_err"]].mean()
                 .reset_index())
    return {"n_rows": len(frame), "signals_seconds": seconds, "site": cfg.quant_site,
            "reference": {"n_harmful": len(calib), "sites": list(refs), "n_post": next(iter(refs.values())).n_post},
            "openings": openings, "validation": val,
            "screen_thresholds": thresholds.to_dict(orient="records"),
            "per_layer_geometry": per_layer.to_dict(orient="records"),
            "rows": frame.to_dict(orient="records")}


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame((r.get("validation") or {}).get("signals", []))


def render(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    val = stage.get("validation")
    if not val:
        return f"<p>{esc(stage.get('reason', 'no rows'))}</p>"
    comb, sp = val["combined"], val["spearman"]
    verdict = ("supports screening (CI above {:.2f})" if val["supports_screen"]
               else "does not support screening (CI reaches {:.2f} or below)").format(val["min_auroc"])
    head = (f"<p>{val['n_rows']} decoded rows of {val['n_prompts']} refused prompts ({val['n_flips']} flips). "
            f"Combined model AUROC <b>{esc(fmt_num(comb['auroc'], '.2f'))}</b> "
            f"[{esc(fmt_num(comb['low'], '.2f'))}, {esc(fmt_num(comb['high'], '.2f'))}]: {esc(verdict)}. "
            f"Spearman (predicted vs measured flip rate over {sp['n_configs']} configurations): "
            f"{esc(fmt_num(sp['rho'], '.2f'))} [{esc(fmt_num(sp['low'], '.2f'))}, "
            f"{esc(fmt_num(sp['high'], '.2f'))}].</p>")
    return (head + fig_html(roc_figure(val), "fig-flip-roc")
            + fig_html(predicted_vs_measured_figure(pd.DataFrame(val["per_config"])), "fig-flip-per-layer"))


STAGE = register_stage(Stage(
    name="flip_prediction", order=105, run=run, requires=("baseline", "layer_sweep"),
    optional=("bit_sweep", "engine_matrix"),
    frame=frame, default=False, doc="prefill-only flip signals validated against the decoded verdicts",
    section=Section("flip-prediction", "Predicting flips from one forward pass",
                    "Each signal is computed from prefill passes only (no decoding) for every row the audit "
                    "decoded, and scored against the generated verdict: ROC curves with AUROC and 95% prompt-"
                    "bootstrap CIs; the combined logistic regression is scored out of fold (folds by prompt). The "
                    "second figure shows predicted (mean out-of-fold probability) against measured flip rate per "
                    "configuration.", render, hide_unless_ran=True),
    schema=obj({"n_rows": {"type": "integer"}}, validation={"type": "object"}, rows={"type": "array"},
               screen_thresholds={"type": "array"}),
))
