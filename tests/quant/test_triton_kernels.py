"""Triton fused fake-quant kernels give exactly the eager path's bits (``torch.equal``).

CPU variants run the kernels under the Triton interpreter and need ``TRITON_INTERPRET=1`` set before Python
starts; CUDA variants (marked ``cuda``) compile them for the GPU and must run *without* it::

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python -m pytest -q tests/quant/test_triton_kernels.py   # CPU
    python -m pytest -q -m cuda tests/quant/test_triton_kernels.py                                # GPU

Skipped when triton is not installed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from kvgeom.quant import FP8Spec, GGMLSpec, IntSpec, KIVISpec, Scheme, StreamQuantizer, fake_quant  # noqa: E402
from kvgeom.quant.triton import common, dispatch  # noqa: E402
from kvgeom.quant.triton import kivi as tkivi  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
COVERED = (
    "int4-token-sym int4-token-asym int2-token-asym int8-token-sym int3-head-sym int4-head-asym "
    "int4-group32-asym int4-group16-sym int5-group64-asym int4-group48-asym int4-tensor-asym int2-tensor-sym "
    "int8-channel-asym int4-channel-sym q8_0 q4_0 q5_0 q4_1 q5_1 fp8_e4m3 fp8_e5m2 fp8_e4m3@amax fp8_e5m2@amax "
    "q8_0+rot q4_0+rot q5_0+rot q4_1+rot q5_1+rot iq4_nl iq4_nl+rot "
    "int8_per_token_head fp8_per_token_head int4_per_token_head"
).split()
FALLBACK = ("bf16", "fp16")
#: KIVI (forward mode): default G=32 R=128, R = G, R = 2G, small groups, a group size not a power of two
KIVI = ("kivi2", "kivi4", "kivi2-g32-r32", "kivi4-g16-r32", "kivi2-g8-r16", "kivi4-g4-r8", "kivi2-g12-r24")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((3, 45, 3, 64), (2, 33, 2, 128))
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU runs need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and no TRITON_INTERPRET")]),
]


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """torch.equal, with the count, largest difference and first mismatches in the failure message."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype, want.dtype)
    if torch.equal(got, want):
        return
    g, w = got.float().cpu(), want.float().cpu()
    bad = (g != w) & ~(g.isnan() & w.isnan())
    idx = bad.nonzero()[:5].tolist()
    diff = (g - w).abs()[bad]
    pytest.fail(f"{what}: {int(bad.sum())}/{bad.numel()} values differ, max |diff| {float(diff.max()):.6g}; "
                f"first at {idx}: triton {[g[tuple(i)].item() for i in idx]} eager {[w[tuple(i)].item() for i in idx]}")


