"""KIVI (forward and streaming) and the streaming cache quantizer for the other schemes."""

from __future__ import annotations

import pytest
import torch
from _quant_refs import kivi_keys_ref, kivi_values_ref

from kvgeom.quant import Scheme, StreamQuantizer, fake_quant

G, R = 8, 16
KIVI = f"kivi2-g{G}-r{R}"


def _seq(n: int, seed: int = 0, heads: int = 2, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, heads, d, generator=g)
    x[:, 0, 3] += 6.0  # an outlier channel, as keys have
    return x


@pytest.mark.parametrize("n", [5, 16, 21, 32, 37, 48])
def test_kivi_forward_prefill_rule(n):
    x = _seq(n)
    keys = fake_quant(x[None], KIVI, role="k")[0]
    n_k = (n // R) * R  # keys: leading multiple of R quantized per channel in token groups of G
    assert torch.equal(keys[:n_k], kivi_keys_ref(x[:n_k], 2, G))
    assert torch.equal(keys[n_k:], x[n_k:])
    vals = fake_quant(x[None], KIVI, role="v")[0]
    n_v = max(n - R, 0)  # values: all but the last R quantized per token in channel groups of G
    for t in range(n_v):
        assert torch.equal(vals[t], kivi_values_ref(x[t], 2, G))
    assert torch.equal(vals[n_v:], x[n_v:])


def test_kivi_clamps_before_rounding_and_handles_constant_groups():
    x = _seq(R)
    x[:G, 1, 2] = 0.75  # a constant key group
    keys = fake_quant(x[None], KIVI, role="k")[0]
    assert torch.equal(keys[:G, 1, 2], x[:G, 1, 2])
    assert torch.isfinite(keys).all()
    for b in (2, 4):
        q = fake_quant(x[None], f"kivi{b}-g{G}-r{R}", role="k")[0]
        levels = torch.unique(q[:G, 0, 0]).numel()
        assert levels <= 2**b


def test_kivi_group_must_divide_d_head():
    with pytest.raises(ValueError, match="d_head=12"):
        fake_quant(torch.randn(1, 4, 1, 12), KIVI, role="v")


def _expected_tails(n_prefill: int, n_decode: int) -> tuple[int, int, int]:
    """Independent bookkeeping of KIVI's residual: (#flushed keys, #full keys, #full values)."""
    flushed = (n_prefill // R) * R
    tail_k = n_prefill - flushed
    tail_v = min(n_prefill, R)
    for _ in range(n_decode):
        tail_k += 1
        if tail_k == R:
            flushed += R
            tail_k = 0
        tail_v = min(tail_v + 1, R)
    return flushed, tail_k, tail_v


@pytest.mark.parametrize("lengths", [(21, 21), (21, 13), (16, 3)])
def test_kivi_streaming_prefill_then_40_tokens(lengths):
    P = max(lengths)
    full = [_seq(n + 40, seed=i) for i, n in enumerate(lengths)]
    x = torch.full((len(lengths), P, 2, 16), 99.0)  # left padding
    mask = torch.zeros(len(lengths), P, dtype=torch.bool)
    for b, n in enumerate(lengths):
        x[b, P - n :] = full[b][:n]
        mask[b, P - n :] = True
    ks, vs = StreamQuantizer(KIVI, "k"), StreamQuantizer(KIVI, "v")
    k_cache, v_cache = ks.append(x, mask), vs.append(x, mask)
    assert torch.equal(k_cache, fake_quant(x, KIVI, role="k", mask=mask))  # prefill == forward mode
    assert torch.equal(v_cache, fake_quant(x, KIVI, role="v", mask=mask))
    seen_change = False
    for step in range(41):
        if step:
            new = torch.stack([f[n + step - 1] for f, n in zip(full, lengths, strict=True)])[:, None]
            prev_k = k_cache
            k_cache, v_cache = ks.append(new), vs.append(new)
            seen_change |= not torch.equal(k_cache[:, : prev_k.shape[1]], prev_k)
        kf, vf = ks.full_precision_mask(), vs.full_precision_mask()
        for b, n in enumerate(lengths):
            n_real = n + step
            real = full[b][:n_real]
            pos = mask[b].nonzero().squeeze(-1).tolist() + list(range(P, P + step))
            flushed, tail_k, tail_v = _expected_tails(n, step)
            assert kf[b, pos].tolist() == [i >= n_real - tail_k for i in range(n_real)]
            assert vf[b, pos].tolist() == [i >= n_real - tail_v for i in range(n_real)]
            assert not kf[b, : P - n].any() and not vf[b, : P - n].any()
            assert torch.equal(k_cache[b, pos[:flushed]], kivi_keys_ref(real[:flushed], 2, G))
            assert torch.equal(k_cache[b, pos[flushed:]], real[flushed:])
            for i in range(n_real - tail_v):
                assert torch.equal(v_cache[b, pos[i]], kivi_values_ref(real[i], 2, G))
            assert torch.equal(v_cache[b, pos[n_real - tail_v :]], real[n_real - tail_v :])
            assert torch.equal(k_cache[b, : P - n], x[b, : P - n])  # padding untouched
    assert seen_change  # flushing rewrites old key positions


@pytest.mark.parametrize("role", ["k", "v"])
def test_kivi_multi_token_appends_equal_single_token_appends(role):
    x = _seq(70, seed=4)[None]
    one, many = StreamQuantizer(KIVI, role), StreamQuantizer(KIVI, role)
    one.append(x[:, :10])
    many.append(x[:, :10])
    for t in range(10, 70):
        a = one.append(x[:, t : t + 1])
    for s, e in [(10, 13), (13, 40), (40, 41), (41, 70)]:
        b = many.append(x[:, s:e])
    assert torch.equal(a, b)
    assert torch.equal(one.full_precision_mask(), many.full_precision_mask())


# ---- the other schemes in cache mode ----

PER_POSITION = [
    "none",
    "bf16",
    "int4-token-asym",
    "int4-head-sym",
    "int8-group32-asym",
    "q4_0",
    "iq4_nl",
    "q4_0+rot",
    "fp8_e4m3",
    "fp8_e5m2",
]


@pytest.mark.parametrize("name", PER_POSITION)
def test_per_position_schemes_quantize_each_token_on_arrival(name):
    x = torch.randn(2, 30, 2, 64)
    sq = StreamQuantizer(name, "k")
    sq.append(x[:, :20])
    for t in range(20, 30):
        cache = sq.append(x[:, t : t + 1])
    assert torch.equal(cache, fake_quant(x, name))
    assert sq.full_precision_mask().all() == (name == "none")


@pytest.mark.parametrize(
    "name",
    [
        "int8-tensor-sym",
        "int4-tensor-asym",
        "int4-channel-asym",
        "int3-channel-sym",
        "fp8_e4m3@amax",
        "fp8_e5m2@amax",
    ],
)
@pytest.mark.parametrize("role", ["k", "v"])
def test_frozen_ranges_come_from_the_prefill(name, role):
    g = torch.Generator().manual_seed(5)
    pre, later = torch.randn(2, 12, 2, 32, generator=g), torch.randn(2, 5, 2, 32, generator=g) * 4
    sq = StreamQuantizer(name, role)
    first = sq.append(pre)
    assert torch.equal(first, fake_quant(pre, name, role=role))
    cache = sq.append(later)
    assert torch.equal(cache[:, :12], first)  # the prefill is not re-quantized
    # later tokens: quantizing [prefill; later] with a mask that hides `later` from the ranges gives the
    # later positions quantized with ranges frozen to the prefill
    both = torch.cat([pre, later], dim=1)
    spec = Scheme.parse(name).for_role(role)
    from kvgeom.quant.fake import quantize_fp32  # the same code path with the prefill-only mask

    m = torch.zeros(2, 17, dtype=torch.bool)
    m[:, :12] = True
    ref = quantize_fp32(both, m, spec, role)
    assert torch.equal(cache[:, 12:], ref[:, 12:])
    if name.startswith("int"):  # the later (4x larger) tokens saturate at the prefill's range
        assert cache[:, 12:].abs().max() < 0.75 * later.abs().max()


def test_frozen_int_tensor_clamps_to_prefill_range_exactly():
    pre = torch.tensor([0.5, -1.0, 0.25, 1.0]).reshape(1, 1, 1, 4)
    sq = StreamQuantizer("int8-tensor-sym", "k")
    sq.append(pre)
    cache = sq.append(torch.tensor([5.0, -9.0, 0.5, 0.0]).reshape(1, 1, 1, 4))
    scale = 1.0 / 127
    assert torch.allclose(cache[0, 1, 0], torch.tensor([127 * scale, -128 * scale, 64 * scale, 0.0]))


def test_fp8_amax_frozen_scale_saturates_later_tokens():
    sq = StreamQuantizer("fp8_e4m3@amax", "k")
    sq.append(torch.full((1, 3, 1, 8), 2.0))  # k_scale = 2/200 = 0.01
    cache = sq.append(torch.full((1, 1, 1, 8), 100.0))
    assert torch.allclose(cache[0, 3], torch.full((1, 8), 448 * 0.01))
    assert torch.allclose(cache[0, :3], torch.full((3, 1, 8), 1.92))  # fp8(200) = 192 in e4m3


@pytest.mark.parametrize("name", ["int4-tensor-asym", "int4-channel-sym", "fp8_e4m3@amax", KIVI, "q4_0"])
def test_streaming_padded_batch_equals_rows_alone(name):
    lengths, P = (20, 9, 14), 20
    rows = [_seq(n + 6, seed=10 + i, d=32) for i, n in enumerate(lengths)]
    x = torch.full((3, P, 2, 32), -5e3)
    mask = torch.zeros(3, P, dtype=torch.bool)
    for b, n in enumerate(lengths):
        x[b, P - n :], mask[b, P - n :] = rows[b][:n], True
    batch = StreamQuantizer(name, "k")
    batch.append(x, mask)
    for t in range(6):
        out = batch.append(torch.stack([r[n + t] for r, n in zip(rows, lengths, strict=True)])[:, None])
    for b, n in enumerate(lengths):
        alone = StreamQuantizer(name, "k")
        alone.append(rows[b][None, :n])
        for t in range(6):
            single = alone.append(rows[b][None, n + t : n + t + 1])
        assert torch.equal(out[b, P - n :], single[0])
        assert torch.equal(out[b, : P - n], x[b, : P - n])


def test_stream_errors_and_reset():
    sq = StreamQuantizer("int4-tensor-sym", "k")
    with pytest.raises(RuntimeError, match="append"):
        sq.full_precision_mask()
    with pytest.raises(ValueError, match="no real positions"):
        sq.append(torch.randn(2, 3, 1, 8), torch.tensor([[True] * 3, [False] * 3]))
    sq.reset()
    sq.append(torch.randn(2, 3, 1, 8))
    with pytest.raises(ValueError, match="must stay the same"):
        sq.append(torch.randn(2, 1, 2, 8))
    assert sq.n_positions == 3
    sq.reset()
    assert sq.n_positions == 0
    pair = StreamQuantizer("K:kivi2,V:q8_0", "v")
    assert str(pair.spec) == "q8_0"
