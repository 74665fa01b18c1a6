"""KV-cache quantization schemes as values parsed from (and printed to) strings.

A :class:`Scheme` holds one base spec for keys and one for values (equal for a plain scheme).
``Scheme.parse(text)`` accepts the grammar in :data:`VALID_FORMS`; ``str(scheme)`` prints the
canonical form, and ``Scheme.parse(str(s)) == s`` for every scheme.

Bits per element (relative to an fp16 cache, so ``none`` counts as 16) include the scale and
zero-point overhead, each stored as fp16 (16 bits):

* uniform ``int{b}``: ``b + 16/n`` (sym) or ``b + 32/n`` (asym), ``n`` = elements sharing one range:
  token ``n = n_kv_heads * d_head``, head ``n = d_head``, group ``n = G``; tensor ``n = seq_len *
  n_kv_heads * d_head`` and channel ``n = seq_len`` (both amortised to ``b`` when ``seq_len`` is None);
* llama.cpp blocks of 32: q8_0 8.5, q4_0 4.5, q4_1 5.0, q5_0 5.5, q5_1 6.0, iq4_nl 4.5 (``+rot`` is free);
* fp8: 8 (one scale per tensor, ignored); KIVI: ``b + 32/G`` (the full-precision residual is ignored);
* a K/V pair: the mean of the two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Role = Literal["k", "v"]
Granularity = Literal["tensor", "token", "head", "channel", "group"]

#: Shape assumed by the ``bits_per_element`` property: the project's default model
#: (Qwen2.5-Coder-0.5B-Instruct: 2 KV heads of 64 dims). Use ``bits_per_element_for`` otherwise.
DEFAULT_D_HEAD = 64
DEFAULT_N_KV_HEADS = 2

KIVI_DEFAULT_GROUP = 32  # KIVI paper / code default group size
KIVI_DEFAULT_RESIDUAL = 128  # KIVI paper default residual length (its example.py uses 32)

GGML_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
GGML_BITS = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "iq4_nl": 4.5}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}

VALID_FORMS = """valid KV-cache quantization schemes:
  none | fp16 | bf16                               cast round trip (none = identity)
  int{b}-{tensor|token|head|channel|group{G}}-{sym|asym}
                                                   uniform, b in 2..8, e.g. int4-group64-asym
  q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | iq4_nl[+rot]  llama.cpp cache types, e.g. q4_0+rot
  fp8_e4m3 | fp8_e5m2[@amax]                       vLLM fp8 cache, e.g. fp8_e4m3@amax
  kivi{b}[-g{G}][-r{R}]                            KIVI, b in {2,4}, defaults G=32 R=128 (R multiple of G)
  K:<scheme>,V:<scheme>                            separate key/value schemes, e.g. K:kivi2,V:q8_0"""


def _invalid(text: str, reason: str) -> ValueError:
    return ValueError(f"invalid KV-cache quantization scheme {text!r}: {reason}.\n{VALID_FORMS}")


def _range_overhead(bits: int, symmetric: bool, n: int | None) -> float:
    """``b + (16 or 32)/n``: one fp16 scale (and one fp16 zero point if asymmetric) per ``n`` elements."""
    if n is None:
        return float(bits)
    return bits + (16 if symmetric else 32) / n


@dataclass(frozen=True)
class CastSpec:
    """``none`` (identity), ``fp16`` or ``bf16``: ``x̂ = cast(cast(x, dtype), x.dtype)``."""

    dtype: Literal["none", "fp16", "bf16"]

    def __str__(self) -> str:
        return self.dtype

    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        return 16.0


@dataclass(frozen=True)
class IntSpec:
    """Uniform ``int{b}`` quantization with one range per block of the given granularity.

    sym:  ``scale = amax/(2^(b-1)-1)``, ``q = clamp(round(x/scale), -2^(b-1), 2^(b-1)-1)``, ``x̂ = q*scale``
    asym: ``scale = max((max-min)/(2^b-1), 1e-8)``, ``zp = clamp(round(-min/scale), 0, 2^b-1)``,
    ``q = clamp(round(x/scale + zp), 0, 2^b-1)``, ``x̂ = (q-zp)*scale``; ``round`` is half-to-even.
    """

    bits: int
    granularity: Granularity
    symmetric: bool
    group_size: int | None = None

    def __str__(self) -> str:
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        return f"int{self.bits}-{gran}-{'sym' if self.symmetric else 'asym'}"

    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        n: int | None
        if self.granularity == "token":
            n = n_kv_heads * d_head
        elif self.granularity == "head":
            n = d_head
        elif self.granularity == "group":
            n = self.group_size
        elif self.granularity == "tensor":
            n = None if seq_len is None else seq_len * n_kv_heads * d_head
        else:  # channel
            n = seq_len
        return _range_overhead(self.bits, self.symmetric, n)


@dataclass(frozen=True)
class GGMLSpec:
    """A llama.cpp cache type (blocks of 32 along d_head), optionally with llama.cpp's Hadamard rotation.

    ``rotate`` models ``attn_rot_k`` / ``attn_rot_v`` (llama.cpp PR #21038, 2026): each head vector is
    split into blocks of ``n`` and each block multiplied by the orthonormal Sylvester Hadamard matrix
    ``H_n/sqrt(n)`` before storing; ``n`` is the largest power of two >= 64 dividing d_head for K, and 64
    for V. We rotate, quantize, and rotate back (``H`` is symmetric and its own inverse), which is what
    attention sees since llama.cpp also rotates Q and un-rotates the attention output.
    """

    qtype: Literal["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]
    rotate: bool = False

    def __str__(self) -> str:
        return self.qtype + ("+rot" if self.rotate else "")

    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        return GGML_BITS[self.qtype]


@dataclass(frozen=True)
class FP8Spec:
    """vLLM fp8 cache: ``x̂ = fp8(clamp(x/s, -max, max)) * s`` with max 448 (e4m3) or 57344 (e5m2).

    ``s = 1`` unless ``dynamic`` (``@amax``): vLLM's ``calculate_kv_scales``, ``s = amax/200`` for K and
    ``amax/100`` for V, measured once on the prefill and frozen.
    """

    fmt: Literal["e4m3", "e5m2"]
    dynamic: bool = False

    def __str__(self) -> str:
        return f"fp8_{self.fmt}" + ("@amax" if self.dynamic else "")

    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        return 8.0


@dataclass(frozen=True)
class KIVISpec:
    """KIVI (Liu et al. 2024): keys per channel over groups of G tokens, values per token over groups of
    G channels, asymmetric; the newest R tokens stay full precision. Defaults G=32, R=128 (the paper's
    setting; KIVI's example.py uses R=32).
    """

    bits: int
    group_size: int = KIVI_DEFAULT_GROUP
    residual: int = KIVI_DEFAULT_RESIDUAL

    def __str__(self) -> str:
        return f"kivi{self.bits}-g{self.group_size}-r{self.residual}"

    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        return self.bits + 32 / self.group_size


BaseSpec = CastSpec | IntSpec | GGMLSpec | FP8Spec | KIVISpec

_INT_RE = re.compile(r"int(\d+)-(tensor|token|head|channel|group(\d+))-(sym|asym)")
_GGML_RE = re.compile(r"(q8_0|q4_0|q4_1|q5_0|q5_1|iq4_nl)(\+rot)?")
_FP8_RE = re.compile(r"fp8_(e4m3|e5m2)(@amax)?")
_KIVI_RE = re.compile(r"kivi(\d+)(?:-g(\d+))?(?:-r(\d+))?")


def parse_base(text: str, *, full_text: str | None = None) -> BaseSpec:
    """Parse one base scheme (no ``K:``/``V:`` pair). Raises ValueError listing the valid forms."""
    full = text if full_text is None else full_text
    s = text.strip().lower()
    if s in ("none", "fp16", "bf16"):
        return CastSpec(s)  # type: ignore[arg-type]
    if m := _INT_RE.fullmatch(s):
        bits = int(m.group(1))
        if not 2 <= bits <= 8:
            raise _invalid(full, f"int bits must be in 2..8 (got {bits})")
        group = None
        gran = m.group(2)
        if m.group(3) is not None:
            group = int(m.group(3))
            if group < 1:
                raise _invalid(full, "the group size G of int{b}-group{G} must be >= 1")
            gran = "group"
        return IntSpec(bits, gran, m.group(4) == "sym", group)  # type: ignore[arg-type]
    if m := _GGML_RE.fullmatch(s):
        return GGMLSpec(m.group(1), m.group(2) is not None)  # type: ignore[arg-type]
    if m := _FP8_RE.fullmatch(s):
        return FP8Spec(m.group(1), m.group(2) is not None)  # type: ignore[arg-type]
    if m := _KIVI_RE.fullmatch(s):
        bits = int(m.group(1))
        if bits not in (2, 4):
            raise _invalid(full, f"KIVI bits must be 2 or 4 (got {bits})")
        group = int(m.group(2)) if m.group(2) is not None else KIVI_DEFAULT_GROUP
        residual = int(m.group(3)) if m.group(3) is not None else KIVI_DEFAULT_RESIDUAL
        if group < 1:
            raise _invalid(full, "the KIVI group size G must be >= 1")
        if residual < group or residual % group != 0:
            raise _invalid(full, f"the KIVI residual R={residual} must be a positive multiple of G={group}")
        return KIVISpec(bits, group, residual)
    if "+rot" in s:
        raise _invalid(full, "+rot applies only to the llama.cpp types q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl")
    if "@amax" in s:
        raise _invalid(full, "@amax applies only to fp8_e4m3 and fp8_e5m2")
    raise _invalid(full, f"{text.strip()!r} matches none of the forms")


@dataclass(frozen=True)
class Scheme:
    """A KV-cache quantization scheme: one base spec for keys (``k``) and one for values (``v``)."""

    k: BaseSpec
    v: BaseSpec

    @classmethod
    def parse(cls, text: str | Scheme) -> Scheme:
        """Parse ``text`` (see :data:`VALID_FORMS`); a Scheme is returned unchanged."""
        if isinstance(text, Scheme):
            return text
        if isinstance(text, CastSpec | IntSpec | GGMLSpec | FP8Spec | KIVISpec):
            return cls(text, text)
        if not isinstance(text, str):
            raise TypeError(f"Scheme.parse expects a string, got {type(text).__name__}")
        if ":" not in text:
            base = parse_base(text)
            return cls(base, base)
        parts = [p.strip() for p in text.split(",")]
        found: dict[str, BaseSpec] = {}
        for part in parts:
            role, sep, rest = part.partition(":")
            role = role.strip().lower()
            if not sep or role not in ("k", "v"):
                raise _invalid(text, f"each part of a pair must start with 'K:' or 'V:' (got {part!r})")
            if role in found:
                raise _invalid(text, f"{role.upper()}: given twice")
            found[role] = parse_base(rest, full_text=text)
        if set(found) != {"k", "v"}:
            raise _invalid(text, "a pair needs both K:<scheme> and V:<scheme>")
        return cls(found["k"], found["v"])

    def __str__(self) -> str:
        if self.k == self.v:
            return str(self.k)
        return f"K:{self.k},V:{self.v}"

    def for_role(self, role: Role) -> BaseSpec:
        """The base spec applied to keys (``"k"``) or values (``"v"``)."""
        if role == "k":
            return self.k
        if role == "v":
            return self.v
        raise ValueError(f"role must be 'k' or 'v', got {role!r}")

    @property
    def is_pair(self) -> bool:
        return self.k != self.v

    def bits_per_element_for(self, *, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        """Mean bits per stored element of K and V, counting fp16 scale/zero-point overhead."""
        kb = self.k.bits_per_element(d_head, n_kv_heads, seq_len)
        vb = self.v.bits_per_element(d_head, n_kv_heads, seq_len)
        return (kb + vb) / 2

    @property
    def bits_per_element(self) -> float:
        """Bits per element assuming :data:`DEFAULT_D_HEAD` and :data:`DEFAULT_N_KV_HEADS`."""
        return self.bits_per_element_for(d_head=DEFAULT_D_HEAD, n_kv_heads=DEFAULT_N_KV_HEADS)
