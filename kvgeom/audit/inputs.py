"""What every stage reads besides earlier results, built once per audit: :class:`AuditInputs`.

The config's derived inputs live here: the prompt splits (loaded once, not per stage), the judge, and the
evaluation call with the audit's settings (batch size, tokens, settling, the progress bar labelled with the
stage). The sites are the config's own (:attr:`AuditConfig.quant_site`, :attr:`AuditConfig.key_site`).
Proved by ``tests/audit/test_audit.py`` (a resumed audit equals an uninterrupted one) and
``tests/audit/test_stage_registry.py`` (the splits are loaded once per audit).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from kvgeom.evaluate import evaluate, plan_label
from kvgeom.judges import Verdict
from kvgeom.prompts import PromptSet, load_prompts

from .config import AuditConfig, AuditError, assignment_plan, split_prompts

if TYPE_CHECKING:
    from kvgeom.models import KVModel
    from kvgeom.quant.plan import QuantPlan

__all__ = ["ROW_COLUMNS", "AuditInputs", "plan_verdicts"]

#: The columns of an evaluated row that an audit keeps for its judges (``out/rows/STAGE.jsonl``).
ROW_COLUMNS = ("stage", "split", "prompt_id", "plan", "prompt", "completion", "verdict", "settled", "n_tokens",
               "stopped_at_eos", "shared_prefix", "skipped_layers", "nll")


def plan_verdicts(rows: pd.DataFrame, plan: str) -> pd.Series:
    """The verdicts of one plan in :func:`kvgeom.evaluate.evaluate`'s rows, indexed by prompt id."""
    return rows[rows["plan"] == plan].set_index("prompt_id")["verdict"]


