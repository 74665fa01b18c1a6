"""KIVI (Liu et al., ICML 2024; github.com/jy-yuan/KIVI) as its reference code does it.

Group quantization (``quant/new_pack.py``, asymmetric, ``b`` bits, ``M = 2^b - 1``), per group:
``mn, mx = min, max``; ``scale = (mx - mn)/M``; ``q = round(clamp((x - mn)/scale, 0, M))`` (clamp first,
then round, half-to-even); ``x̂ = q*scale + mn``. A constant group (``scale = 0``) gives ``x̂ = mn`` (KIVI
divides 0 by 0 there, but its dequantization ``q*0 + mn`` also returns ``mn``). KIVI computes in fp16; we
compute in fp32.

* keys: per (head, channel), groups of G consecutive tokens;
* values: per token, groups of G consecutive channels of each head (needs d_head % G == 0).

Which tokens are quantized (``models/llama_kivi.py``), with L real tokens and residual length R:

* prefill keys: the leading ``(L // R) * R`` tokens, the rest full precision;
* prefill values: all but the last R tokens (none if L <= R);
* decode keys: new tokens join the full-precision tail; when it reaches R tokens, all R are quantized;
* decode values: new tokens join the tail; once it holds more than R, the oldest is quantized.

So a key's stored value can change after it was first written (when its R-block is flushed).
"""

from __future__ import annotations

from typing import Protocol

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor

from ._ops import div
from .role import Role


class KIVIFields(Protocol):
    """The fields of a KIVI format this math reads (:class:`kvgeom.quant.formats.KIVISpec` has them)."""

    @property
    def bits(self) -> int: ...

    @property
    def group_size(self) -> int: ...

    @property
    def residual(self) -> int: ...


def check_kivi(spec: KIVIFields, d_head: int) -> None:
    if d_head % spec.group_size != 0:
        raise ValueError(
            f"{spec} quantizes values in groups of G={spec.group_size} channels of each head, but "
            f"d_head={d_head} is not a multiple of {spec.group_size}; choose a group size dividing d_head, "
            f"e.g. "
            f"kivi{spec.bits}-g{_largest_divisor(d_head, spec.group_size)}-r{spec.residual}"
        )


def _largest_divisor(n: int, below: int) -> int:
    return max(g for g in range(1, below + 1) if n % g == 0)


def quant_groups(t: Float[Tensor, "... group"], bits: int) -> Float[Tensor, "... group"]:
    """KIVI's asymmetric min/max quantize-dequantize over the last axis (fp32)."""
    mn = t.amin(dim=-1, keepdim=True)
    mx = t.amax(dim=-1, keepdim=True)
    qmax = float(2**bits - 1)
    scale = div(mx - mn, qmax)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(((t - mn) / safe).clamp(0, qmax))
    return torch.where(scale > 0, q * scale + mn, mn.expand_as(t))


def quant_keys(x: Float[Tensor, "tok kv_head d_head"], spec: KIVIFields) -> Float[Tensor, "tok kv_head d_head"]:
    """Per-channel quantization over groups of G consecutive tokens (token count a multiple of G)."""
    if x.shape[0] == 0:
        return x
    g = rearrange(x, "(n g) h d -> n h d g", g=spec.group_size)
    return rearrange(quant_groups(g, spec.bits), "n h d g -> (n g) h d")


def quant_values(x: Float[Tensor, "tok kv_head d_head"], spec: KIVIFields) -> Float[Tensor, "tok kv_head d_head"]:
    """Per-token quantization over groups of G consecutive channels of each head."""
    g = rearrange(x, "t h (n g) -> t h n g", g=spec.group_size)
    return rearrange(quant_groups(g, spec.bits), "t h n g -> t h (n g)")


def prefill_split(n_real: int, spec: KIVIFields, role: Role) -> int:
    """How many leading real tokens KIVI's prefill quantizes (the rest stay full precision)."""
    if role == "k":
        return (n_real // spec.residual) * spec.residual
    return max(n_real - spec.residual, 0)


def prefill_row(
    x: Float[Tensor, "tok kv_head d_head"], spec: KIVIFields, role: Role
) -> tuple[Float[Tensor, "tok kv_head d_head"], Bool[Tensor, " tok"]]:
    """KIVI's prefill rule on one sequence of real tokens: dequantized values and full-precision mask."""
    n_quant = prefill_split(x.shape[0], spec, role)
    quant = quant_keys if role == "k" else quant_values
    out = torch.cat([quant(x[:n_quant], spec), x[n_quant:]], dim=0)
    full = torch.arange(x.shape[0], device=x.device) >= n_quant
    return out, full


def kivi_fake_quant(
    x: Float[Tensor, "batch pos kv_head d_head"], mask: Bool[Tensor, "batch pos"], spec: KIVIFields, role: Role
) -> Float[Tensor, "batch pos kv_head d_head"]:
    """Stateless KIVI (forward mode): the prefill rule applied to each row's real positions (fp32)."""
    check_kivi(spec, x.shape[-1])
    out = x.clone()
    for b in range(x.shape[0]):
        idx = mask[b].nonzero().squeeze(-1)
        if idx.numel():
            out[b, idx] = prefill_row(x[b, idx], spec, role)[0]
    return out
