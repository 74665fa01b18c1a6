"""Fused Triton quantize-dequantize kernels for K/V ``[batch, pos, kv_head, d_head]``, bit-identical to eager.

One pass over the data for per-position ranges (``int{b}-{token|head|group{G}}-*``, llama.cpp ``q8_0``,
``q4_0``, ``q5_0``, ``q4_1``, ``q5_1``) and for static ``fp8_e4m3`` / ``fp8_e5m2``; a range pass (exact
atomic min/max) then an elementwise pass for ``int{b}-{tensor|channel}-*`` and ``fp8_*@amax``. KIVI (forward
mode) runs in :mod:`kvgeom.quant.triton_kivi`. Anything else (iq4_nl, ``+rot``, casts, other dtypes) makes
:func:`fused_fake_quant` return None and the caller falls back to the eager path.

Bit-exactness with the eager fp32 math (each torch op rounds once):

* divisions are IEEE (``tl.math.div_rn``, not ``div.full.f32``), as the eager path's tensor-by-tensor ones; on the
  GPU, a program whose divisors all lie in [2^-64, 2^64] divides by their reciprocals the way CUDA's own
  ``div.rn.f32`` does on its fast path (:func:`_fast_div`: same bits where they matter, no per-element
  reciprocal, check or branch);
* kernels are launched with ``enable_fp_fusion=False``: eager's ``x*id + 8.5`` is two roundings, not an fma;
* ``torch.round`` / ``torch.trunc`` are written with the exact ``(a + 2^23) - 2^23`` idiom and the sign copied
  bitwise, fp32 -> bf16 is the round-to-nearest-even bit trick, and fp8 rounding is done in fp32 bits: no
  libdevice and no Triton bf16/fp8 casts, so the interpreter (``TRITON_INTERPRET=1``, numpy) runs the very
  same arithmetic as the GPU (the interpreter's own bf16/fp8 casts do not round to nearest-even).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fp8 import AMAX_DIVISOR
from .ggml import QK
from .kivi import check_kivi
from .scheme import FP8_MAX, BaseSpec, FP8Spec, GGMLSpec, IntSpec, KIVISpec, Role

INT_SYM: tl.constexpr = tl.constexpr(0)
INT_ASYM: tl.constexpr = tl.constexpr(1)
Q8_0: tl.constexpr = tl.constexpr(2)
Q_0: tl.constexpr = tl.constexpr(3)  # q4_0 / q5_0: P1 = half (8 / 16)
Q_1: tl.constexpr = tl.constexpr(4)  # q4_1 / q5_1: P1 = levels (15 / 31)
FP8: tl.constexpr = tl.constexpr(5)  # fp8_e4m3 / fp8_e5m2, static or @amax

_IO = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_GGML = {"q8_0": (2, 127.0), "q4_0": (3, 8.0), "q5_0": (3, 16.0), "q4_1": (4, 15.0), "q5_1": (4, 31.0)}
_FP8_BITS = {"e4m3": (3, -6), "e5m2": (2, -14)}  # mantissa bits, min normal exponent
#: specs whose kernels have passed only under the Triton interpreter, not yet on a GPU: ``fake_quant`` uses them
#: with ``backend="triton"`` only, never by default (``"auto"``). Empty: KIVI's kernel left it once its CUDA
#: bit-identity tests passed on an H200 (docs/benchmarks.md §2).
OPT_IN: tuple[type, ...] = ()
MAX_BLOCK = 16384  # widest range block (padded to a power of two) held by one program
GRID_YZ = 65535  # CUDA's limit on a launch grid's 2nd and 3rd dimensions (the batch rides on one of them)
#: launch shapes (performance only; results do not depend on them)
TUNE = {"block_elems": 1024, "block_warps": 2, "apply_elems": 2048, "apply_bc": 256, "apply_warps": 2,
        "range_chunk": 1024, "range_bp": 16, "range_bc": 256, "range_warps": 4,
        "fast_div": True}  # tuned on an H200, [64, 2048, 8, 128] bf16; fast_div: see _fast_div


# ---- exact elementwise helpers (same arithmetic on the GPU and under the interpreter) ------------------
@triton.jit
def _copysign(mag, s):
    bits = (mag.to(tl.int32, bitcast=True) & 0x7FFFFFFF) | (s.to(tl.int32, bitcast=True) & -2147483648)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rint(v):
    """``torch.round``: nearest, ties to even, sign kept (also of zero); exact for every finite fp32."""
    a = tl.abs(v)
    r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
    return _copysign(r, v)


@triton.jit
def _trunc(v):
    """``torch.trunc`` (C ``truncf``), sign kept."""
    a = tl.abs(v)
    r = (a + 8388608.0) - 8388608.0
    r = tl.where(r > a, r - 1.0, r)
    return _copysign(tl.where(a < 8388608.0, r, a), v)


@triton.jit
def _recip(d):
    """ggml's ``d ? 1.0f/d : 0.0f`` (IEEE division), with 0 also where ``1/d`` overflows: ``d`` is then subnormal,
    its fp16 copy (the dequantization scale) is 0 and every code dequantizes to 0, as eager's do whatever its
    integer cast made of ``x * inf``; a float ``0 * inf`` would be NaN."""
    nz = d != 0.0
    r = tl.math.div_rn(tl.zeros_like(d) + 1.0, tl.where(nz, d, 1.0))
    return tl.where(nz & (tl.abs(r) < float("inf")), r, 0.0)


#: divisor range inside which :func:`_fast_div` is exact where it matters (see there); a program holding any
#: other divisor (or a quotient beyond FAST_HI) runs ``div_rn``
FAST_LO: tl.constexpr = tl.constexpr(2.0**-64)
FAST_HI: tl.constexpr = tl.constexpr(2.0**64)


@triton.jit
def _rcp(s):
    """The refined reciprocal of CUDA's ``div.rn.f32`` fast path: ``rcp.approx`` (inline PTX: GPU only), then one
    Newton step."""
    r0 = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [s], dtype=tl.float32, is_pure=True,
                                   pack=1)
    return tl.fma(r0, tl.fma(-s, r0, 1.0), r0)


@triton.jit
def _fast_div(d, s, r):
    """``d / s`` as CUDA's ``div.rn.f32`` computes it when its check (FCHK) lets it skip its slow path, with the
    reciprocal ``r = _rcp(s)`` computed once per divisor instead of once per element.

    For ``s`` in [FAST_LO, FAST_HI] and ``|d / s| <= FAST_HI`` it equals the IEEE quotient (same bits) whenever
    ``|d / s| >= 2^-20``: operands and result are then normal and the residual ``d - s*q`` exact, the fast path's
    domain. A smaller quotient (``d`` zero, subnormal or tiny against ``s``, where FCHK would take the slow path)
    may be off by ulps, has the sign of ``d`` (also when zero: ``s > 0``), and rounds to the same integer code
    (``|q| < 1/4``) and to the same fp8 value (below half the smallest fp8 subnormal, 2^-17) as the exact one.
    ``tests/quant/test_triton_kernels.py::test_fast_division_is_exact`` checks this against torch on the GPU."""
    return _copysign(_fast_div_nonneg(d, s, r), d)


@triton.jit
def _fast_div_nonneg(d, s, r):
    """:func:`_fast_div` for ``d >= 0`` (or -0) where the sign of a quotient below 2^-20 does not matter: one
    instruction less per element."""
    q = tl.fma(d, r, 0.0)
    return tl.fma(r, tl.fma(-s, q, d), q)


@triton.jit
def _fast_ok(safe, amax, r):
    """Whether every divisor ``safe`` (and quotient bound ``amax * r``) of a program is in :func:`_fast_div`'s
    range: a scalar, so that the program takes one branch."""
    return (tl.min(safe) >= FAST_LO) & (tl.max(safe) <= FAST_HI) & (tl.max(amax * r) <= FAST_HI)


@triton.jit
def _fp16(d):
    return d.to(tl.float16).to(tl.float32)


@triton.jit
def _fp8_round(y, DROP: tl.constexpr, MIN_NORMAL: tl.constexpr, STEP: tl.constexpr):
    """fp32 -> fp8 -> fp32 with nearest-even, for ``|y|`` <= the fp8 max: normals keep ``23 - DROP``
    mantissa bits (bit trick), subnormals (below ``MIN_NORMAL``) are multiples of ``STEP``."""
    a = tl.abs(y)
    sub = _rint(a * (1.0 / STEP)) * STEP  # exact: powers of two
    b = a.to(tl.int32, bitcast=True)
    b = (b + ((1 << (DROP - 1)) - 1) + ((b >> DROP) & 1)) & (-(1 << DROP))
    r = tl.where(a < MIN_NORMAL, sub, b.to(tl.float32, bitcast=True))
    return _copysign(r, y)


@triton.jit
def _load(ptr, offs, ok, IO: tl.constexpr):
    raw = tl.load(ptr + offs, mask=ok, other=0)
    if IO == 2:  # bf16 stored as int16: widening is exact
        x = ((raw.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        x = raw.to(tl.float32)
    return x, raw


@triton.jit
def _store(ptr, offs, ok, y, raw, real, IO: tl.constexpr):
    """Cast ``y`` to the input dtype (nearest-even) and store it at real positions, ``raw`` at padding."""
    if IO == 2:
        b = y.to(tl.int32, bitcast=True)
        yr = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int16)
    else:
        yr = y.to(raw.dtype)
    tl.store(ptr + offs, tl.where(real, yr, raw), mask=ok)


@triton.jit
def _divide(d, s, r, fast, FAST: tl.constexpr, SIGNED: tl.constexpr):
    """``d / s`` (IEEE): :func:`_fast_div` where the program's ``fast`` check passed, else ``div_rn``.
    ``SIGNED=False`` (``d >= 0`` and a quotient below 2^-20 rounds to 0 whatever its sign): :func:`_fast_div_nonneg`."""
    if FAST:
        if fast:
            if SIGNED:
                t = _fast_div(d, s, r)
            else:
                t = _fast_div_nonneg(d, s, r)
        else:
            t = tl.math.div_rn(d, s)
    else:
        t = tl.math.div_rn(d, s)
    return t


@triton.jit
def _divisor(safe, amax, FAST: tl.constexpr):
    """The reciprocal of each divisor ``safe`` (or ``safe`` itself if not ``FAST``) and the program's fast check."""
    if FAST:
        r = _rcp(safe)
        fast = _fast_ok(safe, amax, r)
    else:
        r = safe
        fast = False
    return r, fast


