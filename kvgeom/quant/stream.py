"""A quantized KV cache that grows token by token: :class:`StreamQuantizer`.

``append(x_new, mask_new)`` stores the newly arriving K or V positions and returns the whole cache so far,
dequantized, as attention reads it. Rules by scheme:

* per-position schemes (``token``, ``head``, ``group{G}``, llama.cpp types, fp8 without ``@amax``, casts):
  each position is quantized on arrival, independently; equal to ``fake_quant`` on each chunk;
* ``tensor``, ``channel``, ``@amax``: ranges/scales are measured on the first call (the prefill, real
  positions of each row) and frozen; later positions use them, codes clamped to the code range;
* KIVI: the prefill rule on the first call, then KIVI's decode rule per new real token (keys flushed R at
  a time, values one at a time once more than R are held), so stored keys change when flushed.

Padding positions (mask False) are stored and returned unchanged and never enter a range; rows are
independent. Construct a new instance (or call :meth:`reset`) per generation.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .fake import check_input, quantize_fp32, resolve_spec
from .fp8 import fp8_apply, fp8_scale
from .kivi import check_kivi, prefill_row, quant_keys, quant_values
from .scheme import BaseSpec, CastSpec, FP8Spec, IntSpec, KIVISpec, Role, Scheme
from .uniform import IntParams, int_apply, int_params


def _frozen(spec: BaseSpec) -> bool:
    if isinstance(spec, IntSpec):
        return spec.granularity in ("tensor", "channel")
    return isinstance(spec, FP8Spec) and spec.dynamic


class StreamQuantizer:
    """Streaming (cache-mode) quantizer for one role (K or V) of one layer."""

    def __init__(self, scheme: Scheme | BaseSpec | str, role: Role = "k", *, site: str | None = None) -> None:
        self.spec = resolve_spec(scheme, role)
        self.role: Role = role
        self.site = site
        self.reset()

    def reset(self) -> None:
        """Forget everything stored (start a new generation)."""
        self._store: Tensor | None = None  # fp32 [batch, pos, kv_head, d_head], as attention reads it
        self._real: Tensor | None = None  # bool [batch, pos]
        self._full: Tensor | None = None  # bool [batch, pos]: stored value is the raw input
        self._dtype: torch.dtype | None = None
        self._params: IntParams | Tensor | None = None  # frozen int params or fp8 scale
        self._tail: list[list[int]] = []  # KIVI: positions of full-precision real tokens, per row

    @property
    def n_positions(self) -> int:
        return 0 if self._store is None else self._store.shape[1]

    def full_precision_mask(self) -> Bool[Tensor, "batch pos"]:
        """True at real positions whose stored value is still the raw (unquantized) input."""
        if self._full is None:
            raise RuntimeError("nothing stored yet: call append() first")
        return self._full.clone()

    def append(
        self,
        x_new: Float[Tensor, "batch new kv_head d_head"],
        mask_new: Bool[Tensor, "batch new"] | None = None,
    ) -> Float[Tensor, "batch total kv_head d_head"]:
        """Store the K/V of new positions; return the whole dequantized cache so far.

        Returns ``[batch, total, kv_head, d_head]`` in the input dtype. The first call is the prefill;
        ``mask_new`` marks real positions (True; default all real).
        """
        mask_new = check_input(x_new, mask_new, self.role, self.site)
        first = self._store is None
        if not first:
            assert self._store is not None
            if x_new.shape[0] != self._store.shape[0] or x_new.shape[2:] != self._store.shape[2:]:
                raise ValueError(
                    f"append got shape {tuple(x_new.shape)} but the cache holds {tuple(self._store.shape)}: "
                    f"batch, kv_head and d_head must stay the same (call reset() for a new generation)"
                )
            if x_new.dtype != self._dtype:
                raise ValueError(f"append got dtype {x_new.dtype}, the cache holds {self._dtype}")
        self._dtype = x_new.dtype
        m4 = mask_new[:, :, None, None]
        raw = torch.where(m4, x_new.to(torch.float32), 0.0)
        spec = self.spec
        if isinstance(spec, KIVISpec):
            self._append_kivi(x_new.to(torch.float32), mask_new, spec, first)
        else:
            if _frozen(spec):
                q = self._frozen_quant(raw, mask_new, spec, first)
            else:
                q = quantize_fp32(raw, mask_new, spec, self.role)
            q = torch.where(m4, q, x_new.to(torch.float32))
            exact = isinstance(spec, CastSpec) and spec.dtype == "none"
            self._push(q, mask_new, mask_new if exact else torch.zeros_like(mask_new))
        assert self._store is not None
        return self._store.to(self._dtype)

    def select(self, rows: Tensor) -> None:
        """Keep only batch rows ``rows`` (in that order): generation drops rows that have finished."""
        if self._store is None:
            return
        assert self._real is not None and self._full is not None
        rows = rows.to(self._store.device)
        self._store, self._real, self._full = self._store[rows], self._real[rows], self._full[rows]
        if isinstance(self._params, Tensor):
            self._params = self._params[rows]
        elif isinstance(self._params, IntParams):
            zp = self._params.zero_point
            self._params = IntParams(self._params.scale[rows], None if zp is None else zp[rows])
        if self._tail:
            self._tail = [self._tail[i] for i in rows.tolist()]

    def _push(self, values: Tensor, real: Tensor, full: Tensor) -> None:
        if self._store is None:
            self._store, self._real, self._full = values, real.clone(), full.clone()
        else:
            assert self._real is not None and self._full is not None
            self._store = torch.cat([self._store, values], dim=1)
            self._real = torch.cat([self._real, real], dim=1)
            self._full = torch.cat([self._full, full], dim=1)

    def _frozen_quant(self, raw: Tensor, mask: Tensor, spec: BaseSpec, first: bool) -> Tensor:
        if first:
            empty = ~mask.any(dim=1)
            if bool(empty.any()):
                rows = empty.nonzero().squeeze(-1).tolist()
                raise ValueError(
                    f"{spec} freezes its range on the prefill, but batch rows {rows} have no real positions "
                    f"in it; give every row at least one real prefill token"
                )
            if isinstance(spec, IntSpec):
                self._params = int_params(raw, mask, spec)
            else:
                assert isinstance(spec, FP8Spec)
                self._params = fp8_scale(raw, mask, spec, self.role)
        if isinstance(spec, IntSpec):
            assert isinstance(self._params, IntParams)
            return int_apply(raw, self._params, spec)
        assert isinstance(spec, FP8Spec) and isinstance(self._params, Tensor)
        return fp8_apply(raw, self._params, spec)

    def _append_kivi(self, x: Tensor, mask: Tensor, spec: KIVISpec, first: bool) -> None:
        check_kivi(spec, x.shape[-1])
        start = self.n_positions
        self._push(x.clone(), mask, mask.clone())
        assert self._store is not None and self._full is not None
        if first:
            self._tail = [[] for _ in range(x.shape[0])]
        for b in range(x.shape[0]):
            new_pos = (mask[b].nonzero().squeeze(-1) + start).tolist()
            if first:  # KIVI's prefill rule on this row's real tokens
                if new_pos:
                    idx = torch.tensor(new_pos, dtype=torch.long, device=x.device)
                    out, full = prefill_row(self._store[b, idx], spec, self.role)
                    self._store[b, idx] = out
                    self._full[b, idx] = full
                    self._tail[b] = [p for p, f in zip(new_pos, full.tolist(), strict=True) if f]
                continue
            tail = self._tail[b] + new_pos
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
                self._store[b, idx] = quant(self._store[b, idx], spec)
                self._full[b, idx] = False
            self._tail[b] = keep
