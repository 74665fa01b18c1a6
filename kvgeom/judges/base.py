"""Verdicts, the :class:`Judge` protocol, and the verdict table.

Every judge maps (prompt, completion) pairs to a :class:`Verdict`:

* ``REFUSED`` -- the completion declines the request;
* ``COMPLIED`` -- a fluent completion that does not refuse (whether it is actually *harmful* is a
  different question, for a classifier such as WildGuard or LlamaGuard; plug one in through the
  :class:`Judge` protocol and :func:`kvgeom.judges.register_judge`);
* ``DEGENERATE`` -- not a refusal and not language either (:mod:`kvgeom.judges.degeneracy`). Aggressive
  KV-cache quantization produces a lot of this, and counting it as "complied" would overstate jailbreaks,
  counting it as "refused" would hide the collapse; :mod:`kvgeom.stats` reports the two kinds of flip
  separately;
* ``NONFINITE`` -- no judge's verdict: the model's logits were NaN or inf while generating the row (fp16
  overflow, an aggressive scheme), so its text is an artefact of argmax over NaN. :func:`kvgeom.evaluate.evaluate`
  gives it to such rows in place of the judge's verdict; judges never return it, and :mod:`kvgeom.stats` leaves
  such rows out of every rate and test and counts them (``FlipStats.nonfinite``), so they are never counted as
  refused, complied or flipped.

A judge has a ``name`` and ``judge(prompts, completions, *, nll=None) -> list[Verdict]``. Optional extras
that kvgeom uses when present: ``settled(completion) -> bool`` (the verdict can no longer change as more
text is generated: :func:`kvgeom.evaluate.evaluate` with ``settle=True`` stops such rows early) and
``identity() -> dict`` (what :func:`kvgeom.judges.judge_identity` records; it has a fallback).

Tests: ``tests/judges/test_judges.py`` (``test_protocol_and_verdicts``, ``test_verdict_frame``,
``test_bad_inputs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol, runtime_checkable

import pandas as pd

__all__ = ["Judge", "Verdict", "check_lengths", "to_verdict", "verdict_frame"]


class Verdict(StrEnum):
    """What a completion did with the request (a ``str`` enum: ``Verdict.REFUSED == "refused"``)."""

    REFUSED = "refused"
    COMPLIED = "complied"
    DEGENERATE = "degenerate"
    NONFINITE = "nonfinite"


def to_verdict(value: Verdict | str) -> Verdict:
    """A :class:`Verdict` from a Verdict or its value (case-insensitive), e.g. ``"refused"``."""
    if isinstance(value, Verdict):
        return value
    if isinstance(value, str):
        try:
            return Verdict(value.strip().lower())
        except ValueError:
            pass
    raise ValueError(f"not a verdict: {value!r}; expected one of {[v.value for v in Verdict]}")


@runtime_checkable
class Judge(Protocol):
    """Anything that turns (prompt, completion) pairs into verdicts: keyword rules, WildGuard, LlamaGuard...

    ``nll`` (optional) holds one mean per-token NLL of each completion under the full-precision model.
    """

    name: str

    def judge(
        self, prompts: Sequence[str], completions: Sequence[str], *, nll: Sequence[float] | None = None
    ) -> list[Verdict]: ...


def check_lengths(prompts: Sequence[str], completions: Sequence[str], nll: Sequence[float] | None) -> None:
    """Raise unless ``prompts``, ``completions`` (and ``nll`` if given) are lists of one length."""
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("pass lists of prompts and completions, not a single string (wrap it in a list)")
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions: pass one completion "
                         "per prompt, in the same order")
    if nll is not None and len(nll) != len(completions):
        raise ValueError(f"got {len(nll)} NLL values for {len(completions)} completions: pass one per completion "
                         "(NaN or None where unknown), or nll=None")


def verdict_frame(
    prompts: Sequence[str], completions: Sequence[str], verdicts: Sequence[Verdict | str],
    *, ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """A table with columns ``id`` (if given), ``prompt``, ``completion``, ``verdict`` (the string value)."""
    check_lengths(prompts, completions, None)
    if len(verdicts) != len(prompts):
        raise ValueError(f"got {len(verdicts)} verdicts for {len(prompts)} prompts: pass one per prompt")
    data: dict[str, list] = {}
    if ids is not None:
        if len(ids) != len(prompts):
            raise ValueError(f"got {len(ids)} ids for {len(prompts)} prompts: pass one per prompt")
        data["id"] = list(ids)
    data["prompt"] = list(prompts)
    data["completion"] = list(completions)
    data["verdict"] = [to_verdict(v).value for v in verdicts]
    return pd.DataFrame(data)
