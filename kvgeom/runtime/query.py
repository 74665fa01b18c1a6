"""The query hook of cache-mode plans with ``query=`` (llama.cpp's Q converted to q8_0 before ``Q·K``).

:func:`query_hook` returns the hook :func:`kvgeom.runtime.plans.apply_plans` installs at site ``rot_q`` (post-RoPE
queries ``[batch, pos, head, d_head]``, before the attention reads the cache) on the layers such plans quantize
with a llama.cpp K type (a layer whose K is another format keeps Q exact, as in llama.cpp): for each plan's rows
it replaces Q by :func:`kvgeom.quant.query.query_fake_quant` with the layer's K format (its Hadamard block when K
is ``+rot``); other rows, and padding positions, are left as they are. Q never enters the KV cache, so only this
call's attention sees the change. Proved by ``tests/runtime/test_query_plan.py`` (equal to a
manual fake-quant of Q at ``rot_q``; per-row plans equal separate runs).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kvgeom.quant.fake import resolve_spec
from kvgeom.quant.query import query_fake_quant, query_spec_error

__all__ = ["query_hook", "query_layers"]


def query_layers(plans: Any, n_layers: int) -> list[int]:
    """The layers where some cache-mode plan in ``plans`` quantizes Q."""
    qp = [p for p in plans if p.mode == "cache" and p.query is not None]
    return sorted({lay for p in qp for lay in range(n_layers) if _applies(p, lay)})


def _applies(plan: Any, layer: int) -> bool:
    """Whether ``plan`` quantizes Q at ``layer``: a cache-mode plan with ``query=`` quantizing the layer, whose K
    there is a llama.cpp type (llama.cpp converts Q to q8_0 only for a quantized K)."""
    return (plan.mode == "cache" and plan.query is not None and plan.quantizes(layer)
            and query_spec_error(resolve_spec(plan.scheme_for(layer), "k")) is None)


def query_hook(groups: Any):
    """The ``rot_q`` hook for :class:`kvgeom.runtime.plans.RowGroups` ``groups`` (re-read at every call, so it
    follows rows dropped during generation)."""

    def hook(x: Tensor, ctx: Any) -> Tensor | None:
        out = None
        for plan, _rows in groups.items():
            if not _applies(plan, ctx.layer):
                continue
            idx = groups.index(plan, x.device)
            call_mask = ctx.call.mask_on(x.device)
            mask = call_mask[idx] if call_mask is not None and call_mask.shape[1] == x.shape[1] else None
            y = query_fake_quant(x[idx], resolve_spec(plan.scheme_for(ctx.layer), "k"), plan.query, mask)
            if out is None:
                out = x.clone()
            out[idx] = y
        return out

    return hook
