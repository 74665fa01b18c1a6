"""vLLM's per-token-head KV dtypes against independent numpy transcriptions of vLLM's write kernels
(``_reshape_cache_per_token_head`` for int8/fp8, ``_reshape_cache_int4_kernel`` + ``single_rht`` for int4):
bit for bit on random and adversarial head vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvgeom.quant import Scheme, fake_quant
from kvgeom.quant.formats import VLLMPerTokenHead
from kvgeom.quant.formats.vllm_pth import rht_signs


def _ref_sym(head: np.ndarray, kind: str) -> np.ndarray:
    qmax, qmin = (127.0, -128.0) if kind == "int8" else (448.0, -448.0)
    scale = np.float32(max(np.float32(np.abs(head).max()) / np.float32(qmax), np.float32(1e-6)))
    inv = np.float32(1.0) / scale
    y = np.clip(head * inv, qmin, qmax).astype(np.float32)
    if kind == "int8":
        q = np.trunc(y)  # tl.store of fp32 into an int8 pointer truncates toward zero
    else:
        q = torch.from_numpy(y).to(torch.float8_e4m3fn).to(torch.float32).numpy()
    return (q * scale).astype(np.float32)


def _ref_wht(v: np.ndarray) -> np.ndarray:  # vLLM's tier-3 butterfly, transcribed
    d = v.shape[-1]
    x = v.astype(np.float32)
    h = 1
    while h < d:
        xv = x.reshape(d // (2 * h), 2, h)
        a, b = xv[:, 0, :], xv[:, 1, :]
        x = np.stack([a + b, a - b], axis=-2).reshape(d)
        h <<= 1
    return x


def _ref_int4(head: np.ndarray) -> np.ndarray:
    d = head.shape[0]
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0x9E3779B9)
    signs = (2.0 * torch.bernoulli(torch.full((d,), 0.5), generator=gen) - 1.0).numpy().astype(np.float32)
    y = _ref_wht(head * signs)
    lo, hi = np.float32(y.min()), np.float32(y.max())
    scale = np.float32(max(np.float32(hi - lo) / np.float32(15.0), np.float32(1e-6)))

    def rnd(v):
        return np.where(v >= 0, np.trunc(v + np.float32(0.5)), np.trunc(v - np.float32(0.5))).astype(np.float32)

    zp = np.clip(rnd(np.float32(-lo) / scale), 0, 15).astype(np.float32)
    inv = np.float32(1.0) / scale
    q = np.clip(rnd(y * inv + zp), 0, 15).astype(np.float32)
    packed = np.array([scale], dtype=np.float32).view(np.int32)
    packed = ((packed & -16) | (zp.astype(np.int32) & 0xF)).view(np.float32)
    s2 = (packed.view(np.int32) & -16).view(np.float32)[0]
    z2 = np.float32(packed.view(np.int32)[0] & 0xF)
    yq = ((q - z2) * s2).astype(np.float32)
    return (_ref_wht(yq) * signs / np.float32(d)).astype(np.float32)


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 2, 64, generator=g) * 3
    x[0, 0, 0] = 0.0  # an all-zero head: the 1e-6 floor
    x[0, 1, 1, :5] = torch.tensor([500.0, -500.0, 0.49, -0.5, 1e-9])  # an outlier head
    x[1, 2] = x[1, 2].abs()  # one-signed heads
    return x


@pytest.mark.parametrize("kind", ["int8", "fp8", "int4"])
def test_bit_exact_with_vllm_kernels(kind):
    x = _inputs()
    y = fake_quant(x, f"{kind}_per_token_head")
    ref = np.empty_like(x.numpy())
    for idx in np.ndindex(*x.shape[:3]):
        head = x.numpy()[idx]
        ref[idx] = _ref_int4(head) if kind == "int4" else _ref_sym(head, kind)
    assert np.array_equal(y.numpy(), ref), float(np.abs(y.numpy() - ref).max())


def test_grammar_bits_and_engine_names():
    for kind, bits in (("int8", 8.5), ("fp8", 8.5), ("int4", 4.5)):
        s = Scheme.parse(f"{kind.upper()}_per_token_head")
        assert s.k == VLLMPerTokenHead(kind) and Scheme.parse(str(s)) == s
        assert s.bits_per_element_for(d_head=64, n_kv_heads=2) == bits
        assert s.k.vllm().kv_cache_dtype == f"{kind}_per_token_head"


def test_int4_needs_a_power_of_two_head():
    with pytest.raises(ValueError, match="power of two"):
        fake_quant(torch.randn(1, 2, 1, 48), "int4_per_token_head")
    fake_quant(torch.randn(1, 2, 1, 48), "int8_per_token_head")  # no such constraint


def test_rht_signs_are_fixed_and_balanced():
    s = rht_signs(64)
    assert torch.equal(s, rht_signs(64)) and set(s.tolist()) == {-1.0, 1.0}
