"""vLLM's per-token-head KV cache dtypes ``int8_per_token_head | fp8_per_token_head | int4_per_token_head``.

One fp32 scale per (token, KV head), computed on arrival (no calibration, nothing frozen), as vLLM's Triton
write kernels do (``vllm/v1/attention/ops/triton_reshape_and_cache_flash.py``, ``_reshape_cache_per_token_head``;
``vllm/v1/attention/ops/int4_per_token_head.py`` at commit 055e47c28003156421365af985d676fc921cb075; the
``CacheDType`` list of ``vllm/config/cache.py`` at 002f10e0cfa1373a19a0d2756598a34b700d20e5):

* int8: ``s = max(amax/127, 1e-6)``, ``q = trunc(clamp(x * (1/s), -128, 127))`` (Triton's float-to-int store
  truncates toward zero), ``x̂ = q * s``;
* fp8: ``s = max(amax/448, 1e-6)``, ``q = e4m3(clamp(x * (1/s), -448, 448))`` (round to nearest even),
  ``x̂ = q * s``;
* int4: a randomized Hadamard rotation first, ``y = H (d ⊙ x)`` (unnormalised Sylvester ``H``, fixed ±1 signs
  ``d`` drawn by ``torch.Generator`` seeded ``0x9E3779B9``), then asymmetric 4 bits over the head:
  ``s = max((max - min)/15, 1e-6)``, ``z = clamp(rnd(-min/s), 0, 15)``, ``q = clamp(rnd(y/s + z), 0, 15)``
  with ``rnd`` rounding half away from zero; the zero point is stored in the low 4 mantissa bits of the fp32
  scale, so attention reads ``ŷ = (q - z) * s'`` with ``s' = s`` with those bits cleared; attention rotates Q
  the same way and un-rotates its output, so what it sees is ``x̂ = d ⊙ (H ŷ) / d_head``.

The divisions by 127, 448 and 15 are IEEE (:func:`kvgeom.quant._ops.div`: torch's ``tensor / scalar`` is a product with
a reciprocal on CUDA and a division on the CPU), so CPU, GPU and the fused kernel (:mod:`kvgeom.quant.triton.pth`,
d_head a power of two) give the same bits. Bits per element: 8 + 32/d_head (int8, fp8), 4 + 32/d_head (int4).
kvgeom computes in fp32; vLLM receives
K/V in the model's dtype (bf16/fp16) and, on GPUs, may rotate with a bf16 tensor-core kernel: those roundings
are not modelled. Proved bit-exact against the formulas of vLLM's kernels by
``tests/quant/test_formats_vllm_pth.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from kvgeom.quant._ops import div
from kvgeom.quant.hadamard import rht_signs, wht
from kvgeom.quant.kernels import triton_package

from .base import KVFormat, Role, register_format
from .engines import VLLMDtype

__all__ = ["VLLMPerTokenHead", "rht_signs"]

_QMAX = {"int8": 127.0, "fp8": 448.0}
_QMIN = {"int8": -128.0, "fp8": -448.0}

def _round_away(x: Tensor) -> Tensor:
    """Round half away from zero (the kernel's ``where(x >= 0, x + 0.5, x - 0.5).to(int32)``)."""
    return torch.where(x >= 0, torch.trunc(x + 0.5), torch.trunc(x - 0.5))


def _int4_head(y: Tensor) -> Tensor:
    """Asymmetric 4-bit quantize-dequantize of each head vector (last axis), the zero point in the scale."""
    lo, hi = y.amin(dim=-1, keepdim=True), y.amax(dim=-1, keepdim=True)
    scale = torch.clamp(div(hi - lo, 15.0), min=1e-6)
    zp = torch.clamp(_round_away(-lo / scale), 0.0, 15.0)
    q = torch.clamp(_round_away(y * (1.0 / scale) + zp), 0.0, 15.0)
    packed = (scale.view(torch.int32) & -16).view(torch.float32)  # low 4 mantissa bits hold the zero point
    return (q - zp) * packed


@register_format
@dataclass(frozen=True)
class VLLMPerTokenHead(KVFormat):
    """vLLM ``{int8,fp8,int4}_per_token_head``: one scale per (token, KV head), on arrival (module docstring)."""

    kind: Literal["int8", "fp8", "int4"]

    format_name = "vllm_per_token_head"
    grammar = "int8_per_token_head | fp8_per_token_head | int4_per_token_head"
    summary = "vLLM per-(token, head) scales; int4 Hadamard-rotated"
    pattern = re.compile(r"(int8|fp8|int4)_per_token_head")

    @classmethod
    def from_match(cls, m: re.Match[str]) -> VLLMPerTokenHead:
        return cls(m.group(1))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.kind}_per_token_head"

    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        return (4.0 if self.kind == "int4" else 8.0) + 32.0 / d_head

    def check(self, x: Tensor) -> None:
        d = x.shape[-1]
        if self.kind == "int4" and (d < 2 or d & (d - 1)):
            raise ValueError(f"{self} rotates each head by a Hadamard transform, which needs d_head a power of two "
                             f"(vLLM asserts it); got d_head={d}: pick int8_per_token_head or fp8_per_token_head")

    def quantize(self, x: Tensor, mask: Tensor, role: Role) -> Tensor:
        self.check(x)
        if self.kind == "int4":
            d = x.shape[-1]
            signs = rht_signs(d, x.device)
            y = _int4_head(wht(x * signs, d))
            return wht(y, d) * signs / d
        amax = x.abs().amax(dim=-1, keepdim=True)
        scale = torch.clamp(div(amax, _QMAX[self.kind]), min=1e-6)
        y = torch.clamp(x * (1.0 / scale), _QMIN[self.kind], _QMAX[self.kind])
        q = torch.trunc(y) if self.kind == "int8" else y.to(torch.float8_e4m3fn).to(torch.float32)
        return q * scale

    def kernel(self):
        package = triton_package()
        return None if package is None else package.pth.PerTokenHeadKernel(self.kind)

    def vllm(self) -> VLLMDtype:
        return VLLMDtype(str(self))

    @property
    def nominal_bits(self) -> int:
        return 4 if self.kind == "int4" else 8

    @property
    def symmetric_range(self) -> bool:
        return self.kind != "int4"
