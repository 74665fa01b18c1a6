"""The tokens every prompt of a batch starts with, prefilled once per plan instead of once per row.

Chat prompts open with the same template tokens: the default model's (Qwen2.5) system message and user header
are 24 of a bundled harmful prompt's ~43 tokens. Under plans that store each position from its own K/V alone
(:attr:`kvgeom.quant.QuantPlan.per_position`: no range over positions, no streaming state) and with no hooks but
the plans' own, those positions' K/V and every activation above them are the same in each row of a plan:
positions count from a row's first real token and attention is causal. So :func:`prefill_shared` runs the shared
tokens once per distinct plan, copies each plan's cache rows to all of its rows
(:func:`~kvgeom.runtime.forward.select_cache_rows` and :meth:`~kvgeom.runtime.row_groups.RowGroups.select` with
repeated indices), and then runs each row's own tokens, left-padded after the shared ones, against that cache.

The result is the one-call prefill's within float32 rounding: the matmuls run on other shapes, as they do between
batch sizes (``tests/runtime/test_prefix.py``: first-position logits within 1e-4 and the same greedy tokens with
and without sharing, for full precision, forward- and cache-mode plans, per-row mixes, protected channels and
``+rot`` types; plans that are not per position, hooks of the caller's own and a user cache never share).
:func:`kvgeom.runtime.generate` shares by default on the CPU (``share_prefix=None``), where a row costs its matmuls;
on an H200 it saved nothing measurable, so it is off there (docs/benchmarks.md §14).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from kvgeom.quant.plan import QuantPlan
from kvgeom.runtime.forward import Batch, forward, select_cache_rows

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["SharedPrefix", "cache_keeps_every_position", "common_prefix", "prefill_shared", "shared_prefix"]


@dataclass(frozen=True)
class SharedPrefix:
    """How a batch's prefill is split: ``length`` tokens every row starts with, run once for each row in ``reps``
    (one row per distinct plan, in batch order); ``expand[i]``: the index in ``reps`` of row ``i``'s plan."""

    length: int
    reps: tuple[int, ...]
    expand: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"a shared prefix needs at least one token, got length {self.length}")
        if not self.reps or any(not 0 <= r < len(self.expand) for r in self.reps):
            raise ValueError(f"reps {self.reps} must be rows of the batch (0..{len(self.expand) - 1})")
        if any(not 0 <= e < len(self.reps) for e in self.expand):
            raise ValueError(f"expand {self.expand} must index reps (0..{len(self.reps) - 1})")

    @property
    def saved_tokens(self) -> int:
        """Prefill positions not computed: the shared tokens of every row but the representatives."""
        return (len(self.expand) - len(self.reps)) * self.length


def common_prefix(input_ids: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]) -> int:
    """How many tokens every row of a left-padded batch starts with, at most the shortest row's length less one
    (each row keeps a token of its own, whose logits start its generation)."""
    lengths = mask.sum(1)
    most = int(lengths.min()) - 1
    if most < 1:
        return 0
    width = input_ids.shape[1]
    cols = (width - lengths)[:, None] + torch.arange(most)[None]  # each row's first ``most`` real positions
    toks = input_ids.gather(1, cols)
    same = (toks == toks[:1]).all(0)
    return most if bool(same.all()) else int((~same).nonzero()[0])


def cache_keeps_every_position(cache: Any) -> bool:
    """Whether ``cache`` (an HF cache) attends every stored position: no sliding-window or chunked layer. Those
    count their window in cache slots, and a shared prefix puts each row's padding between the prefix and the row's
    own tokens, so a window would drop real prefix tokens where the one-call prefill drops padding (Gemma-2's
    sliding layers, ``tests/runtime/test_prefix.py::test_sliding_window_caches_do_not_share``). A cache of another
    kind (no ``layers``) is not known to, so it does not share either."""
    layers = getattr(cache, "layers", None)
    return layers is not None and not any(getattr(layer, "is_sliding", False) for layer in layers)


def shared_prefix(batch: Batch, plans: Sequence[QuantPlan | None], *, min_tokens: int = 2) -> SharedPrefix | None:
    """The split of ``batch``'s prefill under per-row ``plans`` (``None`` = full precision), or None when a plan is
    not :attr:`~kvgeom.quant.QuantPlan.per_position`, fewer than ``min_tokens`` tokens are shared, or every row has
    its own plan (nothing would be saved)."""
    if len(plans) != len(batch):
        raise ValueError(f"{len(plans)} plans for a batch of {len(batch)} rows: pass one per row")
    if any(p is not None and not p.per_position for p in dict.fromkeys(plans)):
        return None
    n = common_prefix(batch.input_ids, batch.mask)
    if n < min_tokens:
        return None
    first: dict[QuantPlan | None, int] = {}
    for p in plans:
        first.setdefault(p, len(first))
    if len(first) == len(plans):
        return None
    reps = tuple(plans.index(p) for p in first)
    return SharedPrefix(length=n, reps=reps, expand=tuple(first[p] for p in plans))


def prefill_shared(
    model: KVModel,
    batch: Batch,
    prefix: SharedPrefix,
    *,
    cache: Any,
    select: Callable[[list[int]], None] | None = None,
) -> tuple[Float[Tensor, "batch 1 vocab"], Bool[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Prefill ``batch`` into ``cache`` (empty) in two calls: the shared tokens for ``prefix.reps``, copied to every
    row, then each row's own tokens. ``select(rows)`` re-indexes the plan groups (a plan run's ``select``) with the
    cache. Returns the last position's logits, the attention mask (the shared tokens, then each row's own
    left-padded) and the position ids of the second call, which decoding continues from."""
    n, dev = prefix.length, model.device
    ids, mask = batch.input_ids, batch.mask
    b, width = ids.shape
    lengths = mask.sum(1)
    start = int(width - lengths[prefix.reps[0]])
    head = ids[prefix.reps[0], start:start + n].expand(len(prefix.reps), n)
    if select is not None:
        select(list(prefix.reps))
    forward(model, head, torch.ones_like(head, dtype=torch.bool), past_key_values=cache,
            position_ids=torch.arange(n).expand(len(prefix.reps), n), step=0, logits_to_keep=1)
    expand = torch.tensor(prefix.expand, dtype=torch.long)
    if select is not None:
        select(list(prefix.expand))
    select_cache_rows(cache, expand.to(dev))
    own = lengths - n  # each row's tokens after the shared ones, its last ``own`` tokens
    w = int(own.max())
    own_mask = torch.arange(w)[None] >= (w - own)[:, None]
    own_ids = ids[:, width - w:].masked_fill(~own_mask, model.pad_token_id)
    full_mask = torch.cat([torch.ones((b, n), dtype=torch.bool), own_mask], dim=1).to(dev)
    pos = (n + own_mask.long().cumsum(-1) - 1).masked_fill(~own_mask, 1).to(dev)
    logits = forward(model, own_ids, full_mask, past_key_values=cache, position_ids=pos, step=0, logits_to_keep=1)
    return logits, full_mask, pos
