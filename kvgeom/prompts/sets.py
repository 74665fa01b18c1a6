"""The :class:`PromptSet` value: an immutable, named table of prompts (columns ``id``, ``prompt``,
``category``), and :class:`PromptLoadError`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd

__all__ = ["PromptLoadError", "PromptSet"]


class PromptLoadError(ValueError):
    """A prompt set could not be loaded; the message says what was expected and what to do."""


@dataclass(frozen=True, eq=False)
class PromptSet:
    """An immutable, named table of prompts.

    ``frame`` has at least the columns ``id`` (str), ``prompt`` (non-empty str) and ``category``
    (str or NA) and a 0..n-1 index. Treat it as read-only; :meth:`to_frame` returns a copy.
    """

    name: str
    frame: pd.DataFrame = field(repr=False)
    source: str = ""

    def __post_init__(self) -> None:
        missing = [c for c in ("id", "prompt", "category") if c not in self.frame.columns]
        if missing:
            raise PromptLoadError(
                f"PromptSet {self.name!r}: frame lacks column(s) {missing}; "
                f"columns found: {list(self.frame.columns)}"
            )
        bad = [i for i, p in enumerate(self.frame["prompt"]) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise PromptLoadError(f"PromptSet {self.name!r}: rows {bad[:10]} have an empty or non-text prompt")
        object.__setattr__(self, "frame", self.frame.reset_index(drop=True))

    @property
    def prompts(self) -> list[str]:
        return self.frame["prompt"].tolist()

    @property
    def ids(self) -> list[str]:
        return self.frame["id"].tolist()

    def __len__(self) -> int:
        return len(self.frame)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def __repr__(self) -> str:
        return f"PromptSet(name={self.name!r}, n={len(self)}, source={self.source!r})"

    def head(self, n: int) -> PromptSet:
        """The first ``n`` prompts (all of them when ``n >= len(self)``)."""
        check_count(n, "head(n)")
        return PromptSet(self.name, self.frame.head(n), self.source)

    def sample(self, n: int, seed: int = 0) -> PromptSet:
        """``n`` prompts drawn without replacement with ``numpy`` seed ``seed``, kept in file order.

        Two sets of equal length sampled with the same ``n`` and ``seed`` keep the same row positions,
        so the row pairing of ``harmful`` and ``harmless`` survives sampling.
        """
        check_count(n, "sample(n)")
        if n > len(self):
            raise ValueError(f"cannot sample {n} prompts from {self.name!r}, which has only {len(self)}")
        picked = self.frame.sample(n=n, random_state=seed).sort_index()
        return PromptSet(self.name, picked, self.source)

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()


def check_count(n: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} needs a positive integer, got {n!r}")
