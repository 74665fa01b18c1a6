"""The runtime: hook sessions on the bridge, batched left-padded forward passes and capture, greedy cached
generation, and per-row quantization plans.

Layering (imports go downward only): :mod:`kvgeom.sites` (names, hook types) → :mod:`kvgeom.models` →
:mod:`kvgeom.runtime.hooks` (sessions) → :mod:`kvgeom.runtime.forward` (``encode``, ``forward``, ``capture``) →
:mod:`kvgeom.runtime.plans` (running :class:`~kvgeom.quant.QuantPlan` s as hooks or a quantizing cache) →
:mod:`kvgeom.runtime.prefix` and :mod:`kvgeom.runtime.layer_skip` (prefills split so that work every row would
repeat runs once: a shared chat prefix, the full-precision layers below a row's first quantized layer) →
:mod:`kvgeom.runtime.generation` (``generate``; prompt lengths against the context first,
:mod:`kvgeom.runtime.limits`). Tests: ``tests/runtime/``.

The function ``forward`` is not re-exported here, so that ``kvgeom.runtime.forward`` is always the module (a
package attribute named like its submodule shadows it): call ``kvgeom.forward`` or
``kvgeom.runtime.forward.forward``.
"""

from kvgeom.runtime.forward import (
    Batch,
    Capture,
    PositionSpec,
    capture,
    encode,
    new_cache,
    position_ids_from_mask,
)
from kvgeom.runtime.generation import Generation, generate, greedy_uncached
from kvgeom.runtime.hooks import CallInfo, HookContext, HookFn, HookSession, kv_hooks, set_call
from kvgeom.runtime.limits import PromptTooLongError, context_length, fit_prompts, prompt_token_counts
from kvgeom.runtime.plans import (
    PlanCache,
    PlanRun,
    RowGroups,
    apply_plans,
    forward_with_plans,
    normalise_plans,
    plan_cache_class,
)

__all__ = [
    "Batch",
    "CallInfo",
    "Capture",
    "Generation",
    "HookContext",
    "HookFn",
    "HookSession",
    "PlanCache",
    "PlanRun",
    "PositionSpec",
    "PromptTooLongError",
    "RowGroups",
    "apply_plans",
    "capture",
    "context_length",
    "encode",
    "fit_prompts",
    "forward_with_plans",
    "generate",
    "greedy_uncached",
    "kv_hooks",
    "new_cache",
    "normalise_plans",
    "plan_cache_class",
    "position_ids_from_mask",
    "prompt_token_counts",
    "set_call",
]
