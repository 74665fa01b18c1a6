"""The query side of llama.cpp's CPU flash attention (``kvgeom.quant.query``): the rotation identity, and the
quantizer and ``Q·K`` checked against the installed ggml-cpu library itself (ctypes on llama-cpp-python's
``libggml-cpu.so`` / ``libggml-base.so``; those tests are skipped, with the reason, where it is not importable)."""

import ctypes
import os

import numpy as np
import pytest
import torch

from kvgeom.quant import GGMLSpec, QuantPlan, Scheme, fake_quant
from kvgeom.quant.ggml import GGML_TYPES, ggml_fake_quant, quantize_q8_0, quantize_q8_0_avx2
from kvgeom.quant.hadamard import fwht, rotation_block
from kvgeom.quant.query import QUERY_MODES, VEC_DOT_TYPE, check_query, query_fake_quant


def _q(shape=(2, 5, 4, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 4


@pytest.mark.parametrize("d_head", [64, 128, 192])
@pytest.mark.parametrize("rotate", [False, True])
def test_q8_0_query_is_fake_quant_q8_0_rot_on_the_query_layout(d_head, rotate):
    """H·q8_0(H·q) with K's rotation block is exactly fake_quant(q, "q8_0+rot"), K's block being the one fake_quant
    uses for keys (and without rotation plain q8_0), whatever the K type."""
    q = _q((2, 5, 4, d_head))
    want = fake_quant(q, "q8_0+rot" if rotate else "q8_0", role="k")
    for t in GGML_TYPES:
        assert torch.equal(query_fake_quant(q, GGMLSpec(t, rotate), "q8_0"), want), t


@pytest.mark.parametrize("k_type", ["q4_0", "q4_1", "iq4_nl"])
def test_rotated_back_q_times_stored_k_is_the_rotated_space_product(k_type):
    """What kvgeom's attention computes, (H q8(Hq))·(H q4(Hk)), is what llama.cpp computes, q8(Hq)·q4(Hk): H is
    orthonormal and symmetric (up to fp32 rounding)."""
    q, k = _q((1, 3, 2, 128), 1), _q((1, 3, 2, 128), 2)
    n = rotation_block(128, "k")
    spec = GGMLSpec(k_type, True)
    ours = (query_fake_quant(q, spec, "q8_0") * fake_quant(k, spec, role="k")).sum(-1)
    qb = ggml_fake_quant(fwht(q, n).reshape(-1, 32), "q8_0").reshape(q.shape)
    kb = ggml_fake_quant(fwht(k, n).reshape(-1, 32), k_type).reshape(k.shape)
    torch.testing.assert_close(ours, (qb * kb).sum(-1), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(ours, (q * fake_quant(k, spec, role="k")).sum(-1), atol=1e-3)  # Q really changed


def test_modes_padding_and_errors():
    q = _q()
    spec = GGMLSpec("q4_0", True)
    mask = torch.ones(q.shape[:2], dtype=torch.bool)
    mask[0, :2] = False
    out = query_fake_quant(q, spec, "engine", mask)
    assert torch.equal(out[0, :2], q[0, :2]) and not torch.equal(out[0, 2:], q[0, 2:])
    assert torch.equal(query_fake_quant(q, spec, "engine"), query_fake_quant(q, spec, "q8_0-avx2"))
    assert query_fake_quant(q.half(), spec, "q8_0").dtype == torch.float16
    assert set(VEC_DOT_TYPE) == set(GGML_TYPES) and check_query(None) is None
    for bad in ("q4_0", "Q8_0", "fp16", ""):
        with pytest.raises(ValueError, match="not a query conversion kvgeom simulates"):
            check_query(bad)
        with pytest.raises(ValueError, match="not a query conversion"):
            QuantPlan("q4_0+rot", mode="cache", query=bad)
    with pytest.raises(ValueError, match="not a llama.cpp cache type"):
        query_fake_quant(q, Scheme.parse("int4-token-asym").for_role("k"), "q8_0")
    assert QUERY_MODES == ("q8_0", "q8_0-avx2", "engine")


# ---- against the installed ggml-cpu -------------------------------------------------------------------------
try:
    import llama_cpp

    _LIB = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    _CPU = ctypes.CDLL(os.path.join(_LIB, "libggml-cpu.so"))
    _BASE = ctypes.CDLL(os.path.join(_LIB, "libggml-base.so"))
    _AVX2 = b"AVX2 = 1" in llama_cpp.llama_print_system_info()
    _CPU.ggml_cpu_init()  # ggml-cpu's fp16 tables: its vec_dot reads block scales through them
except (ImportError, OSError):  # pragma: no cover - depends on the optional extra
    _CPU = _BASE = None
    _AVX2 = False
needs_ggml = pytest.mark.skipif(_CPU is None, reason="llama-cpp-python (kvgeom[llamacpp]) is not importable")
needs_avx2 = pytest.mark.skipif(not _AVX2, reason="the installed ggml-cpu is not an x86 AVX2 build")

#: bytes per block of 32 (ggml-common.h)
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34, "q8_1": 36, "iq4_nl": 18}


def _quantize_row(lib, fn: str, x: np.ndarray, qtype: str) -> ctypes.Array:
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    buf = (ctypes.c_uint8 * (x.size // 32 * BLOCK_BYTES[qtype]))()
    getattr(lib, fn)(x.ctypes.data_as(ctypes.c_void_p), buf, ctypes.c_int64(x.size))
    return buf


def _q8(buf: ctypes.Array, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    a = np.frombuffer(buf, dtype=np.uint8).reshape(-1, BLOCK_BYTES[qtype])
    d = a[:, :2].copy().view(np.float16).astype(np.float32)
    s = a[:, 2:4].copy().view(np.float16).astype(np.float32) if qtype == "q8_1" else None
    return d, a[:, -32:].copy().view(np.int8).astype(np.int64), s


def _x(n=4000, seed=3):
    x = _q((n, 32), seed).reshape(n, 32)
    ties = torch.randint(-250, 250, (200, 32), generator=torch.Generator().manual_seed(seed)).float() * 0.5
    ties[:, 0] = 127.0  # amax 127: x*id lands on exact halves, where the two roundings differ
    return torch.cat([x, ties, torch.zeros(1, 32)])


@needs_ggml
@needs_avx2
@pytest.mark.parametrize("qtype", ["q8_0", "q8_1"])
def test_avx2_quantizer_is_ggml_cpus_own(qtype):
    x = _x()
    d, q, _ = _q8(_quantize_row(_CPU, f"quantize_row_{qtype}", x.numpy(), qtype), qtype)
    mine = quantize_q8_0_avx2(x)
    assert np.array_equal(q, (mine.codes - 128).numpy()) and np.array_equal(d, mine.d.numpy())
    assert not torch.equal(quantize_q8_0(x).codes, mine.codes)  # the ties: the two roundings really differ


@needs_ggml
def test_reference_quantizer_is_ggml_base_ref():
    x = _x()
    d, q, _ = _q8(_quantize_row(_BASE, "quantize_row_q8_0_ref", x.numpy(), "q8_0"), "q8_0")
    mine = quantize_q8_0(x)
    assert np.array_equal(q, (mine.codes - 128).numpy()) and np.array_equal(d, mine.d.numpy())


@needs_ggml
@needs_avx2
@pytest.mark.parametrize("k_type", GGML_TYPES)
def test_q_dot_k_is_ggml_cpus_vec_dot(k_type):
    """ggml-cpu's ``kq_vec_dot`` of K blocks (its ``from_float``) with Q converted by ``q_to_vec_dot`` equals
    kvgeom's fp32 product of fake-quantized K and the engine query, up to fp32 summation order; for q4_1/q5_1
    (Q as q8_1) the only other term is ``m_k * (s_q - d_q Σq_q)``, q8_1's fp16-rounded block sum."""
    vd = VEC_DOT_TYPE[k_type]
    rows = 64
    q, k = _q((rows, 1, 1, 128), 5), _q((rows, 1, 1, 128), 6) + 0.3  # an offset: q4_1/q5_1 minimums not ~0
    fn = getattr(_CPU, f"ggml_vec_dot_{k_type}_{vd}")
    n_blocks = 128 // 32
    for r in range(rows):
        kb = _quantize_row(_CPU, f"quantize_row_{k_type}", k[r].numpy(), k_type)
        qb = _quantize_row(_CPU, f"quantize_row_{vd}", q[r].numpy(), vd)
        s = ctypes.c_float()
        fn(ctypes.c_int(128), ctypes.byref(s), ctypes.c_size_t(0), kb, ctypes.c_size_t(0), qb, ctypes.c_size_t(0),
           ctypes.c_int(1))
        k_hat = fake_quant(k[r:r + 1], k_type, role="k").double().reshape(-1)
        q_hat = query_fake_quant(q[r:r + 1], GGMLSpec(k_type), "engine").double().reshape(-1)
        ours = float((q_hat * k_hat).sum())
        if vd == "q8_1":
            d, codes, s_q = _q8(qb, "q8_1")
            m_k = np.frombuffer(kb, dtype=np.uint8).reshape(n_blocks, -1)[:, 2:4].copy().view(np.float16)
            ours += float((m_k.astype(np.float64) * (s_q - d * codes.sum(1, keepdims=True))).sum())
        scale = float((q_hat.abs() * k_hat.abs()).sum())
        assert abs(s.value - ours) <= 2e-6 * scale + 1e-6, (k_type, r, s.value, ours)
