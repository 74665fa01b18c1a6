"""Running per-row :class:`~kvgeom.quant.QuantPlan` s in forward passes and generation.

A forward or generation call takes one plan per batch row (``None`` = full precision). Rows with equal plans
are quantized together; a row's result equals running its plan on its own, because every scheme's ranges are
per row and padding never enters a range (``tests/runtime/test_plan.py``:
``test_per_row_plans_equal_separate_runs_forward_pass`` and ``..._generation``; the hooks equal ``fake_quant``,
the cache holds what :class:`~kvgeom.quant.StreamQuantizer` stores, protected channels stay exact).

* mode ``forward`` plans become K/V hooks (:func:`kvgeom.runtime.hooks.kv_hooks`) that fake-quantize what each
  forward call produces.
* mode ``cache`` plans replace HF's ``DynamicCache`` with :class:`PlanCache`: what enters the KV cache is
  quantized with the scheme's streaming rules (:class:`kvgeom.quant.StreamQuantizer`: static ranges fixed at
  prefill for ``tensor``, ``channel`` and ``@amax``; KIVI's full-precision residual window).
  ``prefill="quantized"`` (vLLM-like): every call's attention, the prompt's own included, reads the
  quantized cache. ``prefill="full"`` (HF ``QuantizedCache``-like): each call's own new positions are
  attended at full precision, while everything from earlier calls is read quantized.

Protected key channels are zeroed before quantization (so their magnitude does not set any range; for
``asym`` schemes a zero can still widen a range that excluded it) and restored exactly afterwards. Values are
not affected. A row whose K/V hold NaN/inf at a real position comes out NaN in full, so its logits are flagged
per row and its verdict is ``nonfinite`` (:mod:`kvgeom.runtime.finite`); the other rows are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kvgeom.quant.fake import fake_quant
from kvgeom.quant.plan import QuantPlan
from kvgeom.quant.scheme import Scheme
from kvgeom.runtime.finite import poison_nonfinite_rows
from kvgeom.runtime.forward import Batch, forward, new_cache, position_ids_from_mask
from kvgeom.runtime.hooks import HookSession, kv_hooks
from kvgeom.runtime.plan_cache import PlanCache, channel_index, plan_cache_class
from kvgeom.runtime.query import query_hook, query_layers
from kvgeom.runtime.row_groups import RowGroups

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = [
    "PlanCache",
    "PlanRun",
    "RowGroups",
    "apply_plans",
    "forward_with_plans",
    "normalise_plans",
    "plan_cache_class",
]


def normalise_plans(plans: QuantPlan | str | Sequence[QuantPlan | str | None] | None, n: int) -> list:
    """One plan (or None) per row; a single plan or scheme string applies to every row."""
    if plans is None or isinstance(plans, (QuantPlan, str)):
        one = QuantPlan(plans) if isinstance(plans, str) else plans
        return [one] * n
    plans = [QuantPlan(p) if isinstance(p, str) else p for p in plans]
    if len(plans) != n:
        raise ValueError(f"got {len(plans)} plans for {n} prompts: pass one plan per prompt (None = full "
                         "precision), or a single plan for all")
    return plans


def _protected_quant(x: Tensor, plan: QuantPlan, layer: int, role: str, fn: Any) -> Tensor:
    """Apply ``fn(x, mask)`` (a quantizer) keeping protected key channels at full precision."""
    chans = plan.channels(layer) if role == "k" else ()
    if not chans:
        return fn(x)
    heads, dims = channel_index(tuple(chans), x.device)
    kept = x[:, :, heads, dims].clone()
    x0 = x.clone()
    x0[:, :, heads, dims] = 0
    y = fn(x0).clone()
    y[:, :, heads, dims] = kept
    return y


# ---- forward mode: hooks --------------------------------------------------------------------------
def _forward_hook(groups: RowGroups):
    def hook(x: Tensor, ctx: Any) -> Tensor | None:
        role = "v" if ctx.site == "v" else "k"
        out = None
        call_mask = ctx.call.mask_on(x.device)  # copied once per call and device, not per hook
        for plan, _rows in groups.items():
            if plan.mode != "forward" or not plan.quantizes(ctx.layer):
                continue
            if role == "k" and ctx.site != plan.site:
                continue
            idx = groups.index(plan, x.device)  # built once per group: no host-to-device copy per hook call
            mask = call_mask[idx] if call_mask is not None else None
            scheme = plan.scheme_for(ctx.layer)
            xi = x[idx]

            def quantize(t: Tensor, _s: Scheme = scheme, _m: Tensor | None = mask, _r: str = role) -> Tensor:
                return fake_quant(t, _s, role=_r, mask=_m, site=ctx.name, check_finite=False)

            y = _protected_quant(xi, plan, ctx.layer, role, quantize)
            if out is None:
                out = x.clone()
            out[idx] = y
        # once per call, not per plan: a row with NaN/inf here comes out NaN in full (kvgeom.runtime.finite)
        return out if out is None else poison_nonfinite_rows(x, out, call_mask)

    return hook


# ---- the context that runs a batch under its plans -------------------------------------------------
@contextmanager
def apply_plans(model: KVModel, plans: Sequence[QuantPlan | None]) -> Iterator[Any]:
    """Install what a batch's per-row plans need; yields a cache factory ``f(model, batch) -> cache``.

    Forward-mode plans become K/V hooks; cache-mode plans become a :class:`PlanCache`, and those with ``query=``
    a Q hook at site ``rot_q`` (:mod:`kvgeom.runtime.query`). Use with
    :func:`kvgeom.runtime.generate` / :func:`kvgeom.runtime.forward.forward` on a batch of ``len(plans)`` rows
    (``generate(..., plans=...)`` does this for you).
    """
    for p in {p for p in plans if p is not None}:
        p.validate(model)
    groups = RowGroups(plans)
    fwd = [p for p in groups.groups if p.mode == "forward"]
    with ExitStack() as stack:
        sites = sorted({p.site for p in fwd} | ({"v"} if fwd else set()))
        layers = sorted({lay for p in fwd for lay in range(model.n_layers) if p.quantizes(lay)})
        hook = _forward_hook(groups) if fwd else (lambda x, ctx: None)
        session = stack.enter_context(
            kv_hooks(model, hook, sites=sites or ("v",), layers=layers if fwd else [0])
        )
        sessions = [session]
        if q_layers := query_layers(groups.groups, model.n_layers):  # query=: Q as llama.cpp's flash attention
            sessions.append(stack.enter_context(kv_hooks(model, query_hook(groups), sites=("rot_q",),
                                                         layers=q_layers)))
        yield PlanRun(groups, session, len(plans), any(p.mode == "cache" for p in groups.groups), sessions)


class PlanRun:
    """What :func:`apply_plans` yields: call it as a cache factory ``run(model, batch)``; ``run.select(keep)``
    drops finished rows from the plan groups (and from the cache it built, via
    :func:`~kvgeom.runtime.forward.select_cache_rows`). ``sessions``: the hook sessions the plans opened (the K/V
    hooks' ``session`` first), so that a caller can tell them from hooks of its own."""

    def __init__(self, groups: RowGroups, session: HookSession, n_rows: int, needs_cache: bool,
                 sessions: Sequence[HookSession] = ()) -> None:
        self.groups, self.session, self.n_rows, self.needs_cache = groups, session, n_rows, needs_cache
        self.sessions = tuple(sessions) or (session,)

    def __call__(self, model: KVModel, batch: Batch) -> Any:
        if len(batch) != self.n_rows:
            raise ValueError(f"batch has {len(batch)} rows but {self.n_rows} plans were given")
        if self.needs_cache:
            return PlanCache(model, self.groups, self.session)
        return new_cache(model)

    def select(self, keep: Sequence[int]) -> None:
        self.groups.select(list(keep))

    def only(self, rows: Sequence[int]) -> AbstractContextManager[None]:
        """The plans restricted to batch ``rows`` for a ``with`` block (:meth:`RowGroups.only`)."""
        return self.groups.only(rows)


def forward_with_plans(
    model: KVModel,
    input_ids: Tensor,
    mask: Tensor,
    plans: Sequence[QuantPlan | None],
    *,
    chunk: int | None = None,
    logits_to_keep: int | None = None,
) -> Tensor:
    """Logits of one forward pass (no generation) with per-row plans; ``[batch, pos, vocab]``.

    Cache-mode plans read the quantized cache during this pass (``prefill="quantized"``). With
    ``prefill="full"`` a single pass would never read quantized K/V, so the sequence is fed in chunks of
    ``chunk`` tokens (default 64 when any row has such a plan): each chunk attends to its own K/V in full
    precision and to earlier chunks' quantized K/V. ``logits_to_keep=k``: logits of the last ``k``
    positions only.
    """
    if len(plans) != input_ids.shape[0]:
        raise ValueError(f"{len(plans)} plans for a batch of {input_ids.shape[0]} rows: pass one per row")
    with apply_plans(model, plans) as factory:
        cache = factory(model, Batch(input_ids, mask, [], [0] * len(plans)))
        if chunk is None and any(p is not None and p.mode == "cache" and p.prefill == "full" for p in plans):
            chunk = 64
        if not chunk or chunk >= input_ids.shape[1]:
            return forward(model, input_ids, mask, past_key_values=cache, logits_to_keep=logits_to_keep)
        pos = position_ids_from_mask(mask)
        outs = []
        for start in range(0, input_ids.shape[1], chunk):
            stop = min(start + chunk, input_ids.shape[1])
            outs.append(forward(model, input_ids[:, start:stop], mask[:, :stop], past_key_values=cache,
                                position_ids=pos[:, start:stop], step=0 if start == 0 else 1))
        logits = torch.cat(outs, dim=1)
        return logits[:, -logits_to_keep:] if logits_to_keep else logits
