"""The query side of llama.cpp's CPU flash attention: Q quantized to the K type's dot-product type before ``Q·K``.

What llama.cpp does (``0c1e57098``, as vendored by llama-cpp-python 0.3.36):

* ``src/llama-graph.cpp``, ``llm_graph_context::build_attn`` (the KV-cache overload at line 2868: lines 2883-2890;
  the SWA one at 3115: lines 3133-3143): with ``attn_rot_k`` on, Q *and* K are multiplied by the same
  Walsh-Hadamard block (``llama_mul_mat_hadamard`` with ``inp->self_k_rot``; the block is the largest power of
  two >= 64 dividing d_head, ``build_input_k_rot`` in ``src/llama-kv-cache.cpp`` lines 1447-1466; on the CPU the
  product is ggml's fast Walsh-Hadamard transform, ``GGML_HINT_SRC0_IS_HADAMARD``, ``ggml-cpu.c`` line 1263), so
  Q reaches the attention kernel rotated and unscaled (``kq_scale`` multiplies the dot product afterwards).
* ``ggml/src/ggml-cpu/ops.cpp``, ``ggml_compute_forward_flash_attn_ext_f16_one_chunk`` (lines 8843-9078) is the
  only path for a quantized K (the tiled and split-KV paths need an f16/f32 K, lines 9489-9490, 9547-9551):
  ``q_to_vec_dot``, the ``from_float`` of the K type's ``vec_dot_type``, converts each Q row (lines 8917-8920,
  8961) and ``kq_vec_dot`` multiplies the stored K blocks with those Q blocks (line 8976). In ``type_traits_cpu``
  (``ggml/src/ggml-cpu/ggml-cpu.c`` lines 215-290, 380-385) ``vec_dot_type`` is q8_0 for q4_0, q5_0, q8_0 and
  iq4_nl, q8_1 for q4_1 and q5_1.
* ``from_float`` of q8_0 / q8_1 on an x86 build with AVX or AVX2 is ``quantize_row_q8_0`` / ``quantize_row_q8_1`` of
  ``ggml/src/ggml-cpu/arch/x86/quants.c`` (lines 302-398, 400-500): ``q = round_half_even(x * (127/amax))``
  (:func:`kvgeom.quant.ggml.quantize_q8_0_avx2`); elsewhere the reference ``roundf(x * (1/d))``
  (``quantize_row_q8_0_ref``, ``ggml/src/ggml-quants.c`` lines 276-299). q8_1 stores the same codes and ``d``
  plus ``s = fp16(d * Σq)``, which ``ggml_vec_dot_q4_1_q8_1`` / ``..._q5_1_q8_1`` multiply by K's block minimum
  ``m``; that fp16 rounding of ``s`` is the one part of the product not simulated here.

The simulation: since ``H`` is orthonormal and symmetric, ``q8(Hq)·q4(Hk) = (H q8(Hq))·(H q4(Hk))``; kvgeom's
cache already holds ``H q4(Hk)`` (``q4_0+rot``), so replacing Q (post-RoPE, hook site ``rot_q``) by
``H q8(Hq)`` makes the fp32 attention compute llama.cpp's ``Q·K`` up to fp32 summation order. With rotation off
(or a K type llama.cpp does not rotate) ``H`` is the identity. :func:`query_fake_quant` is that replacement; for
``mode="q8_0"`` it equals ``fake_quant(q, "q8_0+rot", role="k")`` on the query layout (``q8_0`` without rotation).

Modes (:data:`QUERY_MODES`, a :class:`kvgeom.quant.QuantPlan`'s ``query``): ``"q8_0"`` (reference rounding),
``"q8_0-avx2"`` (the x86 SIMD rounding) and ``"engine"`` (what the llama-cpp-python CPU build here does: the K
type's ``vec_dot_type`` with the AVX2 rounding, i.e. ``"q8_0-avx2"`` for every llama.cpp cache type). The V side
needs nothing: a quantized V is de-quantized to fp32 (``v_to_float``) and accumulated in fp32 (``VKQ32``, lines
9009-9029), as kvgeom's attention does; only an f16 V is accumulated in f16 (``VKQ16``, lines 8993-9008, 9033-9037).
CUDA's vector kernel quantizes Q to q8_1 for a quantized K as well (``ggml-cuda/fattn-vec.cuh`` lines 97, 181).

Proved by ``tests/quant/test_query_quant.py`` (the rotation identity, bit-exact against ggml-cpu's own
``quantize_row_q8_0``, and ``Q·K`` against ggml-cpu's ``ggml_vec_dot_*`` on the same blocks) and
``tests/runtime/test_query_plan.py`` (the plan option changes logits only through Q).
"""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor

