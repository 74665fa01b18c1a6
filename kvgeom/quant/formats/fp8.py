"""vLLM's fp8 cache ``fp8_e4m3 | fp8_e5m2[@amax]`` (math: :mod:`kvgeom.quant.fp8`); 8 bits per element (the
per-tensor scale is not counted). ``@amax`` scales are measured on the prefill and frozen in a growing cache.

Proved by ``tests/quant/test_quant_fp8_batching.py``, ``tests/quant/test_quant_scheme.py`` and
``tests/quant/test_formats.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from kvgeom.quant.fp8 import AMAX_DIVISOR, FP8_MAX, fp8_apply, fp8_scale
from kvgeom.quant.kernels import triton_package

from .base import KVFormat, Role, register_format
from .cache import CacheRule, FrozenOnPrefill, PerPosition
from .engines import HFCache, VLLMDtype

__all__ = ["FP8Spec"]


@register_format
@dataclass(frozen=True)
class FP8Spec(KVFormat):
    """vLLM fp8 cache: ``x̂ = fp8(clamp(x/s, -max, max)) * s`` with max 448 (e4m3) or 57344 (e5m2).

    ``s = 1`` unless ``dynamic`` (``@amax``): vLLM's ``calculate_kv_scales``, ``s = amax/200`` for K and
    ``amax/100`` for V, measured once on the prefill and frozen.
    """

    fmt: Literal["e4m3", "e5m2"]
    dynamic: bool = False

    format_name = "fp8"
    grammar = "fp8_e4m3 | fp8_e5m2[@amax]"
    summary = "vLLM fp8 cache, e.g. fp8_e4m3@amax"
    pattern = re.compile(r"fp8_(e4m3|e5m2)(@amax)?")

    @classmethod
    def from_match(cls, m: re.Match[str]) -> FP8Spec:
        return cls(m.group(1), m.group(2) is not None)  # type: ignore[arg-type]

    @classmethod
    def near_miss(cls, text: str) -> str | None:
        return "@amax applies only to fp8_e4m3 and fp8_e5m2" if "@amax" in text else None

    def __str__(self) -> str:
        return f"fp8_{self.fmt}" + ("@amax" if self.dynamic else "")

    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        return 8.0

    def quantize(self, x: Tensor, mask: Tensor, role: Role) -> Tensor:
        return fp8_apply(x, fp8_scale(x, mask, self, role), self)

    def cache_rule(self, role: Role) -> CacheRule:
        if not self.dynamic:
            return PerPosition(self, role)
        return FrozenOnPrefill(self, role, lambda x, m: fp8_scale(x, m, self, role), lambda x, s: fp8_apply(x, s, self))

    def kernel(self):
        package = triton_package()
        if package is None:
            return None
        return package.ranged.fp8_kernel(self.fmt, FP8_MAX[self.fmt], AMAX_DIVISOR, self.dynamic)

    def vllm(self) -> VLLMDtype:
        return VLLMDtype(f"fp8_{self.fmt}", calculate_kv_scales=self.dynamic)

    def hf(self) -> HFCache:
        if self.fmt != "e4m3":
            return super().hf()
        return HFCache({"backend": "fp8"},
                       ("approximate: HF's fp8 backend is e4m3 with a per-tensor scale amax/448 frozen at the first "
                        "update; kvgeom's fp8_e4m3 uses scale 1 (vLLM uncalibrated), @amax vLLM's amax/200 (K), "
                        "/100 (V)",))

    @property
    def nominal_bits(self) -> int:
        return 8
