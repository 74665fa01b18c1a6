"""llama.cpp cache types: bit-exact against the gguf package (and ggml's iq4_nl reference algorithm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _quant_refs import iq4_nl_block_ref, pack_iq4_nl
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kvgeom.quant import fake_quant
from kvgeom.quant.ggml import KVALUES_IQ4NL, ggml_dequant, quantize_iq4_nl, roundf
from kvgeom.quant.hadamard import fwht, rotation_block, sylvester_hadamard

GGUF_TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def gguf_round_trip(x: torch.Tensor, name: str) -> np.ndarray:
    qtype = getattr(GGMLQuantizationType, name.upper())
    arr = x.numpy().astype(np.float32).reshape(-1, x.shape[-1])
    return dequantize(quantize(arr, qtype), qtype).reshape(x.shape)


def _blocks(kind: str, seed: int) -> torch.Tensor:
    """[2, 6, 2, 64] fp32 K-like tensors of a given flavour (each d_head holds two blocks of 32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 2, 64, generator=g)
    if kind == "heavy":  # planted outliers of both signs, and a student-t-like tail
        x = x / torch.rand(x.shape, generator=g).clamp_min(0.05)
        x[0, 1, 0, 3], x[1, 4, 1, 40], x[0, 5, 1, 63] = 300.0, -450.0, 1e3
    elif kind == "constant":
        x = torch.full_like(x, 0.7)
        x[1] = -3.25
    elif kind == "zero":
        x = torch.zeros_like(x)
    elif kind == "ties":  # |max| reached with both signs; values on rounding half-points of the grids
        base = torch.tensor([8.0, -8.0, 0.5, -0.5, 1.5, -2.5, 3.5, 7.5, 4.0, -4.0, 2.0, 0.0, 6.5, -6.5, 5.5, 1.0])
        x = base.repeat(2 * 6 * 2 * 4)[: 2 * 6 * 2 * 64].reshape(2, 6, 2, 64) * torch.tensor(
            [1.0, 2.0, 127 / 8, 0.25]
        ).repeat_interleave(16).repeat(2 * 6 * 2)[: 2 * 6 * 2 * 64].reshape(2, 6, 2, 64)
    elif kind == "tiny":  # scales in fp16's subnormal range
        x = x * 1e-6
    elif kind == "wide":
        x = x * 3e3
    return x.contiguous()


KINDS = ["normal", "heavy", "constant", "zero", "ties", "tiny", "wide"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", GGUF_TYPES)
def test_bit_exact_vs_gguf(name, kind):
    x = _blocks(kind, seed=GGUF_TYPES.index(name) * 100 + KINDS.index(kind))
    ours = fake_quant(x, name)
    ref = gguf_round_trip(x, name)
    assert np.array_equal(ours.numpy(), ref)
    assert torch.equal(ours, torch.from_numpy(ref))


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(GGUF_TYPES),
    arrays(np.float32, (3, 1, 1, 64), elements=st.floats(-3e4, 3e4, width=32)),
)
def test_bit_exact_vs_gguf_property(name, arr):
    # blocks whose amax is below ~2e-38 make ggml's 1/d overflow (undefined behaviour in C); not KV data
    amax = np.abs(arr).reshape(-1, 32).max(-1)
    assume(((amax == 0) | (amax > 1e-30)).all())
    x = torch.from_numpy(arr)
    assert np.array_equal(fake_quant(x, name).numpy(), gguf_round_trip(x, name))


def test_roundf_is_half_away_from_zero():
    v = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, 0.49999997, -0.49999997, 126.5, -126.5, 3.0])
    assert roundf(v).tolist() == [1.0, -1.0, 2.0, -2.0, 3.0, 0.0, -0.0, 127.0, -127.0, 3.0]


@pytest.mark.parametrize("ntry", [-1, 7])
@pytest.mark.parametrize("kind", KINDS)
def test_iq4_nl_matches_scalar_ggml_reference(kind, ntry):
    blocks = _blocks(kind, seed=7).reshape(-1, 32)[:24]
    qb = quantize_iq4_nl(blocks, ntry=ntry)
    for i in range(blocks.shape[0]):
        d_ref, codes_ref = iq4_nl_block_ref(blocks[i].numpy(), ntry=ntry)
        assert qb.codes[i].tolist() == codes_ref, f"block {i}"
        assert np.float16(qb.d[i, 0].item()) == d_ref, f"block {i}"


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, (2, 32), elements=st.floats(-1e3, 1e3, width=32)), st.sampled_from([-1, 7]))
def test_iq4_nl_reference_property(arr, ntry):
    qb = quantize_iq4_nl(torch.from_numpy(arr), ntry=ntry)
    for i in range(arr.shape[0]):
        d_ref, codes_ref = iq4_nl_block_ref(arr[i], ntry=ntry)
        assert qb.codes[i].tolist() == codes_ref
        assert np.float16(qb.d[i, 0].item()) == d_ref


@pytest.mark.parametrize("kind", KINDS)
def test_iq4_nl_packed_blocks_dequantize_identically_in_gguf(kind):
    x = _blocks(kind, seed=3)
    blocks = x.reshape(-1, 32)
    qb = quantize_iq4_nl(blocks)
    packed = pack_iq4_nl(qb.d.numpy()[:, 0], qb.codes.numpy())
    ref = dequantize(packed, GGMLQuantizationType.IQ4_NL).reshape(x.shape)
    ours = fake_quant(x, "iq4_nl")
    assert np.array_equal(ours.numpy(), ref)
    assert torch.equal(ggml_dequant(qb).reshape(x.shape), ours)


