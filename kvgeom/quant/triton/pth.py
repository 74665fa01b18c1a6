"""vLLM's per-token-head KV dtypes (``int8_per_token_head``, ``fp8_per_token_head``, ``int4_per_token_head``) in one
fused kernel, bit-identical to the eager math of :class:`kvgeom.quant.formats.vllm_pth.VLLMPerTokenHead`.

Each program holds ``ROWS`` head vectors of ``N = d_head`` values (a power of two) in registers. int8/fp8: the
head's ``amax``, ``s = max(amax / QMAX, 1e-6)`` (an IEEE division, as the eager path's
:func:`kvgeom.quant._ops.div`), ``y = clamp(x * (1/s))``, truncation (int8) or fp8 e4m3 rounding in fp32 bits
(:func:`kvgeom.quant.triton.ranged.fp8_round`), times ``s``. int4: the signs, the unnormalised Hadamard butterflies
in the eager order (:func:`kvgeom.quant.triton.rotated.wht_tile`), asymmetric 4 bits with rounding half away from
zero and the zero point in the scale's low mantissa bits, the butterflies again, the signs, ``/ N`` (exact: a power
of two). No fma (``enable_fp_fusion=False``); padding positions are returned unchanged.

Proved by ``tests/quant/test_triton_kernels.py`` (the three dtypes in ``COVERED``: random inputs, ties, padding,
every input dtype, d_head 64 and 128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvgeom.quant.hadamard import rht_signs

from .common import IO_CODES, TUNE, io_view, load_rows, store, trunc
from .ranged import fp8_round
from .rotated import wht_tile

__all__ = ["PerTokenHeadKernel"]

_KINDS = {"int8": 0, "fp8": 1, "int4": 2}


@triton.jit
def _round_away(v):
    """``where(v >= 0, trunc(v + 0.5), trunc(v - 0.5))``."""
    return tl.where(v >= 0, trunc(v + 0.5), trunc(v - 0.5))


@triton.jit
def _pth_kernel(x_ptr, out_ptr, mask_ptr, signs_ptr, n_rows, NR: tl.constexpr, ROWS: tl.constexpr, N: tl.constexpr,
                LOG: tl.constexpr, KIND: tl.constexpr, IO: tl.constexpr, HAS_MASK: tl.constexpr,
                I64: tl.constexpr):
    """``ROWS`` head vectors of ``N`` values per program (``NR`` heads per position)."""
    offs, ok, x, raw, real = load_rows(x_ptr, mask_ptr, n_rows, NR, ROWS, N, IO, HAS_MASK, I64)
    one = tl.full([ROWS], 1.0, tl.float32)
    if KIND == 2:
        sg = tl.load(signs_ptr + tl.arange(0, N))[None, :]
        y = wht_tile(x * sg, ROWS, N, LOG)
        lo = tl.min(y, axis=1)
        hi = tl.max(y, axis=1)
        scale = tl.maximum(tl.math.div_rn(hi - lo, one * 15.0), 1e-6)
        zp = tl.minimum(tl.maximum(_round_away(tl.math.div_rn(-lo, scale)), 0.0), 15.0)
        r = tl.math.div_rn(one, scale)
        q = tl.minimum(tl.maximum(_round_away(y * r[:, None] + zp[:, None]), 0.0), 15.0)
        packed = (scale.to(tl.int32, bitcast=True) & -16).to(tl.float32, bitcast=True)
        yh = (q - zp[:, None]) * packed[:, None]
        back = wht_tile(yh, ROWS, N, LOG) * sg * (1.0 / N)
    else:
        qmax = 127.0 if KIND == 0 else 448.0
        qmin = -128.0 if KIND == 0 else -448.0
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.maximum(tl.math.div_rn(amax, one * qmax), 1e-6)
        r = tl.math.div_rn(one, scale)
        y = tl.minimum(tl.maximum(x * r[:, None], qmin), qmax)
        if KIND == 0:
            q = trunc(y)
        else:
            q = fp8_round(y, 20, 2.0**-6, 2.0**-9)
        back = q * scale[:, None]
    store(out_ptr, offs, ok, back, raw, real[:, None], IO)


@dataclass(frozen=True)
class PerTokenHeadKernel:
    """The kernel of one of vLLM's per-token-head dtypes (``kind``: ``int8``, ``fp8`` or ``int4``)."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {self.kind!r}")

    def supported(self, x: Tensor) -> bool:
        d = x.shape[-1]
        return x.ndim == 4 and 2 <= d <= 1024 and not d & (d - 1)

    def launch(self, x: Tensor, out: Tensor, mask: Tensor | None, role: str) -> None:
        B, P, H, N = x.shape
        n_rows = B * P * H
        rows = max(1, TUNE["block_elems"] // N)
        signs = rht_signs(N, x.device).to(torch.float32).contiguous()
        m = mask if mask is not None else x  # x: placeholder, never read
        _pth_kernel[(triton.cdiv(n_rows, rows),)](
            io_view(x), io_view(out), m, signs, n_rows, NR=H, ROWS=rows, N=N, LOG=N.bit_length() - 1,
            KIND=_KINDS[self.kind], IO=IO_CODES[x.dtype], HAS_MASK=mask is not None,
            I64=x.numel() + rows * N >= 2**31, num_warps=min(16, max(TUNE["block_warps"], rows * N // 512)),
            enable_fp_fusion=False)
