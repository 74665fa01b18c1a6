"""llama.cpp's rotated cache types (``q8_0+rot`` ... ``q5_1+rot``) by a fused block kernel between two rotations.

The eager math (:func:`kvgeom.quant.formats.ggml.ggml_kv`) is: rotate each head vector's blocks of ``n`` by
``H_n/sqrt(n)`` (:func:`kvgeom.quant.hadamard.fwht`, fp32 butterflies), quantize blocks of 32 with the llama.cpp
type, rotate back. :class:`RotatedKernel` runs the same two rotations (the same torch function on the same fp32
values) around the block kernel of the unrotated type (:mod:`.block`, bit-identical to the eager block quantizer),
so its result is the eager path's bit for bit while the ~60 eager ops of the block quantizer become one launch.
Padding positions (mask False) are returned unchanged, as the eager path returns them. ``iq4_nl+rot`` has no block
kernel and stays eager.

Proved by ``tests/quant/test_triton_kernels.py`` (``q*_+rot`` in ``COVERED``: random inputs, ties, padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvgeom.quant.hadamard import fwht, rotation_block

from .common import Kernel

__all__ = ["RotatedKernel"]


@dataclass(frozen=True)
class RotatedKernel:
    """``inner`` (a per-position kernel) between llama.cpp's Hadamard rotations of the role's block size."""

    inner: Kernel

    def supported(self, x: Tensor) -> bool:
        return self.inner.supported(x)

    def launch(self, x: Tensor, out: Tensor, mask: Tensor | None, role: str) -> None:
        n = rotation_block(x.shape[-1], role)  # type: ignore[arg-type]
        y = fwht(x.to(torch.float32), n).contiguous()  # per position: padding values never reach a real one
        q = torch.empty_like(y)
        self.inner.launch(y, q, mask, role)
        back = fwht(q, n).to(x.dtype)
        if mask is not None:
            back = torch.where(mask.view(torch.bool)[:, :, None, None], back, x)
        out.copy_(back)
