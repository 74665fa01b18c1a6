"""llama.cpp's KV cache types and the kvgeom schemes that simulate them: one table, one value per K/V pair.

:data:`LLAMA_CPP_CACHE_TYPES` maps each type llama.cpp accepts for ``--cache-type-k/-ctk``,
``--cache-type-v/-ctv`` (``common/arg.cpp``, ``kv_cache_types``, llama.cpp ``0c1e57098`` as vendored by
llama-cpp-python 0.3.36) to the kvgeom base scheme of the same storage, unrotated: ``f32 -> none``, ``f16 -> fp16``,
``bf16 -> bf16`` and every ``kvgeom.quant.ggml.GGML_TYPES`` entry to itself. The other direction is each kvgeom
format's own :meth:`~kvgeom.quant.formats.KVFormat.llama_cpp` (what :func:`kvgeom.mitigation.export_settings`
prints), and the test checks the two agree.

Rotation (``src/llama-kv-cache.cpp`` at ``0c1e57098``, ``llama_kv_cache::llama_kv_cache``): ``attn_rot_k`` is on
when the K type is quantized (``ggml_is_quantized``) and ``n_embd_head_k % 64 == 0``, ``attn_rot_v`` likewise for
V, both off when the environment sets ``LLAMA_ATTN_ROT_DISABLE``; ``llm_graph_context::build_attn``
(``src/llama-graph.cpp``) then multiplies Q and K (K's block: the largest power of two >= 64 dividing d_head) and V
(blocks of 64) by the Walsh-Hadamard matrix before storing, and the attention output by it again. So llama.cpp's
``q4_0`` on a model with d_head 64 is kvgeom's ``q4_0+rot``, and ``-ctk q8_0 -ctv f16`` is
``K:q8_0+rot,V:fp16`` (f16 is not rotated). :meth:`EngineFormat.kvgeom_scheme` applies this rule.

Proved by ``tests/validate/test_validate_types.py`` (the table agrees with every format's ``llama_cpp()``, the
rotation rule, pairs, and the errors for a type llama.cpp does not have).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvgeom.quant.ggml import GGML_TYPES
from kvgeom.quant.hadamard import ROT_MIN_BLOCK
from kvgeom.quant.scheme import Scheme

__all__ = ["DEFAULT_FORMATS", "LLAMA_CPP_CACHE_TYPES", "EngineFormat", "FULL_PRECISION", "parse_formats"]

#: llama.cpp cache type -> the kvgeom base scheme storing the same values (unrotated)
LLAMA_CPP_CACHE_TYPES: dict[str, str] = {"f32": "none", "f16": "fp16", "bf16": "bf16", **{t: t for t in GGML_TYPES}}
#: llama.cpp's default cache type (the ceiling row runs kvgeom's fp32 model against it)
FULL_PRECISION = "f16"
#: what ``kvgeom validate`` runs without ``--formats``: llama.cpp's default, every quantized type, the usual pair
DEFAULT_FORMATS = ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "q8_0/q4_0")


def _check_type(name: str, text: str) -> str:
    if name in LLAMA_CPP_CACHE_TYPES:
        return name
    hint = ""
    try:
        sch = Scheme.parse(name)
    except ValueError:
        sch = None
    if sch is not None:
        k, v = sch.k.llama_cpp(), sch.v.llama_cpp()
        if k is not None and v is not None:
            hint = (f" ({name!r} is kvgeom's name; llama.cpp calls it "
                    f"{k.cache_type if k == v else k.cache_type + '/' + v.cache_type!r})")
        else:
            hint = f" ({name!r} is a kvgeom scheme that no llama.cpp cache type stores)"
    raise ValueError(f"format {text!r}: {name!r} is not a llama.cpp cache type{hint}; llama.cpp's --cache-type-k/-v "
                     f"take {', '.join(LLAMA_CPP_CACHE_TYPES)}, and a K/V pair is written K_TYPE/V_TYPE, e.g. "
                     "q8_0/q4_0")


@dataclass(frozen=True)
class EngineFormat:
    """A llama.cpp cache configuration: ``type_k`` (``-ctk``) and ``type_v`` (``-ctv``); written ``q8_0`` or
    ``q8_0/q4_0`` (K/V)."""

    type_k: str
    type_v: str

    def __post_init__(self) -> None:
        for t in (self.type_k, self.type_v):
            _check_type(t, str(self))

    @classmethod
    def parse(cls, text: str) -> EngineFormat:
        """``"q4_0"`` (both) or ``"q8_0/q4_0"`` (K/V); ValueError naming the valid types otherwise."""
        parts = [p.strip().lower() for p in str(text).split("/")]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"format {text!r}: write one llama.cpp cache type (q4_0) or a K/V pair K_TYPE/V_TYPE "
                             f"(q8_0/q4_0); types: {', '.join(LLAMA_CPP_CACHE_TYPES)}")
        for p in parts:
            _check_type(p, text)
        return cls(parts[0], parts[1])

    def __str__(self) -> str:
        return self.type_k if self.type_k == self.type_v else f"{self.type_k}/{self.type_v}"

    @property
    def quantized_v(self) -> bool:
        """Whether V is quantized (llama.cpp then needs flash attention)."""
        return LLAMA_CPP_CACHE_TYPES[self.type_v] in GGML_TYPES

    def rotated(self, role: str, d_head: int, *, rotation: bool = True) -> bool:
        """Whether llama.cpp Hadamard-rotates ``role`` (``"k"``/``"v"``): a quantized type, d_head a multiple of
        64, rotation not disabled (``LLAMA_ATTN_ROT_DISABLE``)."""
        t = self.type_k if role == "k" else self.type_v
        return rotation and t in GGML_TYPES and d_head % ROT_MIN_BLOCK == 0

    def kvgeom_scheme(self, d_head: int, *, rotation: bool = True) -> str:
        """The kvgeom scheme (cache mode) that stores what llama.cpp stores for this format."""
        parts = []
        for role, t in (("k", self.type_k), ("v", self.type_v)):
            parts.append(LLAMA_CPP_CACHE_TYPES[t] + ("+rot" if self.rotated(role, d_head, rotation=rotation) else ""))
        text = parts[0] if parts[0] == parts[1] else f"K:{parts[0]},V:{parts[1]}"
        return str(Scheme.parse(text))


def parse_formats(formats: str | EngineFormat | list | tuple | None) -> list[EngineFormat]:
    """Formats from ``"f16,q8_0,q8_0/q4_0"``, a list of strings or values, or None (:data:`DEFAULT_FORMATS`);
    duplicates dropped, order kept. ValueError for an unknown type or an empty list."""
    if formats is None:
        formats = DEFAULT_FORMATS
    given = formats
    if isinstance(formats, str | EngineFormat):
        formats = [formats] if isinstance(formats, EngineFormat) else formats.split(",")
    out: list[EngineFormat] = []
    for f in formats:
        if isinstance(f, str) and not f.strip():
            raise ValueError(f"--formats {given!r} has an empty entry: write e.g. f16,q8_0,q4_0,q8_0/q4_0")
        ef = f if isinstance(f, EngineFormat) else EngineFormat.parse(f)
        if ef not in out:
            out.append(ef)
    if not out:
        raise ValueError("no formats given: write e.g. --formats f16,q8_0,q4_0,q8_0/q4_0")
    return out
