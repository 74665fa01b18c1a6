"""What every Triton kernel of :mod:`kvgeom.quant.triton` shares: exact elementwise helpers, the uniform int
parameters, loads and stores in the input dtype, launch settings and the :class:`Kernel` protocol.

Bit-exactness with the eager fp32 math (each torch op rounds once):

* divisions are IEEE (``tl.math.div_rn``, not ``div.full.f32``), as the eager path's tensor-by-tensor ones; on the
  GPU, a program whose divisors all lie in [2^-64, 2^64] divides by their reciprocals the way CUDA's own
  ``div.rn.f32`` does on its fast path (:func:`fast_div`: same bits where they matter, no per-element
  reciprocal, check or branch);
* kernels are launched with ``enable_fp_fusion=False``: eager's ``x*id + 8.5`` is two roundings, not an fma;
* ``torch.round`` / ``torch.trunc`` are written with the exact ``(a + 2^23) - 2^23`` idiom and the sign copied
  bitwise, fp32 -> bf16 is the round-to-nearest-even bit trick, and fp8 rounding is done in fp32 bits: no
  libdevice and no Triton bf16/fp8 casts, so the interpreter (``TRITON_INTERPRET=1``, numpy) runs the very
  same arithmetic as the GPU (the interpreter's own bf16/fp8 casts do not round to nearest-even).

Proved by ``tests/quant/test_triton_kernels.py`` (every kernel against the eager path, ``torch.equal``;
``test_fast_division_is_exact`` for :func:`fast_div` on the GPU).
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "FAST_HI", "FAST_LO", "FP8", "GRID_YZ", "INT_ASYM", "INT_SYM", "IO_CODES", "IQ4_NL", "MAX_BLOCK", "Q8_0", "Q_0",
    "Q_1", "TUNE", "Kernel", "copysign", "divide", "divisor", "fast_div", "fast_div_nonneg", "fast_ok", "fp16",
    "int_apply", "int_params", "interpreting", "io_view", "launchable", "load", "load_rows", "rcp", "recip", "rint",
    "store", "trunc", "use_fast_div",
]

INT_SYM: tl.constexpr = tl.constexpr(0)
INT_ASYM: tl.constexpr = tl.constexpr(1)
Q8_0: tl.constexpr = tl.constexpr(2)
Q_0: tl.constexpr = tl.constexpr(3)  # q4_0 / q5_0: P1 = half (8 / 16)
Q_1: tl.constexpr = tl.constexpr(4)  # q4_1 / q5_1: P1 = levels (15 / 31)
FP8: tl.constexpr = tl.constexpr(5)  # fp8_e4m3 / fp8_e5m2, static or @amax
IQ4_NL: tl.constexpr = tl.constexpr(6)  # llama.cpp iq4_nl (non-linear levels, least-squares block scale)

#: the input dtypes the kernels read and write, and their ``IO`` code
IO_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_BLOCK = 16384  # widest range block (padded to a power of two) held by one program
GRID_YZ = 65535  # CUDA's limit on a launch grid's 2nd and 3rd dimensions (the batch rides on one of them)
#: launch shapes of the block and range kernels (performance only; results do not depend on them)
TUNE = {"block_elems": 1024, "block_warps": 2, "apply_elems": 2048, "apply_bc": 256, "apply_warps": 2,
        "range_chunk": 1024, "range_bp": 16, "range_bc": 256, "range_warps": 4,
        "fast_div": True}  # tuned on an H200, [64, 2048, 8, 128] bf16; fast_div: see fast_div


class Kernel(Protocol):
    """A fused quantize-dequantize kernel for one format (what :meth:`KVFormat.kernel` returns). A kernel whose rows
    can share one launch with other formats' rows (the llama.cpp types) also has ``mix_code() -> int | None``
    (:mod:`kvgeom.quant.triton.mixed`)."""

    def supported(self, x: Tensor) -> bool:
        """Whether it covers ``x``'s shape (device and dtype: :func:`launchable`)."""
        ...

    def launch(self, x: Tensor, out: Tensor, mask: Tensor | None, role: str) -> None:
        """Write ``fake_quant(x)`` for contiguous ``x`` into ``out`` (``mask``: uint8 view of the bool mask, or
        None for all positions real)."""
        ...