def padded_mask(shape, device) -> torch.Tensor:
    mask = torch.ones(shape[:2], dtype=torch.bool)
    mask[1, : shape[1] // 3] = False  # left padding
    if shape[0] > 2:
        mask[2] = False  # a row without any real position
    mask[0, -1] = False
    return mask.to(device)


def random_kv(shape, seed: int) -> torch.Tensor:
    """Heavy tails, an outlier, zero rows/heads, tiny values, garbage at padding positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) / torch.rand(shape, generator=g).clamp_min(0.05)
    x[0, 3, 0, 5] = 700.0
    x[0, 4] = 0.0
    x[1, -2, 1] = 0.0
    x[0, 6] *= 1e-5
    x[1, 0] = 1e4  # padding
    return x


def tie_kv(shape, name: str, seed: int) -> torch.Tensor:
    """Blocks of 32 whose range makes many values exact rounding ties (x/scale = k + 1/2, fp8 midpoints)."""
    rng = np.random.default_rng(seed)
    spec = Scheme.parse(name).k
    if isinstance(spec, FP8Spec):
        lead: list[float] = []
        pool = [1 + 2**-4, -(1 + 3 * 2**-4), 1 + 2**-3, 3 * 2**-10, -5 * 2**-10, 2**-6 - 2**-10, 2**-14 * 1.5,
                3 * 2**-17, 248.0, 500.0, -600.0, 448.0, 6e4, -6.1e4, 0.0, -0.0, 2.5, 1.25, 96.0 + 8]
    elif isinstance(spec, GGMLSpec) and spec.qtype == "q8_0":
        lead, pool = [15.875], [(k + 0.5) / 8 for k in range(-127, 126)] + [0.0, -0.0]
    elif isinstance(spec, GGMLSpec) and spec.qtype == "iq4_nl":  # d0 = -127/-127 = 1: values on the midpoints
        from kvgeom.quant.ggml import KVALUES_IQ4NL as kv
        lead, pool = [-127.0], [(kv[i - 1] + kv[i]) / 2 for i in range(1, 16)] + [float(v) for v in kv[1:]] + [0.0]
    elif isinstance(spec, GGMLSpec) and spec.qtype.endswith("_0"):
        lead, pool = [-2.0], [k / 8 for k in range(-15, 16)]
    elif isinstance(spec, IntSpec) and spec.symmetric:
        lead, pool = [1.75], [(k + 0.5) * 0.25 for k in range(-7, 7)] + [0.0, -0.0]
    else:  # asym int and q4_1 / q5_1: range [-2, 1.75]
        lead, pool = [-2.0, 1.75], [k / 8 for k in range(-16, 15)]
    x = rng.choice(np.array(pool, dtype=np.float32), size=shape)
    blocks = x.reshape(-1, 32)
    blocks[:, : len(lead)] = lead
    return torch.from_numpy(x)


def run_both(x, name, role, mask):
    want = fake_quant(x, name, role=role, mask=mask, backend="eager")
    got = fake_quant(x, name, role=role, mask=mask, backend="triton")
    return got, want


def skip_uncovered(x, name):
    if not dispatch.supported(x, Scheme.parse(name).k):  # e.g. a group size not dividing kv_head*d_head
        pytest.skip(f"{name} on {tuple(x.shape)}: eager rejects it / no kernel")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", COVERED)
def test_random_inputs_bit_identical(name, dtype, shape, device):
    x = random_kv(shape, seed=len(name)).to(dtype).to(device)
    skip_uncovered(x, name)
    mask = padded_mask(shape, device)
    for role in ("k", "v") if "@amax" in name else ("k",):
        got, want = run_both(x, name, role, mask)
        assert_same(got, want, f"{name} {dtype} {shape} role={role}")
        assert torch.equal(got[~mask], x[~mask])  # padding returned unchanged
    got, want = run_both(x, name, "k", None)
    assert_same(got, want, f"{name} {dtype} {shape} mask=None")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", COVERED)
def test_rounding_ties_bit_identical(name, dtype, device):
    shape = (2, 21, 2, 64)
    x = tie_kv(shape, name, seed=1).to(dtype).to(device)
    skip_uncovered(x, name)
    for mask in (None, padded_mask(shape, device)):
        got, want = run_both(x, name, "k", mask)
        assert_same(got, want, f"{name} {dtype} ties mask={mask is not None}")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_output_ties_are_exercised(device):
    """q8_0 outputs fp16(d)*q carry up to 18 significant bits: many are exact ties of the final bf16 cast."""
    x = random_kv((2, 64, 2, 128), seed=3).to(torch.bfloat16).to(device)
    exact = fake_quant(x.float(), "q8_0", backend="eager")  # the fp32 values before the cast
    bits = exact.cpu().view(torch.int32)
    n_ties = int(((bits & 0xFFFF) == 0x8000).sum())
    assert n_ties > 10
    got, want = run_both(x, "q8_0", "k", None)
    assert_same(got, want, "q8_0 bf16 output ties")


def _fma_traps(inv: np.float32, ks: range, n: int, seed: int) -> np.ndarray:
    """fp32 values x with fl(x*inv) exactly k - 1/2 but the exact x*inv below it: an fma of ``x*id + c``
    (c = half + 0.5, or 0.5) truncates to one code lower there than eager's two roundings."""
    rng = np.random.default_rng(seed)
    out: list[np.float32] = []
    for _ in range(200 * n):
        if len(out) == n:
            break
        t = int(rng.choice(ks)) - 0.5
        x = np.float32(t / float(inv))
        for _ in range(8):
            p = float(x) * float(inv)  # exact in float64
            if np.float32(p) == t and p < t:
                out.append(x)
                break
            x = np.nextafter(x, np.float32(np.inf if (p < t) == (x > 0) else -np.inf))
    assert len(out) == n, "could not build fma traps"
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q4_1", "q5_1"])
def test_no_fma_contraction(name, device):
    """Eager rounds x*id before adding 8.5 (q*_0) or 0.5 (q*_1); a fused multiply-add picks other codes."""
    if name.endswith("_0"):  # blocks [mx, 0, traps...]: d = mx/-half
        half = {"q4_0": 8, "q5_0": 16}[name]
        mx, c, ks = np.float32(-10.4), half + 0.5, range(-half + 1, half + 1)
        d = mx / np.float32(-half)
    else:  # blocks [mx, 0, traps >= 0]: min 0, d = mx/levels
        levels = {"q4_1": 15, "q5_1": 31}[name]
        mx, c, ks = np.float32(12.3), 0.5, range(1, levels + 1)
        d = mx / np.float32(levels)
    inv = np.float32(1.0) / d
    traps = _fma_traps(inv, ks, 40 * 30, seed=0).reshape(40, 30)
    eager_codes = np.trunc(np.float32(traps * inv) + np.float32(c))
    fma_codes = np.trunc(traps.astype(np.float64) * float(inv) + c)
    assert (eager_codes != fma_codes).all()  # every trap would change code under an fma
    blocks = np.concatenate([np.tile(np.array([mx, 0.0], dtype=np.float32), (40, 1)), traps], axis=1)
    x = torch.from_numpy(blocks).reshape(1, 20, 1, 64).to(device)
    got, want = run_both(x, name, "k", None)
    assert_same(got, want, f"{name} fma traps")


def _order_traps(n: int, seed: int) -> torch.Tensor:
    """Blocks of 32 whose iq4_nl scale ``fp16(Σwqx / Σwq²)`` changes when the sums are added in another order
    (reversed): a kernel that reduced them as a tree instead of ggml's element order would store other scales."""
    from kvgeom.quant.ggml import KVALUES_IQ4NL, best_index_iq4nl, signed_absmax

    g = torch.Generator().manual_seed(seed)
    kv = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32)
    found: list[torch.Tensor] = []
    while sum(len(f) for f in found) < n:
        b = torch.randn(200_000, 32, generator=g) * torch.rand(200_000, 1, generator=g).mul(8).exp2()
        q = kv[best_index_iq4nl((1.0 / (signed_absmax(b) / -127.0)) * b)]
        wq = b * b * q
        tx, tq = wq * b, wq * q

        def scale(cols, tx=tx, tq=tq):
            sx = torch.zeros(len(tx))
            sq = torch.zeros(len(tx))
            for j in cols:
                sx, sq = sx + tx[:, j], sq + tq[:, j]
            return (sx / sq).half()

        found.append(b[scale(range(32)) != scale(range(31, -1, -1))])
    return torch.cat(found)[:n]


