"""Batch rows of different llama.cpp cache types in one launch: :func:`mixed_launch`.

A batch that decodes every llama.cpp format at once (the engine matrix: each row under its own format, and the fix
candidates' per-layer types) would launch one kernel per (layer, role, format), plus a gather and a scatter of the
format's rows; on a GPU each of those is host time, so a 7B decode step's cost grew with the number of formats in the
batch, not with its rows (docs/benchmarks.md §13). :func:`_mixed_kernel` reads each row's type from a small code
table and runs that type's block quantizer (:func:`kvgeom.quant.triton.block.ggml_quant`) on the row, between the
Hadamard rotations where the type is ``+rot`` (:func:`kvgeom.quant.triton.rotated.wht_tile`): the same jit functions,
the same fp32 operations in the same order as the one-format kernels, so each row gets the bits its own format's
kernel (and the eager math) gives it. Rows with code -1 are copied unchanged.

A row's code is its format's kernel's ``mix_code()`` (:meth:`kvgeom.quant.triton.block.BlockKernel.mix_code`,
:meth:`kvgeom.quant.triton.rotated.RotatedKernel.mix_code`): ``2 * type + rotated``, the type's place in
:func:`~kvgeom.quant.triton.block.ggml_blocks`' table, which :func:`_quant_type`'s branches follow.
Proved by ``tests/quant/test_triton_kernels.py::test_mixed_rows_equal_each_rows_own_format``
(every type, with and without ``+rot``, padding, every input dtype) and
``::test_plan_cache_mixes_llama_cpp_rows_with_the_same_bits`` (a cache-mode batch with a format per row gives the
logits and tokens it gives with the mix off).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from torch import Tensor

from .block import ggml_quant
from .common import GRID_YZ, IO_CODES, IQ4_NL, Q8_0, Q_0, Q_1, TUNE, io_view, load, store
from .rotated import QK, wht_tile

__all__ = ["mixed_launch"]


@triton.jit
def _quant_type(b, e, lane, lo, hi, T: tl.constexpr):
    """Type ``T`` (q8_0, q4_0, q5_0, q4_1, q5_1, iq4_nl) on fp32 rows of 32 (the one-format kernels' quantizer,
    fp32 path)."""
    if T == 0:
        q = ggml_quant(b, b, e, lane, lo, hi, Q8_0, 127.0, 0, QK)
    elif T == 1:
        q = ggml_quant(b, b, e, lane, lo, hi, Q_0, 8.0, 0, QK)
    elif T == 2:
        q = ggml_quant(b, b, e, lane, lo, hi, Q_0, 16.0, 0, QK)
    elif T == 3:
        q = ggml_quant(b, b, e, lane, lo, hi, Q_1, 15.0, 0, QK)
    elif T == 4:
        q = ggml_quant(b, b, e, lane, lo, hi, Q_1, 31.0, 0, QK)
    else:
        q = ggml_quant(b, b, e, lane, lo, hi, IQ4_NL, 127.0, 0, QK)
    return q


@triton.jit
def _mixed_kernel(x_ptr, out_ptr, mask_ptr, code_ptr, row_elems, inv_sqrt_n, PD: tl.constexpr, ROWS: tl.constexpr,
                  N: tl.constexpr, LOG: tl.constexpr, IO: tl.constexpr, HAS_MASK: tl.constexpr, I64: tl.constexpr):
    """Program (i, b): ``ROWS`` blocks of ``N`` values (``N`` the rotation block, or 32) of batch row ``b``, laid out
    ``[pos, kv_head, d_head]`` (``PD`` values per position), quantized with the row's code."""
    i = tl.program_id(0)
    b = tl.program_id(1)
    if I64:
        i = i.to(tl.int64)
        b = b.to(tl.int64)
    code = tl.load(code_ptr + b)
    blk = i * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, N)
    ok = (blk < row_elems // N)[:, None] & (col < N)[None, :]
    local = blk[:, None] * N + col[None, :]
    offs = b * row_elems + local
    x, raw = load(x_ptr, offs, ok, IO)
    if code < 0:
        tl.store(out_ptr + offs, raw, mask=ok)  # not quantized: the input as it is
    else:
        if HAS_MASK:
            real = tl.load(mask_ptr + b * (row_elems // PD) + local // PD, mask=ok, other=0) != 0
        else:
            real = ok
        rot = (code % 2) == 1
        if rot:
            y = wht_tile(x, ROWS, N, LOG) * inv_sqrt_n
        else:
            y = x
        blocks = tl.reshape(tl.where(real, y, 0.0), [ROWS * (N // QK), QK])  # eager zeroes padding first
        e = tl.arange(0, QK)
        lane = (e < QK)[None, :]
        lo = tl.min(blocks, axis=1)
        hi = tl.max(blocks, axis=1)
        t = code // 2
        if t == 0:
            q = _quant_type(blocks, e, lane, lo, hi, 0)
        elif t == 1:
            q = _quant_type(blocks, e, lane, lo, hi, 1)
        elif t == 2:
            q = _quant_type(blocks, e, lane, lo, hi, 2)
        elif t == 3:
            q = _quant_type(blocks, e, lane, lo, hi, 3)
        elif t == 4:
            q = _quant_type(blocks, e, lane, lo, hi, 4)
        else:
            q = _quant_type(blocks, e, lane, lo, hi, 5)
        q = tl.reshape(q, [ROWS, N])
        if rot:
            q = wht_tile(q, ROWS, N, LOG) * inv_sqrt_n
        store(out_ptr, offs, ok, q, raw, real, IO)


def mixed_launch(x: Tensor, out: Tensor, mask: Tensor | None, codes: Tensor, n: int) -> None:
    """Write each row of contiguous ``x`` ``[batch, pos, kv_head, d_head]`` quantized with its code (``codes``:
    int32 ``[batch]`` on ``x``'s device, -1 = copied) into ``out``; ``mask``: uint8 ``[batch, pos]`` (None: all real);
    ``n``: the rotation block of the role (:func:`kvgeom.quant.hadamard.rotation_block`; any multiple of 32 that
    divides d_head when no row is ``+rot``)."""
    B, P, H, D = x.shape
    if B > GRID_YZ:
        raise ValueError(f"mixed llama.cpp rows: {B} batch rows, more than one launch takes ({GRID_YZ})")
    if D % n or n % 32 or n & (n - 1):
        raise ValueError(f"mixed llama.cpp rows: block {n} must be a power of two, a multiple of 32 dividing "
                         f"d_head={D}")
    rows = max(1, TUNE["block_elems"] // n)
    row_elems = P * H * D
    m = mask if mask is not None else x  # x: placeholder, never read
    grid = (triton.cdiv(row_elems // n, rows), B)
    _mixed_kernel[grid](
        io_view(x), io_view(out), m, codes, row_elems, 1.0 / math.sqrt(n), PD=H * D, ROWS=rows, N=n,
        LOG=n.bit_length() - 1, IO=IO_CODES[x.dtype], HAS_MASK=mask is not None,
        I64=x.numel() + rows * n >= 2**31, num_warps=min(16, max(TUNE["block_warps"], rows * n // 512)),
        enable_fp_fusion=False)
