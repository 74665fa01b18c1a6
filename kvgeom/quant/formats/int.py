"""Uniform ``int{b}-{tensor|token|head|channel|group{G}}-{sym|asym}``, b in 2..8 (math: :mod:`kvgeom.quant.uniform`).

Bits per element ``b + 16/n`` (sym) or ``b + 32/n`` (asym), ``n`` = elements sharing one fp16 range: token
``n = n_kv_heads * d_head``, head ``n = d_head``, group ``n = G``; tensor ``n = seq_len * n_kv_heads * d_head``
and channel ``n = seq_len`` (both amortised to ``b`` when ``seq_len`` is None). In a growing cache, ``tensor``
and ``channel`` ranges are measured on the prefill and frozen. Proved by ``tests/quant/test_quant_uniform.py``,
``tests/quant/test_quant_scheme.py`` and ``tests/quant/test_formats.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from torch import Tensor

from kvgeom.quant.kernels import triton_package
from kvgeom.quant.uniform import Granularity, check_group, int_apply, int_fake_quant, int_params

from .base import FormatError, KVFormat, Role, register_format
from .cache import CacheRule, FrozenOnPrefill, PerPosition
from .engines import HFCache

__all__ = ["INT_BITS", "Granularity", "IntSpec", "int_twin"]

INT_BITS = tuple(range(2, 9))


def _range_overhead(bits: int, symmetric: bool, n: int | None) -> float:
    """``b + (16 or 32)/n``: one fp16 scale (and one fp16 zero point if asymmetric) per ``n`` elements."""
    if n is None:
        return float(bits)
    return bits + (16 if symmetric else 32) / n


@register_format
@dataclass(frozen=True)
class IntSpec(KVFormat):
    """Uniform ``int{b}`` quantization with one range per block of the given granularity.

    sym:  ``scale = amax/(2^(b-1)-1)``, ``q = clamp(round(x/scale), -2^(b-1), 2^(b-1)-1)``, ``x̂ = q*scale``
    asym: ``scale = max((max-min)/(2^b-1), 1e-8)``, ``zp = clamp(round(-min/scale), 0, 2^b-1)``,
    ``q = clamp(round(x/scale + zp), 0, 2^b-1)``, ``x̂ = (q-zp)*scale``; ``round`` is half-to-even.
    """

    bits: int
    granularity: Granularity
    symmetric: bool
    group_size: int | None = None

    format_name = "int"
    grammar = "int{b}-{tensor|token|head|channel|group{G}}-{sym|asym}"
    summary = "uniform, b in 2..8, e.g. int4-group64-asym"
    pattern = re.compile(r"int(\d+)-(tensor|token|head|channel|group(\d+))-(sym|asym)")

    @classmethod
    def from_match(cls, m: re.Match[str]) -> IntSpec:
        bits = int(m.group(1))
        if bits not in INT_BITS:
            raise FormatError(f"int bits must be in 2..8 (got {bits})")
        group = None
        gran = m.group(2)
        if m.group(3) is not None:
            group = int(m.group(3))
            if group < 1:
                raise FormatError("the group size G of int{b}-group{G} must be >= 1")
            gran = "group"
        return cls(bits, gran, m.group(4) == "sym", group)

    def _ranges(self) -> str:
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        return f"{gran}-{'sym' if self.symmetric else 'asym'}"

    def __str__(self) -> str:
        return f"int{self.bits}-{self._ranges()}"

    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        n: int | None
        if self.granularity == "token":
            n = n_kv_heads * d_head
        elif self.granularity == "head":
            n = d_head
        elif self.granularity == "group":
            n = self.group_size
        elif self.granularity == "tensor":
            n = None if seq_len is None else seq_len * n_kv_heads * d_head
        else:  # channel
            n = seq_len
        return _range_overhead(self.bits, self.symmetric, n)

    @property
    def frozen_ranges(self) -> bool:
        """Whether a range spans positions (``tensor``, ``channel``): a cache freezes it on the prefill."""
        return self.granularity in ("tensor", "channel")

    def quantize(self, x: Tensor, mask: Tensor, role: Role) -> Tensor:
        return int_fake_quant(x, mask, self)

    def cache_rule(self, role: Role) -> CacheRule:
        if not self.frozen_ranges:
            return PerPosition(self, role)
        return FrozenOnPrefill(self, role, lambda x, m: int_params(x, m, self), lambda x, p: int_apply(x, p, self))

    def check(self, x: Tensor) -> None:
        check_group(self, x.shape[2], x.shape[3])

    def kernel(self):
        package = triton_package()
        if package is None:
            return None
        if self.frozen_ranges:
            return package.ranged.int_ranged(self.bits, self.symmetric, self.granularity == "channel")
        block = self.group_size if self.granularity == "group" else self.granularity
        return None if block is None else package.block.int_blocks(self.bits, self.symmetric, block)

    def hf(self) -> HFCache:
        if self.granularity != "group":
            return super().hf()
        if self.bits in (2, 4):
            backend = "quanto"
        elif self.bits in (1, 3, 8):
            backend = "hqq"
        else:
            return HFCache(None, (f"not expressible: HF backends take nbits 2/4 (quanto) or 1/2/3/4/8 (hqq), not "
                                  f"{self.bits}",))
        return HFCache({"backend": backend, "nbits": self.bits, "axis_key": 0, "axis_value": 0,
                        "q_group_size": self.group_size, "residual_length": 128},
                       ("approximate: the backend's grouping axis, rounding and zero point differ from kvgeom's "
                        f"{self}, and HF keeps the newest <= residual_length tokens in full precision",))

    @property
    def nominal_bits(self) -> int:
        return self.bits

    @property
    def symmetric_range(self) -> bool:
        return self.symmetric

    def bit_widths(self) -> tuple[int, ...]:
        return INT_BITS

    def at_bits(self, bits: int) -> IntSpec | None:
        return replace(self, bits=bits) if bits in INT_BITS else None

    def family(self) -> str:
        return f"int{{b}}-{self._ranges()}"


def int_twin(spec: KVFormat, granularity: Granularity, group_size: int | None = None) -> KVFormat:
    """The uniform format with ``spec``'s nominal bits (clamped to 2..8) and symmetry and the given ranges
    (``q4_0`` -> ``int4-group64-asym`` for ``"group", 64``); a full-precision format (a cast) is returned
    unchanged."""
    if spec.full_precision:
        return spec
    bits = min(max(spec.nominal_bits, INT_BITS[0]), INT_BITS[-1])
    return IntSpec(bits, granularity, spec.symmetric_range, group_size)
