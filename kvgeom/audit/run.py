"""Running the registered stages in order, each saved atomically; ``resume`` loads finished stages.

Each stage gets the :class:`~kvgeom.audit.inputs.AuditInputs` (built once) and exactly the earlier results it
declares (:class:`~kvgeom.audit.stage.StageResults`). A run records its config in ``stages/_config.json`` and its
judge's identity (:func:`kvgeom.judges.judge_identity`) in ``stages/_judge.json``; ``--resume`` refuses a folder
written with other settings or another judge, so one audit never mixes two judges' verdicts. Every file is
written with :func:`kvgeom.io.atomic_write_json` (fsync, rename, the umask's permissions), so a run killed at any
point leaves each stage file whole or absent; a stage file that does not parse (written by something else, or
damaged) is recomputed on ``--resume``, never trusted.
A run holds ``--out``'s lock (:func:`kvgeom.io.lock_folder`) from before its first file to its last: a second audit
on the same folder at once is refused, and a crashed one leaves no lock (the temporary files a killed run left are
removed then). A disk that fills up mid-run stops the audit with one :class:`AuditError` naming the folder, its free
space and the finished stages (each still whole, so ``--resume`` continues from them). Rows with NaN/inf logits are
counted per stage (saved with the stage; ``audit.json``'s ``nonfinite``).
Proved by ``tests/audit/test_audit.py`` (resume equals an uninterrupted run; another judge is refused; files get the
umask's mode), ``tests/audit/test_faults.py`` (a kill at every stage boundary and in the middle of writing every
stage, then ``--resume``, gives the uninterrupted run's ``audit.json``; the lock; a full disk; an unreadable stage
file) and ``tests/audit/test_checks.py`` (bad input refused before the model loads, or right after it and before any
stage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from kvgeom.io import (
    OutputDirError,
    atomic_write_json,
    check_out_dir,
    disk_full_error,
    is_disk_full,
    lock_folder,
    to_jsonable,
)
from kvgeom.judges import JudgePanel
from kvgeom.judges.rows import judge_rows, load_rows, rows_path, save_rows
from kvgeom.prompts import PromptSet
from kvgeom.quant import Scheme

from .adaptive import calibration_pool, grow_calibration
from .checks import check_model, check_out_space
from .config import AuditConfig, AuditError, check_config
from .inputs import AuditInputs
from .page import render_html
from .stage import STAGE_REGISTRY, default_stages, get_stage

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["AuditResult", "load", "run_audit"]


def _versions() -> dict:
    import torch
    import transformer_lens
    import transformers

    import kvgeom

    return {"kvgeom": kvgeom.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "transformer_lens": getattr(transformer_lens, "__version__", "?"), "python": platform.python_version()}


@dataclass
class AuditResult:
    """What :func:`run_audit` returns: the ``audit.json`` dict, where it was written, and stage timings."""

    audit: dict
    out: Path | None
    timings: dict = field(default_factory=dict)
    rows_log: dict | None = field(default=None, repr=False)

    @property
    def rows(self) -> pd.DataFrame:
        """Every completion of the run with each judge's verdict (``out/rows/*.jsonl``; :mod:`kvgeom.judges.rows`)."""
        if self.rows_log:
            return pd.concat([f for frames in self.rows_log.values() for f in frames], ignore_index=True)
        return load_rows(self.out) if self.out is not None else pd.DataFrame()

    def summary(self) -> dict[str, Any]:
        """The key numbers: model, scheme, label, PCR, critical layer, flips, baseline refusal, judges' kappa."""
        st = self.audit.get("stages") or {}
        lab, base = st.get("label") or {}, st.get("baseline") or {}
        out = {"model": (self.audit.get("model") or {}).get("name"), "scheme": self.audit.get("scheme"),
               "label": lab.get("label"), "PCR": lab.get("pcr"), "critical layer": lab.get("critical_layer"),
               "worst single-layer flip": lab.get("worst_layer_flip"), "all-layer flip": lab.get("all_layer_flip"),
               "refusal at full precision": (base.get("calibration") or {}).get("rate"),
               "judge": (self.audit.get("judge") or {}).get("name")}
        for p in (st.get("judges") or {}).get("pairs") or []:
            out[f"kappa vs {p['judge']}"] = p["kappa"] if p["kappa"] is not None else "undefined"
        return out

    def _repr_html_(self) -> str:
        """Jupyter: :meth:`summary` as a table and the layer-sweep figure (:mod:`kvgeom.display`)."""
        from kvgeom.display import result_html

        from .stages.layer_sweep import figure

        st = self.audit.get("stages") or {}
        fig = figure(st["layer_sweep"], st) if (st.get("layer_sweep") or {}).get("layers") else None
        where = f" ({self.out})" if self.out is not None else ""
        return result_html(f"kvgeom audit{where}", self.summary(), fig)

    def frame(self, stage: str) -> pd.DataFrame:
        """One stage's result as a table (:func:`kvgeom.audit.stage_frame`)."""
        from .frames import stage_frame

        if stage not in self.audit["stages"]:
            raise KeyError(f"stage {stage!r} was not run; stages here: {', '.join(self.audit['stages'])}")
        return stage_frame(stage, self.audit["stages"][stage])


