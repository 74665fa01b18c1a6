"""How a serving engine names a KV format: the values :class:`~kvgeom.quant.formats.KVFormat`'s ``vllm``,
``llama_cpp`` and ``hf`` return and :func:`kvgeom.mitigation.export_settings` turns into settings.

Proved by ``tests/mitigation/test_mitigation.py`` (``test_export_*``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["HFCache", "LlamaCppType", "VLLMDtype"]


@dataclass(frozen=True)
class VLLMDtype:
    """vLLM's ``kv_cache_dtype`` (``"auto"``: the model's dtype) and whether it needs ``calculate_kv_scales``."""

    kv_cache_dtype: str
    calculate_kv_scales: bool = False


@dataclass(frozen=True)
class LlamaCppType:
    """llama.cpp's cache type (``--cache-type-k/-v``); ``rotated``: its Hadamard rotation on (True) or off
    (False) for a quantized type, None for an unquantized one (f16, bf16)."""

    cache_type: str
    rotated: bool | None = None


@dataclass(frozen=True)
class HFCache:
    """Hugging Face ``QuantizedCache`` ``cache_config`` (None: not expressible) and notes (the reason, if None)."""

    config: dict[str, Any] | None
    notes: tuple[str, ...] = field(default=())
