"""JSON-schema building blocks shared by the stages' schema fragments (``Stage.schema``).

The fragments are JSON Schema (draft 2020-12) dicts; :func:`audit_schema` assembles the whole ``audit.json``
schema from the registered stages, and ``tests/audit/test_stage_registry.py`` validates a real audit against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["BOOT_CI", "FLIP", "NUM", "RATE_CI", "audit_schema", "obj"]

#: a number or null (NaN is stored as null)
NUM: dict[str, Any] = {"type": ["number", "null"]}
INT: dict[str, Any] = {"type": "integer"}
STR: dict[str, Any] = {"type": "string"}


def obj(required: Mapping[str, Any], **optional: Any) -> dict[str, Any]:
    """An object with the ``required`` properties (name → schema) and further ``optional`` ones."""
    return {"type": "object", "required": sorted(required), "properties": {**required, **optional}}


#: :meth:`kvgeom.stats.RateCI.to_dict`
RATE_CI = obj({"k": INT, "n": INT, "rate": NUM, "low": NUM, "high": NUM})
#: :meth:`kvgeom.stats.BootstrapCI.to_dict`
BOOT_CI = obj({"estimate": NUM, "low": NUM, "high": NUM})
#: :func:`kvgeom.stats.flip_summary`
FLIP = obj({"flip": NUM, "low": NUM, "high": NUM, "k": INT, "n": INT})


def audit_schema() -> dict[str, Any]:
    """The ``audit.json`` schema: the top-level keys and each registered stage's fragment."""
    from .stage import STAGE_REGISTRY

    stages = {name: {"anyOf": [dict(s.schema), {"type": "null"},
                               obj({"status": {"enum": ["skipped", "failed", "not run"]}, "reason": STR})]}
              for name, s in STAGE_REGISTRY.items()}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **obj({
        "schema_version": INT, "model": obj({"name": STR}), "scheme": STR, "versions": {"type": "object"},
        "seed": INT, "settings": {"type": "object"}, "judge": {"type": "object"},
        "stages": {"type": "object", "properties": stages}, "timings": {"type": "object"}})}
