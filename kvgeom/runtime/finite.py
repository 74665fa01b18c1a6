"""NaN/inf detection for the K/V a plan quantizes, without a device-to-host sync per hook call on a GPU:
:class:`FiniteGuard` (used by :mod:`kvgeom.runtime.plans`). Proved by ``tests/runtime/test_plan.py`` (the
non-finite K/V tests)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FiniteGuard"]


class FiniteGuard:
    """NaN/inf detection without a device-to-host sync per hook call (GPU): flags accumulate on the device
    per site and are checked once when the plans' context exits."""

    def __init__(self) -> None:
        self.flags: dict[str, Tensor] = {}

    def note(self, x: Tensor, mask: Tensor | None, site: str) -> None:
        bad = ~torch.isfinite(x)
        if mask is not None:
            bad = bad & mask[:, :, None, None]
        flag = bad.any()
        self.flags[site] = flag if site not in self.flags else self.flags[site] | flag

    def check(self) -> None:
        if not self.flags:
            return
        names = list(self.flags)
        hit = torch.stack([self.flags[n].cpu() for n in names]).tolist()
        bad = [n for n, h in zip(names, hit, strict=True) if h]
        if bad:
            raise ValueError(f"non-finite K/V at real positions at site(s) {', '.join(bad)}; quantization ranges "
                             "would be poisoned. Run the model in fp32/bf16 or fix the upstream activations.")