@pytest.mark.parametrize("device", DEVICES)
def test_iq4_nl_sums_in_element_order(device):
    """iq4_nl's least-squares sums are ggml's loop, element by element (fp32, no fma): on blocks where another
    summation order stores another fp16 scale, the kernel stores eager's (``iq4_nl+rot`` runs the same block
    quantizer on the rotated values)."""
    traps = _order_traps(64, seed=2)
    x = traps.reshape(1, 32, 1, 64).to(device)
    got, want = run_both(x, "iq4_nl", "k", None)
    assert_same(got, want, "iq4_nl order traps")


def subnormal_kv(shape, seed: int) -> torch.Tensor:
    """Random values at magnitudes 1e-45 .. 1e-30 per position: many ranges, scales and quotients are fp32
    subnormals, which eager keeps and a flush-to-zero division (``div.rn.ftz.f32``) would zero."""
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** (-45 + 15 * torch.rand(shape[:2] + (1, 1), generator=g))
    return (torch.randn(shape, generator=g, dtype=torch.float64) * mag).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", [*COVERED, *KIVI[:3]])
def test_subnormal_ranges_bit_identical(name, dtype, device):
    shape = (2, 64, 2, 64)
    x = subnormal_kv(shape, seed=4).to(dtype).to(device)
    skip_uncovered(x, name)
    assert int(((x != 0) & (x.abs() < torch.finfo(torch.float32).tiny)).sum()) > 1000  # subnormal inputs
    for role in ("k", "v") if "@amax" in name or name.startswith("kivi") else ("k",):
        for mask in (None, padded_mask(shape, device)):
            got, want = run_both(x, name, role, mask)
            assert_same(got, want, f"{name} {dtype} subnormal role={role} mask={mask is not None}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", ["q4_0", "q5_0"])
