"""``none`` (identity), ``fp16``, ``bf16``: a cast round trip, ``x̂ = cast(cast(x, dtype), fp32)``; 16 bits.

Proved by ``tests/quant/test_quant_scheme.py`` (grammar, bits) and ``tests/quant/test_formats.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .base import KVFormat, Role, register_format
from .engines import LlamaCppType, VLLMDtype

__all__ = ["CastSpec"]

_CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@register_format
@dataclass(frozen=True)
class CastSpec(KVFormat):
    """``none`` (identity), ``fp16`` or ``bf16``: ``x̂ = cast(cast(x, dtype), x.dtype)``."""

    dtype: Literal["none", "fp16", "bf16"]

    format_name = "cast"
    grammar = "none | fp16 | bf16"
    summary = "cast round trip (none = identity)"
    pattern = re.compile(r"none|fp16|bf16")

    @classmethod
    def from_match(cls, m: re.Match[str]) -> CastSpec:
        return cls(m.group(0))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.dtype

    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        return 16.0

    def quantize(self, x: Tensor, mask: Tensor, role: Role) -> Tensor:
        return x if self.dtype == "none" else x.to(_CAST[self.dtype]).to(torch.float32)

    @property
    def is_identity(self) -> bool:
        return self.dtype == "none"

    @property
    def full_precision(self) -> bool:
        return True

    def vllm(self) -> VLLMDtype:
        return VLLMDtype("auto")

    def llama_cpp(self) -> LlamaCppType:
        return LlamaCppType("f16" if self.dtype in ("none", "fp16") else "bf16")