def _save(d: Path, path: Path, data: Any) -> None:
    """:func:`kvgeom.io.atomic_write_json`, a full disk turned into one :class:`AuditError` naming the folder, its
    free space and the stages already saved (each whole: the failed write left the old file or none)."""
    try:
        atomic_write_json(path, data)
    except OSError as err:
        if not is_disk_full(err):
            raise
        done = sorted(p.stem for p in (d / "stages").glob("*.json") if not p.name.startswith("_")) \
            if (d / "stages").is_dir() else []
        kept = f"; finished stages {', '.join(done)} are saved whole in {d / 'stages'}" if done else ""
        err.filename = err.filename or str(path)
        raise AuditError(disk_full_error(d, err, kept=kept)) from None


def _saved_stage(path: Path) -> dict | None:
    """A saved stage file's content, None when it is absent or does not parse as one (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and "result" in saved and "seconds" in saved else None


def load(path: str | os.PathLike) -> AuditResult:
    """The :class:`AuditResult` of a saved run (``path``: its ``--out`` folder, or its ``audit.json``): the same
    ``audit`` dict :func:`run_audit` returned (as saved), its folder, its stage timings, its rows on demand."""
    p = Path(path)
    f = p / "audit.json" if p.is_dir() else p
    if not f.is_file():
        raise AuditError(f"{f} does not exist: pass the --out folder of a finished kvgeom audit")
    audit = json.loads(f.read_text())
    return AuditResult(audit=audit, out=f.parent, timings=dict(audit.get("timings") or {}))


def _check_resume(d: Path, cfg: AuditConfig, judge_id: dict, panel_ids: list[dict]) -> None:
    cfg_path = d / "stages" / "_config.json"
    if cfg_path.is_file():
        saved = json.loads(cfg_path.read_text())
        now = json.loads(json.dumps(cfg.to_dict()))
        # a setting added to kvgeom after the folder was written counts as its default there
        defaults = json.loads(json.dumps(AuditConfig().to_dict()))
        saved = {**{k: defaults[k] for k in now if k not in saved and k in defaults}, **saved}
        if saved != now:
            raise AuditError(f"--resume: {d} holds an audit with other settings ({cfg_path}); use another --out "
                             "or the same settings")
    judge_path = d / "stages" / "_judge.json"
    finished = [p for p in (d / "stages").glob("*.json") if not p.name.startswith("_")] if (d / "stages").is_dir() \
        else []
    if judge_path.is_file():
        saved_judge = json.loads(judge_path.read_text())
        if saved_judge != to_jsonable(judge_id):
            raise AuditError(
                f"--resume: {d} was judged by {saved_judge.get('name')!r} {saved_judge.get('settings') or ''} "
                f"({judge_path}), this run by {judge_id.get('name')!r} {judge_id.get('settings') or ''}: resuming "
                "would mix two judges' verdicts in one audit; resume with the same --judge, or use another --out")
    elif finished:
        raise AuditError(f"--resume: {d} holds finished stages but no record of their judge ({judge_path}; written "
                         "by an older kvgeom): run again without --resume, or with another --out")
    panel_path = d / "stages" / "_judges.json"
    saved_panel = json.loads(panel_path.read_text()) if panel_path.is_file() else None
    if saved_panel is None and finished and len(panel_ids) > 1:
        raise AuditError(f"--resume: {d} was judged by one judge ({judge_path}; no {panel_path.name}), this run by "
                         f"{len(panel_ids)}: its finished stages saved no rows for the other judges; resume with "
                         "--judge set to the first judge alone, or use another --out")
    if saved_panel is not None and saved_panel != to_jsonable(panel_ids):
        saved_keys = [j.get("key") for j in saved_panel]
        raise AuditError(f"--resume: {d} was judged by the judges {saved_keys} ({panel_path}), this run by "
                         f"{[j['key'] for j in panel_ids]} (names and settings must match): resume with the same "
                         "--judge list, or use another --out")


def _grown(inputs: AuditInputs, d: Path | None, resume: bool,
           progress: Callable[[str, str], None] | None) -> tuple[AuditInputs, dict]:
    """The adaptive mode's calibration set: drawn now (and saved to ``stages/_calibration.json``), or read back
    from there on ``--resume`` so that a resumed audit uses the same prompts."""
    path = d / "stages" / "_calibration.json" if d is not None else None
    if resume and path is not None and path.is_file():
        record = json.loads(path.read_text())
        pool = calibration_pool(inputs.cfg, inputs.calibration, inputs.held_out)
        every = pd.concat([inputs.calibration.frame, pool.frame]).drop_duplicates("id").set_index("id")
        missing = [i for i in record["calibration_ids"] if i not in every.index]
        if missing:
            raise AuditError(f"--resume: {path} lists calibration prompts {missing[:5]} that the prompt sources no "
                             "longer hold; run again without --resume")
        frame = every.loc[record["calibration_ids"]].reset_index()
        calib = PromptSet(inputs.calibration.name, frame, inputs.calibration.source)
        if progress:
            progress("until-stable", f"resumed: {len(calib)} calibration prompts")
    else:
        grown, record = grow_calibration(inputs, progress=progress)
        calib = grown.calibration
        if path is not None and d is not None:
            _save(d, path, record)
    return dataclasses.replace(inputs, calibration=calib, calibration_record=record), record


def run_audit(
    cfg: AuditConfig,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    model: KVModel | None = None,
    judge: Any = None,
    stages: Sequence[str] | None = None,
    progress: Callable[[str, str], None] | None = None,
    bars: bool = False,
    engine: str | None = None,
) -> AuditResult:
    """Run the audit's stages in order; each finished stage is saved atomically to ``out/stages/NAME.json``.

    ``judge``: a judge object or a registered judge spec (:func:`kvgeom.judges.get_judge`; default the keyword
    judge). ``stages``: names of registered stages (default :func:`kvgeom.audit.default_stages`); a stage's
    declared requirements must be among them or already saved (``resume``).
    ``resume=True`` loads finished stages (written by a run with the same config and judge) instead of
    recomputing them. Writes ``out/audit.json`` and ``out/report.html`` at the end. ``progress(stage, event)`` is
    told of each stage's start/finish (the CLI prints a line per stage); ``bars=True`` adds a tqdm bar of
    generated rows per evaluation, labelled with its stage. Bad input raises :class:`AuditError` before any work:
    settings, numbers and prompt files (:func:`kvgeom.audit.check_config`) and ``out`` (created and written to,
    :func:`kvgeom.io.check_out_dir`) before the model loads; schemes that do not apply to the model and prompts
    longer than its context (:func:`kvgeom.audit.check_model`) right after, before any stage or file.
    ``engine``: shorthand for ``AuditConfig.engine`` (``"llama.cpp"``, ``"vllm"``, ``"hf"``, ``"all"``, ``"none"``,
    ``"auto"``), the engines whose KV formats the ``engine_matrix`` stage judges.
    """
    if engine is not None:
        cfg = dataclasses.replace(cfg, engine=engine)
    check_config(cfg)
    names = tuple(default_stages() if stages is None else stages)
    unknown = [s for s in names if s not in STAGE_REGISTRY]
    if unknown:
        raise AuditError(f"unknown stages {sorted(unknown)}; valid: {', '.join(STAGE_REGISTRY)}")
    names = tuple(sorted(names, key=lambda s: STAGE_REGISTRY[s].order))
    try:
        panel = JudgePanel.from_spec(judge)
        judge_id, panel_ids = panel.identity(), panel.identities()
    except (KeyError, ValueError, TypeError) as err:
        raise AuditError(f"--judge: {err}") from None
    d = Path(out) if out is not None else None
    with contextlib.ExitStack() as stack:
        if d is not None:
            try:
                check_out_dir(d, option="--out")
                stack.enter_context(lock_folder(d, option="--out"))
            except OutputDirError as err:
                raise AuditError(str(err)) from None
            for tmp in [*d.glob(".*.tmp"), *(d / "stages").glob(".*.tmp")]:  # a killed writer's; ours: we hold the lock
                tmp.unlink(missing_ok=True)
            if resume:
                _check_resume(d, cfg, judge_id, panel_ids)
        return _run(cfg, d, names, panel, judge_id, panel_ids, resume=resume, model=model, progress=progress, bars=bars)


def _run(cfg: AuditConfig, d: Path | None, names: tuple[str, ...], panel: JudgePanel, judge_id: dict,
         panel_ids: list[dict], *, resume: bool,
         model: KVModel | None, progress: Callable[[str, str], None] | None, bars: bool) -> AuditResult:
    """:func:`run_audit` once its input is checked and ``d`` is locked."""
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    nonfinite: dict[str, int] = {}
    t_load = time.perf_counter()
    if model is None:
        from kvgeom.models import load_model
        from kvgeom.models.placement import placement_kwargs

        model = load_model(cfg.model, device=cfg.device, **placement_kwargs(cfg.device_map, cfg.max_memory))
    timings["load_model"] = time.perf_counter() - t_load
    inputs = AuditInputs.build(model, cfg, judge=panel, bars=bars, row_cache=cfg.until_stable)
    check_model(inputs)  # schemes that do not apply to this model, prompts longer than its context: before any stage
    if d is not None:
        check_out_space(d, cfg, model)
        _save(d, d / "stages" / "_config.json", cfg.to_dict())
        _save(d, d / "stages" / "_judge.json", judge_id)
        _save(d, d / "stages" / "_judges.json", panel_ids)
    record = None
    if cfg.until_stable:
        inputs, record = _grown(inputs, d, resume, progress)
    for name in names:
        stage = get_stage(name)
        path = d / "stages" / f"{name}.json" if d is not None else None
        saved = _saved_stage(path) if resume and path is not None else None
        if saved is not None:
            results[name] = saved["result"]
            timings[name] = saved["seconds"]
            nonfinite[name] = int(saved.get("nonfinite", 0))
            if rows_path(d, name).is_file():
                inputs.rows_log[name] = [load_rows(d, [name])]
            if progress:
                progress(name, "resumed")
            continue
        if progress:
            progress(name, "start" if not (resume and path is not None and path.is_file())
                     else "start (its saved file does not parse: recomputed)")
        t0 = time.perf_counter()
        inputs.nonfinite.pop(name, None)
        results[name] = stage.run(inputs, stage.results_for(results))
        timings[name] = time.perf_counter() - t0
        nonfinite[name] = inputs.nonfinite.get(name, 0)
        if inputs.rows_log.get(name):  # every judge's verdict on this stage's completions
            inputs.rows_log[name] = [judge_rows(inputs.rows_log[name], panel)]
            if d is not None:
                save_rows(d, name, inputs.rows_log[name][0])
        if path is not None and d is not None:
            _save(d, path, {"result": results[name], "seconds": timings[name], "nonfinite": nonfinite[name]})
        if progress:
            progress(name, f"done in {timings[name]:.1f}s")
        if stage.check is not None:
            stage.check(results[name], inputs)
    audit = {
        "schema_version": 1,
        "model": {"name": cfg.model, **{k: v for k, v in model.describe().items() if k != "name"}},
        "scheme": str(Scheme.parse(cfg.scheme)), "versions": _versions(), "seed": cfg.seed,
        "settings": cfg.to_dict(), "judge": judge_id, "judges": panel_ids,
        **({"calibration": to_jsonable(record)} if record is not None else {}),
        "stages": results,
        "nonfinite": {"rows": sum(nonfinite.values()), "by_stage": {k: v for k, v in nonfinite.items() if v}},
        "timings": timings,
    }
    if d is not None:
        # timings of a resumed run are those recorded when each stage ran; load time is this run's own
        stage_timings = {k: v for k, v in timings.items() if k != "load_model"}
        _save(d, d / "audit.json", {**audit, "timings": stage_timings})
        try:
            render_html(audit, d / "report.html")
        except OSError as err:
            if not is_disk_full(err):
                raise
            raise AuditError(disk_full_error(d, err, kept="; audit.json and every stage are saved")) from None
    return AuditResult(audit=audit, out=d, timings=timings, rows_log=inputs.rows_log)
