"""KV-cache formats as declared values: the :class:`KVFormat` protocol, the :data:`FORMATS` registry and the
built-in families, one file each (``cast``, ``int``, ``ggml``, ``fp8``, ``kivi``, ``vllm_pth``, ``hf_quanto``),
registered in this order.

A new format is one file: a frozen dataclass subclassing :class:`KVFormat`, decorated with
:func:`register_format` (``docs/extending.md`` walks through one; ``tests/quant/test_extending_formats.py``
runs it). The parser (:meth:`kvgeom.quant.Scheme.parse`), ``fake_quant``, the streaming cache, the Triton
dispatch, the mitigation search and the serving export all ask the registry or the spec, never its type.
Proved by ``tests/quant/test_formats.py``.
"""

# ruff: noqa: I001 -- the built-in families register on import, in the parser's and VALID_FORMS' order
from .base import FORMATS, FormatError, KVFormat, Role, parse_format, register_format, unregister_format
from .cache import CacheRule, CacheStore, FrozenOnPrefill, PerPosition
from .engines import HFCache, LlamaCppType, VLLMDtype
from .cast import CastSpec
from .int import IntSpec, int_twin
from .ggml import GGMLSpec
from .fp8 import FP8Spec
from .kivi import KIVISpec
from .vllm_pth import VLLMPerTokenHead
from .hf_quanto import HFQuantoSpec

__all__ = [
    "FORMATS", "CacheRule", "CacheStore", "CastSpec", "FP8Spec", "FormatError", "FrozenOnPrefill", "GGMLSpec",
    "HFCache", "HFQuantoSpec", "IntSpec", "KIVISpec", "KVFormat", "LlamaCppType", "PerPosition", "Role", "VLLMDtype",
    "VLLMPerTokenHead",
    "int_twin", "parse_format", "register_format", "unregister_format",
]