from .formats.ggml import GGMLSpec
from .ggml import QK, ggml_dequant, quantize_q8_0, quantize_q8_0_avx2
from .hadamard import fwht, rotation_block

__all__ = ["QUERY_MODES", "VEC_DOT_TYPE", "check_query", "query_fake_quant", "query_spec_error"]

#: ``QuantPlan.query`` values: Q's conversion before ``Q·K`` (module docstring)
QUERY_MODES = ("q8_0", "q8_0-avx2", "engine")
#: llama.cpp K cache type -> the type ggml-cpu converts Q to for ``Q·K`` (``type_traits_cpu[...].vec_dot_type``)
VEC_DOT_TYPE = {"q8_0": "q8_0", "q4_0": "q8_0", "q5_0": "q8_0", "iq4_nl": "q8_0", "q4_1": "q8_1", "q5_1": "q8_1"}
_QUANTIZER = {"q8_0": quantize_q8_0, "q8_0-avx2": quantize_q8_0_avx2, "engine": quantize_q8_0_avx2}

Q = Float[Tensor, "batch pos head d_head"]


def check_query(query: str | None) -> str | None:
    """``query`` if it is None or one of :data:`QUERY_MODES`; ValueError naming them otherwise."""
    if query is None or query in QUERY_MODES:
        return query
    raise ValueError(f"query={query!r} is not a query conversion kvgeom simulates: use None (Q kept exact, the "
                     f"default), {', '.join(repr(m) for m in QUERY_MODES)} (llama.cpp's CPU flash attention converts "
                     "Q to q8_0 for every quantized K type; 'engine' is its x86 AVX2 rounding)")


def query_spec_error(k_spec: object) -> str | None:
    """Why Q quantization cannot follow ``k_spec`` (the K format of a layer), or None when it can."""
    if isinstance(k_spec, GGMLSpec):
        return None
    return (f"K is {k_spec}, not a llama.cpp cache type ({', '.join(VEC_DOT_TYPE)}): llama.cpp converts Q to q8_0 "
            "for a quantized K (with an f16 K it rounds Q to f16 on its vector path only, which kvgeom does not "
            "simulate), so query= applies to llama.cpp K types only: drop query= or give K a llama.cpp type")


def query_fake_quant(q: Q, k_spec: GGMLSpec, mode: str, mask: Bool[Tensor, "batch pos"] | None = None) -> Q:
    """``H·q8(H·q)`` per head vector (``H``: K's Hadamard block when ``k_spec.rotate``, else the identity), in fp32,
    returned in ``q``'s dtype; positions where ``mask`` is False are returned unchanged."""
    check_query(mode)
    if mode is None:
        return q
    err = query_spec_error(k_spec)
    if err:
        raise ValueError(err)
    d_head = q.shape[-1]
    if d_head % QK:
        raise ValueError(f"Q's d_head {d_head} is not a multiple of {QK}: q8_0 blocks need whole blocks of {QK}")
    n_rot = rotation_block(d_head, "k") if k_spec.rotate else 0
    x = q.to(torch.float32)
    y = fwht(x, n_rot) if n_rot else x
    blocks = rearrange(y, "b p h (n k) -> (b p h n) k", k=QK).contiguous()
    y = ggml_dequant(_QUANTIZER[mode](blocks)).reshape(q.shape)
    y = (fwht(y, n_rot) if n_rot else y).to(q.dtype)
    return y if mask is None else torch.where(mask[:, :, None, None], y, q)
