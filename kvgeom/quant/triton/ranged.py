"""Fused Triton kernels for ranges measured over a whole row: ``int{b}-{tensor|channel}-*`` and ``fp8_*@amax``
(a range pass with exact atomic min/max, then an elementwise pass), and static ``fp8_e4m3`` / ``fp8_e5m2``
(the elementwise pass alone); bit-identical to the eager path (:mod:`kvgeom.quant.triton.common` says how).

Proved by ``tests/quant/test_triton_kernels.py`` (random inputs, ties, padding, grid limits, against eager).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    FP8,
    GRID_YZ,
    IO_CODES,
    TUNE,
    copysign,
    divide,
    divisor,
    int_apply,
    int_params,
    io_view,
    load,
    rint,
    store,
    use_fast_div,
)

__all__ = ["RangedKernel", "fp8_kernel", "fp8_round", "int_ranged"]

_FP8_BITS = {"e4m3": (3, -6), "e5m2": (2, -14)}  # mantissa bits, min normal exponent


@triton.jit
def fp8_round(y, DROP: tl.constexpr, MIN_NORMAL: tl.constexpr, STEP: tl.constexpr):
    """fp32 -> fp8 -> fp32 with nearest-even, for ``|y|`` <= the fp8 max: normals keep ``23 - DROP``
    mantissa bits (bit trick), subnormals (below ``MIN_NORMAL``) are multiples of ``STEP``."""
    a = tl.abs(y)
    sub = rint(a * (1.0 / STEP)) * STEP  # exact: powers of two
    b = a.to(tl.int32, bitcast=True)
    b = (b + ((1 << (DROP - 1)) - 1) + ((b >> DROP) & 1)) & (-(1 << DROP))
    r = tl.where(a < MIN_NORMAL, sub, b.to(tl.float32, bitcast=True))
    return copysign(r, y)


@triton.jit
def _range_kernel(x_ptr, mask_ptr, lo_ptr, hi_ptr, P, L, CHUNK: tl.constexpr, BP: tl.constexpr,
                  BC: tl.constexpr, PER_COL: tl.constexpr, IO: tl.constexpr, HAS_MASK: tl.constexpr):
    """Atomic min/max over real positions into ``lo``/``hi`` (pre-filled with +-inf): one value per batch row,
    or per (row, column) if PER_COL. min/max are exact, so the atomics' order does not matter."""
    b, pc, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = cb * BC + tl.arange(0, BC)
    col_ok = (cols < L)[None, :]
    lo = tl.full([BP, BC], float("inf"), tl.float32)
    hi = tl.full([BP, BC], float("-inf"), tl.float32)
    for p0 in range(0, CHUNK, BP):
        pos = pc * CHUNK + p0 + tl.arange(0, BP)
        real = pos < P
        row = b.to(tl.int64) * P + pos
        if HAS_MASK:
            real = real & (tl.load(mask_ptr + row, mask=real, other=0) != 0)
        sel = real[:, None] & col_ok
        x, _ = load(x_ptr, row[:, None] * L + cols[None, :], sel, IO)
        lo = tl.minimum(lo, tl.where(sel, x, float("inf")))
        hi = tl.maximum(hi, tl.where(sel, x, float("-inf")))
    lo_c, hi_c = tl.min(lo, axis=0), tl.max(hi, axis=0)
    if PER_COL:
        dst = b.to(tl.int64) * L + cols
        tl.atomic_min(lo_ptr + dst, lo_c, mask=cols < L)
        tl.atomic_max(hi_ptr + dst, hi_c, mask=cols < L)
    else:
        tl.atomic_min(lo_ptr + b, tl.min(lo_c, axis=0))
        tl.atomic_max(hi_ptr + b, tl.max(hi_c, axis=0))