def test_first_largest_magnitude_wins(name, dtype, device):
    """q4_0/q5_0 scale by the *first* value of largest magnitude: blocks holding both +a and -a (and +-0 for an
    all-zero block) at every pair of positions, in both orders."""
    g = torch.Generator().manual_seed(11)
    blocks = []
    for i, j in [(0, 31), (31, 0), (3, 4), (4, 3), (15, 16), (16, 15), (0, 1)]:
        for a in (1.5, 0.75):
            b = torch.rand(32, generator=g) - 0.5
            b[i], b[j] = a, -a
            blocks.append(b)
    zero = torch.zeros(32)
    zero[5] = -0.0
    blocks.append(zero)
    x = torch.stack(blocks).reshape(1, len(blocks), 1, 32).to(dtype).to(device)
    got, want = run_both(x, name, "k", None)
    assert_same(got, want, f"{name} {dtype} magnitude ties")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    x = random_kv((2, 40, 3, 64), seed=5).transpose(1, 2).contiguous().transpose(1, 2).to(device)  # HF layout
    assert not x.is_contiguous()
    for name in ("int4-token-asym", "q4_0", "int4-channel-asym", "fp8_e4m3@amax", "kivi2-g8-r16"):
        got, want = run_both(x, name, "v", None)
        assert_same(got, want, f"{name} non-contiguous")


def test_old_module_paths_still_work():
    """``kvgeom.quant.triton_kernels`` / ``triton_kivi`` moved to the ``kvgeom.quant.triton`` package."""
    with pytest.warns(DeprecationWarning, match="kvgeom.quant.triton"):
        from kvgeom.quant.triton_kernels import fused_fake_quant
    with pytest.warns(DeprecationWarning, match="kvgeom.quant.triton.kivi"):
        from kvgeom.quant.triton_kivi import KIVI_TUNE
    assert fused_fake_quant is dispatch.fused_fake_quant and KIVI_TUNE is tkivi.KIVI_TUNE


CUDA_ONLY = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@CUDA_ONLY
@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("name", ["q4_0+rot", "q8_0+rot", "q5_1+rot", "q8_0", "int4-token-asym", "int4-group32-sym",
                                  "fp8_e4m3", "iq4_nl+rot", "int8_per_token_head"])
def test_cache_mode_runs_the_kernels_with_the_eager_bits(name, role, monkeypatch):
    """A streaming cache (prefill, then one position at a time) on a GPU quantizes each chunk with the format's
    fused kernel where it has one, and stores exactly what the eager math stores."""
    x = random_kv((3, 45, 2, 128), seed=11).to("cuda", torch.bfloat16)
    mask = padded_mask(x.shape, "cuda")
    spec = Scheme.parse(name).for_role(role)
    calls: list[bool] = []
    fused = dispatch.fused_fake_quant

    def spy(*args, **kwargs):
        out = fused(*args, **kwargs)
        calls.append(out is not None)
        return out

    def stream() -> list[torch.Tensor]:
        sq = StreamQuantizer(name, role)
        outs = [sq.append(x[:, :40], mask[:, :40])]
        outs += [sq.append(x[:, p:p + 1], mask[:, p:p + 1]) for p in range(40, 45)]
        return outs

    monkeypatch.setattr(dispatch, "fused_fake_quant", spy)
    monkeypatch.setattr("kvgeom.quant.triton.fused_fake_quant", spy)
    got = stream()
    assert calls and all(calls) == (spec.kernel() is not None), (name, calls)
    monkeypatch.setattr(type(spec), "quantize_fast", lambda self, v, m, r: self.quantize(v, m, r))
    want = stream()
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same(g, w, f"{name} {role} append {i}")


@pytest.mark.parametrize("name", FALLBACK)
def test_uncovered_schemes_fall_back(name):
    x = random_kv((2, 40, 2, 64), seed=6)
    spec = Scheme.parse(name).k
    assert not dispatch.supported(x, spec) and dispatch.fused_fake_quant(x, spec, "k") is None
    with pytest.raises(ValueError, match="backend='triton'"):
        fake_quant(x, name, backend="triton")
    assert torch.equal(fake_quant(x, name), fake_quant(x, name, backend="eager"))


def test_auto_on_cpu_is_eager_and_bad_backend_rejected():
    x = random_kv((2, 10, 2, 64), seed=7)
    assert not dispatch.supported(x, Scheme.parse("q4_0").k) or INTERPRET
    assert torch.equal(fake_quant(x, "q4_0"), fake_quant(x, "q4_0", backend="eager"))
    with pytest.raises(ValueError, match="backend"):
        fake_quant(x, "q4_0", backend="fast")


