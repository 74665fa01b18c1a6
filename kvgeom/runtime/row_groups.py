"""Which batch rows run under which :class:`~kvgeom.quant.QuantPlan`: :class:`RowGroups`, shared by a batch's
forward-mode hooks (:mod:`kvgeom.runtime.plans`) and its cache (:mod:`kvgeom.runtime.plan_cache`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from kvgeom.quant.plan import QuantPlan

__all__ = ["RowGroups"]


def _groups(plans: Sequence[QuantPlan | None]) -> dict[QuantPlan, list[int]]:
    groups: dict[QuantPlan, list[int]] = {}
    for i, p in enumerate(plans):
        if p is not None:
            groups.setdefault(p, []).append(i)
    return groups


class RowGroups:
    """Which batch rows run under which plan; shared by the hooks and the cache of one batch.

    :meth:`select` follows generation when it drops finished rows: the groups are re-indexed and the
    per-device index tensors rebuilt lazily (built once per group and device, never inside a hook loop).
    """

    def __init__(self, plans: Sequence[QuantPlan | None]) -> None:
        self.groups = _groups(plans)
        self._index: dict[tuple[QuantPlan, torch.device], Tensor] = {}
        self.listeners: list[Any] = []

    def items(self):
        return self.groups.items()

    def index(self, plan: QuantPlan, device: torch.device) -> Tensor:
        idx = self._index.get((plan, device))
        if idx is None:  # every group's rows for this device in one copy: pinned and non-blocking on a GPU, so
            # building them does not wait for the queued kernels (a blocking copy per group after every row drop
            # showed as 11 s of waits in a cProfile of the powered 7B audit, docs/benchmarks.md)
            plans = list(self.groups)
            flat = torch.tensor([r for p in plans for r in self.groups[p]], dtype=torch.long)
            flat = (flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device))
            for p, part in zip(plans, flat.split([len(self.groups[p]) for p in plans]), strict=True):
                self._index[(p, device)] = part
            idx = self._index[(plan, device)]
        return idx

    def select(self, keep: Sequence[int]) -> None:
        """Keep batch rows ``keep`` (old indices; in any order, and an index may repeat: a row copied, as a shared
        prefix is copied to every row of its plan, :mod:`kvgeom.runtime.prefix`); tell listeners (caches) which
        rows of each group stay, as each group's old local indices in their new order."""
        where = {r: (plan, j) for plan, rows in self.groups.items() for j, r in enumerate(rows)}
        local: dict[QuantPlan, list[int]] = {plan: [] for plan in self.groups}
        new_rows: dict[QuantPlan, list[int]] = {plan: [] for plan in self.groups}
        for new, old in enumerate(keep):
            hit = where.get(int(old))
            if hit is not None:
                local[hit[0]].append(hit[1])
                new_rows[hit[0]].append(new)
        self.groups = {plan: rows for plan, rows in new_rows.items() if rows}
        self._index.clear()
        for listener in self.listeners:
            listener(local)

    @contextmanager
    def only(self, rows: Sequence[int]) -> Iterator[None]:
        """Restrict the groups to batch rows ``rows`` (renumbered in that order, as :meth:`select` does) for a
        ``with`` block, then restore them exactly: a prefill run in parts (:mod:`kvgeom.runtime.layer_skip`).
        ``only([])``: no plan applies. Refused while a cache listens, since its rows could not follow back."""
        if self.listeners:
            raise RuntimeError("RowGroups.only: a cache follows these groups (a cache-mode plan); its rows cannot be "
                               "restored, so run the batch in one call")
        saved, saved_index = self.groups, self._index
        self._index = {}
        self.select(list(rows))
        try:
            yield
        finally:
            self.groups, self._index = saved, saved_index
