"""kvgeom: a mechanistic audit of how KV-cache quantization breaks the safety refusals of chat LLMs.

Pipeline: ``models`` (load, bridge) → ``hooks`` (K/V hook points) → ``forward``/``generation``
(batched left-padded passes, capture, greedy generation) → ``quant`` (quantizer zoo, per-row plans) →
``geometry``/``noise`` (directions, subspaces, sensitivity) → ``evaluate``/``sweep`` (judges, statistics,
perplexity) → ``taxonomy``/``mitigation`` → ``audit`` (the main job) → ``report`` → ``cli``.
"""

from kvgeom.forward import Batch, Capture, capture, encode, forward
from kvgeom.generation import Generation, generate
from kvgeom.hooks import SITES, HookContext, hook_name, kv_hooks
from kvgeom.models import KVModel, ModelFacts, ModelLoadError, load_model, wrap_hf_model
from kvgeom.quant import QuantPlan, Scheme, fake_quant
from kvgeom.registry import DEFAULT_MODEL, REGISTRY, ModelNotInstalledError

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "SITES",
    "Batch",
    "Capture",
    "Generation",
    "HookContext",
    "KVModel",
    "ModelFacts",
    "ModelLoadError",
    "ModelNotInstalledError",
    "QuantPlan",
    "Scheme",
    "capture",
    "encode",
    "fake_quant",
    "forward",
    "generate",
    "hook_name",
    "kv_hooks",
    "load_model",
    "wrap_hf_model",
]
