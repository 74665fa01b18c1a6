"""How much memory a batch needs, against what the device has free: checked before anything is allocated.

:func:`free_memory` is what the model's device can still give: on a GPU ``torch.cuda.mem_get_info`` plus what
PyTorch's allocator holds reserved but unused; on the CPU the kernel's ``MemAvailable`` (``psutil`` when
installed, else ``/proc/meminfo``, else ``os.sysconf``), lowered to a cgroup v2 ``memory.max`` when one is set.

:func:`batch_bytes` is an upper estimate of what one forward-and-generate batch allocates beyond the weights::

    KV cache      rows × (prompt + new tokens) × layers × 2 × kv_heads × d_head × dtype bytes
    attention     rows × heads × prompt² × 4 bytes × 2        (eager scores and probabilities, fp32, one layer)
    hidden        rows × prompt × (6 d_model + 3 d_mlp) × dtype bytes   (one layer's transient tensors)
    logits        rows × logit positions × vocab × 4 bytes × 2

:func:`memory_token_limit` is the longest row (prompt + new tokens) whose one-row batch fits in
:data:`SAFETY` of the free memory; :func:`kvgeom.runtime.fit_prompts` refuses a longer prompt (or truncates it,
when asked) exactly as one longer than the context, naming the memory limit. :func:`fit_batch` is the largest
batch, at most the one asked for, whose rows fit together; :func:`kvgeom.runtime.generate` and
:func:`kvgeom.runtime.capture` run smaller batches when the asked one would not fit (results do not depend on the
batch size). Nothing here allocates a tensor.
Proved by ``tests/runtime/test_memory.py`` (the estimate grows with rows and tokens; a prompt over the memory
limit is refused before any batch, naming the limit, the free memory and the fix; truncation fits it; the batch
is lowered to what fits; a capture bigger than the CPU's free memory is refused).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["SAFETY", "MemoryLimitError", "batch_bytes", "fit_batch", "free_memory", "memory_token_limit"]

#: the share of the free memory one batch may plan to use (the rest: fragmentation, the estimate's slack)
SAFETY = 0.8


class MemoryLimitError(ValueError):
    """Work that would not fit in the device's free memory; the message names the need, the free memory and the
    fix."""


def _cgroup_room() -> int | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def _cpu_available() -> int | None:
    try:
        import psutil

        avail: int | None = int(psutil.virtual_memory().available)
    except ImportError:
        avail = None
    if avail is None:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            avail = None
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


def free_memory(device: torch.device | str) -> int | None:
    """Bytes the device can still allocate (see the module docstring); None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, idle))
    if device.type == "cpu":
        return _cpu_available()
    return None


def _d_mlp(model: KVModel) -> int:
    config = model.hf_model.config
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "intermediate_size", None) or 4 * model.d_model)


def batch_bytes(model: KVModel, rows: int, prompt_tokens: int, *, new_tokens: int = 0, logit_positions: int = 1,
                extra_per_row: int = 0) -> int:
    """Upper estimate of the bytes one batch of ``rows`` rows of ``prompt_tokens`` tokens allocates (module
    docstring), generating ``new_tokens`` and computing logits at ``logit_positions`` positions per row;
    ``extra_per_row``: bytes the caller keeps per row besides (captured activations)."""
    e = torch.empty((), dtype=model.dtype).element_size()
    p, t = int(prompt_tokens), int(prompt_tokens) + int(new_tokens)
    kv = rows * t * model.n_layers * 2 * model.n_kv_heads * model.d_head * e
    attention = rows * model.n_heads * p * p * 4 * 2
    hidden = rows * p * (6 * model.d_model + 3 * _d_mlp(model)) * e
    logits = rows * max(1, min(int(logit_positions), t)) * model.facts.vocab_size * 4 * 2
    return int(kv + attention + hidden + logits + rows * extra_per_row)


def _budget(model: KVModel) -> tuple[int, int] | None:
    free = free_memory(model.device)
    return None if free is None else (int(free * SAFETY), free)


def memory_token_limit(model: KVModel, *, new_tokens: int = 0, logit_positions: int = 1) -> tuple[int, int] | None:
    """``(limit, free)``: the most tokens (prompt + ``new_tokens``) one row may have for a one-row batch to fit in
    :data:`SAFETY` of the free memory, and the free bytes; None when the free memory cannot be told."""
    budget = _budget(model)
    if budget is None:
        return None
    allowed, free = budget
    lo, hi = 0, 1
    while batch_bytes(model, 1, hi, new_tokens=new_tokens, logit_positions=logit_positions) <= allowed:
        lo, hi = hi, hi * 2
        if hi > 2**40:
            return hi, free
    while hi - lo > 1:  # largest prompt length that fits, by bisection on the monotone estimate
        mid = (lo + hi) // 2
        if batch_bytes(model, 1, mid, new_tokens=new_tokens, logit_positions=logit_positions) <= allowed:
            lo = mid
        else:
            hi = mid
    return lo + new_tokens, free


def fit_batch(model: KVModel, batch_size: int, prompt_tokens: int, *, new_tokens: int = 0,
              logit_positions: int = 1, extra_per_row: int = 0) -> int:
    """The largest batch of at most ``batch_size`` rows of ``prompt_tokens`` tokens that fits in :data:`SAFETY`
    of the free memory (at least 1: a row that does not fit alone is :func:`memory_token_limit`'s to refuse)."""
    budget = _budget(model)
    if budget is None:
        return batch_size
    per_row = batch_bytes(model, 1, prompt_tokens, new_tokens=new_tokens, logit_positions=logit_positions,
                          extra_per_row=extra_per_row)  # the estimate is linear in the rows
    return max(1, min(batch_size, budget[0] // max(1, per_row)))