@triton.jit
def _int_params(lo, hi, KIND: tl.constexpr, QMAX: tl.constexpr, FAST: tl.constexpr):
    """:func:`kvgeom.quant.uniform.int_params` from a block's min/max; QMAX 2^(b-1)-1 (sym) or 2^b-1. Also the
    divisor ``safe`` of :func:`_int_apply`, its reciprocal and the program's fast-division check."""
    amax = tl.maximum(tl.abs(lo), tl.abs(hi))
    if KIND == INT_SYM:
        scale = tl.math.div_rn(amax, QMAX)
        zp = scale * 0.0
        safe = tl.where(scale > 0.0, scale, 1.0)
    else:
        scale = tl.maximum(tl.math.div_rn(hi - lo, QMAX), 1e-8)
        zp = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, scale)), 0.0), QMAX)
        safe = scale
    r, fast = _divisor(safe, amax, FAST)
    return scale, zp, safe, r, fast


@triton.jit
def _int_apply(x, scale, zp, safe, r, fast, KIND: tl.constexpr, QMAX: tl.constexpr, FAST: tl.constexpr):
    """:func:`kvgeom.quant.uniform.int_apply` (``safe``, ``r``, ``fast`` from :func:`_int_params`)."""
    t = _divide(x, safe, r, fast, FAST, True)
    if KIND == INT_SYM:
        q = tl.minimum(tl.maximum(_rint(t), -QMAX - 1.0), QMAX)
        return q * scale
    else:
        q = tl.minimum(tl.maximum(_rint(t + zp), 0.0), QMAX)
        return (q - zp) * scale


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


