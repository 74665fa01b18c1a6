"""Serving engines' KV-cache catalogues: every format an engine offers (as a kvgeom scheme in cache mode), how it
is written in the engine's settings, and the fixes the engine can express. One file per engine, each registering
itself in :data:`ENGINES` (``docs/engines.md``). Proved by ``tests/engines/test_engines.py``.
"""

# ruff: noqa: I001 -- the engines register on import, in this order
from .base import (ENGINES, Engine, EngineFormat, FixCandidate, ModelShape, Unsimulated, default_engines,
                   get_engine, register_engine, resolve_engines)
from . import llama_cpp, vllm, hf  # noqa: F401

__all__ = ["ENGINES", "Engine", "EngineFormat", "FixCandidate", "ModelShape", "Unsimulated", "default_engines",
           "get_engine", "register_engine", "resolve_engines"]