def test_batch_beyond_the_grid_limit_falls_back():
    """The range schemes' elementwise pass puts the batch on the launch grid's 3rd dimension (at most 65,535):
    a larger batch is not claimed by the kernels (so fake_quant runs eager) instead of failing to launch."""
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("kernels run on CUDA or under TRITON_INTERPRET=1 only")
    device = "cpu" if INTERPRET else "cuda"
    for spec in (Scheme.parse("int4-tensor-asym").k, Scheme.parse("int8-channel-sym").k, Scheme.parse("fp8_e4m3").k):
        assert dispatch.supported(torch.zeros(common.GRID_YZ, 1, 1, 2, device=device), spec)
        assert not dispatch.supported(torch.zeros(common.GRID_YZ + 1, 1, 1, 2, device=device), spec)


# ---- KIVI -------------------------------------------------------------------------------------------------
def kivi_case(name: str) -> tuple[tuple[int, int, int, int], list[int]]:
    """Shape (d_head a multiple of G) and per-row real lengths: all, > R, exactly R, < R, 0 (all padding)."""
    spec = Scheme.parse(name).k
    g, r = spec.group_size, spec.residual
    d = 48 if 64 % g else 64
    P = 2 * r + g + 5
    return (5, P, 2, d), [P, r + g + 1, r, max(r - g - 1, 1), 0]


def left_padded(P: int, lengths: list[int], device) -> torch.Tensor:
    mask = torch.zeros(len(lengths), P, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, P - n:] = n > 0
    return mask.to(device)


