"""Running the stages in order, each saved atomically; ``resume`` loads finished stages."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from kvgeom.quant import Scheme

from .config import STAGE_ORDER, AuditConfig, AuditError, check_config
from .stages import STAGES

if TYPE_CHECKING:
    from kvgeom.models import KVModel


# ---- running ---------------------------------------------------------------------------------------------
def _atomic_json(path: Path, data: Any) -> None:
    from kvgeom.report import to_jsonable

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(to_jsonable(data), fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    def frame(self, stage: str) -> pd.DataFrame:
        """One stage's result as a table (:func:`kvgeom.audit.stage_frame`)."""
        from .frames import stage_frame

        if stage not in self.audit["stages"]:
            raise KeyError(f"stage {stage!r} was not run; stages here: {', '.join(self.audit['stages'])}")
        return stage_frame(stage, self.audit["stages"][stage])


def run_audit(
    cfg: AuditConfig,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    model: KVModel | None = None,
    judge: Any = None,
    stages: tuple[str, ...] = STAGE_ORDER,
    progress: Callable[[str, str], None] | None = None,
    bars: bool = False,
) -> AuditResult:
    """Run the audit's stages in order; each finished stage is saved atomically to ``out/stages/NAME.json``.

    ``judge``: a :class:`kvgeom.judges.Judge` (default :class:`~kvgeom.judges.KeywordJudge`).
    ``resume=True`` loads finished stages (written by a run with the same config) instead of recomputing them.
    Writes ``out/audit.json`` and ``out/report.html`` at the end. ``progress(stage, event)`` is told of each
    stage's start/finish (the CLI prints a line per stage); ``bars=True`` adds a tqdm bar of generated rows per
    evaluation, labelled with its stage. Bad input raises :class:`AuditError` before any work.
    """
    check_config(cfg)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise AuditError(f"unknown stages {sorted(unknown)}; valid: {', '.join(STAGES)}")
    d = Path(out) if out is not None else None
    if d is not None:
        cfg_path = d / "stages" / "_config.json"
        if resume and cfg_path.is_file():
            saved = json.loads(cfg_path.read_text())
            if saved != json.loads(json.dumps(cfg.to_dict())):
                raise AuditError(f"--resume: {d} holds an audit with other settings ({cfg_path}); use another --out "
                                 "or the same settings")
        _atomic_json(cfg_path, cfg.to_dict())
    ctx: dict[str, Any] = {"_judge": judge}
    timings: dict[str, float] = {}
    t_load = time.perf_counter()
    if model is None:
        from kvgeom.models import load_model

        model = load_model(cfg.model, device=cfg.device)
    timings["load_model"] = time.perf_counter() - t_load
    for name in stages:
        path = d / "stages" / f"{name}.json" if d is not None else None
        if resume and path is not None and path.is_file():
            saved = json.loads(path.read_text())
            ctx[name] = saved["result"]
            timings[name] = saved["seconds"]
            if progress:
                progress(name, "resumed")
            continue
        if progress:
            progress(name, "start")
        t0 = time.perf_counter()
        ctx["_bar"] = name if bars else None
        ctx[name] = STAGES[name](model, cfg, ctx)
        timings[name] = time.perf_counter() - t0
        if path is not None:
            _atomic_json(path, {"result": ctx[name], "seconds": timings[name]})
        if progress:
            progress(name, f"done in {timings[name]:.1f}s")
        if name == "baseline" and not ctx[name]["calibration"]["k"]:
            raise AuditError(
                f"{cfg.model} refuses none of the {ctx[name]['calibration']['n']} calibration prompts at full "
                "precision, so there are no refusals for quantization to break: audit a safety-tuned chat model, "
                "or pass --harmful with prompts it refuses (the baseline was saved; --resume continues from it)")
    audit = {
        "schema_version": 1,
        "model": {"name": cfg.model, **{k: v for k, v in model.describe().items() if k != "name"}},
        "scheme": str(Scheme.parse(cfg.scheme)), "versions": _versions(), "seed": cfg.seed,
        "settings": cfg.to_dict(),
        "stages": {k: v for k, v in ctx.items() if not k.startswith("_")},
        "timings": timings,
    }
    if d is not None:
        from kvgeom.report import render_html

        # timings of a resumed run are those recorded when each stage ran; load time is this run's own
        _atomic_json(d / "audit.json", {**audit, "timings": {k: v for k, v in timings.items() if k != "load_model"}})
        render_html(audit, d / "report.html")
    return AuditResult(audit=audit, out=d, timings=timings)