@dataclass(frozen=True)
class AuditInputs:
    """The model, the config and the inputs derived from it, shared read-only by every stage of one audit.

    ``calibration`` / ``held_out``: the harmful prompt splits (:func:`kvgeom.audit.split_prompts`);
    ``borderline``: the over-refusal prompts (first ``n_borderline``); ``judge``: the judge object every
    evaluation uses (``None`` = the default judge); ``bars``: a tqdm bar per evaluation, labelled with its stage;
    ``row_cache``: when a dict (the adaptive mode, :mod:`kvgeom.audit.adaptive`), every generated row is kept by
    (prompt id, prompt, plan, settings) and a stage rerun on a grown prompt set generates only the new rows;
    ``calibration_record``: how the adaptive mode grew the calibration set (its trajectory), for the label stage;
    ``nonfinite``: stage -> rows of its evaluations whose logits were NaN/inf (verdict ``nonfinite``), which
    :func:`kvgeom.audit.run_audit` saves with each stage and reports in ``audit.json``;
    ``rows_log``: every evaluated row, by stage (:meth:`record`), that :func:`kvgeom.audit.run_audit` saves to
    ``out/rows/STAGE.jsonl`` with each judge's verdict (:func:`kvgeom.judges.rejudge`) and the ``judges`` stage
    compares.
    """

    model: KVModel
    cfg: AuditConfig
    calibration: PromptSet
    held_out: PromptSet
    borderline: PromptSet
    judge: Any = None
    bars: bool = False
    row_cache: dict | None = field(default=None, compare=False, repr=False)
    calibration_record: Mapping[str, Any] | None = None
    nonfinite: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    rows_log: dict | None = field(default=None, compare=False, repr=False)

    @classmethod
    def build(cls, model: KVModel, cfg: AuditConfig, *, judge: Any = None, bars: bool = False,
              row_cache: bool = False) -> AuditInputs:
        calib, held = split_prompts(cfg)
        border = load_prompts(cfg.borderline, limit=cfg.n_borderline)
        return cls(model, cfg, calib, held, border, judge=judge, bars=bars, row_cache={} if row_cache else None,
                   rows_log={})

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, kept under ``key`` when the row cache is on (e.g. the perplexity, which does not depend
        on the prompts)."""
        if self.row_cache is None:
            return compute()
        store = self.row_cache.setdefault("values", {})
        if key not in store:
            store[key] = compute()
        return store[key]

    def plan(self, scheme: str, **kw: Any) -> QuantPlan:
        """:meth:`AuditConfig.plan`: ``scheme`` with the audit's mode and site."""
        return self.cfg.plan(scheme, **kw)

    def assignment_plan(self, assignment: Sequence[str | None], name: str | None = None) -> QuantPlan | None:
        """:func:`kvgeom.audit.assignment_plan` with this audit's config."""
        return assignment_plan(self.cfg, assignment, name)

    # ---- prompts -----------------------------------------------------------------------------------------
    def split(self, name: str) -> PromptSet:
        """``"calibration"`` or ``"held_out"``."""
        return {"calibration": self.calibration, "held_out": self.held_out}[name]

    def harmless_pairs(self, calib: PromptSet | None = None) -> list[str]:
        """Harmless prompts matched to the calibration prompts (the bundled sets pair row i with row i)."""
        cfg = self.cfg
        calib = calib if calib is not None else self.calibration
        harmless = load_prompts(cfg.harmless)
        harmful = load_prompts("harmful") if cfg.harmful == "harmful" and cfg.harmless == "harmless" else None
        if harmful is not None and set(calib.ids) <= set(harmful.ids):
            pos = harmful.frame.reset_index().set_index("id").loc[calib.ids, "index"].tolist()
            return harmless.frame["prompt"].iloc[pos].tolist()
        if len(harmless) < len(calib):
            raise AuditError(f"{cfg.harmless}: {len(harmless)} harmless prompts, need at least n_calib={len(calib)}")
        return harmless.prompts[: len(calib)]

    def flip_prompts(self, prompts: PromptSet, base: pd.Series) -> PromptSet:
        """The prompts a conditional flip rate needs: those refused at full precision (all if not
        ``refused_only``)."""
        if not self.cfg.refused_only:
            return prompts
        refused = set(base.index[base == Verdict.REFUSED.value])
        keep = prompts.frame[prompts.frame["id"].isin(refused)]
        return PromptSet(prompts.name, keep, prompts.source)

    # ---- evaluation --------------------------------------------------------------------------------------
    def record(self, stage: str, rows: pd.DataFrame) -> None:
        """Keep ``rows`` (evaluated rows: prompt id, prompt, plan, completion, verdict...) under ``stage`` for the
        judges (:data:`ROW_COLUMNS`); an id ``split\x1fid`` (:meth:`evaluate_splits`) names its split, any other
        id is looked up in the calibration, held-out and borderline sets. Rows the screen skipped
        (``screened``) are left out."""
        if self.rows_log is None or rows is None or not len(rows):
            return
        if "screened" in rows:  # rows the screen skipped have no completion for another judge to read
            rows = rows[~rows["screened"].astype(bool)]
            if not len(rows):
                return
        split, _, ids = rows["prompt_id"].astype(str).str.rpartition("\x1f").T.to_numpy()
        where = {**{i: "borderline" for i in self.borderline.ids}, **{i: "held_out" for i in self.held_out.ids},
                 **{i: "calibration" for i in self.calibration.ids}}
        split = [s or where.get(i, "other") for s, i in zip(split, ids, strict=True)]
        keep = rows.assign(prompt_id=ids, split=split, stage=stage)
        self.rows_log.setdefault(stage, []).append(keep[[c for c in ROW_COLUMNS if c in keep]])

    def evaluate(self, prompts: PromptSet, plans: list, *, stage: str, settle: bool | None = None,
                 **kw: Any) -> pd.DataFrame:
        """:func:`kvgeom.evaluate.evaluate` with the audit's settings (batch size, tokens, judge, settling)."""
        cfg = self.cfg
        settle = cfg.settle if settle is None else settle

        def run(ps: PromptSet) -> pd.DataFrame:
            return evaluate(self.model, ps, plans, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                            judge=self.judge, settle=settle, progress=stage if self.bars else False, **kw)

        if self.row_cache is None:
            return self._count(stage, run(prompts))
        rows = self.row_cache.setdefault((settle, tuple(sorted(kw.items()))), {})
        keys = {plan_label(p): repr(p) for p in plans}
        f = prompts.frame
        need = [not all((i, t, k) in rows for k in keys.values()) for i, t in zip(f["id"], f["prompt"], strict=True)]
        if any(need):
            new = run(PromptSet(prompts.name, f[need], prompts.source))
            for r in new.to_dict(orient="records"):
                rows[(r["prompt_id"], r["prompt"], keys[r["plan"]])] = r
        return self._count(stage, pd.DataFrame([rows[(i, t, k)] for k in keys.values()
                                                for i, t in zip(f["id"], f["prompt"], strict=True)]))

    def _count(self, stage: str, rows: pd.DataFrame) -> pd.DataFrame:
        """Record the rows of one evaluation (:meth:`record`) and add its NaN/inf rows to ``nonfinite[stage]``;
        return ``rows``."""
        self.record(stage, rows)
        n = int((rows["verdict"] == Verdict.NONFINITE.value).sum())
        self.nonfinite[stage] = self.nonfinite.get(stage, 0) + n
        return rows

    def evaluate_flips(self, prompts: PromptSet, base: pd.Series, plans: list, *,
                       stage: str) -> tuple[pd.DataFrame, dict | None]:
        """:meth:`evaluate` on :meth:`flip_prompts` (the refused-at-baseline prompts of a conditional flip rate);
        with ``--screen`` only the rows the screen keeps are decoded (:mod:`kvgeom.audit.screening`) and the
        screen's record comes back with the rows (else ``None``)."""
        flips = self.flip_prompts(prompts, base)
        if not self.cfg.screen:
            return self.evaluate(flips, plans, stage=stage), None
        from .screening import screened_evaluate

        return screened_evaluate(self, flips, plans, stage=stage)

    def evaluate_splits(self, splits: Mapping[str, PromptSet], plans: list, *, stage: str,
                        **kw: Any) -> dict[str, pd.DataFrame]:
        """One :meth:`evaluate` over several prompt sets (full batches instead of one small batch per set), split
        back into one table per set with the sets' own prompt ids."""
        frames = [ps.frame.assign(id=[f"{name}\x1f{i}" for i in ps.frame["id"]]) for name, ps in splits.items()]
        rows = self.evaluate(PromptSet("audit", pd.concat(frames, ignore_index=True)), plans, stage=stage, **kw)
        split_of, _, ids = rows["prompt_id"].str.partition("\x1f").T.to_numpy()
        rows = rows.assign(prompt_id=ids)
        return {name: rows[split_of == name].reset_index(drop=True) for name in splits}
