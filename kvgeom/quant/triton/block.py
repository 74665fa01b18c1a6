"""Fused Triton kernel for per-position blocks: ``int{b}-{token|head|group{G}}-*`` and llama.cpp ``q8_0``,
``q4_0``, ``q5_0``, ``q4_1``, ``q5_1``, ``iq4_nl`` (blocks of 32 along d_head), one pass over the data,
bit-identical to the eager path (:mod:`kvgeom.quant.triton.common` says how); the ``+rot`` types run the same
block quantizer between two Hadamard rotations (:mod:`kvgeom.quant.triton.rotated`).

``iq4_nl`` (:func:`kvgeom.quant.ggml.quantize_iq4_nl`, ggml's ``quantize_row_iq4_nl_ref``): levels by the midpoint
rule, then the least-squares scale ``Σ w q x / Σ w q²`` whose two sums ggml accumulates in fp32 in element order;
the kernel adds the 32 products one element at a time in that order (:func:`_iq4_nl`), so ``d`` has eager's bits.

Proved by ``tests/quant/test_triton_kernels.py`` (random inputs, rounding ties, padding, against eager;
``test_iq4_nl_sums_in_element_order``: blocks whose fp16 scale depends on the summation order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import triton
import triton.language as tl
from torch import Tensor

from .common import (
    INT_ASYM,
    INT_SYM,
    IO_CODES,
    IQ4_NL,
    MAX_BLOCK,
    Q8_0,
    Q_0,
    TUNE,
    fp16,
    int_apply,
    int_params,
    io_view,
    load,
    recip,
    store,
    trunc,
    use_fast_div,
)

__all__ = ["BlockKernel", "ggml_blocks", "ggml_quant", "int_blocks"]

#: llama.cpp type -> (KIND, P1) of :func:`_block_kernel` (iq4_nl: P1 = -kvalues[0], its d = max/-127); the order
#: is that of the mixed kernel's row codes (:meth:`BlockKernel.mix_code`)
_GGML = {"q8_0": (2, 127.0), "q4_0": (3, 8.0), "q5_0": (3, 16.0), "q4_1": (4, 15.0), "q5_1": (4, 31.0),
         "iq4_nl": (6, 127.0)}
#: iq4_nl's levels ``kvalues_iq4nl`` (:data:`kvgeom.quant.ggml.KVALUES_IQ4NL`) as the kernel walks them: level i
#: is taken once ``2*al >= kv[i-1] + kv[i]`` (ggml ``best_index_int8``, ties go up) and adds ``kv[i] - kv[i-1]``
IQ4_FIRST: tl.constexpr = tl.constexpr(-127.0)


@triton.jit
def _first_absmax16(raw, e, IO: tl.constexpr):
    """Per row of 16-bit ``raw`` (fp16, or bf16 as int16): the value of largest magnitude, the first on ties
    (:func:`kvgeom.quant.ggml.signed_absmax`). For finite values the order of ``|x|``'s bit patterns is that of
    ``|x|``, so one integer max over ``(|x| bits) << 16 | (32767 - position) << 1 | sign`` finds it."""
    if IO == 1:
        bits = raw.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:
        bits = raw.to(tl.int32) & 0xFFFF
    top = tl.max(((bits & 0x7FFF) << 16) | ((0x7FFF - e[None, :]) << 1) | (bits >> 15), axis=1)
    mb = ((top & 1) << 15) | (top >> 16)
    if IO == 1:
        return mb.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return (mb << 16).to(tl.float32, bitcast=True)


@triton.jit
def ggml_quant(x, raw, e, lane, lo, hi, KIND: tl.constexpr, P1: tl.constexpr, IO: tl.constexpr, GP: tl.constexpr):
    """A llama.cpp type (``KIND`` Q8_0, Q_0 or Q_1) on each row of ``x`` (fp32, ``lane`` the real columns,
    ``lo``/``hi`` their min/max; ``raw`` the loaded 16-bit values when ``IO`` is not 0): the dequantized rows,
    bit for bit :func:`kvgeom.quant.ggml.ggml_fake_quant`."""
    if KIND == Q8_0:  # ggml quantize_q8_0: roundf(x*id) = t + trunc(2*(v - t)); codes q+128
        d = tl.math.div_rn(tl.maximum(tl.abs(lo), tl.abs(hi)), 127.0)
        v = x * recip(d)[:, None]
        t = trunc(v)
        code = (t + trunc(2.0 * (v - t))) + 128.0
        y = fp16(d)[:, None] * (code - 128.0)
    elif KIND == Q_0:  # d = max/-half, max the first value of largest magnitude
        d = tl.math.div_rn(_signed_absmax(x, raw, e, lane, IO, GP), -P1)
        q = tl.minimum(tl.maximum(trunc(x * recip(d)[:, None] + (P1 + 0.5)), 0.0), 2.0 * P1 - 1.0)
        y = fp16(d)[:, None] * (q - P1)
    elif KIND == IQ4_NL:
        y = _iq4_nl(x, raw, e, lane, lo, hi, IO, GP)
    else:  # Q_1: d = (max-min)/levels, x̂ = q*fp16(d) + fp16(min)
        d = tl.math.div_rn(hi - lo, P1)
        q = tl.minimum(tl.maximum(trunc((x - lo[:, None]) * recip(d)[:, None] + 0.5), 0.0), P1)
        y = fp16(d)[:, None] * q + fp16(lo)[:, None]
    return y


@triton.jit
def _signed_absmax(x, raw, e, lane, IO: tl.constexpr, GP: tl.constexpr):
    """Per row: the value of largest magnitude, the first one on ties (:func:`kvgeom.quant.ggml.signed_absmax`)."""
    if IO == 0:
        ax = tl.where(lane, tl.abs(x), -1.0)
        amax = tl.max(ax, axis=1)
        first = tl.min(tl.where(ax == amax[:, None], e[None, :], GP), axis=1)
        mx = tl.max(tl.where(e[None, :] == first[:, None], x, float("-inf")), axis=1)
    else:  # 16-bit input: one integer max over keys (|x|'s bits, first position, sign)
        mx = _first_absmax16(raw, e, IO)
    return mx


@triton.jit
def _level(q, two_al, s, step):
    """One midpoint of ggml's ``best_index_int8``: past it (``2*al >= s``, exact) the level rises by ``step``."""
    return q + tl.where(two_al >= s, step, 0.0)


