"""Several judges over the same completions: :class:`JudgePanel` (the first decides) and :func:`rejudge`.

``--judge A,B,C`` (``kvgeom audit``, ``kvgeom sweep``; :func:`add_judge_argument` adds the option to any command)
builds a :class:`JudgePanel`: judge ``A`` decides every verdict a run reports, ``B`` and ``C`` re-judge the same
saved completions afterwards (:func:`rejudge`), so that :func:`kvgeom.judge_agreement.compare_judges` can say how
far the judges agree and what flip rate each would have reported.

Settling (``evaluate(..., settle=True)``: a row stops generating once its verdict can no longer change) must hold
for *every* judge of the panel, or a secondary judge would see a completion cut where only the first judge had
made up its mind: :meth:`JudgePanel.settled` is true only when every judge has a ``settled`` method and each says
so. A panel with one classifier judge (no ``settled``) generates every row in full.

A judge may expose ``judge_rows(prompts, completions, *, nll=None) -> DataFrame`` with columns ``verdict``
(a :class:`~kvgeom.judges.Verdict` value or ``None``), ``error`` (``None`` or why the row has no verdict: e.g. a
classifier's malformed answer) and any detail columns (``answer``, ``score``...). :func:`rejudge` uses it when
present, so that one malformed answer is a per-row error state, counted, and not a silent default; a judge
without it gives one verdict per row and no errors.

Tests: ``tests/judges/test_panel.py`` (the first decides; settling needs every judge; identities; per-row errors;
keys of judges with one name).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import pandas as pd

from kvgeom.judges.base import Judge, Verdict, check_lengths, to_verdict
from kvgeom.judges.registry import DEFAULT_JUDGE, get_judges, judge_identity

__all__ = ["JUDGE_HELP", "JudgePanel", "add_judge_argument", "judge_keys", "rejudge"]

#: The ``--judge`` option's help text (one for every command that takes it).
JUDGE_HELP = ("judges NAME[:KEY=VALUE...][,NAME...] from the judge registry; the first decides every verdict, the "
              "others re-judge the same completions for `kvgeom judges compare` (default 'keyword': the paper's "
              "refusal phrases plus the degeneracy rule), e.g. keyword,keyword:phrases=jbb or wildguard,keyword")


def add_judge_argument(parser: argparse.ArgumentParser, *, default: str | None = None) -> argparse.Action:
    """Add ``--judge NAME[,NAME...]`` to ``parser`` (what ``kvgeom audit`` and ``kvgeom sweep`` take; a new
    command such as ``kvgeom validate`` calls this too). Pass the parsed value to :meth:`JudgePanel.from_spec`."""
    return parser.add_argument("--judge", default=default, help=JUDGE_HELP)


def judge_keys(judges: Sequence[Any], specs: Sequence[str | None] | None = None) -> list[str]:
    """One distinct column key per judge: its spec string when it was built from one (``"keyword:phrases=jbb"``),
    else its name; a repeated key gets ``#2``, ``#3``..."""
    keys: list[str] = []
    for i, j in enumerate(judges):
        spec = specs[i] if specs is not None else None
        base = spec if isinstance(spec, str) else str(getattr(j, "name", type(j).__name__))
        key, n = base, 2
        while key in keys:
            key, n = f"{base}#{n}", n + 1
        keys.append(key)
    return keys


