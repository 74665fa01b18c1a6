"""Decoder layers below a row's first quantized layer, read from one full-precision prefill instead of recomputed.

A forward-mode plan that quantizes only layer ``L`` and up (a layer sweep's one-layer plans, a channel ablation at
the critical layer) leaves layers ``0..L-1`` at full precision: there each row of a prompt computes exactly what the
full-precision prefill of that prompt computes, whatever the plan. So :func:`prefill_skipping` prefills each distinct
prompt of a batch once at full precision (its K/V at every layer and the output of the layers where some row's
quantization starts), then runs the rows in groups of equal first quantized layer ``L``: layers below ``L`` are
stand-ins that store the full-precision K/V in the row's cache and hand on the full-precision hidden state, and
layers ``L`` and up run as usual under the rows' plans. The groups' caches are joined in batch order and decoding
continues as after a one-call prefill. In a layer sweep over ``n`` layers this computes about half the prefill's
layer-rows (the mean of ``n - L``), plus one full-precision row per prompt.

The result is the one-call prefill's within float32 rounding (the full-precision layers run on other matmul shapes,
as between batch sizes): ``tests/runtime/test_layer_skip.py`` proves first-position logits within 1e-4 and the same
greedy tokens with and without skipping, for every architecture whose caches keep every position, with per-row mixes
of one-layer, multi-layer and full-precision rows, protected channels and left padding; a mutation that skips one
layer too many, or feeds one prompt's state to another's row, fails it. A batch skips only when every plan is in mode
``forward`` (a cache-mode plan's :class:`~kvgeom.runtime.plan_cache.PlanCache` follows every row from layer 0), no
cache of the caller's and no hooks but the plans' own are open (those may read any layer), the model has no
sliding-window layer, and the layer-rows saved, less the full-precision pass's, exceed 10% of the batch's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from kvgeom.quant.plan import QuantPlan
from kvgeom.runtime.forward import Batch, forward, new_cache, position_ids_from_mask

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["LayerSkip", "first_quantized_layer", "layer_skip", "prefill_skipping"]


def first_quantized_layer(plan: QuantPlan | None, n_layers: int) -> int:
    """The lowest layer ``plan`` changes: ``n_layers`` for full precision (or a plan quantizing no layer), 0 for a
    cache-mode plan (its cache follows every layer)."""
    if plan is None:
        return n_layers
    if plan.mode != "forward":
        return 0
    return next((layer for layer in range(n_layers) if plan.quantizes(layer)), n_layers)


@dataclass(frozen=True)
class LayerSkip:
    """How a batch's prefill skips layers: ``first[i]``, row ``i``'s first quantized layer (rows below it read the
    full-precision prefill); ``reps``, one row per distinct prompt (the full-precision pass's rows);
    ``source[i]``, the index in ``reps`` of row ``i``'s prompt; ``n_layers``, the model's."""

    first: tuple[int, ...]
    reps: tuple[int, ...]
    source: tuple[int, ...]
    n_layers: int

    def __post_init__(self) -> None:
        if len(self.first) != len(self.source):
            raise ValueError(f"first ({len(self.first)} rows) and source ({len(self.source)}) need one entry per row")
        if any(not 0 <= f <= self.n_layers for f in self.first):
            raise ValueError(f"first layers {self.first} must lie in 0..{self.n_layers}")
        if not self.reps or any(not 0 <= r < len(self.first) for r in self.reps):
            raise ValueError(f"reps {self.reps} must be rows of the batch (0..{len(self.first) - 1})")
        if any(not 0 <= s < len(self.reps) for s in self.source):
            raise ValueError(f"source {self.source} must index reps (0..{len(self.reps) - 1})")

    @property
    def saved_layer_rows(self) -> int:
        """Layer-rows not computed (the layers skipped in every row) less those of the full-precision pass."""
        return sum(self.first) - len(self.reps) * self.n_layers

    def groups(self) -> dict[int, list[int]]:
        """Rows by first quantized layer, lowest layer first."""
        out: dict[int, list[int]] = {}
        for i, f in sorted(enumerate(self.first), key=lambda x: x[1]):
            out.setdefault(f, []).append(i)
        return out


def layer_skip(batch: Batch, plans: Sequence[QuantPlan | None], n_layers: int, *,
               min_saved: float = 0.1) -> LayerSkip | None:
    """The split of ``batch``'s prefill under per-row ``plans``, or None when it saves at most ``min_saved`` of the
    batch's layer-rows (a cache-mode plan saves nothing: :func:`first_quantized_layer`)."""
    if len(plans) != len(batch):
        raise ValueError(f"{len(plans)} plans for a batch of {len(batch)} rows: pass one per row")
    first = tuple(first_quantized_layer(p, n_layers) for p in plans)
    rows = [tuple(r) for r in batch.input_ids.tolist()]  # a batch's padding is the same for the same prompt
    slot: dict[tuple, int] = {}
    for r in rows:
        slot.setdefault(r, len(slot))  # distinct prompts in batch order
    skip = LayerSkip(first=first, reps=tuple(rows.index(r) for r in slot), source=tuple(slot[r] for r in rows),
                     n_layers=n_layers)
    if skip.saved_layer_rows <= min_saved * len(batch) * n_layers:
        return None
    return skip


def decoder_layers(model: KVModel) -> torch.nn.ModuleList:
    """The HF model's list of decoder layers (the bridge's blocks), the list its forward loops over."""
    from kvgeom.models.placement import decoder_layer_names

    hf = model.hf_model
    return hf.get_submodule(decoder_layer_names(hf, model.n_layers)[0].rpartition(".")[0])


@contextmanager
def _outputs_of(layers: Sequence[torch.nn.Module], which: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Record the hidden-state output of ``layers[i]`` for ``i`` in ``which`` while the block runs."""
    got: dict[int, Tensor] = {}
    handles = []

    def keep(i: int) -> Callable[..., None]:
        def hook(_mod: Any, _args: Any, out: Any) -> None:
            if not isinstance(out, Tensor):
                raise TypeError(f"decoder layer {i} returned {type(out).__name__}, not a hidden-state tensor: "
                                "layer skipping does not support this architecture; pass skip_layers=False")
            got[i] = out

        return hook

    try:
        for i in which:
            handles.append(layers[i].register_forward_hook(keep(i)))
        yield got
    finally:
        for h in handles:
            h.remove()


class _StandIn(torch.nn.Module):
    """Decoder layer ``index`` of a group whose quantization starts above it: stores the full-precision K/V of the
    group's ``rows`` (from cache ``kv``) in the call's cache, and returns ``hidden[rows]`` (the full-precision
    output of this layer, for the layer below the group's first) or else its input unchanged."""

    def __init__(self, index: int, kv: Any, rows: Tensor, hidden: Tensor | None) -> None:
        super().__init__()
        self.index, self.kv, self.rows, self.hidden = index, kv, rows, hidden

    def forward(self, hidden_states: Tensor, *args: Any, past_key_values: Any = None, **kwargs: Any) -> Tensor:
        src = self.kv.layers[self.index]
        idx = self.rows.to(src.keys.device)
        past_key_values.update(src.keys.index_select(0, idx), src.values.index_select(0, idx), self.index)
        if self.hidden is None:
            return hidden_states
        return self.hidden.index_select(0, self.rows.to(self.hidden.device))


@contextmanager
def _stand_ins(layers: torch.nn.ModuleList, below: int, kv: Any, hidden: Tensor, rows: Tensor) -> Iterator[None]:
    """Layers ``0..below-1`` of ``layers`` replaced by :class:`_StandIn` s for a ``with`` block; always restored."""
    real = [layers[i] for i in range(below)]
    try:
        for i in range(below):
            layers[i] = _StandIn(i, kv, rows, hidden if i == below - 1 else None)
        yield
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer


def prefill_skipping(
    model: KVModel,
    batch: Batch,
    skip: LayerSkip,
    *,
    cache: Any,
    only: Callable[[list[int]], AbstractContextManager[Any]],
) -> tuple[Float[Tensor, "batch 1 vocab"], Bool[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Prefill ``batch`` into ``cache`` (an empty HF ``DynamicCache``): one full-precision pass over ``skip.reps``,
    then one call per group of rows with one first quantized layer, its lower layers stood in for, the groups'
    caches joined in batch order. ``only(rows)`` restricts the plans to those rows for a ``with`` block (a plan
    run's :meth:`~kvgeom.runtime.plans.PlanRun.only`; ``only([])``: no plan applies). Returns the last position's
    logits, the attention mask and the position ids, as a one-call prefill would."""
    dev, n = model.device, skip.n_layers
    ids, mask = batch.input_ids.to(dev), batch.mask.to(dev)
    pos = position_ids_from_mask(mask)
    layers = decoder_layers(model)
    groups = skip.groups()
    reps = torch.tensor(skip.reps, device=dev)
    fp = new_cache(model)
    with only([]), _outputs_of(layers, sorted({f - 1 for f in groups if f > 0})) as hidden:
        forward(model, ids[reps], mask[reps], past_key_values=fp, position_ids=pos[reps], step=0, logits_to_keep=1)
    logits, caches, order = [], [], []
    source = torch.tensor(skip.source, device=dev)
    for f, rows in groups.items():
        r = torch.tensor(rows, device=dev)
        part = new_cache(model)
        with ExitStack() as stack:
            stack.enter_context(only(rows))
            if f > 0:
                stack.enter_context(_stand_ins(layers, f, fp, hidden[f - 1], source[r]))
            logits.append(forward(model, ids[r], mask[r], past_key_values=part, position_ids=pos[r], step=0,
                                  logits_to_keep=1))
        caches.append(part)
        order += rows
    back = torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=dev)  # batch row -> joined row
    for i in range(n):
        keys = torch.cat([c.layers[i].keys for c in caches])
        values = torch.cat([c.layers[i].values for c in caches])
        idx = back.to(keys.device)
        cache.update(keys.index_select(0, idx), values.index_select(0, idx), i)
    return torch.cat(logits).index_select(0, back.to(logits[0].device)), mask, pos
