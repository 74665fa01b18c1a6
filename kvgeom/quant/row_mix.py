"""One kernel launch that quantizes each batch row with its own llama.cpp cache type: :class:`RowMix`.

A cache-mode batch holding many formats (the engine matrix decodes every llama.cpp type, and every fix candidate's
per-layer types, in one batch) would otherwise run one launch per (layer, role, format) plus a gather and a scatter
of that format's rows; on a GPU that host time, not the rows, set the cost of a decode step. :class:`RowMix` covers
the rows whose format is a llama.cpp type (``+rot`` or not) with a per-position cache rule, by
:func:`kvgeom.quant.triton.mixed.mixed_launch`; every row gets the bits of its own format's kernel, hence of the
eager math. Rows it does not cover are returned unchanged, for the caller to quantize its usual way.

Proved by ``tests/quant/test_triton_kernels.py::test_mixed_rows_equal_each_rows_own_format`` and
``::test_plan_cache_mixes_llama_cpp_rows_with_the_same_bits``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .formats import KVFormat, Role
from .ggml import QK
from .hadamard import rotation_block
from .kernels import triton_package

__all__ = ["RowMix", "mix_code"]

def mix_code(spec: KVFormat, role: Role) -> int | None:
    """The code under which ``spec`` can share a :class:`RowMix` launch for ``role``, or None: no Triton, not a
    llama.cpp type, or a cache rule that carries state from call to call."""
    if triton_package() is None or not spec.cache_rule(role).stateless:
        return None
    code = getattr(spec.kernel(), "mix_code", None)  # kernels that can share the launch say so
    return code() if code is not None else None


@dataclass(frozen=True)
class RowMix:
    """Per-row codes of one role for batches of ``len(codes)`` rows (``-1``: the row is left as it is).

    Build it with :meth:`of` once per set of row formats; call it on each chunk of new positions.
    """

    codes: Tensor  # int32 [batch], on the device the launches run on
    block: int  # rotation block of the role, or 32 when no row is rotated
    n_rows: int
    _all_real: dict = field(default_factory=dict, compare=False, repr=False)  # (batch, new) -> uint8 ones

    def __post_init__(self) -> None:
        if self.codes.dtype != torch.int32 or self.codes.ndim != 1 or len(self.codes) != self.n_rows:
            raise ValueError(f"RowMix codes must be int32 [{self.n_rows}], got {self.codes.dtype} "
                             f"{tuple(self.codes.shape)}")

    @classmethod
    def of(cls, specs: Sequence[KVFormat | None], role: Role, d_head: int, device: torch.device) -> RowMix | None:
        """The mix of ``specs`` (one per batch row, None = not covered) on ``device``, or None when it would not run
        there (no CUDA device, and not under the Triton interpreter; more rows than one launch's grid takes,
        ``GRID_YZ``) or covers no row: the caller then quantizes those rows format by format. A spec that cannot
        share a launch raises: ask :func:`mix_code` first."""
        package = triton_package()
        if package is None or not (torch.device(device).type == "cuda" or package.common.interpreting()):
            return None
        if len(specs) > package.common.GRID_YZ:  # the batch rides on the grid's 2nd dimension
            return None
        of_spec: dict = {None: -1}  # each distinct format asked once, not once per row
        for s in dict.fromkeys(specs):
            if s not in of_spec:
                of_spec[s] = mix_code(s, role)
            if of_spec[s] is None:
                raise ValueError(f"{s} cannot share a RowMix launch (not a llama.cpp type with a per-position cache "
                                 "rule): check mix_code(spec, role) first")
        codes = [of_spec[s] for s in specs]
        if all(c < 0 for c in codes):
            return None
        if d_head % QK:
            raise ValueError(f"llama.cpp types quantize blocks of {QK} along d_head; d_head={d_head}")
        block = rotation_block(d_head, role) if any(c >= 0 and c % 2 for c in codes) else QK
        flat = torch.tensor(codes, dtype=torch.int32)
        flat = flat.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else \
            flat.to(device)
        return cls(flat, block, len(codes))

    def __call__(self, x: Float[Tensor, "batch new kv_head d_head"],
                 mask: Bool[Tensor, "batch new"] | None = None) -> Float[Tensor, "batch new kv_head d_head"]:
        """Each row of ``x`` quantized with its code (padding, ``mask`` False, returned unchanged), contiguous."""
        if x.shape[0] != self.n_rows:
            raise ValueError(f"RowMix built for {self.n_rows} rows, got a batch of {x.shape[0]}")
        package = triton_package()
        assert package is not None
        x = x.contiguous()
        out = torch.empty_like(x)
        if mask is None:  # an all-real mask, not a kernel variant without one: one compilation less per role
            key = (x.shape[0], x.shape[1], x.device)
            if key not in self._all_real:
                self._all_real[key] = torch.ones(x.shape[:2], dtype=torch.uint8, device=x.device)
            m = self._all_real[key]
        else:
            m = mask.contiguous().view(torch.uint8)
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            package.mixed.mixed_launch(x, out, m, self.codes, self.block)
        return out

