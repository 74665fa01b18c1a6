"""Uniform ``int{b}`` quantization of K/V laid out ``[batch, pos, kv_head, d_head]``.

Ranges (one per block) by granularity, always per sequence and over real positions only:

* ``tensor``  one range per batch row over its real positions, heads and dims;
* ``token``   per (row, pos) over heads x d_head;
* ``head``    per (row, pos, head) over d_head;
* ``channel`` per (row, head, dim) over real positions;
* ``group{G}`` per (row, pos), over G consecutive elements of the flattened heads x d_head vector.

Formulas (``round`` = torch.round, half-to-even):

* sym:  ``scale = amax/(2^(b-1)-1)``; ``q = clamp(round(x/scale), -2^(b-1), 2^(b-1)-1)``; ``x̂ = q*scale``
  (a block with amax 0 gives x̂ = 0);
* asym: ``scale = max((max-min)/(2^b-1), 1e-8)``; ``zp = clamp(round(-min/scale), 0, 2^b-1)``;
  ``q = clamp(round(x/scale + zp), 0, 2^b-1)``; ``x̂ = (q - zp)*scale``.

Parameters are computed by :func:`int_params` and applied by :func:`int_apply`, so a streaming cache
can freeze the parameters measured on the prefill and reuse them (codes clamp to the code range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor

from ._ops import div

Granularity = Literal["tensor", "token", "head", "channel", "group"]
ASYM_MIN_SCALE = 1e-8


class IntFields(Protocol):
    """The fields of a uniform format this math reads (:class:`kvgeom.quant.formats.IntSpec` has them)."""

    @property
    def bits(self) -> int: ...

    @property
    def granularity(self) -> Granularity: ...

    @property
    def symmetric(self) -> bool: ...

    @property
    def group_size(self) -> int | None: ...


@dataclass(frozen=True)
class IntParams:
    """Scale (and zero point, asym only) broadcastable to the block view of the input."""

    scale: Tensor
    zero_point: Tensor | None


def check_group(spec: IntFields, n_kv_heads: int, d_head: int) -> None:
    if spec.granularity == "group":
        assert spec.group_size is not None
        n = n_kv_heads * d_head
        if n % spec.group_size != 0:
            divisors = [g for g in (128, 64, 32, 16, 8, 4, 2) if n % g == 0]
            hint = f"; e.g. int{spec.bits}-group{divisors[0]}-{'sym' if spec.symmetric else 'asym'}" if divisors else ""
            raise ValueError(
                f"{spec} needs n_kv_heads*d_head (= {n_kv_heads}*{d_head} = {n}) divisible by the group size "
                f"{spec.group_size}: pick a group size dividing {n}{hint}"
            )


def _blocks(x: Tensor, spec: IntFields) -> Tensor:
    """View ``x`` so that the last axis holds one block for per-position granularities."""
    if spec.granularity == "token":
        return rearrange(x, "b p h d -> b p 1 (h d)")
    if spec.granularity == "group":
        return rearrange(x, "b p h d -> b p (h d)").unflatten(-1, (-1, spec.group_size))
    return x  # head: blocks are the d_head vectors; tensor/channel: reduced with the mask


def _unblocks(y: Tensor, spec: IntFields, shape: torch.Size) -> Tensor:
    if spec.granularity in ("token", "group"):
        return y.reshape(shape)
    return y


def _masked_range(
    x: Float[Tensor, "batch pos kv_head d_head"], mask: Bool[Tensor, "batch pos"], dims: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    m = mask[:, :, None, None]
    lo = torch.where(m, x, torch.inf).amin(dim=dims, keepdim=True)
    hi = torch.where(m, x, -torch.inf).amax(dim=dims, keepdim=True)
    empty = torch.isinf(lo)  # a row without real positions: park its range at 0 (its output is discarded)
    return torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)


def int_params(
    x: Float[Tensor, "batch pos kv_head d_head"], mask: Bool[Tensor, "batch pos"], spec: IntFields
) -> IntParams:
    """Scale/zero point of every block of ``x`` (fp32), ranges over real positions (``mask`` True)."""
    check_group(spec, x.shape[2], x.shape[3])
    if spec.granularity in ("tensor", "channel"):
        dims = (1, 2, 3) if spec.granularity == "tensor" else (1,)
        lo, hi = _masked_range(x, mask, dims)
    else:
        xb = _blocks(x, spec)
        lo, hi = xb.amin(dim=-1, keepdim=True), xb.amax(dim=-1, keepdim=True)
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return IntParams(div(amax, float(2 ** (spec.bits - 1) - 1)), None)
    qmax = 2**spec.bits - 1
    scale = div(hi - lo, float(qmax)).clamp_min(ASYM_MIN_SCALE)
    zero_point = torch.round(-lo / scale).clamp(0, qmax)
    return IntParams(scale, zero_point)


def int_apply(
    x: Float[Tensor, "batch pos kv_head d_head"], params: IntParams, spec: IntFields
) -> Float[Tensor, "batch pos kv_head d_head"]:
    """Quantize-dequantize ``x`` (fp32) with given parameters; codes are clamped to the code range."""
    xb = _blocks(x, spec)
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        scale = params.scale
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(xb / safe).clamp(-qmax - 1, qmax)
        out = q * scale
    else:
        assert params.zero_point is not None
        qmax = 2**spec.bits - 1
        zp = params.zero_point
        q = torch.round(xb / params.scale + zp).clamp(0, qmax)
        out = (q - zp) * params.scale
    return _unblocks(out, spec, x.shape)


def int_fake_quant(
    x: Float[Tensor, "batch pos kv_head d_head"], mask: Bool[Tensor, "batch pos"], spec: IntFields
) -> Float[Tensor, "batch pos kv_head d_head"]:
    """Stateless uniform quantize-dequantize (fp32 in, fp32 out; padding rows/positions not restored)."""
    return int_apply(x, int_params(x, mask, spec), spec)
