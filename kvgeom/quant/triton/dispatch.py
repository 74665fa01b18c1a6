"""``fake_quant`` by a format's fused kernel: :func:`fused_fake_quant` asks the spec for its kernel
(:meth:`kvgeom.quant.formats.KVFormat.kernel`) and runs it where it covers the input, else returns None and the
caller takes the eager path. The kernels know nothing of specs; each format maps itself onto one, and the
dispatch asks a spec only what :class:`FusableFormat` names.

Proved by ``tests/quant/test_triton_kernels.py`` (covered schemes equal eager; uncovered ones return None).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Protocol

import torch
from torch import Tensor

from .common import Kernel, launchable

__all__ = ["OPT_IN", "FusableFormat", "fused_fake_quant", "supported"]


class FusableFormat(Protocol):
    """What the dispatch asks of a spec (:class:`kvgeom.quant.formats.KVFormat` declares both)."""

    def check(self, x: Tensor) -> None:
        """Raise the eager path's error for a shape the format cannot take."""
        ...

    def kernel(self) -> Kernel | None:
        """The format's fused kernel, None when it has none."""
        ...

#: specs whose kernels have passed only under the Triton interpreter, not yet on a GPU: ``fake_quant`` uses them
#: with ``backend="triton"`` only, never by default (``"auto"``). Empty: KIVI's kernel left it once its CUDA
#: bit-identity tests passed on an H200 (docs/benchmarks.md §2).
OPT_IN: tuple[type, ...] = ()


def supported(x: Tensor, spec: FusableFormat) -> bool:
    """Whether :func:`fused_fake_quant` has a kernel for ``spec`` on this tensor (device, dtype, shape)."""
    kernel = spec.kernel()
    return kernel is not None and launchable(x) and kernel.supported(x)


def fused_fake_quant(x: Tensor, spec: FusableFormat, role: str, mask: Tensor | None = None) -> Tensor | None:
    """``fake_quant(x, spec, role=role, mask=mask)`` by Triton kernels, or None where not covered.

    Expects an input already validated by :func:`kvgeom.quant.fake.check_input` (finite at real positions);
    ``spec.check(x)`` raises the eager path's error for a shape the format cannot take. The result is
    contiguous with ``x``'s shape and dtype, bit-identical to the eager path.
    """
    spec.check(x)
    kernel = spec.kernel()
    if kernel is None or not launchable(x) or not kernel.supported(x):
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    m = mask.contiguous().view(torch.uint8) if mask is not None else None
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        kernel.launch(x, out, m, role)
    return out
