"""Hugging Face ``QuantizedCache(backend="quanto")``: ``quanto{b}[-g{G}][-r{R}]``, b in {2, 4}, defaults G=64 R=128.

What transformers 5.23.0 (``src/transformers/cache_utils.py``, ``QuantizedLayer`` and ``QuantoQuantizedLayer``)
and optimum-quanto 0.2.7 (``MaxOptimizer``, ``group``, ``quantize_affine``, ``QBitsDequantizer``) do, with the
default ``axis_key = axis_value = 0``:

* quantization: groups of ``G`` consecutive values of the ``[batch, head, seq, d_head]`` tensor, i.e. along
  d_head when G divides it; per group ``s = (max - min)/(2^b - 1)``, shift ``-min``,
  ``q = clamp(round((x - min)/s), 0, 2^b - 1)`` (half to even), ``x̂ = s*q + min``;
* the cache: the first call (the prompt) is quantized whole but attended in full precision; later calls append
  to a full-precision residual; when ``len(residual) + new >= R`` the whole cache as that call read it
  (dequantized old part, residual, new tokens) is quantized again and the residual emptied. Each call attends
  its own new tokens in full precision (run it with ``QuantPlan(..., mode="cache", prefill="full")``: the
  engine catalogue does) and sees a flush from the next call on.

Bits per element ``b + 32/G`` (fp scale and shift per group; the residual is not counted). kvgeom quantizes
each sequence on its own; HF quantizes the padded batch, which gives the same groups when G divides d_head.
Proved against a transcription of quanto's and HF's code by ``tests/quant/test_formats_hf_quanto.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import FormatError, KVFormat, Role, register_format
from .cache import CacheRule, CacheStore
from .engines import HFCache

__all__ = ["HF_QUANTO_BITS", "HFQuantoCache", "HFQuantoSpec", "quanto_affine"]

HF_QUANTO_BITS = (2, 4)
HF_DEFAULT_GROUP = 64
HF_DEFAULT_RESIDUAL = 128


def quanto_affine(x: Tensor, bits: int, group: int) -> Tensor:
    """quanto's grouped affine quantize-dequantize along the last axis (``group`` must divide it)."""
    g = x.reshape(-1, group)
    lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    shift = -lo
    q = torch.clamp(torch.round((g + shift) / scale), 0, 2**bits - 1)
    out = scale * q - shift
    return torch.where(scale > 0, out, lo).reshape(x.shape)  # a constant group: quanto's 0/0 gives back min


@register_format
@dataclass(frozen=True)
class HFQuantoSpec(KVFormat):
    """HF ``QuantizedCache`` with the quanto backend (module docstring)."""

    bits: int
    group_size: int = HF_DEFAULT_GROUP
    residual: int = HF_DEFAULT_RESIDUAL

    format_name = "hf_quanto"
    grammar = "quanto{b}[-g{G}][-r{R}]"
    summary = "HF QuantizedCache (quanto), b in {2,4}, defaults G=64 R=128"
    pattern = re.compile(r"quanto(\d+)(?:-g(\d+))?(?:-r(\d+))?")

    @classmethod
    def from_match(cls, m: re.Match[str]) -> HFQuantoSpec:
        bits = int(m.group(1))
        if bits not in HF_QUANTO_BITS:
            raise FormatError(f"HF's quanto backend takes nbits 2 or 4 (got {bits})")
        group = int(m.group(2)) if m.group(2) is not None else HF_DEFAULT_GROUP
        residual = int(m.group(3)) if m.group(3) is not None else HF_DEFAULT_RESIDUAL
        if group < 1 or residual < 1:
            raise FormatError("the quanto group size G and residual length R must be >= 1")
        return cls(bits, group, residual)

    def __str__(self) -> str:
        return f"quanto{self.bits}-g{self.group_size}-r{self.residual}"

    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        return self.bits + 32 / self.group_size

    def check(self, x: Tensor) -> None:
        if x.shape[-1] % self.group_size:
            raise ValueError(f"{self}: kvgeom models quanto's groups along d_head, so G={self.group_size} must divide "
                             f"d_head={x.shape[-1]}; pick a G that divides it (HF's default is 64)")

    def quantize(self, x: Tensor, mask: Tensor, role: Role) -> Tensor:
        self.check(x)
        return quanto_affine(x, self.bits, self.group_size)

    def cache_rule(self, role: Role) -> CacheRule:
        return HFQuantoCache(self, role)

    def hf(self) -> HFCache:
        return HFCache({"backend": "quanto", "nbits": self.bits, "axis_key": 0, "axis_value": 0,
                        "q_group_size": self.group_size, "residual_length": self.residual})

    @property
    def nominal_bits(self) -> int:
        return self.bits


class HFQuantoCache(CacheRule):
    """HF's ``QuantizedLayer.update``: quantize the prompt for later calls, keep a residual, requantize all on a
    flush (seen from the next call), per row."""

    spec: HFQuantoSpec

    def __init__(self, spec: HFQuantoSpec, role: Role) -> None:
        super().__init__(spec, role)
        self.residual = 0
        self.pending = False

    def append(self, store: CacheStore, x: Tensor, mask: Tensor, first: bool) -> None:
        if self.pending and store.values is not None:  # the flush decided at the previous call
            assert store.real is not None and store.full is not None
            real = store.real[:, :, None, None]
            q = self.spec.quantize(torch.where(real, store.values, 0.0), store.real, self.role)
            store.values = torch.where(real, q, store.values)
            store.full = torch.zeros_like(store.full)
            self.pending = False
        store.push(x.clone(), mask, mask.clone())
        n_new = x.shape[1]
        if first:
            self.residual, self.pending = 0, True
        elif self.residual + n_new >= self.spec.residual:
            self.residual, self.pending = 0, True
        else:
            self.residual += n_new
