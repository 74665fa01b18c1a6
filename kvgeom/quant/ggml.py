"""llama.cpp cache types on blocks of 32 consecutive values, bit-exact with ggml's reference quantizers.

Each quantizer takes fp32 ``blocks`` ``[n, 32]`` and returns :class:`GGMLBlocks` (integer codes plus the
fp16-rounded block scale ``d`` and, for q4_1/q5_1, the fp16 minimum ``m``); :func:`ggml_dequant` turns them
back into fp32 exactly as ``gguf.quants.dequantize`` / ggml's ``dequantize_row_*`` do. All arithmetic is
fp32 in the reference's order (``quantize_row_*_ref`` in ggml-quants.c, mirrored by ``gguf/quants.py``):

* q8_0: ``d = amax/127``, ``q = roundf(x/d)`` (half away from zero), ``x̂ = q * fp16(d)``;
* q4_0 / q5_0: ``d = max/-8`` (``/-16``) with ``max`` the signed value of largest magnitude (first one),
  ``q = min(15, trunc(x*(1/d) + 8.5))`` (``min(31, trunc(x/d + 16.5))``), ``x̂ = (q-8)*fp16(d)`` (``q-16``);
* q4_1 / q5_1: ``d = (max-min)/15`` (``/31``), ``q = min(15, trunc((x-min)*(1/d) + 0.5))`` (31),
  ``x̂ = q*fp16(d) + fp16(min)``;
* iq4_nl: non-linear levels ``kvalues_iq4nl``, see :func:`quantize_iq4_nl`.

:func:`quantize_q8_0_avx2` is ggml-cpu's x86 AVX/AVX2 ``quantize_row_q8_0`` (``ggml/src/ggml-cpu/arch/x86/
quants.c``), what llama.cpp's CPU build uses when it converts activations (and flash attention's Q) to q8_0:
``q = round_half_even(x * (127/amax))`` instead of the reference ``roundf(x * (1/d))``, same ``fp16(amax/127)``.

The block scales are stored as fp16 (``d`` rounds to nearest-even); codes are chosen with the unrounded
fp32 ``d``, as in ggml.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ._ops import div

QK = 32
GGML_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
#: bits per element, the fp16 block scale (and minimum) included
GGML_BITS = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "iq4_nl": 4.5}
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a block with amax below this quantizes to zero (iq4_nl)


@dataclass(frozen=True)
class GGMLBlocks:
    """Quantized blocks: ``codes`` as stored (unsigned, 0..2^b-1), fp16-rounded ``d`` and ``m`` as fp32."""

    qtype: str
    codes: Int[Tensor, "n 32"]
    d: Float[Tensor, "n 1"]
    m: Float[Tensor, "n 1"] | None = None


def _recip(d: Tensor) -> Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    nz = d != 0
    return torch.where(nz, div(1.0, torch.where(nz, d, torch.ones_like(d))), torch.zeros_like(d))


def _fp16(d: Tensor) -> Tensor:
    return d.to(torch.float16).to(torch.float32)


def roundf(v: Tensor) -> Tensor:
    """C ``roundf`` (half away from zero), exact: ``trunc(v) + trunc(2*(v - trunc(v)))``."""
    t = torch.trunc(v)
    return t + torch.trunc(2 * (v - t))


def signed_absmax(blocks: Float[Tensor, "n 32"]) -> Float[Tensor, "n 1"]:
    """The value of largest magnitude in each block, the first one on ties (ggml's ``if (amax < |v|)``)."""
    idx = blocks.abs().argmax(dim=-1, keepdim=True)
    return blocks.gather(-1, idx)


def quantize_q8_0(blocks: Float[Tensor, "n 32"]) -> GGMLBlocks:
    d = div(blocks.abs().amax(dim=-1, keepdim=True), 127.0)
    q = roundf(blocks * _recip(d))
    return GGMLBlocks("q8_0", (q + 128).to(torch.int64), _fp16(d))


def quantize_q8_0_avx2(blocks: Float[Tensor, "n 32"]) -> GGMLBlocks:
    """ggml-cpu's x86 SIMD ``quantize_row_q8_0`` (``__AVX2__ || __AVX__``): ``d = amax/127.f`` stored as fp16,
    ``id = amax != 0 ? 127.f/amax : 0``, ``q = _mm256_round_ps(x*id, _MM_ROUND_NEAREST)`` (half to even).
    ``quantize_row_q8_1`` (the Q type of q4_1/q5_1 dot products) gives the same codes and ``d``."""
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    d = div(amax, 127.0)
    nz = amax != 0
    inv = torch.where(nz, div(127.0, torch.where(nz, amax, torch.ones_like(amax))), torch.zeros_like(amax))
    q = torch.round(blocks * inv)  # torch.round: half to even, as the SIMD rounding mode
    return GGMLBlocks("q8_0", (q + 128).to(torch.int64), _fp16(d))


def _quantize_sym(blocks: Tensor, qtype: str, half: int) -> GGMLBlocks:
    d = div(signed_absmax(blocks), float(-half))
    q = torch.trunc(blocks * _recip(d) + (half + 0.5)).clamp(0, 2 * half - 1)
    return GGMLBlocks(qtype, q.to(torch.int64), _fp16(d))


def _quantize_affine(blocks: Tensor, qtype: str, levels: int) -> GGMLBlocks:
    mn = blocks.amin(dim=-1, keepdim=True)
    mx = blocks.amax(dim=-1, keepdim=True)
    d = div(mx - mn, float(levels))
    q = torch.trunc((blocks - mn) * _recip(d) + 0.5).clamp(0, levels)
    return GGMLBlocks(qtype, q.to(torch.int64), _fp16(d), _fp16(mn))


def quantize_q4_0(blocks: Float[Tensor, "n 32"]) -> GGMLBlocks:
    return _quantize_sym(blocks, "q4_0", 8)


def quantize_q5_0(blocks: Float[Tensor, "n 32"]) -> GGMLBlocks:
    return _quantize_sym(blocks, "q5_0", 16)


def quantize_q4_1(blocks: Float[Tensor, "n 32"]) -> GGMLBlocks:
    return _quantize_affine(blocks, "q4_1", 15)


def quantize_q5_1(blocks: Float[Tensor, "n 32"]) -> GGMLBlocks:
    return _quantize_affine(blocks, "q5_1", 31)


def _kvalues(device: torch.device) -> Tensor:
    return torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=device)


