"""Checking kvgeom's simulation against a real engine (issue #16): ``kvgeom validate MODEL.gguf --engine llama.cpp``.

Modules: :mod:`~kvgeom.validate.types` (llama.cpp's cache types, the one table mapping them to kvgeom schemes, and
llama.cpp's rotation rule), :mod:`~kvgeom.validate.llamacpp` (greedy generation through llama-cpp-python, the
optional extra ``kvgeom[llamacpp]``), :mod:`~kvgeom.validate.agreement` (per-prompt verdict agreement with Wilson
intervals, token-level agreement), :mod:`~kvgeom.validate.run` (:func:`validate_engine`, what the command does),
:mod:`~kvgeom.validate.command` (the subcommand and its terminal summary). Tests: ``tests/validate/``.
"""

from kvgeom.validate.agreement import AGREEMENT_TARGET, agreement_summary, first_divergence
from kvgeom.validate.command import validation_summary
from kvgeom.validate.llamacpp import (
    PORTABLE_CMAKE_ARGS,
    EngineNotInstalledError,
    import_llama_cpp,
    llama_cpp_generate,
    llama_cpp_logits,
)
from kvgeom.validate.run import CEILING, ENGINES, Validation, check_engine, resolve_gguf, validate_engine
from kvgeom.validate.types import DEFAULT_FORMATS, FULL_PRECISION, LLAMA_CPP_CACHE_TYPES, EngineFormat, parse_formats

__all__ = [
    "AGREEMENT_TARGET",
    "CEILING",
    "DEFAULT_FORMATS",
    "ENGINES",
    "FULL_PRECISION",
    "LLAMA_CPP_CACHE_TYPES",
    "PORTABLE_CMAKE_ARGS",
    "EngineFormat",
    "EngineNotInstalledError",
    "Validation",
    "agreement_summary",
    "check_engine",
    "first_divergence",
    "import_llama_cpp",
    "llama_cpp_generate",
    "llama_cpp_logits",
    "parse_formats",
    "resolve_gguf",
    "validate_engine",
    "validation_summary",
]
