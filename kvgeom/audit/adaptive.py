"""Enough evidence, found automatically (``--until-stable``): grow the calibration set until the label is stated.

After the first pass of the decision stages (baseline, layer sweep, PCR, label) on the configured calibration
prompts, :func:`grow_calibration` draws ``grow_step`` further prompts at a time from the harmful pool
(:func:`calibration_pool`: the bundled harmful set, or the user's file, plus ``pool`` sources, minus the
calibration and held-out prompts: a held-out prompt is never drawn), reruns the decision stages (with the row
cache of :class:`~kvgeom.audit.inputs.AuditInputs`, so only the new rows are generated) and stops when the label's
confidence reaches ``label_confidence``, the pool is empty, or the budget (``max_calib`` prompts, ``max_minutes``)
is spent. The trajectory (n prompts, n refused, P(label), the stated label, the critical layer) is returned, saved
by :func:`kvgeom.audit.run_audit` in ``stages/_calibration.json`` (with the drawn prompt ids, so ``--resume``
uses the same calibration set) and shown in the report.

Proved by ``tests/audit/test_adaptive.py`` (stops at the threshold on a planted confidence, never draws a held-out
prompt, records the trajectory, resume reuses the drawn set).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from kvgeom.prompts import PromptSet, load_prompts

from .config import AuditConfig
from .inputs import AuditInputs
from .stage import get_stage

__all__ = ["DECISION_STAGES", "calibration_pool", "grow_calibration", "with_calibration"]

#: The stages rerun on each draw: what the label needs.
DECISION_STAGES = ("baseline", "layer_sweep", "pcr", "label")


def calibration_pool(cfg: AuditConfig, calibration: PromptSet, held_out: PromptSet) -> PromptSet:
    """The prompts the adaptive mode may draw, in a seeded random order: the harmful source (bundled set or the
    user's file) plus every ``cfg.pool`` source, minus the calibration and held-out prompts (by id and by text)."""
    sources = [load_prompts(cfg.harmful)] + [load_prompts(s) for s in cfg.pool]
    frames = [sources[0].frame] + [s.frame.assign(id=[f"{s.name}/{i}" for i in s.frame["id"]]) for s in sources[1:]]
    frame = pd.concat(frames, ignore_index=True)
    taken_ids = set(calibration.ids) | set(held_out.ids)
    taken_text = set(calibration.prompts) | set(held_out.prompts)
    keep = frame[~frame["id"].isin(taken_ids) & ~frame["prompt"].isin(taken_text)]
    keep = keep.drop_duplicates("prompt").drop_duplicates("id")
    keep = keep.sample(frac=1.0, random_state=cfg.seed) if len(keep) else keep
    return PromptSet("pool", keep, ", ".join(s.name for s in sources))


def with_calibration(inputs: AuditInputs, calibration: PromptSet) -> AuditInputs:
    """``inputs`` with another calibration set (the row cache is shared)."""
    return dataclasses.replace(inputs, calibration=calibration)


def _decide(inputs: AuditInputs) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in DECISION_STAGES:
        stage = get_stage(name)
        results[name] = stage.run(inputs, stage.results_for(results))
    return results


def _point(results: Mapping[str, Any], n: int, seconds: float) -> dict[str, Any]:
    lab = results["label"]
    conf = lab.get("confidence") or {}
    return {"n_calib": n, "n_refused": conf.get("n_refused"), "label": lab["label"],
            "point_label": lab.get("point_label"), "p_point": conf.get("p_point"), "p_label": conf.get("p_label"),
            "critical_layer": lab.get("critical_layer"), "stated": conf.get("stated"), "seconds": seconds}


def grow_calibration(inputs: AuditInputs, *, progress: Callable[[str, str], None] | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> tuple[AuditInputs, dict[str, Any]]:
    """Draw calibration prompts until the label is stated or the budget is spent (see the module docstring).
    Returns the inputs with the final calibration set and the record ``{"calibration_ids", "trajectory",
    "stopped", "pool_size"}``."""
    cfg = inputs.cfg
    pool = calibration_pool(cfg, inputs.calibration, inputs.held_out)
    t0 = clock()
    cur, drawn, traj = inputs, 0, []
    while True:
        results = _decide(cur)
        traj.append(_point(results, len(cur.calibration), clock() - t0))
        if progress:
            p = traj[-1]
            progress("until-stable", f"{p['n_calib']} prompts, {p['n_refused']} refused: {p['label']} "
                                     f"(point label {p['point_label']}, P={p['p_point'] or 0:.2f})")
        if traj[-1]["stated"]:
            stopped = "stated"
            break
        room = min(cfg.grow_step, cfg.max_calib - len(cur.calibration), len(pool) - drawn)
        if room <= 0:
            stopped = "pool exhausted" if drawn >= len(pool) else "prompt budget spent"
            break
        if clock() - t0 >= 60.0 * cfg.max_minutes:
            stopped = "time budget spent"
            break
        new = pool.frame.iloc[drawn:drawn + room]
        drawn += room
        cur = with_calibration(cur, PromptSet(cur.calibration.name, pd.concat([cur.calibration.frame, new]),
                                              cur.calibration.source))
    return cur, {"calibration_ids": cur.calibration.ids, "trajectory": traj, "stopped": stopped,
                 "pool_size": len(pool)}
