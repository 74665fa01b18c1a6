"""Orthonormal Walsh-Hadamard rotation of head vectors, as llama.cpp applies it to a quantized KV cache.

llama.cpp (PR #21038, ``attn_rot_k`` / ``attn_rot_v``, enabled for quantized cache types when d_head is a
multiple of 64) multiplies blocks of ``n`` consecutive head dims by ``H_n / sqrt(n)``, the Sylvester
Hadamard matrix (``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``), which is symmetric and its own
inverse once normalised. The block size is the largest power of two >= 64 dividing d_head for K, and 64
for V. We compute the product with a fast Walsh-Hadamard transform (butterflies, then one multiply by
``1/sqrt(n)``): equal to the matrix product up to fp32 rounding, and independent of the batch layout.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from jaxtyping import Float
from torch import Tensor

from .role import Role

ROT_MIN_BLOCK = 64


def rotation_block(d_head: int, role: Role) -> int:
    """Block size llama.cpp uses for ``role``; raises ValueError when it would not rotate."""
    if d_head % ROT_MIN_BLOCK != 0:
        raise ValueError(
            f"+rot models llama.cpp's Hadamard rotation, which it enables only when d_head is a multiple of "
            f"{ROT_MIN_BLOCK} (d_head need not be a power of two: blocks of 64 or more are rotated); got "
            f"d_head={d_head}. Use the scheme without +rot for this model."
        )
    if role == "v":
        return ROT_MIN_BLOCK
    n = ROT_MIN_BLOCK
    while d_head % (2 * n) == 0:
        n *= 2
    return n


def sylvester_hadamard(n: int, *, device: torch.device | str | None = None) -> Float[Tensor, "n n"]:
    """``H_n / sqrt(n)`` built like ggml's ``ggml_gen_hadamard`` (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Sylvester Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float32, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h * (1.0 / math.sqrt(n))


def wht(x: Float[Tensor, "... n"], n: int) -> Float[Tensor, "... n"]:
    """The unnormalised product ``H_n x`` on each block of ``n`` consecutive values on the last axis, by
    butterflies (``[a + b, a - b]`` on halves of growing size: the order of vLLM's PyTorch fallback
    ``fast_hadamard_transform``, so its fp32 rounding is vLLM's)."""
    shape = x.shape
    if shape[-1] % n != 0:
        raise ValueError(f"last axis {shape[-1]} is not a multiple of the rotation block {n}")
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        a, b = y.reshape(-1, n // (2 * h), 2, h).unbind(2)
        y = torch.stack([a + b, a - b], dim=2)
        h *= 2
    return y.reshape(shape)


def fwht(x: Float[Tensor, "... n"], n: int) -> Float[Tensor, "... n"]:
    """Multiply each block of ``n`` consecutive values on the last axis by ``H_n/sqrt(n)`` (fp32)."""
    shape = x.shape
    return (wht(x, n).reshape(-1, n) * (1.0 / math.sqrt(n))).reshape(shape)


#: the seed of vLLM's ``torch.Generator`` for the signs of its randomized Hadamard transform (``int4_per_token_head``)
RHT_SEED = 0x9E3779B9


@lru_cache(maxsize=8)
def _signs(d: int) -> Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(RHT_SEED)
    return 2.0 * torch.bernoulli(torch.full((d,), 0.5), generator=gen) - 1.0


@lru_cache(maxsize=32)
def _signs_on(d: int, device: torch.device) -> Tensor:
    return _signs(d).to(device)


def rht_signs(d: int, device: torch.device | str | None = None) -> Tensor:
    """vLLM's fixed ±1 signs of its randomized Hadamard transform for head size ``d`` (``_get_rht_signs`` of
    ``vllm/v1/attention/ops/int4_per_token_head.py``): :mod:`kvgeom.quant.formats.vllm_pth` and its fused kernel
    (:mod:`kvgeom.quant.triton.pth`) read them here. Copied to ``device`` once, not per call (a host-to-GPU copy
    waits for the GPU: it was 1,344 of the 1,462 host syncs of a vLLM-formats batch, ``benchmarks/host_syncs.py``);
    the tensor is shared, so do not write to it."""
    return _signs_on(d, torch.device("cpu") if device is None else torch.device(device))
