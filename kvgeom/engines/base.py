"""Serving engines as declared values: what KV formats an engine offers, how each is written in its settings,
and which fixes it can express. One file per engine (``vllm``, ``llama_cpp``, ``hf``), registered in
:data:`ENGINES` with :func:`register_engine`; the audit's ``engine_matrix`` stage asks the registry only.

Proved by ``tests/engines/test_engines.py`` (every format parses and applies to the model it is listed for,
commands are exact, the fix candidates are what each engine can run, the default engine follows the model's
files).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from kvgeom.quant import Scheme

__all__ = ["ENGINES", "Engine", "EngineFormat", "FixCandidate", "ModelShape", "Unsimulated", "default_engines",
           "get_engine", "register_engine", "resolve_engines"]

Assignment = tuple[str | None, ...]


@dataclass(frozen=True)
class ModelShape:
    """What the catalogues need of a model: its heads and layers (and whether it came from a GGUF file)."""

    n_layers: int
    n_kv_heads: int
    d_head: int
    gguf: bool = False

    def __post_init__(self) -> None:
        for f in ("n_layers", "n_kv_heads", "d_head"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"ModelShape.{f} must be >= 1, got {getattr(self, f)!r}")

    @classmethod
    def of(cls, model: Any) -> ModelShape:
        """The shape of a :class:`kvgeom.models.KVModel` (``gguf``: it was loaded from a ``.gguf`` file)."""
        return cls(model.n_layers, model.n_kv_heads, model.d_head, gguf="gguf" in (getattr(model, "info", {}) or {}))


@dataclass(frozen=True)
class EngineFormat:
    """One KV format an engine offers: its label, the kvgeom scheme that simulates it (cache mode), whether
    each call attends its own new tokens in full precision (``prefill="full"``, HF) or from the cache
    (``"quantized"``), the engine's own setting, and what the simulation does not model."""

    name: str
    scheme: str
    setting: str
    prefill: str = "quantized"
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", str(Scheme.parse(self.scheme)))
        if self.prefill not in ("quantized", "full"):
            raise ValueError(f"EngineFormat.prefill must be 'quantized' or 'full', got {self.prefill!r}")

    def bits(self, shape: ModelShape) -> float:
        return Scheme.parse(self.scheme).bits_per_element_for(d_head=shape.d_head, n_kv_heads=shape.n_kv_heads)


@dataclass(frozen=True)
class Unsimulated:
    """A format the engine offers that kvgeom does not simulate, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class FixCandidate:
    """A fix the engine can run: a per-layer assignment (``None`` = full precision), the exact setting, and what
    it needs beyond the engine's mainline (``needs``, e.g. a fork)."""

    name: str
    assignment: Assignment
    setting: str
    needs: str = ""

    def __post_init__(self) -> None:
        if not self.assignment:
            raise ValueError("FixCandidate.assignment needs one entry per layer")
        object.__setattr__(self, "assignment", tuple(None if s is None else str(Scheme.parse(s))
                                                     for s in self.assignment))


class Engine(ABC):
    """One serving engine's catalogue (see the module docstring)."""

    name: ClassVar[str]
    title: ClassVar[str]
    #: where the semantics were read: files and commits
    source: ClassVar[str]
    #: what kind of fix it expresses, for the table
    fix_kind: ClassVar[str]

    @abstractmethod
    def formats(self, shape: ModelShape) -> list[EngineFormat]:
        """The formats this engine offers for a model of ``shape`` (those its own checks would accept)."""

    def unsimulated(self) -> tuple[Unsimulated, ...]:
        return ()

    @abstractmethod
    def command(self, fmt: EngineFormat, model: str) -> str:
        """The exact command line or config that serves ``model`` with ``fmt``."""

    @abstractmethod
    def fix_candidates(self, fmt: EngineFormat, shape: ModelShape, *, layer_order: Sequence[int],
                       budget_bits: float, max_candidates: int, model: str) -> list[FixCandidate]:
        """Fixes of ``fmt`` this engine can express, cheapest first (``layer_order``: most fragile layer first)."""


#: engine name -> the engine, in registration order
ENGINES: dict[str, Engine] = {}


def register_engine(engine: Engine) -> Engine:
    """Add an engine to :data:`ENGINES` (its name must be new)."""
    if engine.name in ENGINES:
        raise ValueError(f"an engine named {engine.name!r} is already registered")
    ENGINES[engine.name] = engine
    return engine


def get_engine(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise KeyError(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}, or 'all'") from None


def default_engines(shape: ModelShape) -> tuple[str, ...]:
    """The engines a model's files point to: a ``.gguf`` file is served by llama.cpp; an HF model by vLLM and HF."""
    return ("llama.cpp",) if shape.gguf else ("vllm", "hf")


ENGINE_CHOICES = ("auto", "none", "all")


def resolve_engines(spec: str, shape: ModelShape | None = None) -> tuple[str, ...]:
    """``"auto"`` → :func:`default_engines`, ``"none"`` → (), ``"all"`` → every engine, else comma-separated names."""
    spec = spec.strip().lower()
    if spec == "none":
        return ()
    if spec == "all":
        return tuple(ENGINES)
    if spec == "auto":
        if shape is None:
            raise ValueError("engine 'auto' needs the model's shape (its files say which engine serves it)")
        return default_engines(shape)
    names = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    bad = [n for n in names if n not in ENGINES]
    if bad or not names:
        raise ValueError(f"--engine {spec!r}: unknown engine {', '.join(bad) or '(empty)'}; valid: "
                         f"{', '.join((*ENGINES, *ENGINE_CHOICES))}")
    return names
