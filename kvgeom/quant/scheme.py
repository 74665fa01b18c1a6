"""KV-cache quantization schemes as values parsed from (and printed to) strings.

A :class:`Scheme` holds one base spec for keys and one for values (equal for a plain scheme); a base spec is a
value of a registered KV format (:mod:`kvgeom.quant.formats`: ``CastSpec``, ``IntSpec``, ``GGMLSpec``,
``FP8Spec``, ``KIVISpec``, and any format registered later). ``Scheme.parse(text)`` accepts the grammar in
:func:`valid_forms` (each format's own, plus ``K:<scheme>,V:<scheme>``); ``str(scheme)`` prints the canonical
form, and ``Scheme.parse(str(s)) == s`` for every scheme.

Bits per element (relative to an fp16 cache, so ``none`` counts as 16) include the scale and zero-point
overhead, each stored as fp16 (16 bits); each format's module gives its formula; a K/V pair is the mean of
the two. Bit sweeps: :attr:`Scheme.family` (``int4-token-asym`` -> ``int{b}-token-asym``),
:meth:`Scheme.at_bits` and :func:`expand_family`.

:meth:`Scheme.check_shape` says whether a scheme applies to a model's heads (``tests/runtime/test_plan.py``).
Proved by ``tests/quant/test_quant_scheme.py`` and ``tests/quant/test_formats.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .formats import FORMATS, CastSpec, FormatError, FP8Spec, GGMLSpec, IntSpec, KIVISpec, KVFormat, Role
from .formats import parse_format as _parse_format
from .formats.int import Granularity
from .formats.kivi import KIVI_DEFAULT_GROUP, KIVI_DEFAULT_RESIDUAL
from .fp8 import FP8_MAX
from .ggml import GGML_BITS, GGML_TYPES

__all__ = [
    "DEFAULT_D_HEAD", "DEFAULT_N_KV_HEADS", "FP8_MAX", "GGML_BITS", "GGML_TYPES", "KIVI_DEFAULT_GROUP",
    "KIVI_DEFAULT_RESIDUAL", "VALID_FORMS", "BaseSpec", "CastSpec", "FP8Spec", "GGMLSpec", "Granularity",
    "IntSpec", "KIVISpec", "Role", "Scheme", "expand_family", "parse_base", "valid_forms",
]

#: Shape assumed by the ``bits_per_element`` property: the project's default model
#: (Qwen2.5-Coder-0.5B-Instruct: 2 KV heads of 64 dims). Use ``bits_per_element_for`` otherwise.
DEFAULT_D_HEAD = 64
DEFAULT_N_KV_HEADS = 2

#: Any base spec: a value of a registered format.
BaseSpec = KVFormat

_PAIR_FORM = ("K:<scheme>,V:<scheme>", "separate key/value schemes, e.g. K:kivi2,V:q8_0")
_HELP_COLUMN = 51


def _form_line(grammar: str, summary: str) -> str:
    head = f"  {grammar}"
    if len(head) >= _HELP_COLUMN - 1:
        return f"{head}\n{' ' * _HELP_COLUMN}{summary}"
    return f"{head:<{_HELP_COLUMN}}{summary}"


def valid_forms() -> str:
    """The grammar of every registered format (one line each, in registration order) and of K/V pairs."""
    lines = [_form_line(f.grammar, f.summary) for f in FORMATS.values()]
    return "\n".join(["valid KV-cache quantization schemes:", *lines, _form_line(*_PAIR_FORM)])


#: :func:`valid_forms` of the built-in formats (error messages use the live registry).
VALID_FORMS = valid_forms()


def _invalid(text: str, reason: str) -> ValueError:
    return ValueError(f"invalid KV-cache quantization scheme {text!r}: {reason}.\n{valid_forms()}")


def parse_base(text: str, *, full_text: str | None = None) -> KVFormat:
    """Parse one base scheme (no ``K:``/``V:`` pair). Raises ValueError listing the valid forms."""
    try:
        return _parse_format(text)
    except FormatError as err:
        raise _invalid(text if full_text is None else full_text, str(err)) from None


@dataclass(frozen=True)
class Scheme:
    """A KV-cache quantization scheme: one base spec for keys (``k``) and one for values (``v``)."""

    k: KVFormat
    v: KVFormat

    @classmethod
    def parse(cls, text: str | Scheme | KVFormat) -> Scheme:
        """Parse ``text`` (see :func:`valid_forms`); a Scheme is returned unchanged, a base spec paired with
        itself."""
        if isinstance(text, Scheme):
            return text
        if isinstance(text, KVFormat):
            return cls(text, text)
        if not isinstance(text, str):
            raise TypeError(f"Scheme.parse expects a string, got {type(text).__name__}")
        if ":" not in text:
            base = parse_base(text)
            return cls(base, base)
        parts = [p.strip() for p in text.split(",")]
        found: dict[str, KVFormat] = {}
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

    def _repr_html_(self) -> str:
        """Jupyter: the scheme, its family and bits per element (:mod:`kvgeom.display`)."""
        from kvgeom.display import result_html

        return result_html(f"Scheme {self}", {"keys": str(self.k), "values": str(self.v), "family": self.family,
                                              "bits per element": self.bits_per_element,
                                              "bit widths of the family": ", ".join(map(str, self.bit_widths))})

    def for_role(self, role: Role) -> KVFormat:
        """The base spec applied to keys (``"k"``) or values (``"v"``)."""
        if role == "k":
            return self.k
        if role == "v":
            return self.v
        raise ValueError(f"role must be 'k' or 'v', got {role!r}")

    @property
    def is_pair(self) -> bool:
        return self.k != self.v

    def check_shape(self, *, n_kv_heads: int, d_head: int) -> None:
        """Raise the formats' ValueError (cause and fix) when this scheme cannot quantize K/V of ``n_kv_heads``
        heads of ``d_head`` dims (``+rot`` needs d_head a multiple of 64, KIVI's group size must divide d_head,
        llama.cpp blocks of 32 must tile it, int groups must tile the heads): no tensor is allocated."""
        import torch

        shape = torch.empty((1, 1, n_kv_heads, d_head), device="meta")
        for spec in dict.fromkeys((self.k, self.v)):
            spec.check(shape)

    def bits_per_element_for(self, *, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        """Mean bits per stored element of K and V, counting fp16 scale/zero-point overhead."""
        kb = self.k.bits_per_element(d_head, n_kv_heads, seq_len)
        vb = self.v.bits_per_element(d_head, n_kv_heads, seq_len)
        return (kb + vb) / 2

    @property
    def bits_per_element(self) -> float:
        """Bits per element assuming :data:`DEFAULT_D_HEAD` and :data:`DEFAULT_N_KV_HEADS`."""
        return self.bits_per_element_for(d_head=DEFAULT_D_HEAD, n_kv_heads=DEFAULT_N_KV_HEADS)

    # ---- bit sweeps ----------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """The name with ``{b}`` for the bit width: ``int4-token-asym`` -> ``int{b}-token-asym``,
        ``kivi2-g32-r32`` -> ``kivi{b}-g32-r32``; a fixed-width scheme (``q4_0``) and a K/V pair: the name."""
        return str(self) if self.is_pair else self.k.family()

    @property
    def bit_widths(self) -> tuple[int, ...]:
        """The bit widths :meth:`at_bits` admits (empty for a fixed-width scheme and for a K/V pair)."""
        return () if self.is_pair else self.k.bit_widths()

    def at_bits(self, bits: int) -> Scheme | None:
        """This scheme at another bit width, None where it does not admit ``bits`` (see :attr:`bit_widths`)."""
        spec = None if self.is_pair else self.k.at_bits(bits)
        return None if spec is None else Scheme(spec, spec)


def _admitted(scheme: Scheme) -> set[int]:
    """The bit widths both roles admit (a pair family written with ``{b}`` sweeps both parts)."""
    return set(scheme.k.bit_widths()) & set(scheme.v.bit_widths())


def expand_family(family: str, bits: Sequence[int]) -> list[tuple[int | None, str]]:
    """``[(bits, scheme text)]`` of a family written with ``{b}`` (``"int{b}-token-asym"``, ``"kivi{b}"``),
    keeping the widths in ``bits`` its format admits (KIVI: 2 and 4); a family without ``{b}`` is one point
    ``(None, family)``. Raises ValueError for a family no format parses, or one left without a point."""
    if "{b}" not in family:
        Scheme.parse(family)  # validate
        return [(None, family)]
    template = None
    for b in [*bits, *range(1, 33)]:  # the family's format, parsed at a width it admits
        try:
            template = Scheme.parse(family.format(b=b))
            break
        except ValueError:
            continue
    if template is None:
        Scheme.parse(family.format(b=bits[0] if len(bits) else 0))  # raises the parser's error
    widths = _admitted(template) if template is not None else set()
    out = []
    for b in bits:
        if b in widths:
            text = family.format(b=b)
            Scheme.parse(text)
            out.append((b, text))
    if not out:
        raise ValueError(f"family {family!r} has no valid bit-width among {list(bits)}")
    return out

