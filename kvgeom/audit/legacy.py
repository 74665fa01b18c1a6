"""The pre-registry stage functions ``stage_NAME(model, cfg, ctx) -> dict``, kept for one release.

Each builds the :class:`~kvgeom.audit.inputs.AuditInputs` from ``model``, ``cfg`` and ``ctx["_judge"]``, hands
the registered stage the results it declares from ``ctx`` and returns its result (the caller stores it in
``ctx``, as notebook 03 does), with a :class:`DeprecationWarning` pointing to :func:`run_stage`.
Proved by ``tests/test_notebooks.py`` (notebook 03 runs these unchanged) and ``tests/audit/test_audit.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kvgeom.deprecation import REMOVED_IN

from .config import AuditConfig
from .inputs import AuditInputs
from .stage import STAGE_REGISTRY, get_stage

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["LEGACY_STAGES", "legacy_stage", "run_stage"]


def run_stage(name: str, model: KVModel, cfg: AuditConfig, results: Mapping[str, dict], *, judge: Any = None,
              inputs: AuditInputs | None = None) -> dict:
    """Run one registered stage outside :func:`~kvgeom.audit.run_audit` (a notebook, step by step): ``results``
    holds earlier stages' results by name; pass ``inputs`` to reuse one :class:`AuditInputs` across calls."""
    stage = get_stage(name)
    inputs = inputs if inputs is not None else AuditInputs.build(model, cfg, judge=judge)
    return stage.run(inputs, stage.results_for(results))


def legacy_stage(name: str) -> Callable[[Any, AuditConfig, dict], dict]:
    """``stage_NAME(model, cfg, ctx)`` for registered stage ``name`` (deprecated)."""

    def stage_fn(model: Any, cfg: AuditConfig, ctx: dict) -> dict:
        warnings.warn(f"kvgeom.audit.stage_{name}(model, cfg, ctx) is deprecated (removed in kvgeom {REMOVED_IN}): "
                      f"use kvgeom.audit.run_stage({name!r}, model, cfg, results, judge=...) or run_audit",
                      DeprecationWarning, stacklevel=2)
        return run_stage(name, model, cfg, {k: v for k, v in ctx.items() if not k.startswith("_")},
                         judge=ctx.get("_judge"))

    stage_fn.__name__ = stage_fn.__qualname__ = f"stage_{name}"
    stage_fn.__doc__ = f"Deprecated: run_stage({name!r}, ...). {get_stage(name).doc}"
    return stage_fn


#: name -> ``stage_NAME(model, cfg, ctx)`` for every stage registered at import (the old ``STAGES`` mapping).
LEGACY_STAGES: dict[str, Callable[[Any, AuditConfig, dict], dict]] = {n: legacy_stage(n) for n in STAGE_REGISTRY}
