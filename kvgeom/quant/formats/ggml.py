"""llama.cpp cache types ``q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | iq4_nl``, optionally ``+rot`` (math:
:mod:`kvgeom.quant.ggml`, :mod:`kvgeom.quant.hadamard`).

Blocks of 32 along d_head; bits per element q8_0 8.5, q4_0 4.5, q4_1 5.0, q5_0 5.5, q5_1 6.0, iq4_nl 4.5 (``+rot``
is free). Proved by ``tests/quant/test_quant_ggml.py`` (bit-exact with ggml) and ``tests/quant/test_formats.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from kvgeom.quant.ggml import GGML_BITS, GGML_TYPES, QK, ggml_fake_quant
from kvgeom.quant.hadamard import fwht, rotation_block
from kvgeom.quant.kernels import triton_package

from .base import KVFormat, Role, register_format
from .engines import LlamaCppType

__all__ = ["GGMLSpec", "ggml_kv"]

KV = Float[Tensor, "batch pos kv_head d_head"]
#: the integer bit width of each type (what a uniform twin gets)
NOMINAL_BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "iq4_nl": 4}


def _check_blocks(spec: GGMLSpec, d_head: int) -> None:
    if d_head % QK != 0:
        raise ValueError(
            f"llama.cpp type {spec.qtype} quantizes blocks of {QK} values along d_head, but "
            f"d_head={d_head} is not a multiple of {QK}; llama.cpp refuses such a cache type for this "
            f"model, so pick another scheme"
        )


def ggml_kv(x: KV, spec: GGMLSpec, role: Role) -> KV:
    """llama.cpp type on blocks of 32 along d_head (fp32), with the optional Hadamard rotation."""
    d_head = x.shape[-1]
    _check_blocks(spec, d_head)
    n_rot = rotation_block(d_head, role) if spec.rotate else 0
    y = fwht(x, n_rot) if n_rot else x
    blocks = rearrange(y, "b p h (n k) -> (b p h n) k", k=QK)
    y = ggml_fake_quant(blocks.contiguous(), spec.qtype).reshape(x.shape)
    return fwht(y, n_rot) if n_rot else y


@register_format
@dataclass(frozen=True)
class GGMLSpec(KVFormat):
    """A llama.cpp cache type (blocks of 32 along d_head), optionally with llama.cpp's Hadamard rotation.

    ``rotate`` models ``attn_rot_k`` / ``attn_rot_v`` (llama.cpp PR #21038, 2026): each head vector is
    split into blocks of ``n`` and each block multiplied by the orthonormal Sylvester Hadamard matrix
    ``H_n/sqrt(n)`` before storing; ``n`` is the largest power of two >= 64 dividing d_head for K, and 64
    for V. We rotate, quantize, and rotate back (``H`` is symmetric and its own inverse), which is what
    attention sees since llama.cpp also rotates Q and un-rotates the attention output.
    """

    qtype: Literal["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]
    rotate: bool = False

    format_name = "ggml"
    grammar = " | ".join(GGML_TYPES) + "[+rot]"
    summary = "llama.cpp cache types, e.g. q4_0+rot"
    pattern = re.compile(r"(" + "|".join(GGML_TYPES) + r")(\+rot)?")

    @classmethod
    def from_match(cls, m: re.Match[str]) -> GGMLSpec:
        return cls(m.group(1), m.group(2) is not None)  # type: ignore[arg-type]

    @classmethod
    def near_miss(cls, text: str) -> str | None:
        if "+rot" in text:
            return "+rot applies only to the llama.cpp types " + ", ".join(GGML_TYPES)
        return None

    def __str__(self) -> str:
        return self.qtype + ("+rot" if self.rotate else "")

    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        return GGML_BITS[self.qtype]

    def quantize(self, x: Tensor, mask: Tensor, role: Role) -> Tensor:
        return ggml_kv(x, self, role)

    def check(self, x: Tensor) -> None:
        _check_blocks(self, x.shape[-1])
        if self.rotate:
            rotation_block(x.shape[-1], "k")

    def kernel(self):
        package = triton_package()
        if package is None:
            return None
        inner = package.block.ggml_blocks(self.qtype, QK)
        if inner is None or not self.rotate:
            return inner
        return package.rotated.RotatedKernel(inner)  # the same rotations around the unrotated type's kernel

    def llama_cpp(self) -> LlamaCppType:
        return LlamaCppType(self.qtype, rotated=self.rotate)

    @property
    def nominal_bits(self) -> int:
        return NOMINAL_BITS[self.qtype]
