"""The protocol every KV-cache format implements (:class:`KVFormat`) and the registry that declares them.

A format is a frozen dataclass subclassing :class:`KVFormat`, registered with :func:`register_format`; its
values are the specs a :class:`kvgeom.quant.Scheme` holds (``IntSpec(4, "token", False)``, ...). What it
declares, and who asks:

==========================  ================================================  ===================================
member                      what                                              asked by
==========================  ================================================  ===================================
``format_name``             registry key (``"int"``)                          :data:`FORMATS`
``grammar``, ``summary``    its line of ``VALID_FORMS``                       the parser's error message
``pattern``, ``from_match``  text -> spec (``FormatError`` for bad values)    ``Scheme.parse``
``near_miss``               a hint for text that almost matched               ``Scheme.parse``
``__str__``                 canonical name, ``parse(str(s)) == s``            everyone
``bits_per_element``        stored bits per element (fp16 overhead counted)   ``Scheme``, mitigation costs
``quantize``                eager fake-quant, fp32 in/out, mask semantics     ``fake_quant``, the stream
``quantize_fast``           the same by the fused kernel where one covers it  the stream (cache mode)
``is_identity``             stores the input exactly (``none``)               ``fake_quant``, the stream
``cache_rule``              how a growing cache stores new positions          :class:`kvgeom.quant.StreamQuantizer`
``check``, ``kernel``       shape errors, the optional fused Triton kernel    :mod:`kvgeom.quant.triton.dispatch`
``vllm``, ``llama_cpp``,    how each serving engine names it (None / a        :func:`kvgeom.mitigation.export_settings`
``hf``                      reason when it cannot)
``nominal_bits``,           what the mitigation search needs to regroup it    :func:`kvgeom.mitigation.regroup`
``symmetric_range``,
``full_precision``
``bit_widths``, ``at_bits``, the bit-width sweep                              ``Scheme.family``, ``expand_family``
``family``
==========================  ================================================  ===================================

Proved by ``tests/quant/test_formats.py`` (every registered format: name round trip, bits, registry errors)
and ``tests/quant/test_extending_formats.py`` (a new format in one file, end to end).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from jaxtyping import Bool, Float
from torch import Tensor

from kvgeom.quant.kernels import fused_auto
from kvgeom.quant.role import Role

from .cache import CacheRule, PerPosition
from .engines import HFCache, LlamaCppType, VLLMDtype

if TYPE_CHECKING:
    from kvgeom.quant.triton.common import Kernel

__all__ = ["FORMATS", "FormatError", "KVFormat", "Role", "parse_format", "register_format", "unregister_format"]

KV = Float[Tensor, "batch pos kv_head d_head"]


class FormatError(ValueError):
    """Text that matches a format's grammar but breaks its rules; the message is the reason (the parser adds
    the text and the valid forms)."""


class KVFormat(ABC):
    """One KV-cache format: its grammar, name, cost, eager math, cache rule, kernel and serving names.

    Subclasses are frozen dataclasses (their fields are the format's parameters) and must set the class
    attributes ``format_name``, ``grammar``, ``summary`` and ``pattern`` and implement the abstract methods;
    everything else has a default that suits a format no engine serves and no kernel covers.
    """

    format_name: ClassVar[str]
    #: the format's grammar as ``VALID_FORMS`` shows it, e.g. ``"kivi{b}[-g{G}][-r{R}]"``
    grammar: ClassVar[str]
    #: one line of help next to the grammar
    summary: ClassVar[str]
    #: matched (``fullmatch``) against the stripped, lower-cased text
    pattern: ClassVar[re.Pattern[str]]

    # ---- grammar -------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_match(cls, m: re.Match[str]) -> KVFormat:
        """The spec for a match of :attr:`pattern`; raise :class:`FormatError` (the reason) for bad values."""

    @classmethod
    def parse(cls, text: str) -> KVFormat | None:
        """The spec ``text`` (stripped, lower case) names, None if it is not this format's grammar."""
        m = cls.pattern.fullmatch(text)
        return None if m is None else cls.from_match(m)

    @classmethod
    def near_miss(cls, text: str) -> str | None:
        """Why ``text``, which no format parsed, is not this format (e.g. a suffix only it takes), or None."""
        return None

    @abstractmethod
    def __str__(self) -> str:
        """The canonical name: ``Scheme.parse(str(spec))`` gives this spec back."""

    # ---- cost ----------------------------------------------------------------------------------------
    @abstractmethod
    def bits_per_element(self, d_head: int, n_kv_heads: int, seq_len: int | None = None) -> float:
        """Bits per stored element, counting fp16 scale/zero-point overhead (an fp16 cache counts 16)."""

    # ---- eager math and the cache --------------------------------------------------------------------
    @abstractmethod
    def quantize(self, x: KV, mask: Bool[Tensor, "batch pos"], role: Role) -> KV:
        """Quantize-dequantize fp32 ``x`` (padding, ``mask`` False, already zeroed and outside every range);
        outputs at padding are arbitrary (the caller restores the input there)."""

    def quantize_fast(self, x: KV, mask: Bool[Tensor, "batch pos"], role: Role) -> KV:
        """:meth:`quantize` by the format's fused kernel where one covers ``x`` (a CUDA tensor; same bits:
        ``tests/quant/test_triton_kernels.py``), else the eager math. A streaming cache calls this for every
        arriving chunk, so a GPU decode step runs one launch per layer and role instead of the eager op chain."""
        out = fused_auto(x, self, role, mask)
        return self.quantize(x, mask, role) if out is None else out

    @property
    def is_identity(self) -> bool:
        """Whether the stored value is exactly the input (``none``): ``fake_quant`` returns a copy and a
        streaming cache marks such positions full precision."""
        return False

    def cache_rule(self, role: Role) -> CacheRule:
        """A fresh rule for one streaming cache of ``role`` (default: each position quantized on arrival)."""
        return PerPosition(self, role)

    # ---- kernels -------------------------------------------------------------------------------------
    def check(self, x: Tensor) -> None:
        """Raise the eager path's ValueError (cause and fix) if this format cannot take ``x``'s shape."""
        return None

    def kernel(self) -> Kernel | None:
        """The fused Triton kernel (:class:`kvgeom.quant.triton.common.Kernel`), None when there is none or
        Triton is not installed (:func:`kvgeom.quant.kernels.triton_package`)."""
        return None

    # ---- serving engines -----------------------------------------------------------------------------
    def vllm(self) -> VLLMDtype | None:
        """vLLM's ``kv_cache_dtype`` for this format, None when no vLLM dtype behaves like it."""
        return None

    def llama_cpp(self) -> LlamaCppType | None:
        """llama.cpp's ``--cache-type-k/-v`` for this format, None when it is not a llama.cpp cache type."""
        return None

    def hf(self) -> HFCache:
        """Hugging Face ``QuantizedCache`` settings, or why none fits (default: no backend implements it)."""
        return HFCache(None, (f"not expressible: no HF QuantizedCache backend implements {self}",))

    # ---- mitigation search ---------------------------------------------------------------------------
    @property
    def nominal_bits(self) -> int:
        """The integer bit width a uniform twin of this format gets (``regroup``: q4_0 -> 4, fp8 -> 8)."""
        return 16

    @property
    def symmetric_range(self) -> bool:
        """Whether its ranges are symmetric (a uniform twin keeps it; default asymmetric)."""
        return False

    @property
    def full_precision(self) -> bool:
        """Whether it keeps (about) full precision: casts, which mitigations leave alone."""
        return False

    # ---- bit sweeps ----------------------------------------------------------------------------------
    def bit_widths(self) -> tuple[int, ...]:
        """The bit widths :meth:`at_bits` admits (empty: a fixed-width format, a single sweep point)."""
        return ()

    def at_bits(self, bits: int) -> KVFormat | None:
        """This format at another bit width (None where :meth:`bit_widths` does not admit it)."""
        return None

    def family(self) -> str:
        """The name with ``{b}`` where the bit width goes (``int{b}-token-asym``); a fixed-width format: its
        name."""
        return str(self)


#: format name -> format class, in registration order (the parser tries them in this order)
FORMATS: dict[str, type[KVFormat]] = {}


def register_format(cls: type[KVFormat]) -> type[KVFormat]:
    """Class decorator: add a format to :data:`FORMATS` (its name must be new; its grammar must be declared)."""
    for attr in ("format_name", "grammar", "summary", "pattern"):
        if not hasattr(cls, attr):
            raise TypeError(f"format {cls.__name__} must set the class attribute {attr!r} (see KVFormat)")
    if not isinstance(cls.pattern, re.Pattern):
        raise TypeError(f"format {cls.__name__}: pattern must be a compiled re.Pattern, got {cls.pattern!r}")
    if cls.format_name in FORMATS:
        raise ValueError(f"a KV format named {cls.format_name!r} is already registered "
                         f"({FORMATS[cls.format_name].__qualname__}); pick another format_name, or "
                         f"unregister_format({cls.format_name!r}) first")
    FORMATS[cls.format_name] = cls
    return cls


def unregister_format(name: str) -> None:
    """Remove a format from :data:`FORMATS` (tests and examples that register one clean up with this)."""
    if name not in FORMATS:
        raise KeyError(f"no KV format named {name!r} is registered; registered: {sorted(FORMATS)}")
    del FORMATS[name]


def parse_format(text: str) -> KVFormat:
    """The spec of the first registered format whose grammar ``text`` matches (stripped, case-insensitive).

    Raises :class:`FormatError` with the reason: a format's own (bad values), a near-miss hint, or no match.
    """
    s = text.strip().lower()
    for fmt in FORMATS.values():
        spec = fmt.parse(s)
        if spec is not None:
            return spec
    for fmt in FORMATS.values():
        if (hint := fmt.near_miss(s)) is not None:
            raise FormatError(hint)
    raise FormatError(f"{text.strip()!r} matches none of the forms")