# ---- exact elementwise helpers (same arithmetic on the GPU and under the interpreter) ------------------
@triton.jit
def copysign(mag, s):
    bits = (mag.to(tl.int32, bitcast=True) & 0x7FFFFFFF) | (s.to(tl.int32, bitcast=True) & -2147483648)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def rint(v):
    """``torch.round``: nearest, ties to even, sign kept (also of zero); exact for every finite fp32."""
    a = tl.abs(v)
    r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
    return copysign(r, v)


@triton.jit
def trunc(v):
    """``torch.trunc`` (C ``truncf``), sign kept."""
    a = tl.abs(v)
    r = (a + 8388608.0) - 8388608.0
    r = tl.where(r > a, r - 1.0, r)
    return copysign(tl.where(a < 8388608.0, r, a), v)


@triton.jit
def recip(d):
    """ggml's ``d ? 1.0f/d : 0.0f`` (IEEE division), with 0 also where ``1/d`` overflows: ``d`` is then subnormal,
    its fp16 copy (the dequantization scale) is 0 and every code dequantizes to 0, as eager's do whatever its
    integer cast made of ``x * inf``; a float ``0 * inf`` would be NaN."""
    nz = d != 0.0
    r = tl.math.div_rn(tl.zeros_like(d) + 1.0, tl.where(nz, d, 1.0))
    return tl.where(nz & (tl.abs(r) < float("inf")), r, 0.0)


#: divisor range inside which :func:`fast_div` is exact where it matters (see there); a program holding any
#: other divisor (or a quotient beyond FAST_HI) runs ``div_rn``
FAST_LO: tl.constexpr = tl.constexpr(2.0**-64)
FAST_HI: tl.constexpr = tl.constexpr(2.0**64)


@triton.jit
def rcp(s):
    """The refined reciprocal of CUDA's ``div.rn.f32`` fast path: ``rcp.approx`` (inline PTX: GPU only), then one
    Newton step."""
    r0 = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [s], dtype=tl.float32, is_pure=True,
                                   pack=1)
    return tl.fma(r0, tl.fma(-s, r0, 1.0), r0)


@triton.jit
def fast_div(d, s, r):
    """``d / s`` as CUDA's ``div.rn.f32`` computes it when its check (FCHK) lets it skip its slow path, with the
    reciprocal ``r = rcp(s)`` computed once per divisor instead of once per element.

    For ``s`` in [FAST_LO, FAST_HI] and ``|d / s| <= FAST_HI`` it equals the IEEE quotient (same bits) whenever
    ``|d / s| >= 2^-20``: operands and result are then normal and the residual ``d - s*q`` exact, the fast path's
    domain. A smaller quotient (``d`` zero, subnormal or tiny against ``s``, where FCHK would take the slow path)
    may be off by ulps, has the sign of ``d`` (also when zero: ``s > 0``), and rounds to the same integer code
    (``|q| < 1/4``) and to the same fp8 value (below half the smallest fp8 subnormal, 2^-17) as the exact one.
    ``tests/quant/test_triton_kernels.py::test_fast_division_is_exact`` checks this against torch on the GPU."""
    return copysign(fast_div_nonneg(d, s, r), d)


@triton.jit
def fast_div_nonneg(d, s, r):
    """:func:`fast_div` for ``d >= 0`` (or -0) where the sign of a quotient below 2^-20 does not matter: one
    instruction less per element."""
    q = tl.fma(d, r, 0.0)
    return tl.fma(r, tl.fma(-s, q, d), q)


@triton.jit
def fast_ok(safe, amax, r):
    """Whether every divisor ``safe`` (and quotient bound ``amax * r``) of a program is in :func:`fast_div`'s
    range: a scalar, so that the program takes one branch."""
    return (tl.min(safe) >= FAST_LO) & (tl.max(safe) <= FAST_HI) & (tl.max(amax * r) <= FAST_HI)


@triton.jit
def fp16(d):
    return d.to(tl.float16).to(tl.float32)