def test_iq4_nl_levels_and_error_are_sane():
    x = _blocks("normal", seed=11)
    qb = quantize_iq4_nl(x.reshape(-1, 32))
    assert qb.codes.min() >= 0 and qb.codes.max() <= 15
    # the element of largest magnitude takes the extreme level -127 (code 0) in the ref (ntry = -1)
    idx = x.reshape(-1, 32).abs().argmax(-1)
    assert (qb.codes.gather(-1, idx[:, None]) == 0).all()
    err = (fake_quant(x, "iq4_nl") - x).abs().mean()
    assert err < (fake_quant(x, "q4_0") - x).abs().mean()  # non-linear levels beat q4_0 on gaussian data
    assert len(KVALUES_IQ4NL) == 16


@pytest.mark.parametrize("name", GGUF_TYPES + ["iq4_nl"])
def test_d_head_not_multiple_of_32_is_refused(name):
    with pytest.raises(ValueError, match="multiple of 32"):
        fake_quant(torch.randn(1, 2, 1, 48), name)


# ---- Hadamard rotation (+rot) ----


def test_sylvester_matrix_matches_ggml_construction_and_is_orthonormal():
    for n in (1, 2, 4, 64, 128):
        h = sylvester_hadamard(n)
        ggml = np.zeros((n, n), dtype=np.float32)
        ggml[0, 0] = 1.0 / np.sqrt(np.float32(n))
        s = 1
        while s < n:
            ggml[s : 2 * s, :s] = ggml[:s, :s]
            ggml[:s, s : 2 * s] = ggml[:s, :s]
            ggml[s : 2 * s, s : 2 * s] = -ggml[:s, :s]
            s *= 2
        assert np.allclose(h.numpy(), ggml, rtol=1e-6, atol=0)
        assert torch.allclose(h @ h, torch.eye(n), atol=1e-5)
        assert torch.equal(h, h.T)
    with pytest.raises(ValueError, match="power of two"):
        sylvester_hadamard(96)


def test_fwht_equals_blockwise_matrix_product():
    x = torch.randn(3, 5, 2, 192)
    for n in (64,):
        h = sylvester_hadamard(n)
        ref = (x.reshape(-1, n) @ h).reshape(x.shape)
        assert torch.allclose(fwht(x, n), ref, atol=1e-5)
    x = torch.randn(4, 128)
    assert torch.allclose(fwht(x, 128), x @ sylvester_hadamard(128), atol=1e-5)
    assert torch.allclose(fwht(fwht(x, 128), 128), x, atol=1e-5)


def test_rotation_block_sizes_follow_llama_cpp():
    assert rotation_block(64, "k") == 64 and rotation_block(64, "v") == 64
    assert rotation_block(128, "k") == 128 and rotation_block(128, "v") == 64
    assert rotation_block(256, "k") == 256 and rotation_block(192, "k") == 64
    with pytest.raises(ValueError, match="multiple of 64") as err:
        rotation_block(96, "k")
    assert "power of two" in str(err.value)


@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("name", ["q4_0", "q8_0", "iq4_nl"])
def test_rot_is_rotate_quantize_rotate_back(name, role):
    x = _blocks("heavy", seed=5).repeat(1, 1, 1, 2)  # d_head 128: K rotates one 128-block, V two 64-blocks
    n = rotation_block(128, role)
    y = fwht(x, n)
    if name == "iq4_nl":
        qy = ggml_dequant(quantize_iq4_nl(y.reshape(-1, 32))).reshape(y.shape)
    else:
        qy = torch.from_numpy(gguf_round_trip(y, name))
    assert torch.equal(fake_quant(x, f"{name}+rot", role=role), fwht(qy, n))


@pytest.mark.parametrize("role", ["k", "v"])
def test_rot_spreads_outlier_channels(role):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 2, 128, generator=g)
    x[..., 7] += 25.0  # a fixed-sign outlier channel, as in real keys
    plain = (fake_quant(x, "q4_0", role=role) - x).pow(2).mean()
    rot = (fake_quant(x, "q4_0+rot", role=role) - x).pow(2).mean()
    assert rot < 0.5 * plain


def test_rot_refuses_d_head_not_multiple_of_64():
    with pytest.raises(ValueError, match="d_head=96"):
        fake_quant(torch.randn(1, 2, 1, 96), "q4_0+rot")
    fake_quant(torch.randn(1, 2, 1, 96), "q4_0")  # fine without the rotation
    fake_quant(torch.randn(1, 2, 1, 192), "q4_0+rot", role="k")  # multiple of 64, not a power of two: fine


def test_iq4_nl_best_index_ties_go_up():
    from kvgeom.quant.ggml import best_index_iq4nl

    kv = KVALUES_IQ4NL
    mids = torch.tensor([(kv[i - 1] + kv[i]) / 2 for i in range(1, 16)])
    assert best_index_iq4nl(mids).tolist() == list(range(1, 16))
    assert best_index_iq4nl(mids - 1e-3).tolist() == list(range(0, 15))
    assert best_index_iq4nl(torch.tensor([-1e9, 1e9, 0.0])).tolist() == [0, 15, 8]
    # a block whose scale is exactly 1 (max -127) with values on midpoints: codes must match ggml
    block = torch.tensor([-127.0] + [float(m) for m in mids] + [0.0] * 16)[None]
    qb = quantize_iq4_nl(block)
    _, codes_ref = iq4_nl_block_ref(block[0].numpy())
    assert qb.codes[0].tolist() == codes_ref and qb.codes[0, 1:16].tolist() == list(range(1, 16))
