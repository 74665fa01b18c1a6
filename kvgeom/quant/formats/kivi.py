"""KIVI ``kivi{b}[-g{G}][-r{R}]``, b in {2, 4}, defaults G=32 R=128 (math: :mod:`kvgeom.quant.kivi`).

Bits per element ``b + 32/G`` (the full-precision residual is not counted). In a growing cache
(:class:`KIVICache`): KIVI's prefill rule on the first call, then its decode rule per new real token (keys
flushed R at a time, values one at a time once more than R are held), so stored keys change when flushed.
Proved by ``tests/quant/test_quant_kivi_stream.py`` (against KIVI's reference code) and
``tests/quant/test_formats.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kvgeom.quant.kernels import triton_package
from kvgeom.quant.kivi import check_kivi, kivi_fake_quant, prefill_row, quant_keys, quant_values

from .base import FormatError, KVFormat, Role, register_format
from .cache import CacheRule, CacheStore
from .engines import HFCache

__all__ = ["KIVI_BITS", "KIVI_DEFAULT_GROUP", "KIVI_DEFAULT_RESIDUAL", "KIVICache", "KIVISpec"]

KIVI_DEFAULT_GROUP = 32  # KIVI paper / code default group size
KIVI_DEFAULT_RESIDUAL = 128  # KIVI paper default residual length (its example.py uses 32)
KIVI_BITS = (2, 4)


@register_format
@dataclass(frozen=True)
class KIVISpec(KVFormat):
    """KIVI (Liu et al. 2024): keys per channel over groups of G tokens, values per token over groups of
    G channels, asymmetric; the newest R tokens stay full precision. Defaults G=32, R=128 (the paper's
    setting; KIVI's example.py uses R=32).
    """

    bits: int
    group_size: int = KIVI_DEFAULT_GROUP
    residual: int = KIVI_DEFAULT_RESIDUAL

    format_name = "kivi"
    grammar = "kivi{b}[-g{G}][-r{R}]"
    summary = "KIVI, b in {2,4}, defaults G=32 R=128 (R multiple of G)"
    pattern = re.compile(r"kivi(\d+)(?:-g(\d+))?(?:-r(\d+))?")

    @classmethod
    def from_match(cls, m: re.Match[str]) -> KIVISpec:
        bits = int(m.group(1))
        if bits not in KIVI_BITS:
            raise FormatError(f"KIVI bits must be 2 or 4 (got {bits})")
        group = int(m.group(2)) if m.group(2) is not None else KIVI_DEFAULT_GROUP
        residual = int(m.group(3)) if m.group(3) is not None else KIVI_DEFAULT_RESIDUAL
        if group < 1:
            raise FormatError("the KIVI group size G must be >= 1")
        if residual < group or residual % group != 0:
            raise FormatError(f"the KIVI residual R={residual} must be a positive multiple of G={group}")
        return cls(bits, group, residual)

    def __str__(self) -> str:
        return f"kivi{self.bits}-g{self.group_size}-r{self.residual}"

    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        return self.bits + 32 / self.group_size

    def quantize(self, x: Tensor, mask: Tensor, role: Role) -> Tensor:
        return kivi_fake_quant(x, mask, self, role)

    def cache_rule(self, role: Role) -> CacheRule:
        return KIVICache(self, role)

    def check(self, x: Tensor) -> None:
        check_kivi(self, x.shape[-1])

    def kernel(self):
        package = triton_package()
        return None if package is None else package.kivi.KIVIKernel(self.bits, self.group_size, self.residual)

    def hf(self) -> HFCache:
        return HFCache({"backend": "quanto", "nbits": self.bits, "axis_key": 0, "axis_value": 0,
                        "q_group_size": self.group_size, "residual_length": self.residual},
                       ("approximate: HF quantizes keys and values with the same grouping (its docs: per channel, "
                        "q_group_size) and flushes its full-precision residual when it fills, while KIVI quantizes "
                        "values per token and keeps a sliding residual",))

    @property
    def nominal_bits(self) -> int:
        return self.bits

    def bit_widths(self) -> tuple[int, ...]:
        return KIVI_BITS

    def at_bits(self, bits: int) -> KIVISpec | None:
        return replace(self, bits=bits) if bits in KIVI_BITS else None

    def family(self) -> str:
        return f"kivi{{b}}-g{self.group_size}-r{self.residual}"


class KIVICache(CacheRule):
    """KIVI's cache: the prefill rule on each row's real prefill tokens, then the decode rule per new token."""

    spec: KIVISpec

    def __init__(self, spec: KIVISpec, role: Role) -> None:
        super().__init__(spec, role)
        self.tail: list[list[int]] = []  # positions of full-precision real tokens, per row

    def append(self, store: CacheStore, x: Tensor, mask: Tensor, first: bool) -> None:
        spec = self.spec
        check_kivi(spec, x.shape[-1])
        start = store.n_positions
        store.push(x.clone(), mask, mask.clone())
        assert store.values is not None and store.full is not None
        if first:
            self.tail = [[] for _ in range(x.shape[0])]
        for b in range(x.shape[0]):
            new_pos = (mask[b].nonzero().squeeze(-1) + start).tolist()
            if first:  # KIVI's prefill rule on this row's real tokens
                if new_pos:
                    idx = torch.tensor(new_pos, dtype=torch.long, device=x.device)
                    out, full = prefill_row(store.values[b, idx], spec, self.role)
                    store.values[b, idx] = out
                    store.full[b, idx] = full
                    self.tail[b] = [p for p, f in zip(new_pos, full.tolist(), strict=True) if f]
                continue
            tail = self.tail[b] + new_pos
            if self.role == "k":
                n_flush = (len(tail) // spec.residual) * spec.residual
                flush, keep = tail[:n_flush], tail[n_flush:]
                quant = quant_keys  # each R-block is a multiple of G tokens: groups never straddle flushes
            else:
                n_flush = max(len(tail) - spec.residual, 0)
                flush, keep = tail[:n_flush], tail[n_flush:]
                quant = quant_values
            if flush:
                idx = torch.tensor(flush, dtype=torch.long, device=x.device)
                store.values[b, idx] = quant(store.values[b, idx], spec)
                store.full[b, idx] = False
            self.tail[b] = keep

    def select(self, rows: Tensor) -> None:
        if self.tail:
            self.tail = [self.tail[i] for i in rows.tolist()]
