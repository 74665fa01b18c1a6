"""Cache rules: how a KV cache that grows token by token stores one role's newly arriving positions.

:class:`kvgeom.quant.StreamQuantizer` owns a :class:`CacheStore` (values as attention reads them, which
positions are real, which still hold the raw input) and asks its format for a :class:`CacheRule`
(:meth:`kvgeom.quant.formats.KVFormat.cache_rule`). Two rules serve most formats:

* :class:`PerPosition`: each position quantized on arrival, independently (equal to ``fake_quant`` on each
  chunk); an identity format marks its positions full precision;
* :class:`FrozenOnPrefill`: parameters measured on the first call (the prefill, real positions of each row)
  and frozen; later positions reuse them (``tensor``/``channel`` ranges, fp8 ``@amax``).

A format with its own rule (KIVI's residual windows, :mod:`kvgeom.quant.formats.kivi`) subclasses
:class:`CacheRule`. A rule asks its format only what :class:`CachedFormat` names (every
:class:`~kvgeom.quant.formats.KVFormat` has it), so this module sits below the formats' base. Proved by
``tests/quant/test_quant_kivi_stream.py``, ``tests/quant/test_quant_fp8_batching.py`` and
``tests/quant/test_formats.py`` (``test_cache_rules``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kvgeom.quant.role import Role

__all__ = ["CacheRule", "CacheStore", "CachedFormat", "FrozenOnPrefill", "PerPosition", "take_rows"]


class CachedFormat(Protocol):
    """What a cache rule asks of its format (:class:`kvgeom.quant.formats.KVFormat` declares both)."""

    @property
    def is_identity(self) -> bool:
        """The stored value is exactly the input: its positions stay full precision."""
        ...

    def quantize(self, x: Float[Tensor, "batch pos kv_head d_head"], mask: Bool[Tensor, "batch pos"],
                 role: Role) -> Float[Tensor, "batch pos kv_head d_head"]:
        """Eager quantize-dequantize (fp32; padding zeroed and outside every range)."""
        ...

    def quantize_fast(self, x: Float[Tensor, "batch pos kv_head d_head"], mask: Bool[Tensor, "batch pos"],
                      role: Role) -> Float[Tensor, "batch pos kv_head d_head"]:
        """The same bits as ``quantize``, by a fused kernel where one covers ``x``."""
        ...


@dataclass
class CacheStore:
    """What a streaming cache holds, fp32 ``[batch, pos, kv_head, d_head]`` and bool ``[batch, pos]`` masks."""

    values: Tensor | None = None  # as attention reads them
    real: Tensor | None = None  # real (not padding) positions
    full: Tensor | None = None  # real positions whose stored value is still the raw input

    @property
    def n_positions(self) -> int:
        return 0 if self.values is None else self.values.shape[1]

    def push(self, values: Tensor, real: Tensor, full: Tensor) -> None:
        """Append positions (the first push starts the cache)."""
        if self.values is None:
            self.values, self.real, self.full = values, real.clone(), full.clone()
        else:
            assert self.real is not None and self.full is not None
            self.values = torch.cat([self.values, values], dim=1)
            self.real = torch.cat([self.real, real], dim=1)
            self.full = torch.cat([self.full, full], dim=1)

    def select(self, rows: Tensor) -> None:
        """Keep batch rows ``rows`` (in that order)."""
        assert self.values is not None and self.real is not None and self.full is not None
        self.values, self.real, self.full = self.values[rows], self.real[rows], self.full[rows]


def take_rows(obj: Any, rows: Tensor) -> Any:
    """Batch rows ``rows`` of a tensor, of every tensor field of a dataclass (recursively), None unchanged."""
    if obj is None:
        return None
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: take_rows(getattr(obj, f.name), rows)  # type: ignore[arg-type]
                                           for f in dataclasses.fields(obj)})
    return obj[rows]


class CacheRule(ABC):
    """One streaming cache's rule (one role of one layer; a fresh instance per generation).

    ``stable``: a stored position never changes after it arrived. Such a rule also offers :meth:`encode` (the
    stored values of the new positions, nothing kept), so that a cache can store them itself and touch only the
    new positions per call (:class:`kvgeom.runtime.PlanCache`); a rule that revisits stored positions (KIVI's
    flushes, HF quanto's requantization) leaves it False and keeps the history in the :class:`CacheStore`.
    ``stateless``: nothing of earlier calls enters a later one (a per-position quantizer), so any caller may run
    the format's kernel on new positions in the rule's place (:class:`kvgeom.quant.RowMix`).
    """

    stable: bool = False
    stateless: bool = False

    def __init__(self, spec: CachedFormat, role: Role) -> None:
        self.spec = spec
        self.role: Role = role

    @abstractmethod
    def append(self, store: CacheStore, x: Float[Tensor, "batch new kv_head d_head"],
               mask: Bool[Tensor, "batch new"], first: bool) -> None:
        """Store new positions ``x`` (fp32, padding not zeroed; ``mask`` True = real) into ``store``; ``first``:
        this is the prefill. Padding must be stored unchanged and never enter a range."""

    def select(self, rows: Tensor) -> None:
        """Keep only batch rows ``rows`` of the rule's own state (the store is selected by its owner)."""
        return None

    def encode(self, x: Float[Tensor, "batch new kv_head d_head"], mask: Bool[Tensor, "batch new"],
               first: bool, all_real: bool = False) -> Float[Tensor, "batch new kv_head d_head"]:
        """The stored values of new positions ``x`` (fp32), as :meth:`append` would store them (stable rules);
        ``all_real``: ``mask`` is all True (a decode step), so no position needs keeping apart."""
        raise TypeError(f"{type(self).__name__} revisits stored positions (stable=False): it has no encode(); use "
                        "append() with a CacheStore")


class PerPosition(CacheRule):
    """Each position quantized on arrival with ``spec.quantize_fast`` (``spec.quantize``'s bits, by the format's
    fused kernel on a GPU where it has one), independently of the others."""

    stable = True
    stateless = True

    def encode(self, x: Tensor, mask: Tensor, first: bool, all_real: bool = False) -> Tensor:
        if all_real:
            return self.quantize(x, mask, first)
        m4 = mask[:, :, None, None]
        q = self.quantize(torch.where(m4, x, 0.0), mask, first)
        return torch.where(m4, q, x)

    def append(self, store: CacheStore, x: Tensor, mask: Tensor, first: bool) -> None:
        store.push(self.encode(x, mask, first), mask, mask if self.spec.is_identity else torch.zeros_like(mask))

    def quantize(self, raw: Tensor, mask: Tensor, first: bool) -> Tensor:
        return self.spec.quantize_fast(raw, mask, self.role)


class FrozenOnPrefill(PerPosition):
    """Parameters measured by ``measure(raw, mask)`` on the prefill (per row, real positions) and frozen;
    ``apply(raw, params)`` quantizes with them (codes clamp to the code range). ``params``: a tensor or a
    dataclass of tensors with the batch first, so that :meth:`select` can keep rows."""

    stateless = False

    def __init__(self, spec: CachedFormat, role: Role, measure: Callable[[Tensor, Tensor], Any],
                 apply: Callable[[Tensor, Any], Tensor]) -> None:
        super().__init__(spec, role)
        self.measure, self.apply = measure, apply
        self.params: Any = None

    def quantize(self, raw: Tensor, mask: Tensor, first: bool) -> Tensor:
        if first:
            empty = ~mask.any(dim=1)
            if bool(empty.any()):
                rows = empty.nonzero().squeeze(-1).tolist()
                raise ValueError(
                    f"{self.spec} freezes its range on the prefill, but batch rows {rows} have no real positions "
                    f"in it; give every row at least one real prefill token"
                )
            self.params = self.measure(raw, mask)
        return self.apply(raw, self.params)

    def select(self, rows: Tensor) -> None:
        self.params = take_rows(self.params, rows)