@triton.jit
def _halves(t, W: tl.constexpr):
    """Columns ``0..W/2-1`` and ``W/2..W-1`` of the ``[rows, W]`` tile ``t`` (register moves, no arithmetic)."""
    return tl.split(tl.permute(tl.reshape(t, [t.shape[0], 2, W // 2]), [0, 2, 1]))


@triton.jit
def _in_order2(acc, t):
    a, b = tl.split(t)
    return (acc + a) + b


@triton.jit
def _in_order4(acc, t):
    a, b = _halves(t, 4)
    return _in_order2(_in_order2(acc, a), b)


@triton.jit
def _in_order8(acc, t):
    a, b = _halves(t, 8)
    return _in_order4(_in_order4(acc, a), b)


@triton.jit
def _in_order16(acc, t):
    a, b = _halves(t, 16)
    return _in_order8(_in_order8(acc, a), b)


@triton.jit
def _in_order32(acc, t):
    """``acc + t[:, 0] + t[:, 1] + ... + t[:, 31]``, added left to right (C's loop order; one rounding per add):
    the columns are taken apart by halving, not by reductions, which would add in a tree."""
    a, b = _halves(t, 32)
    return _in_order16(_in_order16(acc, a), b)


@triton.jit
def _iq4_nl(x, raw, e, lane, lo, hi, IO: tl.constexpr, GP: tl.constexpr):
    """:func:`kvgeom.quant.ggml.quantize_iq4_nl` (``ntry=-1``) then :func:`~kvgeom.quant.ggml.ggml_dequant` on each
    row of 32: ``d0 = max/-127``, levels ``kv[best_index(x/d0)]`` (the levels are small integers: every sum here is
    exact), ``d = Σ w q x / Σ w q²`` with ``w = x²`` summed in element order, ``x̂ = fp16(d) * q``; a block with
    ``amax < 1e-15`` stores ``d = 0`` and level ``kv[0]``."""
    amax = tl.maximum(tl.abs(lo), tl.abs(hi))
    live = amax >= 1e-15  # GROUP_MAX_EPS
    mx = tl.where(live, _signed_absmax(x, raw, e, lane, IO, GP), 1.0)
    d0 = tl.math.div_rn(mx, IQ4_FIRST)
    al = tl.math.div_rn(tl.zeros_like(d0) + 1.0, d0)[:, None] * x
    two_al = al + al
    q = tl.zeros_like(x) + IQ4_FIRST
    q = _level(q, two_al, -231.0, 23.0)
    q = _level(q, two_al, -187.0, 21.0)
    q = _level(q, two_al, -148.0, 18.0)
    q = _level(q, two_al, -114.0, 16.0)
    q = _level(q, two_al, -84.0, 14.0)
    q = _level(q, two_al, -57.0, 13.0)
    q = _level(q, two_al, -32.0, 12.0)
    q = _level(q, two_al, -9.0, 11.0)
    q = _level(q, two_al, 14.0, 12.0)
    q = _level(q, two_al, 38.0, 12.0)
    q = _level(q, two_al, 63.0, 13.0)
    q = _level(q, two_al, 91.0, 15.0)
    q = _level(q, two_al, 122.0, 16.0)
    q = _level(q, two_al, 158.0, 20.0)
    q = _level(q, two_al, 202.0, 24.0)
    wq = (x * x) * q
    tx = wq * x
    tq = wq * q
    sx = _in_order32(tl.zeros_like(lo), tx)  # ggml's loop: one rounding per element, in element order
    sq = _in_order32(tl.zeros_like(lo), tq)
    pos = sq > 0.0
    d = tl.where(pos & live, tl.math.div_rn(sx, tl.where(pos, sq, 1.0)), 0.0)
    return fp16(d)[:, None] * tl.where(live[:, None], q, IQ4_FIRST)


@triton.jit
def _block_kernel(x_ptr, out_ptr, mask_ptr, n_blocks, NB: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                  BLOCK: tl.constexpr, KIND: tl.constexpr, P1: tl.constexpr, IO: tl.constexpr,
                  HAS_MASK: tl.constexpr, I64: tl.constexpr, FAST: tl.constexpr):
    """Blocks of ``G`` consecutive values (``NB`` per position), ``BLOCK`` blocks per program."""
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    blk = pid * BLOCK + tl.arange(0, BLOCK)
    e = tl.arange(0, GP)
    blk_ok = blk < n_blocks
    lane = (e < G)[None, :]
    ok = blk_ok[:, None] & lane
    offs = blk[:, None] * G + e[None, :]
    x, raw = load(x_ptr, offs, ok, IO)
    if HAS_MASK:
        real = blk_ok & (tl.load(mask_ptr + blk // NB, mask=blk_ok, other=0) != 0)
    else:
        real = blk_ok
    x = tl.where(real[:, None], x, 0.0)  # eager zeroes padding before quantizing
    lo = tl.min(tl.where(lane, x, float("inf")), axis=1)
    hi = tl.max(tl.where(lane, x, float("-inf")), axis=1)
    if KIND == INT_SYM or KIND == INT_ASYM:
        scale, zp, safe, r, fast = int_params(lo, hi, KIND, P1, FAST)
        y = int_apply(x, scale[:, None], zp[:, None], safe[:, None], r[:, None], fast, KIND, P1, FAST)
    else:
        y = ggml_quant(x, raw, e, lane, lo, hi, KIND, P1, IO, GP)
    store(out_ptr, offs, ok, y, raw, real[:, None], IO)


@dataclass(frozen=True)
class BlockKernel:
    """:func:`_block_kernel` for one format: ``block`` values per range (an int, or ``"token"``: all heads of a
    position, ``"head"``: one head vector); ``within_head``: blocks must not straddle heads (llama.cpp types)."""

    kind: int
    p1: float
    block: int | Literal["token", "head"]
    within_head: bool = False

    def group(self, x: Tensor) -> int:
        return {"token": x.shape[2] * x.shape[3], "head": x.shape[3]}.get(self.block, self.block)  # type: ignore[arg-type]

    def supported(self, x: Tensor) -> bool:
        g = self.group(x)
        if self.within_head:
            return x.shape[3] % g == 0
        return (x.shape[2] * x.shape[3]) % g == 0 and triton.next_power_of_2(g) <= MAX_BLOCK

    def mix_code(self) -> int | None:
        """This kernel's row code in a mixed launch (:mod:`kvgeom.quant.triton.mixed`): twice its llama.cpp type's
        place in :func:`ggml_blocks`' table (even: not rotated), or None for a kernel that is not a llama.cpp type."""
        kinds = list(_GGML.values())
        key = (self.kind, float(self.p1))
        if not (self.within_head and self.block == 32) or key not in kinds:
            return None
        return 2 * kinds.index(key)

    def launch(self, x: Tensor, out: Tensor, mask: Tensor | None, role: str) -> None:
        has_mask = mask is not None
        m = mask if mask is not None else x  # x: placeholder, never read
        B, P, H, D = x.shape
        L = H * D
        g, kind, p1 = self.group(x), self.kind, self.p1
        gp = triton.next_power_of_2(g)
        block = max(1, TUNE["block_elems"] // gp)
        n_blocks = B * P * (L // g)
        _block_kernel[(triton.cdiv(n_blocks, block),)](
            io_view(x), io_view(out), m, n_blocks, NB=L // g, G=g, GP=gp, BLOCK=block, KIND=kind, P1=float(p1),
            IO=IO_CODES[x.dtype], HAS_MASK=has_mask, I64=x.numel() + block * gp >= 2**31, FAST=use_fast_div(x),
            num_warps=min(16, max(TUNE["block_warps"], gp * block // 512)), enable_fp_fusion=False)


def int_blocks(bits: int, symmetric: bool, block: int | Literal["token", "head"]) -> BlockKernel:
    """Uniform ``int{bits}`` with one range per ``block`` (see :class:`BlockKernel`)."""
    kind, qmax = (0, 2 ** (bits - 1) - 1) if symmetric else (1, 2**bits - 1)
    return BlockKernel(kind, float(qmax), block)


def ggml_blocks(qtype: str, block: int) -> BlockKernel | None:
    """A llama.cpp type on blocks of ``block`` (32) along d_head; None for a type without a kernel."""
    if qtype not in _GGML:
        return None
    kind, p1 = _GGML[qtype]
    return BlockKernel(kind, p1, block, within_head=True)
