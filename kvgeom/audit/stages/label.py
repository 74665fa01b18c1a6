"""Stage ``label``: the failure-mode label with its decision trace (:func:`kvgeom.taxonomy.classify`) from the
layer sweep, PCR and (when it ran) the channel ablation, stated only when it holds on enough bootstrap resamples of
the refused prompts (:func:`with_confidence`; else ``undetermined``); its report section is the diagnosis card,
first on the page. Proved by ``tests/taxonomy/`` and ``tests/audit/test_audit.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from kvgeom.taxonomy import LABEL_DESCRIPTIONS, TaxonomyThresholds
from kvgeom.taxonomy.confidence import FlipEvidence
from kvgeom.viz import figures
from kvgeom.viz.card import label_card_html
from kvgeom.viz.markup import esc, fig_html

from ..config import AuditConfig
from ..evidence import confidence_of, sweep_evidence
from ..inputs import AuditInputs
from ..schema import STR, obj
from ..stage import Section, Stage, StageResults, register_stage
from .baseline import baseline_verdicts


def diagnose(layer_sweep: Mapping[str, Any], pcr: Mapping[str, Any], ablation: Mapping[str, Any], *,
             base: pd.Series | None = None, cfg: AuditConfig | None = None) -> dict:
    """The label from stored stage results (``ablation`` may be ``{}``), as :meth:`Diagnosis.to_dict`; with the
    full-precision verdicts ``base`` and the audit's ``cfg``, also its bootstrap confidence
    (:func:`with_confidence`)."""
    from kvgeom.stats import BootstrapCI
    from kvgeom.taxonomy import classify

    p = pcr
    ci = BootstrapCI(**{k: p[k] if p[k] is not None else float("nan")
                        for k in ("estimate", "low", "high", "n_valid", "n_resamples", "confidence") if k in p})
    stage_flips = {"pcr per-tensor": p["flip_per_tensor"]["rate"] or 0.0,
                   "pcr per-channel": p["flip_per_channel"]["rate"] or 0.0}
    for r in ablation.get("rows", []):
        stage_flips[f"ablation {r['subset']} {r['fraction']} s{r['seed']}"] = r["flip"] or 0.0
    diag = classify(pd.DataFrame(layer_sweep["layers"]), layer_sweep["all_layer"]["flip"], ci,
                    stage_flips=stage_flips).to_dict()
    if base is None:
        return diag
    return with_confidence(diag, cfg or AuditConfig(), sweep_evidence(base, layer_sweep, pcr, ablation))


def with_confidence(diag: Mapping[str, Any], cfg: AuditConfig, evidence: FlipEvidence) -> dict:
    """``diag`` (:meth:`Diagnosis.to_dict`) with the label as stated: the point label when it holds on at least
    ``cfg.label_confidence`` of the resamples, else ``undetermined``; ``point_label`` keeps the rules' answer on
    the observed prompts, ``confidence`` the evidence (:meth:`LabelConfidence.to_dict`), and the trace ends with
    the confidence step."""
    conf = confidence_of(cfg, evidence, TaxonomyThresholds(**diag["thresholds"]))
    point = diag["label"]
    step = {"rule": "confidence", "condition": f"P({point}) >= label_confidence over bootstrap resamples of the "
                                               "refused prompts (else undetermined)",
            "inputs": {"p_label": dict(conf.p_label), "n_refused": conf.n_refused,
                       "p_critical": {str(k): v for k, v in conf.p_critical.items()}},
            "threshold": {"label_confidence": cfg.label_confidence, "n_resamples": cfg.n_resamples},
            "fired": conf.stated, "label": conf.label, "decisive": not conf.stated}
    out = {**diag, "point_label": point, "label": conf.label, "confidence": conf.to_dict(),
           "trace": [*diag["trace"], step]}
    if conf.label != point:
        out["description"] = LABEL_DESCRIPTIONS[conf.label]
    return out


def run(inputs: AuditInputs, results: StageResults) -> dict:
    out = diagnose(results["layer_sweep"], results["pcr"], results.get("channel_ablation", {}),
                   base=baseline_verdicts(results["baseline"]), cfg=inputs.cfg)
    if inputs.calibration_record:
        rec = inputs.calibration_record
        out["adaptive"] = {"trajectory": list(rec["trajectory"]), "stopped": rec["stopped"],
                           "pool_size": rec["pool_size"], "n_calib": len(rec["calibration_ids"])}
    return out


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([{**t, "label_if_fired": t.get("label")} for t in r["trace"]]).drop(columns="label")


def render(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    html = label_card_html(stage, stages)
    ad = stage.get("adaptive")
    if ad and ad.get("trajectory"):
        th = (stage.get("confidence") or {}).get("confidence", 0.8)
        html += (f"<h3>Until stable: {ad['n_calib']} calibration prompts ({esc(ad['stopped'])}; pool of "
                 f"{ad['pool_size']} non-held-out prompts)</h3>"
                 + fig_html(figures.trajectory_figure(ad["trajectory"], threshold=th), "fig-trajectory"))
    return html


STAGE = register_stage(Stage(
    name="label", order=70, run=run, requires=("baseline", "layer_sweep", "pcr"), optional=("channel_ablation",),
    frame=frame,
    doc="the failure-mode label and its decision trace",
    section=Section("label", "Diagnosis", "", render, lead=True),
    schema=obj({"label": STR, "trace": {"type": "array"}}, critical_layer={"type": ["integer", "null"]},
               candidates={"type": "array"}, point_label=STR, confidence={"type": "object"}),
))
