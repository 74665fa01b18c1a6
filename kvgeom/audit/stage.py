"""Audit stages as declared values, in one registry.

A :class:`Stage` says everything the audit needs to know of one step, in the stage's own file
(``kvgeom/audit/stages/NAME.py``): its name and place in the pipeline, the results of earlier stages it reads
(``requires``; ``optional`` for those it uses when present), the function that runs it, its DataFrame view, its
report section and the JSON-schema fragment its result follows. :func:`register_stage` adds it to
:data:`STAGE_REGISTRY`; :func:`kvgeom.audit.run_audit` runs the registered stages in ``order`` and hands each one
exactly the results it declares (a :class:`StageResults` that refuses any other name), plus the
:class:`~kvgeom.audit.inputs.AuditInputs` built once from the config. Adding a stage is one new file plus its test
(``docs/extending.md``, run by ``tests/audit/test_extending_stages.py``).

Proved by ``tests/audit/test_stage_registry.py``: a stage sees only what it declares; a stage that requires an
unknown or later stage, or whose name is taken, is refused at registration; every registered stage's result in an
audit validates against its schema fragment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from .inputs import AuditInputs

__all__ = ["STAGE_REGISTRY", "Section", "Stage", "StageResults", "default_stages", "get_stage", "register_stage",
           "stage_names", "unregister_stage"]

#: A stage's result: the JSON-friendly dict stored under ``audit["stages"][name]`` (schema: ``Stage.schema``).
StageResult = dict[str, Any]


class StageResults(Mapping[str, StageResult]):
    """The earlier stages' results one stage may read: exactly its ``requires`` (always present) and its
    ``optional`` (present when that stage ran). Reading any other stage raises ``KeyError`` naming the fix."""

    def __init__(self, stage: str, results: Mapping[str, StageResult], allowed: tuple[str, ...]) -> None:
        self._stage = stage
        self._allowed = allowed
        self._data = {k: results[k] for k in allowed if k in results}

    def __getitem__(self, name: str) -> StageResult:
        if name not in self._allowed:
            raise KeyError(f"stage {self._stage!r} reads {name!r} but does not declare it: add {name!r} to its "
                           "Stage(requires=...) or optional=...")
        return self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@dataclass(frozen=True)
class Section:
    """A stage's section of ``report.html``: ``render(result, stages)`` returns the section's HTML body from the
    stage's own result and the audit's ``stages`` dict (for cross-references, e.g. the critical layer).

    ``lead=True`` puts the section first on the page (the deployment table, the diagnosis); the others follow in
    pipeline order. ``position`` orders the sections of one group (default: the stage's ``order``).
    A section whose stage did not run shows "not run" (``hide_unless_ran=True``: is left out, e.g. the judges'
    section of a one-judge audit); one whose data is malformed shows the error in place."""

    id: str
    title: str
    how: str
    render: Callable[[StageResult, Mapping[str, Any]], str]
    lead: bool = False
    position: float | None = None
    hide_unless_ran: bool = False


def _no_frame(result: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([dict(result)])


@dataclass(frozen=True)
class Stage:
    """One audit stage (see the module docstring).

    ``run(inputs, results) -> dict`` computes the stage from the :class:`~kvgeom.audit.inputs.AuditInputs` and
    the declared earlier results; ``frame(result) -> DataFrame`` is its table (:func:`kvgeom.audit.stage_frame`);
    ``schema`` is a JSON-schema fragment its result validates against; ``default`` says whether
    ``kvgeom audit`` runs it without being asked (``agreement`` is opt-in); ``check(result, inputs)`` may stop
    the audit after the stage with an :class:`~kvgeom.audit.AuditError` (the result is saved first, so
    ``--resume`` continues from it)."""

    name: str
    order: float
    run: Callable[[AuditInputs, StageResults], StageResult]
    requires: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    frame: Callable[[Mapping[str, Any]], pd.DataFrame] = _no_frame
    section: Section | None = None
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})
    default: bool = True
    check: Callable[[StageResult, AuditInputs], None] | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"stage name {self.name!r} must be a Python identifier (it is a key of audit.json "
                             "and a file name under stages/)")
        both = set(self.requires) & set(self.optional)
        if both:
            raise ValueError(f"stage {self.name!r}: {sorted(both)} are both required and optional")
        if self.name in self.requires or self.name in self.optional:
            raise ValueError(f"stage {self.name!r} cannot read its own result")

    @property
    def reads(self) -> tuple[str, ...]:
        return self.requires + self.optional

    def results_for(self, results: Mapping[str, StageResult]) -> StageResults:
        """The declared subset of ``results``; raises ``KeyError`` naming a required stage that has not run."""
        missing = [r for r in self.requires if r not in results]
        if missing:
            raise KeyError(f"stage {self.name!r} needs the results of {missing}; run those stages first (or "
                           "resume an audit that has them)")
        return StageResults(self.name, results, self.reads)


#: name -> Stage, every registered stage (default and opt-in).
STAGE_REGISTRY: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add ``stage`` to :data:`STAGE_REGISTRY` (returns it, so a stage file reads ``STAGE = register_stage(...)``).

    Refused with ``ValueError``: a name already taken, a required or optional stage that is not registered or
    does not come earlier in ``order``."""
    if stage.name in STAGE_REGISTRY:
        raise ValueError(f"stage {stage.name!r} is already registered; pick another name (or unregister_stage "
                         "it first)")
    for dep in stage.reads:
        if dep not in STAGE_REGISTRY:
            raise ValueError(f"stage {stage.name!r} reads {dep!r}, which is not a registered stage; registered: "
                             f"{', '.join(stage_names(default_only=False))}")
        if STAGE_REGISTRY[dep].order >= stage.order:
            raise ValueError(f"stage {stage.name!r} (order {stage.order}) reads {dep!r}, which runs at order "
                             f"{STAGE_REGISTRY[dep].order}: give it an order after {dep!r}")
    STAGE_REGISTRY[stage.name] = stage
    return stage


def unregister_stage(name: str) -> Stage:
    """Remove a registered stage (for tests and notebooks that add their own); refused if another reads it."""
    users = [s.name for s in STAGE_REGISTRY.values() if name in s.reads]
    if users:
        raise ValueError(f"stage {name!r} is read by {users}; unregister those first")
    return STAGE_REGISTRY.pop(name)


def get_stage(name: str) -> Stage:
    try:
        return STAGE_REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(stage_names(default_only=False))}") from None


def stage_names(*, default_only: bool = True) -> tuple[str, ...]:
    """Registered stage names in pipeline order (only those ``kvgeom audit`` runs by default, unless
    ``default_only=False``)."""
    ordered = sorted(STAGE_REGISTRY.values(), key=lambda s: s.order)
    return tuple(s.name for s in ordered if s.default or not default_only)


def default_stages() -> tuple[str, ...]:
    """What ``kvgeom audit`` runs: :func:`stage_names` of the default stages."""
    return stage_names(default_only=True)
