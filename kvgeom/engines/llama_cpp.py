"""llama.cpp (mainline ggml-org/llama.cpp, and the ik_llama.cpp fork for per-layer types).

Read in: ``common/arg.cpp`` (``-ctk/--cache-type-k``, ``-ctv/--cache-type-v``: f32, f16, bf16, q8_0, q4_0, q4_1,
iq4_nl, q5_0, q5_1; one type per role for every layer), ``ggml/src/ggml-quants.c`` (the block formats kvgeom
checks bit for bit against the ``gguf`` package's reference quantizers, ``tests/quant/test_quant_ggml.py``),
``src/llama-graph.cpp`` / ``src/llama-kv-cache.cpp`` (PR #21038, 2026: quantized K and V are Hadamard-rotated by
default when d_head is a multiple of 64, ``LLAMA_ATTN_ROT_DISABLE=1`` turns it off; a quantized V cache needs
flash attention, ``-fa on``), and ikawrakow/ik_llama.cpp PR #1599 (``-ctk-first/-ctk-last/-ctv-first/-ctv-last
TYPE,N``: other types for the first/last N layers). Proved by ``tests/engines/test_engines.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvgeom.quant import Scheme

from .base import Engine, EngineFormat, FixCandidate, ModelShape, register_engine

__all__ = ["LlamaCpp"]

TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
PAIRS = (("q8_0", "q4_0"), ("f16", "q4_0"))
_UPGRADES = ("q8_0", "f16")


def _scheme(t: str, rot: bool) -> str:
    return "fp16" if t == "f16" else t + ("+rot" if rot else "")


def _pair_scheme(k: str, v: str, rot: bool) -> str:
    ks, vs = _scheme(k, rot), _scheme(v, rot)
    return ks if ks == vs else f"K:{ks},V:{vs}"


def _flags(k: str, v: str) -> str:
    fa = " -fa on" if v != "f16" else ""
    return f"-ctk {k} -ctv {v}{fa}"


def _types(fmt: EngineFormat) -> tuple[str, str]:
    sch = Scheme.parse(fmt.scheme)
    return tuple(("f16" if s.llama_cpp() is None or s.llama_cpp().cache_type in ("f16", "bf16")  # type: ignore[misc]
                  else s.llama_cpp().cache_type) for s in (sch.k, sch.v))


class LlamaCpp(Engine):
    name = "llama.cpp"
    title = "llama.cpp"
    source = ("ggml-org/llama.cpp: common/arg.cpp (cache types), ggml/src/ggml-quants.c (block formats), "
              "src/llama-graph.cpp + src/llama-kv-cache.cpp (PR #21038 Hadamard rotation of quantized K/V when "
              "d_head % 64 == 0; flash attention for a quantized V); ikawrakow/ik_llama.cpp PR #1599 (first/last-"
              "layer cache types)")
    fix_kind = "-ctk/-ctv pair within the memory budget; first/last layers (ik_llama.cpp fork)"

    def formats(self, shape: ModelShape) -> list[EngineFormat]:
        if shape.d_head % 32:
            return []  # llama.cpp refuses quantized caches whose rows are not whole blocks of 32
        rot = shape.d_head % 64 == 0
        note = ("rotated: llama.cpp Hadamard-rotates quantized K/V by default (PR #21038); LLAMA_ATTN_ROT_DISABLE=1 or "
                "an older build gives the unrotated type" if rot else "d_head not a multiple of 64: llama.cpp does not "
                "rotate")
        out = [EngineFormat(t, _scheme(t, rot), _flags(t, t), note=note) for t in TYPES]
        out += [EngineFormat(f"{k}/{v}", _pair_scheme(k, v, rot), _flags(k, v), note=note) for k, v in PAIRS]
        return out

    def command(self, fmt: EngineFormat, model: str) -> str:
        return f"llama-server -m {model} {fmt.setting}"

    def fix_candidates(self, fmt: EngineFormat, shape: ModelShape, *, layer_order: Sequence[int],
                       budget_bits: float, max_candidates: int, model: str) -> list[FixCandidate]:
        k, v = _types(fmt)
        rot = "+rot" in fmt.scheme
        n = shape.n_layers
        own = fmt.bits(shape)
        pairs = []
        for a in dict.fromkeys((k, *_UPGRADES)):
            for b in dict.fromkeys((v, *_UPGRADES)):
                if (a, b) == (k, v):
                    continue
                sch = _pair_scheme(a, b, rot)
                bits = Scheme.parse(sch).bits_per_element_for(d_head=shape.d_head, n_kv_heads=shape.n_kv_heads)
                if own < bits <= budget_bits:
                    pairs.append((bits, a, b, sch))
        out = [FixCandidate(f"-ctk {a} -ctv {b}", (sch,) * n, f"llama-server -m {model} {_flags(a, b)}")
               for _, a, b, sch in sorted(pairs)[: max(1, max_candidates - 2)]]
        hi = "q8_0" if "q8_0" not in (k, v) else "f16"
        had = " -khad -vhad" if rot else ""
        for m in (1, 2):
            if 2 * m >= n:
                break
            edge = _pair_scheme(hi, hi, rot)
            a = tuple(edge if (i < m or i >= n - m) else fmt.scheme for i in range(n))
            fork = (f"llama-server -m {model} -ctk {k} -ctv {v} -ctk-first {hi},{m} -ctk-last {hi},{m} "
                    f"-ctv-first {hi},{m} -ctv-last {hi},{m} -fa on{had}")
            out.append(FixCandidate(f"first/last {m} layers {hi}", a, fork, needs="ik_llama.cpp fork (PR #1599)"))
        return out


ENGINE = register_engine(LlamaCpp())
