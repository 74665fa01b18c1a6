"""llama.cpp's rotated cache types (``q8_0+rot`` ... ``q5_1+rot``, ``iq4_nl+rot``) in one fused kernel: rotate,
quantize, rotate back.

The eager math (:func:`kvgeom.quant.formats.ggml.ggml_kv`) is: rotate each head vector's blocks of ``n`` by
``H_n/sqrt(n)`` (:func:`kvgeom.quant.hadamard.fwht`: fp32 butterflies ``[a + b, a - b]`` on halves of growing
size, then one multiply by ``1/sqrt(n)``), quantize blocks of 32 with the llama.cpp type, rotate back.
:func:`_rotated_kernel` holds ``ROWS`` rotation blocks per program in registers and runs the very same fp32
operations in the same order (each butterfly stage is one reshape/split/join of the tile, each add and subtract
one IEEE rounding, no fma: ``enable_fp_fusion=False``), the block quantizer of the unrotated type
(:func:`kvgeom.quant.triton.block.ggml_quant`, bit-identical to the eager one) in between, so its result is the
eager path's bit for bit in one launch instead of ~50 (the eager butterflies are 3 ops per stage, 7 stages,
twice per call). Padding positions (mask False) are returned unchanged, as the eager path returns them: a rotation
block never straddles positions, so padding values never reach a real one. ``iq4_nl+rot`` runs here too.

Proved by ``tests/quant/test_triton_kernels.py`` (``q*_+rot`` in ``COVERED``: random inputs, ties, padding, every
input dtype, d_head 64 and 128, i.e. K blocks of 64 and 128 and V blocks of 64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import triton
import triton.language as tl
from torch import Tensor

from kvgeom.quant.hadamard import rotation_block

from .block import BlockKernel, ggml_quant
from .common import IO_CODES, TUNE, io_view, load_rows, store

__all__ = ["RotatedKernel", "wht_tile"]

QK: tl.constexpr = tl.constexpr(32)  # llama.cpp's block of values along d_head


@triton.jit
def wht_tile(y, ROWS: tl.constexpr, N: tl.constexpr, LOG: tl.constexpr):
    """:func:`kvgeom.quant.hadamard.wht` on each row of the ``[ROWS, N]`` tile (``N = 2**LOG``): stage ``s`` pairs
    ``a`` = first and ``b`` = second half of each run of ``2h`` values (``h = 2**s``) into ``[a + b, a - b]``."""
    for s in tl.static_range(LOG):
        t = tl.reshape(y, [ROWS, N >> (s + 1), 2, 1 << s])
        a, b = tl.split(tl.permute(t, [0, 1, 3, 2]))
        t = tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2])
        y = tl.reshape(t, [ROWS, N])
    return y


@triton.jit
def _rotated_kernel(x_ptr, out_ptr, mask_ptr, n_rows, inv_sqrt_n, NR: tl.constexpr, ROWS: tl.constexpr,
                    N: tl.constexpr, LOG: tl.constexpr, KIND: tl.constexpr, P1: tl.constexpr, IO: tl.constexpr,
                    HAS_MASK: tl.constexpr, I64: tl.constexpr):
    """``ROWS`` rotation blocks of ``N`` values per program (``NR`` blocks per position)."""
    offs, ok, x, raw, real = load_rows(x_ptr, mask_ptr, n_rows, NR, ROWS, N, IO, HAS_MASK, I64)
    # padding zeroed before the rotation: eager zeroes it before quantizing, and a block never straddles positions
    b = tl.reshape(wht_tile(x, ROWS, N, LOG) * inv_sqrt_n, [ROWS * (N // QK), QK])  # the blocks of 32
    e = tl.arange(0, QK)
    lane = (e < QK)[None, :]
    lo = tl.min(b, axis=1)
    hi = tl.max(b, axis=1)
    q = ggml_quant(b, b, e, lane, lo, hi, KIND, P1, 0, QK)  # fp32 values: the quantizer's fp32 (IO 0) path
    back = wht_tile(tl.reshape(q, [ROWS, N]), ROWS, N, LOG) * inv_sqrt_n
    store(out_ptr, offs, ok, back, raw, real[:, None], IO)


@dataclass(frozen=True)
class RotatedKernel:
    """``inner`` (a llama.cpp type's :class:`~kvgeom.quant.triton.block.BlockKernel`, blocks of 32 within a head)
    between llama.cpp's Hadamard rotations of the role's block size, fused into one kernel."""

    inner: BlockKernel

    def __post_init__(self) -> None:
        if not (self.inner.within_head and self.inner.block == QK):
            raise ValueError(f"RotatedKernel wraps a llama.cpp type's kernel (blocks of {QK} within a head), "
                             f"got {self.inner}")

    def supported(self, x: Tensor) -> bool:
        return self.inner.supported(x)

    def mix_code(self) -> int | None:
        """The inner type's row code, odd: rotated (:mod:`kvgeom.quant.triton.mixed`)."""
        code = self.inner.mix_code()
        return None if code is None else code + 1

    def launch(self, x: Tensor, out: Tensor, mask: Tensor | None, role: str) -> None:
        n = rotation_block(x.shape[-1], role)  # type: ignore[arg-type]
        has_mask = mask is not None
        m = mask if mask is not None else x  # x: placeholder, never read
        B, P, H, D = x.shape
        n_rows = B * P * H * D // n
        rows = max(1, TUNE["block_elems"] // n)
        _rotated_kernel[(triton.cdiv(n_rows, rows),)](
            io_view(x), io_view(out), m, n_rows, 1.0 / math.sqrt(n), NR=H * D // n, ROWS=rows, N=n,
            LOG=n.bit_length() - 1, KIND=self.inner.kind, P1=float(self.inner.p1), IO=IO_CODES[x.dtype],
            HAS_MASK=has_mask, I64=x.numel() + rows * n >= 2**31,
            num_warps=min(16, max(TUNE["block_warps"], rows * n // 512)), enable_fp_fusion=False)