# ---- kernels ------------------------------------------------------------------------------------------
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
    x, raw = _load(x_ptr, offs, ok, IO)
    if HAS_MASK:
        real = blk_ok & (tl.load(mask_ptr + blk // NB, mask=blk_ok, other=0) != 0)
    else:
        real = blk_ok
    x = tl.where(real[:, None], x, 0.0)  # eager zeroes padding before quantizing
    lo = tl.min(tl.where(lane, x, float("inf")), axis=1)
    hi = tl.max(tl.where(lane, x, float("-inf")), axis=1)
    if KIND == INT_SYM or KIND == INT_ASYM:
        scale, zp, safe, r, fast = _int_params(lo, hi, KIND, P1, FAST)
        y = _int_apply(x, scale[:, None], zp[:, None], safe[:, None], r[:, None], fast, KIND, P1, FAST)
    elif KIND == Q8_0:  # ggml quantize_q8_0: roundf(x*id) = t + trunc(2*(v - t)); codes q+128
        d = tl.math.div_rn(tl.maximum(tl.abs(lo), tl.abs(hi)), 127.0)
        v = x * _recip(d)[:, None]
        t = _trunc(v)
        code = (t + _trunc(2.0 * (v - t))) + 128.0
        y = _fp16(d)[:, None] * (code - 128.0)
    elif KIND == Q_0:  # d = max/-half, max the first value of largest magnitude
        if IO == 0:
            ax = tl.where(lane, tl.abs(x), -1.0)
            amax = tl.max(ax, axis=1)
            first = tl.min(tl.where(ax == amax[:, None], e[None, :], GP), axis=1)
            mx = tl.max(tl.where(e[None, :] == first[:, None], x, float("-inf")), axis=1)
        else:  # 16-bit input: one integer max over keys (|x|'s bits, first position, sign)
            mx = _first_absmax16(raw, e, IO)
        d = tl.math.div_rn(mx, -P1)
        q = tl.minimum(tl.maximum(_trunc(x * _recip(d)[:, None] + (P1 + 0.5)), 0.0), 2.0 * P1 - 1.0)
        y = _fp16(d)[:, None] * (q - P1)
    else:  # Q_1: d = (max-min)/levels, x̂ = q*fp16(d) + fp16(min)
        d = tl.math.div_rn(hi - lo, P1)
        q = tl.minimum(tl.maximum(_trunc((x - lo[:, None]) * _recip(d)[:, None] + 0.5), 0.0), P1)
        y = _fp16(d)[:, None] * q + _fp16(lo)[:, None]
    _store(out_ptr, offs, ok, y, raw, real[:, None], IO)


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
        x, _ = _load(x_ptr, row[:, None] * L + cols[None, :], sel, IO)
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
    x, raw = _load(x_ptr, offs, ok, IO)
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
        if KIND == FP8:  # vLLM: fp8(clamp(x/s, -max, max)) * s; P1 max, P2..P4 see _fp8_round, P5 amax divisor
            amax = tl.maximum(tl.abs(lo), tl.abs(hi))
            s = tl.math.div_rn(amax, P5)
            s = tl.where(s > 0.0, s, 1.0)
            r, fast = _divisor(s, amax, FAST)
            y = tl.minimum(tl.maximum(_divide(x, s[None, :], r[None, :], fast, FAST, True), -P1), P1)
            y = _fp8_round(y, P2, P3, P4) * s[None, :]
        else:
            scale, zp, safe, r, fast = _int_params(lo, hi, KIND, P1, FAST)
            y = _int_apply(x, scale[None, :], zp[None, :], safe[None, :], r[None, :], fast, KIND, P1, FAST)
    else:  # static fp8, s = 1: x/1 and y*1 are exact
        y = _fp8_round(tl.minimum(tl.maximum(x, -P1), P1), P2, P3, P4)
    _store(out_ptr, offs, ok, y, raw, real[:, None], IO)


# ---- host side ----------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supported(x: Tensor, spec: BaseSpec) -> bool:
    """Whether :func:`fused_fake_quant` has a kernel for ``spec`` on this tensor (device, dtype, shape)."""
    if x.ndim != 4 or x.dtype not in _IO or x.numel() == 0 or not (x.is_cuda or _interpreting()):
        return False
    L, D = x.shape[2] * x.shape[3], x.shape[3]
    if isinstance(spec, IntSpec):
        if spec.granularity in ("tensor", "channel"):
            return x.shape[0] <= GRID_YZ  # the elementwise pass puts the batch on the grid's 3rd dimension
        g = {"token": L, "head": D}.get(spec.granularity, spec.group_size)
        return g is not None and L % g == 0 and triton.next_power_of_2(g) <= MAX_BLOCK
    if isinstance(spec, GGMLSpec):
        return spec.qtype in _GGML and not spec.rotate and D % QK == 0
    if isinstance(spec, KIVISpec):
        from .triton_kivi import kivi_supported  # imports this module: load it lazily

        return kivi_supported(x, spec)
    return isinstance(spec, FP8Spec) and x.shape[0] <= GRID_YZ


def _fast(x: Tensor) -> bool:
    """Whether kernels on ``x`` may use :func:`_fast_div` (its inline PTX needs the GPU, not the interpreter)."""
    return TUNE["fast_div"] and x.is_cuda


def _io(x: Tensor) -> Tensor:
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


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
            _io(x), m, lo, hi, P, L, CHUNK=chunk, BP=TUNE["range_bp"], BC=bc, PER_COL=per_col, IO=_IO[x.dtype],
            HAS_MASK=has_mask, num_warps=TUNE["range_warps"])
    bc = min(TUNE["apply_bc"], triton.next_power_of_2(L))
    br = max(1, TUNE["apply_elems"] // bc)
    _apply_kernel[(triton.cdiv(P, br), triton.cdiv(L, bc), B)](
        _io(x), _io(out), m, lo, hi, P, L, RANGED=per_col is not None, PER_COL=bool(per_col), BR=br,
        BC=bc, KIND=kind, P1=p[0], P2=p[1], P3=p[2], P4=p[3], P5=p[4], IO=_IO[x.dtype], HAS_MASK=has_mask,
        FAST=_fast(x), num_warps=TUNE["apply_warps"], enable_fp_fusion=False)


def fused_fake_quant(x: Tensor, spec: BaseSpec, role: Role, mask: Tensor | None = None) -> Tensor | None:
    """``fake_quant(x, spec, role=role, mask=mask)`` by Triton kernels, or None where not covered.

    Expects an input already validated by :func:`kvgeom.quant.fake.check_input` (finite at real positions).
    The result is contiguous with ``x``'s shape and dtype, bit-identical to the eager path.
    """
    if isinstance(spec, KIVISpec):
        check_kivi(spec, x.shape[-1])  # the eager path's error for a group size not dividing d_head
    if not supported(x, spec):
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    has_mask = mask is not None
    m = mask.contiguous().view(torch.uint8) if mask is not None else x  # x: placeholder, never read
    B, P, H, D = x.shape
    L = H * D
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        if isinstance(spec, KIVISpec):
            from .triton_kivi import kivi_fused

            kivi_fused(x, out, m if has_mask else None, spec, role)
        elif isinstance(spec, FP8Spec):
            mbits, emin = _FP8_BITS[spec.fmt]
            p = (FP8_MAX[spec.fmt], 23 - mbits, 2.0**emin, 2.0 ** (emin - mbits), AMAX_DIVISOR[role])
            _ranged(x, out, m, has_mask, 5, False if spec.dynamic else None, p)
        elif isinstance(spec, IntSpec) and spec.granularity in ("tensor", "channel"):
            kind, qmax = (0, 2 ** (spec.bits - 1) - 1) if spec.symmetric else (1, 2**spec.bits - 1)
            _ranged(x, out, m, has_mask, kind, spec.granularity == "channel", (float(qmax), 0, 0.0, 0.0, 0.0))
        else:
            if isinstance(spec, IntSpec):
                g = {"token": L, "head": D}.get(spec.granularity, spec.group_size)
                kind, p1 = (0, 2 ** (spec.bits - 1) - 1) if spec.symmetric else (1, 2**spec.bits - 1)
            else:
                g, (kind, p1) = QK, _GGML[spec.qtype]
            assert g is not None
            gp = triton.next_power_of_2(g)
            block = max(1, TUNE["block_elems"] // gp)
            n_blocks = B * P * (L // g)
            _block_kernel[(triton.cdiv(n_blocks, block),)](
                _io(x), _io(out), m, n_blocks, NB=L // g, G=g, GP=gp, BLOCK=block, KIND=kind, P1=float(p1),
                IO=_IO[x.dtype], HAS_MASK=has_mask, I64=x.numel() + block * gp >= 2**31, FAST=_fast(x),
                num_warps=min(16, max(TUNE["block_warps"], gp * block // 512)), enable_fp_fusion=False)
    return out
