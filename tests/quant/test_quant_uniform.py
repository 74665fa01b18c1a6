"""Uniform int schemes against loop references, and properties of all schemes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _quant_refs import int_ref
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kvgeom.quant import Scheme, fake_quant

GRANS = ["tensor", "token", "head", "channel", "group4", "group16"]


def _left_padded(seed: int, shape=(3, 6, 2, 8), lengths=(6, 4, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.linspace(0.5, 3.0, shape[-1])
    x[0, 2, 1, 5] = 9.0
    mask = torch.zeros(shape[:2], dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, shape[1] - n :] = True
    x[~mask] = 1e4  # padding garbage that must never enter a range
    return x, mask


@pytest.mark.parametrize("sym", ["sym", "asym"])
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_matches_loop_reference(bits, gran, sym):
    x, mask = _left_padded(seed=bits)
    name = f"int{bits}-{gran}-{sym}"
    ours = fake_quant(x, name, mask=mask)
    group = int(gran[5:]) if gran.startswith("group") else None
    ref = int_ref(x, mask, bits, "group" if group else gran, sym == "sym", group)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[~mask], x[~mask])  # padding returned unchanged


def test_group_size_must_divide_heads_times_d_head():
    with pytest.raises(ValueError, match=r"2\*8 = 16\) divisible by the group size 6"):
        fake_quant(torch.randn(1, 2, 2, 8), "int4-group6-asym")
    fake_quant(torch.randn(1, 2, 2, 8), "int4-group16-asym")  # groups may span heads


def test_sym_zero_block_and_asym_constant_block_stay_finite():
    x = torch.zeros(1, 2, 1, 8)
    assert torch.equal(fake_quant(x, "int4-token-sym"), x)
    assert torch.equal(fake_quant(x, "int4-token-asym"), x)
    c = torch.full((1, 2, 1, 8), -2.5)
    out = fake_quant(c, "int4-token-sym")
    assert torch.allclose(out, c)


def test_asym_follows_the_literal_zero_point_clamp():
    """The paper's asym formula clamps zp to [0, 2^b-1]; a range that excludes 0 therefore saturates.

    Block [5, 6] at 4 bits: scale = 1/15, zp = clamp(round(-75), 0, 15) = 0, so q = clamp(round(15x), 0, 15)
    = 15 and every value decodes to 15 * scale = 1.0. This pins the formula as specified.
    """
    x = torch.tensor([5.0, 6.0, 5.5, 5.25]).reshape(1, 1, 1, 4)
    out = fake_quant(x, "int4-token-asym")
    assert torch.allclose(out, torch.ones_like(x))


# ---- properties ----

finite = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float32, (2, 3, 2, 8), elements=finite),
    st.integers(2, 8),
    st.sampled_from(["token", "head", "group4"]),
    st.sampled_from(["sym", "asym"]),
)
def test_error_within_half_a_step(arr, bits, gran, sym):
    x = torch.from_numpy(arr)
    if gran == "token":
        blocks = x.reshape(2, 3, 1, 16)
    elif gran == "head":
        blocks = x
    else:
        blocks = x.reshape(2, 3, 4, 4)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    if sym == "sym":
        step = torch.maximum(lo.abs(), hi.abs()) / (2 ** (bits - 1) - 1)
    else:
        assume(bool(((lo <= 0) & (hi >= 0)).all()))  # zp clamping is exact only when 0 is in the range
        step = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    out = fake_quant(x, f"int{bits}-{gran}-{sym}").reshape(blocks.shape)
    err = (out - blocks).abs()
    assert bool((err <= step * (0.5 + 1e-5) + 1e-30).all())


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform", "outliers"])
@pytest.mark.parametrize("gran", ["token", "head", "group16", "channel"])
def test_more_bits_never_increase_mean_error(dist, gran):
    """Seeded check: the grids of b and b+1 bits are not nested, so this is statistical, not pointwise."""
    g = torch.Generator().manual_seed(len(dist) * 31 + len(gran))
    shape = (4, 64, 2, 64)
    if dist == "normal":
        x = torch.randn(shape, generator=g)
    elif dist == "laplace":
        u = torch.rand(shape, generator=g) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    elif dist == "uniform":
        x = torch.rand(shape, generator=g) * 2 - 1
    else:
        x = torch.randn(shape, generator=g)
        x[..., 3] *= 30
    errs = [(fake_quant(x, f"int{b}-{gran}-asym") - x).abs().mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs


ALL_SCHEMES = [
    "none",
    "fp16",
    "bf16",
    "int2-tensor-sym",
    "int4-token-asym",
    "int3-head-sym",
    "int8-channel-asym",
    "int4-group32-sym",
    "q8_0",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "iq4_nl",
    "q4_0+rot",
    "iq4_nl+rot",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp8_e4m3@amax",
    "kivi2-g8-r16",
    "kivi4",
    "K:kivi2-g8-r16,V:q8_0",
]


@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("value", [0.0, 1.5, -1e3, 3e-30, 2.0**-20])
@pytest.mark.parametrize("name", ALL_SCHEMES)
def test_constant_input_stays_finite(name, value, role):
    x = torch.full((2, 40, 2, 64), value)
    out = fake_quant(x, name, role=role)
    assert torch.isfinite(out).all()
    if value == 0.0:
        assert torch.equal(out, x)


IDEMPOTENT = ["none", "fp16", "bf16", "q8_0", "q4_0", "q5_0", "iq4_nl", "fp8_e4m3", "fp8_e5m2"]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(IDEMPOTENT), arrays(np.float32, (2, 2, 2, 64), elements=st.floats(-300, 300, width=32)))
def test_idempotent_formats(name, arr):
    """Exactly idempotent: the fp16 block scale is recovered bit-exactly from the dequantized block.

    (q4_1/q5_1 are not in general: ``15*d + m`` is rounded in fp32, so the re-measured ``d`` can move;
    int schemes re-measure their fp32 scale with rounding, and @amax / +rot / KIVI change their ranges.)
    """
    amax = np.abs(arr).reshape(-1, 32).max(-1)
    assume(((amax == 0) | (amax > 1e-3)).all())  # keep d out of fp16's subnormal range
    x = torch.from_numpy(arr)
    once = fake_quant(x, name)
    assert torch.equal(fake_quant(once, name), once)


@pytest.mark.parametrize("name", ["int4-token-sym", "int8-group16-asym", "int3-head-asym", "int4-tensor-sym"])
def test_int_schemes_idempotent_up_to_rounding(name):
    x = torch.randn(3, 8, 2, 32, generator=torch.Generator().manual_seed(1))
    once = fake_quant(x, name)
    assert torch.allclose(fake_quant(once, name), once, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ALL_SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_shape_and_dtype(name, dtype):
    x = torch.randn(2, 20, 2, 64).to(dtype)
    out = fake_quant(x, name, role="v")
    assert out.shape == x.shape and out.dtype == dtype


def test_bits_reduce_error_ordering_across_families():
    """Sanity: at similar bits the error ordering is plausible on gaussian data."""
    x = torch.randn(2, 64, 2, 64, generator=torch.Generator().manual_seed(0))

    def err(s):
        return (fake_quant(x, s) - x).pow(2).mean().item()

    assert err("q8_0") < err("q5_1") < err("q4_1") and err("q5_0") < err("q4_0")
    assert err("int8-group32-sym") < err("int4-group32-sym")
    assert Scheme.parse("q8_0").bits_per_element > Scheme.parse("q5_1").bits_per_element