@triton.jit
def _apply_kernel(x_ptr, out_ptr, mask_ptr, lo_ptr, hi_ptr, P, L, RANGED: tl.constexpr,
                  PER_COL: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, KIND: tl.constexpr,
                  P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, P4: tl.constexpr, P5: tl.constexpr,
                  IO: tl.constexpr, HAS_MASK: tl.constexpr, FAST: tl.constexpr):
    """Elementwise, parameters from the ranges in ``lo``/``hi`` (per batch row, or per row and column). Grid:
    (position blocks, column blocks, batch row): a program's range is one load (or one column vector)."""
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    row_ok = p < P
    col_ok = cols < L
    ok = row_ok[:, None] & col_ok[None, :]
    rows = b * P + p
    offs = rows[:, None] * L + cols[None, :]
    x, raw = load(x_ptr, offs, ok, IO)
    if HAS_MASK:
        real = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    else:
        real = row_ok
    x = tl.where(real[:, None], x, 0.0)
    if RANGED:  # the range as a vector: one entry per column, or a single one for the batch row
        if PER_COL:
            lo = tl.load(lo_ptr + b * L + cols, mask=col_ok, other=0.0)
            hi = tl.load(hi_ptr + b * L + cols, mask=col_ok, other=0.0)
        else:
            lo = tl.load(lo_ptr + b + tl.zeros([1], tl.int64))
            hi = tl.load(hi_ptr + b + tl.zeros([1], tl.int64))
        empty = lo == float("inf")  # no real position: the range is parked at 0 (uniform._masked_range)
        lo = tl.where(empty, 0.0, lo)
        hi = tl.where(empty, 0.0, hi)
        if KIND == FP8:  # vLLM: fp8(clamp(x/s, -max, max)) * s; P1 max, P2..P4 see fp8_round, P5 amax divisor
            amax = tl.maximum(tl.abs(lo), tl.abs(hi))
            s = tl.math.div_rn(amax, P5)
            s = tl.where(s > 0.0, s, 1.0)
            r, fast = divisor(s, amax, FAST)
            y = tl.minimum(tl.maximum(divide(x, s[None, :], r[None, :], fast, FAST, True), -P1), P1)
            y = fp8_round(y, P2, P3, P4) * s[None, :]
        else:
            scale, zp, safe, r, fast = int_params(lo, hi, KIND, P1, FAST)
            y = int_apply(x, scale[None, :], zp[None, :], safe[None, :], r[None, :], fast, KIND, P1, FAST)
    else:  # static fp8, s = 1: x/1 and y*1 are exact
        y = fp8_round(tl.minimum(tl.maximum(x, -P1), P1), P2, P3, P4)
    store(out_ptr, offs, ok, y, raw, real[:, None], IO)


def _ranged(x: Tensor, out: Tensor, m: Tensor, has_mask: bool, kind: int, per_col: bool | None,
            p: tuple[float, int, float, float, float]) -> None:
    """Range pass (unless ``per_col`` is None: no range) then the elementwise pass."""
    B, P, L = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    n = L if per_col else 1
    lo = torch.full((B, n), torch.inf, dtype=torch.float32, device=x.device)
    hi = torch.full((B, n), -torch.inf, dtype=torch.float32, device=x.device)
    if per_col is not None:
        chunk, bc = TUNE["range_chunk"], min(TUNE["range_bc"], triton.next_power_of_2(L))
        _range_kernel[(B, triton.cdiv(P, chunk), triton.cdiv(L, bc))](
            io_view(x), m, lo, hi, P, L, CHUNK=chunk, BP=TUNE["range_bp"], BC=bc, PER_COL=per_col, IO=IO_CODES[x.dtype],
            HAS_MASK=has_mask, num_warps=TUNE["range_warps"])
    bc = min(TUNE["apply_bc"], triton.next_power_of_2(L))
    br = max(1, TUNE["apply_elems"] // bc)
    _apply_kernel[(triton.cdiv(P, br), triton.cdiv(L, bc), B)](
        io_view(x), io_view(out), m, lo, hi, P, L, RANGED=per_col is not None, PER_COL=bool(per_col), BR=br,
        BC=bc, KIND=kind, P1=p[0], P2=p[1], P3=p[2], P4=p[3], P5=p[4], IO=IO_CODES[x.dtype], HAS_MASK=has_mask,
        FAST=use_fast_div(x), num_warps=TUNE["apply_warps"], enable_fp_fusion=False)


@dataclass(frozen=True)
class RangedKernel:
    """:func:`_ranged` for one format: ``per_col`` True (one range per column), False (per batch row) or None (no
    range: static fp8); ``p`` the kernel's P1..P4; ``divisor`` the P5 of each role (fp8 ``@amax``)."""

    kind: int
    per_col: bool | None
    p: tuple[float, int, float, float]
    divisor: Mapping[str, float] | None = None

    def supported(self, x: Tensor) -> bool:
        return x.shape[0] <= GRID_YZ  # the elementwise pass puts the batch on the grid's 3rd dimension

    def launch(self, x: Tensor, out: Tensor, mask: Tensor | None, role: str) -> None:
        p5 = self.divisor[role] if self.divisor is not None else 0.0
        _ranged(x, out, mask if mask is not None else x, mask is not None, self.kind, self.per_col, (*self.p, p5))


def int_ranged(bits: int, symmetric: bool, per_channel: bool) -> RangedKernel:
    """Uniform ``int{bits}`` with one range per batch row (``tensor``) or per row and column (``channel``)."""
    kind, qmax = (0, 2 ** (bits - 1) - 1) if symmetric else (1, 2**bits - 1)
    return RangedKernel(kind, per_channel, (float(qmax), 0, 0.0, 0.0))


def fp8_kernel(fmt: str, fmax: float, amax_divisor: Mapping[str, float], dynamic: bool) -> RangedKernel:
    """vLLM's fp8 cache (``fmt`` e4m3 / e5m2, largest finite ``fmax``); ``dynamic``: scale ``amax/divisor[role]``."""
    mbits, emin = _FP8_BITS[fmt]
    return RangedKernel(FP8.value, False if dynamic else None, (fmax, 23 - mbits, 2.0**emin, 2.0 ** (emin - mbits)),
                        dict(amax_divisor))