def scattered(P: int, lengths: list[int], device, seed: int) -> torch.Tensor:
    """Real positions anywhere in the row (not a suffix): groups still run over them in order."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), P, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, torch.randperm(P, generator=g)[:n]] = True
    return mask.to(device)


def kivi_tie_kv(shape, g: int, seed: int) -> torch.Tensor:
    """Grid values in [-2, 1.75], extremes frequent (most groups span the whole range: (x - mn)/scale hits
    k + 1/2 for both 2 and 4 bits), a constant stretch (scale 0) and a stretch of mixed +-0."""
    rng = np.random.default_rng(seed)
    pool = np.array([-2.0, 1.75] + [k / 8 for k in range(-16, 15)], dtype=np.float32)
    p = np.full(len(pool), 0.5 / (len(pool) - 2))
    p[:2] = 0.25
    x = torch.from_numpy(rng.choice(pool, size=shape, p=p))
    x[:, 7 : 7 + 2 * g, 0] = 0.75
    x[:, 7 : 7 + 2 * g, 1, :g] = torch.from_numpy(rng.choice(np.array([0.0, -0.0], dtype=np.float32),
                                                             size=(shape[0], 2 * g, g)))
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", KIVI)
def test_kivi_bit_identical(name, dtype, device):
    shape, lengths = kivi_case(name)
    x = random_kv(shape, seed=len(name)).to(dtype).to(device)
    assert dispatch.supported(x, Scheme.parse(name).k)
    masks = {"left": left_padded(shape[1], lengths, device), "scattered": scattered(shape[1], lengths, device, 0),
             "none": None}
    for role in ("k", "v"):
        for what, mask in masks.items():
            got, want = run_both(x, name, role, mask)
            assert_same(got, want, f"{name} {dtype} role={role} mask={what}")
            if mask is not None:
                assert torch.equal(got[~mask], x[~mask])  # padding returned unchanged
        assert not torch.equal(got, x)  # something was quantized


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", ["kivi2-g8-r16", "kivi4-g8-r16", "kivi2-g32-r32", "kivi4-g12-r24"])
def test_kivi_ties_and_constant_groups(name, dtype, device):
    spec = Scheme.parse(name).k
    shape, lengths = kivi_case(name)
    x = kivi_tie_kv(shape, spec.group_size, seed=2).to(dtype).to(device)
    for role in ("k", "v"):
        for mask in (None, left_padded(shape[1], lengths, device)):
            got, want = run_both(x, name, role, mask)
            assert_same(got, want, f"{name} {dtype} ties role={role} mask={mask is not None}")
    # the ties are there: fp32 (x - mn)/scale lands on k + 1/2 for many values of the first row's value groups
    g, qmax = spec.group_size, 2**spec.bits - 1
    t = x[0, : shape[1] - spec.residual].float().cpu().reshape(-1, g)
    mn, mx = t.amin(1, keepdim=True), t.amax(1, keepdim=True)
    v = (t - mn) / ((mx - mn) / qmax).clamp_min(1e-30)
    assert int((v - v.floor() == 0.5).sum()) > 50


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["kivi2", "kivi4-g16-r32", "kivi2-g12-r24"])
def test_kivi_key_tile_shapes_agree(name, device, monkeypatch):
    """The key kernel gives eager's bits at every tile shape (``KIVI_TUNE["k_elems"]``: columns per program)
    that a sweep tried, ties and constant groups included, with and without padding."""
    spec = Scheme.parse(name).k
    shape, lengths = kivi_case(name)
    xs = {"random": random_kv(shape, seed=5).to(torch.bfloat16).to(device),
          "ties": kivi_tie_kv(shape, spec.group_size, seed=3).to(device)}
    for elems, warps in ((1024, 2), (2048, 1), (4096, 4)):
        monkeypatch.setitem(tkivi.KIVI_TUNE, "k_elems", elems)
        monkeypatch.setitem(tkivi.KIVI_TUNE, "k_warps", warps)
        for what, x in xs.items():
            for mask in (None, left_padded(shape[1], lengths, device), scattered(shape[1], lengths, device, 1)):
                got, want = run_both(x, name, "k", mask)
                assert_same(got, want, f"{name} k_elems={elems} {what} mask={mask is not None}")


@pytest.mark.parametrize("device", DEVICES)
def test_kivi_unsupported_shapes(device):
    x = random_kv((2, 40, 2, 64), seed=8).to(device)
    odd = KIVISpec(2, 8, 12)  # R not a multiple of G: the parser refuses it, eager cannot run it
    assert not dispatch.supported(x, odd) and dispatch.fused_fake_quant(x, odd, "k") is None
    with pytest.raises(ValueError, match="not a multiple of 48"):  # eager's message for G not dividing d_head
        fake_quant(x, "kivi2-g48-r96", backend="triton")


@pytest.mark.parametrize("device", [p for p in DEVICES if p.values[0] == "cuda"])
@pytest.mark.parametrize("name", ["kivi2", "kivi4", "kivi2-g32-r32"])
def test_kivi_realistic_shape(name, device):
    """[8, 2048, 8, 128] bf16 (many programs per row), rows of lengths around multiples of R."""
    P = 2048
    x = random_kv((8, P, 8, 128), seed=9).to(torch.bfloat16).to(device)
    lengths = [P, P - 1, 1000, 129, 128, 127, 1, 0]
    for role in ("k", "v"):
        for mask in (left_padded(P, lengths, device), scattered(P, lengths, device, 1)):
            got, want = run_both(x, name, role, mask)
            assert_same(got, want, f"{name} realistic role={role}")


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and no TRITON_INTERPRET")
def test_kivi_kernel_runs_by_default_on_cuda(monkeypatch):
    """Verified on a GPU, KIVI's kernel is no longer opt-in: ``backend="auto"`` runs it, and so does
    ``"triton"``; both equal eager. A spec put in ``dispatch.OPT_IN`` would stay eager under ``"auto"``."""
    assert not any(issubclass(type(Scheme.parse("kivi2").k), c) for c in dispatch.OPT_IN)
    x = torch.randn(2, 40, 2, 64, device="cuda", dtype=torch.bfloat16)
    calls = []
    real = tkivi.kivi_fused
    monkeypatch.setattr(tkivi, "kivi_fused", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert_same(fake_quant(x, "kivi2"), fake_quant(x, "kivi2", backend="eager"), "auto")
    assert len(calls) == 1
    assert_same(fake_quant(x, "kivi2", backend="triton"), fake_quant(x, "kivi2", backend="eager"), "triton")
    assert len(calls) == 2
    monkeypatch.setattr(dispatch, "OPT_IN", (type(Scheme.parse("kivi2").k),))
    assert_same(fake_quant(x, "kivi2"), fake_quant(x, "kivi2", backend="eager"), "auto, opt-in")
    assert len(calls) == 2


if not INTERPRET:  # compiled for the GPU only: the kernel under test uses inline PTX
    import triton
    import triton.language as tl

    @triton.jit
    def _fast_div_probe(d_ptr, s_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        d = tl.load(d_ptr + i, mask=ok, other=0.0)
        s = tl.load(s_ptr + i, mask=ok, other=1.0)
        tl.store(out_ptr + i, common.fast_div(d, s, common.rcp(s)), mask=ok)


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and no TRITON_INTERPRET")
@pytest.mark.parametrize("ties", [3, 15, 255])
def test_fast_division_is_exact(ties):
    """:func:`common.fast_div` (the divisor's reciprocal computed once) against torch's CUDA division on
    2^23 pairs, divisors over [2^-64, 2^64] with every mantissa: half with signed quotients log-uniform over
    [2^-40, 2^40] (and zeros), half within a few ulps of a rounding tie ``(k + 1/2)``, k < ``ties``. The bits are
    equal wherever ``|d / s| >= 2^-20``; below, the result keeps the sign and stays below 2^-19."""
    g = torch.Generator(device="cuda").manual_seed(ties)
    n = 1 << 22
    s = torch.exp2(torch.empty(2 * n, device="cuda").uniform_(-64, 63, generator=g).floor())
    s = s * torch.empty_like(s).uniform_(1, 2, generator=g)
    sign = torch.randint(0, 2, (2 * n,), device="cuda", generator=g).float() * 2 - 1
    t = torch.exp2(torch.empty(n, device="cuda").uniform_(-40, 40, generator=g))
    k = torch.randint(0, ties, (n,), device="cuda", generator=g).float() + 0.5
    d = torch.cat([t, k]) * s * sign
    ulps = torch.randint(-3, 4, (n,), device="cuda", generator=g).to(torch.int32)
    d[n:] = (d[n:].view(torch.int32) + ulps).view(torch.float32)  # a few ulps off the tie, either way
    d[:512] = 0.0
    d[512:1024] = -0.0
    want = d / s
    got = torch.empty_like(d)
    _fast_div_probe[(triton.cdiv(2 * n, 1024),)](d, s, got, 2 * n, BLOCK=1024, enable_fp_fusion=False)
    big = want.abs() >= 2.0**-20
    assert int(big.sum()) > n
    assert torch.equal(got[big].view(torch.int32), want[big].view(torch.int32))
    assert bool((got[~big].abs() < 2.0**-19).all())
    assert torch.equal(torch.signbit(got[~big]), torch.signbit(want[~big]))


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and no TRITON_INTERPRET")
@pytest.mark.parametrize("name", ["kivi2", "kivi4-g16-r32", "int4-token-sym", "int4-group32-asym",
                                  "int4-tensor-asym", "int8-channel-asym", "fp8_e4m3@amax", "fp8_e5m2@amax"])
def test_both_divisions_agree(name, monkeypatch):
    """``fast_div`` on and off give eager's bits, also where a program must fall back to ``div_rn``: subnormal
    values (divisors below 2^-64) and huge constant blocks (quotients beyond 2^64, the asym floor 1e-8)."""
    kivi = name.startswith("kivi")
    shape, lengths = kivi_case(name) if kivi else ((3, 45, 3, 64), [45, 30, 0])
    huge = random_kv(shape, seed=7)
    huge[0, 1:5] = 3e30  # constant blocks: asym scale 1e-8, x/scale overflows fp32
    huge[1, 2, 0] = -1e37
    xs = {"random": random_kv(shape, seed=5).to(torch.bfloat16).cuda(), "subnormal": subnormal_kv(shape, seed=6).cuda(),
          "huge": huge.cuda()}
    if kivi:
        xs["ties"] = kivi_tie_kv(shape, Scheme.parse(name).k.group_size, seed=3).cuda()
    table = tkivi.KIVI_TUNE if kivi else common.TUNE
    for fast in (False, True):
        monkeypatch.setitem(table, "fast_div", fast)
        for what, x in xs.items():
            for role in ("k", "v") if kivi or "@amax" in name else ("k",):
                for mask in (None, left_padded(shape[1], lengths, "cuda")):
                    got, want = run_both(x, name, role, mask)
                    assert_same(got, want, f"{name} fast={fast} {what} {role} mask={mask is not None}")


# ---- rows of several llama.cpp types in one launch (kvgeom.quant.RowMix) -----------------------------------
MIX_NAMES = ("q8_0", "q4_0", "q5_0", "q4_1", "q5_1", "iq4_nl")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("rotated", [True, False], ids=["with_rot", "no_rot"])
@pytest.mark.parametrize("d_head", [64, 128])
def test_mixed_rows_equal_each_rows_own_format(d_head, rotated, dtype, device):
    """Each batch row of a mix gets exactly what its own format's ``fake_quant`` gives it (eager), padding kept;
    rows without a format come back unchanged."""
    from kvgeom.quant import RowMix, mix_code

    names = [*MIX_NAMES, *(n + "+rot" for n in MIX_NAMES)] if rotated else list(MIX_NAMES)
    row_names = [*names, None, names[0], None]
    shape = (len(row_names), 9, 2, d_head)
    x = random_kv(shape, seed=d_head + rotated).to(dtype).to(device)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    mask[1, :4] = False
    mask[2, :] = False
    mask[-2, :2] = False
    mask = mask.to(device)
    for role in ("k", "v"):
        specs = [None if n is None else Scheme.parse(n).for_role(role) for n in row_names]
        assert all(s is None or mix_code(s, role) is not None for s in specs)
        mix = RowMix.of(specs, role, d_head, x.device)
        assert mix is not None
        for m in (mask, None):
            got = mix(x, m)
            for i, n in enumerate(row_names):
                want = x[i:i + 1] if n is None else fake_quant(x[i:i + 1], n, role=role,
                                                                 mask=None if m is None else m[i:i + 1],
                                                                 backend="eager")
                assert_same(got[i:i + 1], want, f"row {i} {n} role={role} {dtype} mask={m is not None}")


def test_mix_codes_cover_llama_cpp_types_only():
    from kvgeom.quant import RowMix, mix_code

    for name in ("int4-token-asym", "fp8_e4m3", "int4-tensor-sym", "bf16", "fp8_e4m3@amax"):
        assert mix_code(Scheme.parse(name).k, "k") is None, name
    codes = {mix_code(Scheme.parse(n).k, "k") for n in (*MIX_NAMES, *(n + "+rot" for n in MIX_NAMES))}
    assert codes == set(range(12))
    with pytest.raises(ValueError, match="cannot share a RowMix"):
        RowMix.of([Scheme.parse("int4-token-asym").k], "k", 64, torch.device("cuda"))
    q4 = Scheme.parse("q4_0").k  # a batch beyond one launch's grid is left to the per-format path, not failed
    assert RowMix.of([q4] * (common.GRID_YZ + 1), "k", 64, torch.device("cuda")) is None
    assert RowMix.of([None, None], "k", 64, torch.device("cuda")) is None  # covers no row
    assert RowMix.of([q4], "k", 64, torch.device("cpu")) is None or INTERPRET  # no GPU: not claimed


PLAN_CACHE_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU runs need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.cuda, CUDA_ONLY]),
]


@pytest.mark.parametrize("device", PLAN_CACHE_DEVICES)
def test_plan_cache_mixes_llama_cpp_rows_with_the_same_bits(device, monkeypatch):
    """A cache-mode batch with a llama.cpp type (or K/V pair, or per-layer assignment) per row, next to rows the mix
    does not cover (an int format, ``prefill="full"``, full precision): the logits of a quantized-prefill pass and
    the greedy tokens equal those of the same batch with the mix turned off, and the mix really ran."""
    import kvgeom
    from kvgeom.quant import QuantPlan
    from kvgeom.quant.triton import mixed
    from kvgeom.runtime import plan_cache
    from kvgeom.runtime.forward import encode
    from kvgeom.runtime.plans import forward_with_plans
    from kvgeom.testing import tiny_model

    model = tiny_model("llama", n_layers=3, device=device)
    if device == "cuda":
        model.hf_model.to(torch.bfloat16)
    names = ["q4_0+rot", "q8_0", "iq4_nl+rot", "q5_1", "K:q8_0+rot,V:q4_0", "int4-token-asym", "q4_1", None]
    plans = [None if n is None else QuantPlan(n, mode="cache", site="rot_k", name=f"p{i}")
             for i, n in enumerate(names)]
    plans[6] = QuantPlan("q4_1", mode="cache", site="rot_k", prefill="full", name="p6")
    plans.append(QuantPlan("q8_0", layers=(0, 2), layer_schemes={1: "q4_0+rot"}, mode="cache", site="rot_k",
                           name="layers"))
    prompts = [f"Tell me about item {i} in some detail." for i in range(len(plans))]
    batch = encode(model, prompts)
    launches: list[int] = []
    real = mixed.mixed_launch

    def spy(*args, **kwargs):
        launches.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mixed, "mixed_launch", spy)
    mix_logits = forward_with_plans(model, batch.input_ids, batch.mask, plans, logits_to_keep=1)
    mix_gen = kvgeom.generate(model, prompts, plans=plans, max_new_tokens=4, stop_at_eos=False)
    assert launches, "the mix never ran"
    monkeypatch.setattr(plan_cache, "mix_code", lambda spec, role: None)
    n = len(launches)
    ref_logits = forward_with_plans(model, batch.input_ids, batch.mask, plans, logits_to_keep=1)
    ref_gen = kvgeom.generate(model, prompts, plans=plans, max_new_tokens=4, stop_at_eos=False)
    assert len(launches) == n  # the reference ran without it
    assert_same(mix_logits, ref_logits, "logits with and without the mix")
    assert mix_gen.tokens == ref_gen.tokens
