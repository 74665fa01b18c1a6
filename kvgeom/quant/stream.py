"""A quantized KV cache that grows token by token: :class:`StreamQuantizer`.

``append(x_new, mask_new)`` stores the newly arriving K or V positions and returns the whole cache so far,
dequantized, as attention reads it. How new positions are stored is the format's cache rule
(:meth:`kvgeom.quant.formats.KVFormat.cache_rule`, :mod:`kvgeom.quant.formats.cache`):

* per-position schemes (``token``, ``head``, ``group{G}``, llama.cpp types, fp8 without ``@amax``, casts):
  each position is quantized on arrival, independently; equal to ``fake_quant`` on each chunk;
* ``tensor``, ``channel``, ``@amax``: ranges/scales are measured on the first call (the prefill, real
  positions of each row) and frozen; later positions use them, codes clamped to the code range;
* KIVI: the prefill rule on the first call, then KIVI's decode rule per new real token (keys flushed R at
  a time, values one at a time once more than R are held), so stored keys change when flushed.

``append_new`` is the same for formats whose stored positions never change after arrival (``stable``: every
rule above but KIVI's and HF quanto's): it returns the stored values of the new positions only and keeps no
history, for a cache that stores them itself (:class:`kvgeom.runtime.PlanCache`: each call then costs the new
positions, not the whole history; ``tests/quant/test_formats.py::test_append_new_equals_append``).

Padding positions (mask False) are stored and returned unchanged and never enter a range; rows are
independent. Construct a new instance (or call :meth:`reset`) per generation. Proved by
``tests/quant/test_quant_kivi_stream.py``, ``tests/quant/test_quant_fp8_batching.py`` and
``tests/runtime/test_plan.py``.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .fake import check_input, resolve_spec
from .formats import CacheStore, KVFormat, Role
from .scheme import Scheme


class StreamQuantizer:
    """Streaming (cache-mode) quantizer for one role (K or V) of one layer."""

    def __init__(self, scheme: Scheme | KVFormat | str, role: Role = "k", *, site: str | None = None) -> None:
        self.spec = resolve_spec(scheme, role)
        self.role: Role = role
        self.site = site
        self.reset()

    def reset(self) -> None:
        """Forget everything stored (start a new generation)."""
        self._cache = CacheStore()
        self._rule = self.spec.cache_rule(self.role)
        self._dtype: torch.dtype | None = None
        self._shape: tuple[int, ...] | None = None  # (batch, kv_head, d_head) of the calls so far
        self._n_new = 0  # positions passed through append_new

    @property
    def stable(self) -> bool:
        """Stored positions never change after arrival: :meth:`append_new` applies."""
        return self._rule.stable

    @property
    def n_positions(self) -> int:
        return self._cache.n_positions or self._n_new

    def full_precision_mask(self) -> Bool[Tensor, "batch pos"]:
        """True at real positions whose stored value is still the raw (unquantized) input."""
        if self._cache.full is None:
            raise RuntimeError("nothing stored yet: call append() first")
        return self._cache.full.clone()

    def append(
        self,
        x_new: Float[Tensor, "batch new kv_head d_head"],
        mask_new: Bool[Tensor, "batch new"] | None = None,
        *,
        check_finite: bool = True,
    ) -> Float[Tensor, "batch total kv_head d_head"]:
        """Store the K/V of new positions; return the whole dequantized cache so far.

        Returns ``[batch, total, kv_head, d_head]`` in the input dtype. The first call is the prefill;
        ``mask_new`` marks real positions (True; default all real). ``check_finite=False`` skips the NaN/inf test
        (a device-to-host sync: :class:`kvgeom.runtime.PlanCache` on a GPU flags them on the device instead).
        """
        mask_new = check_input(x_new, mask_new, self.role, self.site, check_finite=check_finite)
        first = self._cache.values is None
        self._check_like_earlier(x_new, "append", first)
        self._rule.append(self._cache, x_new.to(torch.float32), mask_new, first)
        assert self._cache.values is not None
        return self._cache.values.to(self._dtype)

    def append_new(
        self,
        x_new: Float[Tensor, "batch new kv_head d_head"],
        mask_new: Bool[Tensor, "batch new"] | None = None,
        *,
        check_finite: bool = True,
    ) -> Float[Tensor, "batch new kv_head d_head"]:
        """Store the K/V of new positions and return their stored values only (stable formats; see module doc).

        The same values as the last ``new`` positions of :meth:`append`, which must not be mixed with it on one
        instance: here the caller keeps the history.
        """
        if not self._rule.stable:
            raise TypeError(f"{self.spec} revisits stored positions (its cache rule is not stable): use append(), "
                            "which keeps and returns the whole history")
        if self._cache.values is not None:
            raise RuntimeError("append() already stored positions in this cache: use one of append() and "
                               "append_new() per generation (or call reset())")
        all_real = mask_new is None
        mask_new = check_input(x_new, mask_new, self.role, self.site, check_finite=check_finite)
        first = self._n_new == 0
        self._check_like_earlier(x_new, "append_new", first)
        q = self._rule.encode(x_new.to(torch.float32), mask_new, first, all_real)
        self._n_new += x_new.shape[1]
        return q.to(x_new.dtype)

    def _check_like_earlier(self, x_new: Tensor, method: str, first: bool) -> None:
        """Batch, kv_head, d_head and dtype as in earlier calls (then remembered)."""
        shape = (x_new.shape[0], *x_new.shape[2:])
        if not first:
            if shape != self._shape:
                raise ValueError(
                    f"{method} got shape {tuple(x_new.shape)} but earlier calls had batch, kv_head, d_head = "
                    f"{self._shape}: they must stay the same (call reset() for a new generation)")
            if x_new.dtype != self._dtype:
                raise ValueError(f"{method} got dtype {x_new.dtype}, earlier calls {self._dtype}")
        self._shape, self._dtype = shape, x_new.dtype

    def select(self, rows: Tensor) -> None:
        """Keep only batch rows ``rows`` (in that order): generation drops rows that have finished."""
        if self._shape is None:
            return
        if self._cache.values is not None:
            rows = rows.to(self._cache.values.device)
            self._cache.select(rows)
        self._shape = (len(rows), *self._shape[1:])
        self._rule.select(rows)