def best_index_iq4nl(al: Tensor) -> Tensor:
    """ggml ``best_index_int8``: the level whose midpoint rule picks ``al`` (ties go up).

    Level ``i`` is chosen once ``2*al >= kv[i-1] + kv[i]`` (exact: integer sums, exact doubling), so the
    index is the number of midpoint sums not above ``2*al``.
    """
    kv = KVALUES_IQ4NL
    sums = torch.tensor([kv[i - 1] + kv[i] for i in range(1, 16)], dtype=torch.float32, device=al.device)
    return torch.bucketize((al + al).contiguous(), sums, right=True)


def _lsq(blocks: Tensor, weight: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``sumqx += w*q*x; sumq2 += w*q*q`` accumulated in fp32 in element order, like the C loop."""
    wq = weight * q
    terms = torch.stack([wq * blocks, wq * q]).permute(2, 0, 1).contiguous()  # [32, 2, n]: the same products
    acc = torch.zeros_like(terms[0])
    for t in terms.unbind(0):  # one add per element for both sums (the order is the C loop's)
        acc = acc + t
    return acc[0][:, None], acc[1][:, None]


def quantize_iq4_nl(blocks: Float[Tensor, "n 32"], ntry: int = -1) -> GGMLBlocks:
    """ggml ``quantize_row_iq4_nl_impl`` for one 32-block super-block, weights ``w = x^2`` (no imatrix).

    ``ntry = -1`` is ``quantize_row_iq4_nl_ref`` (what ggml-cpu's ``from_float`` -- hence the KV cache --
    uses): ``d0 = max/-127``, codes ``L = best_index(x/d0)``, then the weighted least-squares scale
    ``d = Σ w q x / Σ w q²`` (codes kept). ``ntry = 7`` is ``quantize_iq4_nl`` (llama-quantize without an
    imatrix): additionally tries ``id = (t - 127)/max`` for t in -7..7, keeps the d maximising
    ``(Σwqx)²/Σwq²``, and re-picks the codes with ``1/d``. Blocks with amax < 1e-15 store d = 0, codes 0.
    """
    kv = _kvalues(blocks.device)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    live = amax >= GROUP_MAX_EPS
    mx = torch.where(live, signed_absmax(blocks), torch.ones_like(amax))
    weight = blocks * blocks
    d = div(mx, float(KVALUES_IQ4NL[0] if ntry <= 0 else -KVALUES_IQ4NL[0]))
    codes = best_index_iq4nl(div(1.0, d) * blocks)
    sumqx, sumq2 = _lsq(blocks, weight, kv[codes])
    d = torch.where(sumq2 > 0, div(sumqx, torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2))), 0.0)
    if ntry > 0:
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            idt = div(float(itry + KVALUES_IQ4NL[0]), mx)
            sqx, sq2 = _lsq(blocks, weight, kv[best_index_iq4nl(idt * blocks)])
            better = (sq2 > 0) & (sqx * sqx > best * sq2)
            d_try = div(sqx, torch.where(sq2 > 0, sq2, torch.ones_like(sq2)))
            d = torch.where(better, d_try, d)
            best = torch.where(better, d_try * sqx, best)
        codes = best_index_iq4nl(_recip(d) * blocks)
    d = torch.where(live, d, 0.0)
    codes = torch.where(live, codes, 0 if ntry <= 0 else 8)  # ntry > 0 re-picks codes with id = 0 -> level 8
    return GGMLBlocks("iq4_nl", codes, _fp16(d))


QUANTIZERS = {
    "q8_0": quantize_q8_0,
    "q4_0": quantize_q4_0,
    "q4_1": quantize_q4_1,
    "q5_0": quantize_q5_0,
    "q5_1": quantize_q5_1,
    "iq4_nl": quantize_iq4_nl,
}
_OFFSET = {"q8_0": 128, "q4_0": 8, "q5_0": 16}


def ggml_dequant(qb: GGMLBlocks) -> Float[Tensor, "n 32"]:
    """fp32 values as ggml/gguf dequantize them: ``(q - offset)*d``, ``q*d + m`` or ``kvalues[q]*d``."""
    if qb.qtype == "iq4_nl":
        return qb.d * _kvalues(qb.codes.device)[qb.codes]
    if qb.qtype in _OFFSET:
        return qb.d * (qb.codes - _OFFSET[qb.qtype]).to(torch.float32)
    assert qb.m is not None
    return qb.d * qb.codes.to(torch.float32) + qb.m


def ggml_fake_quant(blocks: Float[Tensor, "n 32"], qtype: str) -> Float[Tensor, "n 32"]:
    """Quantize then dequantize fp32 blocks of 32 with a llama.cpp type."""
    return ggml_dequant(QUANTIZERS[qtype](blocks))
