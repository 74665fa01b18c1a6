"""kvgeom: a mechanistic audit of how KV-cache quantization breaks the safety refusals of chat LLMs.

Pipeline: ``sites`` (hook-point names, what a hook is given) → ``models`` (load, bridge) → ``runtime`` (hook
sessions, batched left-padded passes and capture, per-row quantization plans, greedy generation) → ``quant``
(quantizer zoo, plan values) → ``geometry``/``noise`` (directions, subspaces, sensitivity) → ``evaluate``/``sweep``
(judges, statistics, perplexity) → ``taxonomy``/``mitigation`` → ``audit`` (the main job) → ``report`` → ``cli``.
"""

from kvgeom.models import KVModel, ModelFacts, ModelLoadError, load_model, wrap_hf_model
from kvgeom.quant import QuantPlan, Scheme, fake_quant
from kvgeom.registry import DEFAULT_MODEL, REGISTRY, ModelNotInstalledError
from kvgeom.runtime.forward import Batch, Capture, capture, encode, forward
from kvgeom.runtime.generation import Generation, generate
from kvgeom.runtime.hooks import HookContext, kv_hooks
from kvgeom.sites import SITES, hook_name

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