class JudgePanel:
    """Judges in order: the first decides (:meth:`judge`), the others re-judge (:func:`rejudge`)."""

    def __init__(self, judges: Sequence[Judge], keys: Sequence[str] | None = None) -> None:
        judges = tuple(judges)
        if not judges:
            raise ValueError("a judge panel needs at least one judge, e.g. JudgePanel.from_spec('keyword')")
        self.judges = judges
        self.keys = tuple(keys) if keys is not None else tuple(judge_keys(judges))
        if len(self.keys) != len(judges) or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"a judge panel needs one distinct key per judge, got {self.keys!r}")
        self.name = judges[0].name if len(judges) == 1 else "panel:" + ",".join(self.keys)

    @classmethod
    def from_spec(cls, specs: str | Sequence[Any] | Judge | None = None) -> JudgePanel:
        """A panel from ``"A,B"`` (:func:`kvgeom.judges.get_judges`), a list of specs or judges, one judge object
        (a panel is returned as it is) or ``None`` (the default judge alone)."""
        if isinstance(specs, JudgePanel):
            return specs
        if specs is not None and not isinstance(specs, str | list | tuple):
            specs = [specs]
        items = None if specs is None else ([s.strip() for s in specs.split(",")] if isinstance(specs, str)
                                            else list(specs))
        judges = get_judges(items if items is not None else None)
        spec_list = [DEFAULT_JUDGE] if items is None else [s if isinstance(s, str) else None for s in items]
        return cls(judges, judge_keys(judges, spec_list))

    @property
    def primary(self) -> Judge:
        """The deciding judge."""
        return self.judges[0]

    @property
    def others(self) -> tuple[Judge, ...]:
        return self.judges[1:]

    def identities(self) -> list[dict[str, Any]]:
        """Each judge's :func:`kvgeom.judges.judge_identity` plus its ``key``, in order (what a run records)."""
        return [{"key": k, **judge_identity(j)} for k, j in zip(self.keys, self.judges, strict=True)]

    def identity(self) -> dict[str, Any]:
        """The deciding judge's identity (so that a one-judge panel is recorded as that judge)."""
        return judge_identity(self.primary)

    def judge(self, prompts: Sequence[str], completions: Sequence[str], *,
              nll: Sequence[float] | None = None) -> list[Verdict]:
        """The deciding judge's verdicts."""
        return list(self.primary.judge(prompts, completions, nll=nll))

    def settled(self, completion: str) -> bool:
        """True only when every judge has ``settled`` and each says the verdict can no longer change."""
        return all(callable(getattr(j, "settled", None)) and j.settled(completion) for j in self.judges)

    @property
    def can_settle(self) -> bool:
        return all(callable(getattr(j, "settled", None)) for j in self.judges)


def _rows_of(judge: Any, prompts: list[str], completions: list[str], nll: list | None) -> pd.DataFrame:
    own = getattr(judge, "judge_rows", None)
    if callable(own):
        table = own(prompts, completions, nll=nll)
        if len(table) != len(completions) or "verdict" not in table or "error" not in table:
            raise TypeError(f"{type(judge).__qualname__}.judge_rows must return one row per completion with "
                            "columns 'verdict' and 'error'")
        return table.reset_index(drop=True)
    verdicts = [to_verdict(v).value for v in judge.judge(prompts, completions, nll=nll)]
    return pd.DataFrame({"verdict": verdicts, "error": [None] * len(verdicts)})


def rejudge(judges: JudgePanel | Sequence[Any] | str, prompts: Sequence[str], completions: Sequence[str], *,
            nll: Sequence[float] | None = None) -> pd.DataFrame:
    """Every judge's verdict on each (prompt, completion): columns ``verdict:KEY`` (a verdict string, or ``None``
    where the judge gave no verdict) and ``error:KEY`` (``None``, or why), one row per completion, in order.
    Detail columns of a judge's ``judge_rows`` (e.g. WildGuard's ``harmful_response``) come as ``KEY:COLUMN``."""
    panel = JudgePanel.from_spec(judges)
    check_lengths(prompts, completions, nll)
    ps, cs = list(prompts), list(completions)
    nl = None if nll is None else list(nll)
    out = pd.DataFrame(index=range(len(cs)))
    for key, judge in zip(panel.keys, panel.judges, strict=True):
        table = _rows_of(judge, ps, cs, nl)
        out[f"verdict:{key}"] = pd.Series([None if v is None or (isinstance(v, float) and v != v)
                                           else to_verdict(v).value for v in table["verdict"]], dtype=object)
        out[f"error:{key}"] = pd.Series([None if e is None or (isinstance(e, float) and e != e) else str(e)
                                         for e in table["error"]], dtype=object)
        for col in table.columns:
            if col not in ("verdict", "error"):
                out[f"{key}:{col}"] = pd.Series(table[col].tolist(), dtype=object)
    return out
