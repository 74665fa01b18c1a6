"""fp8 against torch casts; batching/padding invariance and input validation for every scheme."""

from __future__ import annotations

import pytest
import torch

from kvgeom.quant import StreamQuantizer, fake_quant

# ---- fp8 ----


@pytest.mark.parametrize(
    ("fmt", "dtype", "fmax"), [("e4m3", torch.float8_e4m3fn, 448.0), ("e5m2", torch.float8_e5m2, 57344.0)]
)
def test_fp8_static_matches_torch_cast_and_saturates(fmt, dtype, fmax):
    x = torch.randn(2, 5, 2, 16) * 50
    x[0, 0, 0, :4] = torch.tensor([1e6, -1e6, fmax * 1.2, -fmax * 1.01])
    out = fake_quant(x, f"fp8_{fmt}")
    expected = x.clamp(-fmax, fmax).to(dtype).to(torch.float32)
    assert torch.equal(out, expected)
    assert out[0, 0, 0, :4].tolist() == [fmax, -fmax, fmax, -fmax]
    assert torch.isfinite(out).all()
    # a plain cast would not saturate e5m2: the clamp is what keeps it finite
    if fmt == "e5m2":
        assert torch.isinf(torch.tensor([1e6]).to(dtype).to(torch.float32)).all()


@pytest.mark.parametrize(("role", "divisor"), [("k", 200.0), ("v", 100.0)])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_amax_scale_per_row_over_real_positions(fmt, role, divisor):
    dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    x = torch.randn(2, 6, 2, 8)
    x[1] *= 7
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    x[0, :2] = 1e5  # padding: must not enter amax
    out = fake_quant(x, f"fp8_{fmt}@amax", role=role, mask=mask)
    for b in range(2):
        real = x[b][mask[b]]
        s = real.abs().max() / torch.tensor(divisor)
        exp = (real / s).to(dtype).to(torch.float32) * s
        assert torch.equal(out[b][mask[b]], exp)
    assert torch.equal(out[0, :2], x[0, :2])


# ---- batching and padding ----

SCHEMES = [
    "none",
    "fp16",
    "bf16",
    "int2-tensor-sym",
    "int4-token-asym",
    "int3-head-sym",
    "int8-channel-asym",
    "int4-channel-sym",
    "int4-group32-asym",
    "q8_0",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "iq4_nl",
    "q4_0+rot",
    "q5_1+rot",
    "fp8_e4m3",
    "fp8_e5m2@amax",
    "kivi2-g8-r16",
    "kivi4-g16-r32",
    "K:kivi2-g8-r16,V:int4-tensor-asym",
]


def _rows(seed: int, lengths=(37, 21, 5, 48)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, 64, generator=g) * (1 + i) for i, n in enumerate(lengths)]


def _left_pad(rows: list[torch.Tensor], garbage: float = 3e3) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(r.shape[0] for r in rows)
    x = torch.full((len(rows), P, *rows[0].shape[1:]), garbage)
    mask = torch.zeros(len(rows), P, dtype=torch.bool)
    for b, r in enumerate(rows):
        x[b, P - r.shape[0] :] = r
        mask[b, P - r.shape[0] :] = True
    return x, mask


@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("name", SCHEMES)
def test_padded_batch_equals_each_row_alone(name, role):
    rows = _rows(seed=1)
    x, mask = _left_pad(rows)
    out = fake_quant(x, name, role=role, mask=mask)
    for b, r in enumerate(rows):
        alone = fake_quant(r[None], name, role=role)[0]
        assert torch.equal(out[b][mask[b]], alone), f"row {b}"
    assert torch.equal(out[~mask], x[~mask])


@pytest.mark.parametrize("name", ["int4-tensor-asym", "int4-channel-sym", "fp8_e4m3@amax", "kivi2-g8-r16", "q4_0"])
def test_row_result_independent_of_other_rows(name):
    rows = _rows(seed=2)
    a = fake_quant(torch.stack([rows[0], rows[0] * 0 + 1]), name)
    b = fake_quant(torch.stack([rows[0], rows[0] * 100]), name)
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("name", ["int4-tensor-asym", "int8-channel-asym", "fp8_e5m2@amax", "kivi2-g8-r16"])
def test_general_masks_with_holes(name):
    """Real positions need not be contiguous: the range of a row covers exactly its real positions."""
    r = _rows(seed=3)[0]
    x = torch.full((1, 50, 2, 64), -7e3)
    keep = torch.tensor([p % 4 != 1 for p in range(50)])
    x[0, keep] = r[: int(keep.sum())]
    out = fake_quant(x, name, mask=keep[None])
    assert torch.equal(out[0, keep], fake_quant(r[None, : int(keep.sum())], name)[0])
    assert torch.equal(out[0, ~keep], x[0, ~keep])


# ---- validation ----


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_with_site(bad):
    x = torch.randn(2, 4, 2, 32)
    x[1, 2, 0, 3] = bad
    with pytest.raises(ValueError) as err:
        fake_quant(x, "q8_0", role="v", site="blocks.3.attn.hook_rot_k")
    msg = str(err.value)
    assert "blocks.3.attn.hook_rot_k" in msg and "batch 1, pos 2" in msg and "V" in msg
    with pytest.raises(ValueError, match="blocks.7.attn.hook_v"):
        StreamQuantizer("kivi2", role="v", site="blocks.7.attn.hook_v").append(x)


def test_non_finite_padding_is_ignored():
    x = torch.randn(1, 4, 2, 32)
    x[0, 0] = float("nan")
    mask = torch.tensor([[False, True, True, True]])
    out = fake_quant(x, "int4-tensor-asym", mask=mask)
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[0, 1:]).all()


def test_bad_shapes_and_masks_are_explained():
    with pytest.raises(ValueError, match=r"\[batch, pos, kv_head, d_head\]"):
        fake_quant(torch.randn(4, 32), "q8_0")
    with pytest.raises(ValueError, match="bool tensor"):
        fake_quant(torch.randn(1, 4, 1, 32), "q8_0", mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="role must be"):
        fake_quant(torch.randn(1, 4, 1, 32), "q8_0", role="q")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid KV-cache quantization schemes"):
        fake_quant(torch.randn(1, 4, 1, 32), "int4")