@triton.jit
def load(ptr, offs, ok, IO: tl.constexpr):
    raw = tl.load(ptr + offs, mask=ok, other=0)
    if IO == 2:  # bf16 stored as int16: widening is exact
        x = ((raw.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        x = raw.to(tl.float32)
    return x, raw


@triton.jit
def load_rows(x_ptr, mask_ptr, n_rows, NR: tl.constexpr, ROWS: tl.constexpr, N: tl.constexpr, IO: tl.constexpr,
              HAS_MASK: tl.constexpr, I64: tl.constexpr):
    """This program's ``ROWS`` rows of ``N`` contiguous values (``NR`` rows per position): their offsets, the
    in-bounds mask, the values in fp32 with padding positions zeroed (as eager zeroes them before quantizing), the
    raw values (what :func:`store` returns at padding) and which rows are real positions."""
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    row = pid * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, N)
    row_ok = row < n_rows
    ok = row_ok[:, None] & (col < N)[None, :]
    offs = row[:, None] * N + col[None, :]
    x, raw = load(x_ptr, offs, ok, IO)
    if HAS_MASK:
        real = row_ok & (tl.load(mask_ptr + row // NR, mask=row_ok, other=0) != 0)
    else:
        real = row_ok
    return offs, ok, tl.where(real[:, None], x, 0.0), raw, real


@triton.jit
def store(ptr, offs, ok, y, raw, real, IO: tl.constexpr):
    """Cast ``y`` to the input dtype (nearest-even) and store it at real positions, ``raw`` at padding."""
    if IO == 2:
        b = y.to(tl.int32, bitcast=True)
        yr = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int16)
    else:
        yr = y.to(raw.dtype)
    tl.store(ptr + offs, tl.where(real, yr, raw), mask=ok)


@triton.jit
def divide(d, s, r, fast, FAST: tl.constexpr, SIGNED: tl.constexpr):
    """``d / s`` (IEEE): :func:`fast_div` where the program's ``fast`` check passed, else ``div_rn``.
    ``SIGNED=False`` (``d >= 0`` and a quotient below 2^-20 rounds to 0 whatever its sign): :func:`fast_div_nonneg`."""
    if FAST:
        if fast:
            if SIGNED:
                t = fast_div(d, s, r)
            else:
                t = fast_div_nonneg(d, s, r)
        else:
            t = tl.math.div_rn(d, s)
    else:
        t = tl.math.div_rn(d, s)
    return t


@triton.jit
def divisor(safe, amax, FAST: tl.constexpr):
    """The reciprocal of each divisor ``safe`` (or ``safe`` itself if not ``FAST``) and the program's fast check."""
    if FAST:
        r = rcp(safe)
        fast = fast_ok(safe, amax, r)
    else:
        r = safe
        fast = False
    return r, fast


@triton.jit
def int_params(lo, hi, KIND: tl.constexpr, QMAX: tl.constexpr, FAST: tl.constexpr):
    """:func:`kvgeom.quant.uniform.int_params` from a block's min/max; QMAX 2^(b-1)-1 (sym) or 2^b-1. Also the
    divisor ``safe`` of :func:`int_apply`, its reciprocal and the program's fast-division check."""
    amax = tl.maximum(tl.abs(lo), tl.abs(hi))
    if KIND == INT_SYM:
        scale = tl.math.div_rn(amax, QMAX)
        zp = scale * 0.0
        safe = tl.where(scale > 0.0, scale, 1.0)
    else:
        scale = tl.maximum(tl.math.div_rn(hi - lo, QMAX), 1e-8)
        zp = tl.minimum(tl.maximum(rint(tl.math.div_rn(-lo, scale)), 0.0), QMAX)
        safe = scale
    r, fast = divisor(safe, amax, FAST)
    return scale, zp, safe, r, fast


@triton.jit
def int_apply(x, scale, zp, safe, r, fast, KIND: tl.constexpr, QMAX: tl.constexpr, FAST: tl.constexpr):
    """:func:`kvgeom.quant.uniform.int_apply` (``safe``, ``r``, ``fast`` from :func:`int_params`)."""
    t = divide(x, safe, r, fast, FAST, True)
    if KIND == INT_SYM:
        q = tl.minimum(tl.maximum(rint(t), -QMAX - 1.0), QMAX)
        return q * scale
    else:
        q = tl.minimum(tl.maximum(rint(t + zp), 0.0), QMAX)
        return (q - zp) * scale


# ---- host side ----------------------------------------------------------------------------------------
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launchable(x: Tensor) -> bool:
    """Whether the kernels can run on ``x`` at all: 4 dims, fp32/fp16/bf16, not empty, on CUDA (or under the
    interpreter)."""
    return not (x.ndim != 4 or x.dtype not in IO_CODES or x.numel() == 0 or not (x.is_cuda or interpreting()))


def use_fast_div(x: Tensor) -> bool:
    """Whether kernels on ``x`` may use :func:`fast_div` (its inline PTX needs the GPU, not the interpreter)."""
    return TUNE["fast_div"] and x.is_cuda


def io_view(x: Tensor) -> Tensor:
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x
