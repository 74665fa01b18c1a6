"""Non-finite K/V in the rows a plan quantizes: flagged per row, never a batch-wide error, never a silent number.

A quantizer's ranges are per row, so NaN/inf in one row's K/V can only poison that row. The plan paths
(:mod:`kvgeom.runtime.plans`) quantize with the finiteness test off and then, once per (layer, role) and forward
call, not per plan, set every row that had NaN/inf at a real position to NaN (:func:`poison_nonfinite_rows`):
the NaN reaches that row's logits, generation flags the row (``Generation.extra["nonfinite"]``) and the audit's
verdict for it is ``nonfinite`` instead of a judge's.
Other rows are quantized exactly as if run alone. Everything stays on the device (no host sync per hook call).
Proved by ``tests/runtime/test_plan.py::test_nonfinite_kv_in_one_row_flags_that_row_only`` (forward and cache
mode, generation and verdicts).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool
from torch import Tensor

__all__ = ["nonfinite_rows", "poison_nonfinite_rows"]


def nonfinite_rows(x: Tensor, mask: Bool[Tensor, "batch pos"] | None) -> Bool[Tensor, " batch"]:
    """Rows of ``x`` (``[batch, pos, kv_head, d_head]``) with a NaN or inf at a real position (``mask`` True;
    ``None`` = every position real)."""
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask[:, :, None, None]
    return bad.flatten(1).any(1)


def poison_nonfinite_rows(x: Tensor, y: Tensor, mask: Bool[Tensor, "batch pos"] | None) -> Tensor:
    """``y`` (the quantized ``x``, rows first) with every row whose input ``x`` had NaN/inf at a real position
    set to NaN in full, so that whatever the quantizer made of the bad values (a saturating cast can map NaN to
    a finite code) the row cannot be judged."""
    bad = nonfinite_rows(x, mask).view(-1, *([1] * (y.ndim - 1)))
    return torch.where(bad, torch.full((), float("nan"), dtype=y.dtype, device=y.device), y)
