"""The judge registry: judges by name, built from a short spec string, and a judge's identity.

A judge declares itself in one file with :func:`register_judge` (a class decorator, or a call with any
factory), and :func:`get_judge` builds it from a **spec**::

    NAME[:KEY=VALUE[:KEY=VALUE...]]      e.g. "keyword", "keyword:phrases=jbb", "keyword:degeneracy=off"

The name is looked up in :data:`JUDGES`; each ``KEY=VALUE`` becomes a keyword argument (a string) of the
registered factory: its ``from_settings`` classmethod when it has one (which converts the strings), else the
factory itself. A value may hold ``:`` as long as it is not followed by ``KEY=``; it may not hold ``,``, which
separates judges in :func:`get_judges` (``"keyword,keyword:phrases=jbb"``: the first decides, the others
re-judge). ``get_judge(None)`` is the default judge, :data:`DEFAULT_JUDGE` with no settings, which is
``KeywordJudge()`` (the paper's phrases plus the degeneracy rule); a judge object is returned as it is.

:func:`judge_identity` states what a judge is, as JSON-friendly data, so that a run can record it and a
resumed run can refuse another judge: ``{"name", "version", "settings"}`` from the judge's ``identity()``;
without one, the registered name (or the ``name`` attribute), a ``version`` attribute if any, and the
dataclass fields (or public attributes) as settings; a judge whose class is not registered also gets
``"class": "module.QualName"`` and ``"registered": False``. It holds no ids or memory addresses, so it is
equal across processes for equal settings.

Tests: ``tests/judges/test_judge_registry.py`` (lookup, spec grammar, unknown names and settings, default,
identity stability, equality and difference, the fallback for unregistered judges) and
``tests/judges/test_extending_judges.py`` (the worked example in ``docs/extending.md``).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from kvgeom.judges.base import Judge

__all__ = [
    "DEFAULT_JUDGE",
    "JUDGES",
    "get_judge",
    "get_judges",
    "judge_identity",
    "parse_judge_spec",
    "register_judge",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Registered judges: name -> factory (usually the judge's class). Filled by :func:`register_judge`.
JUDGES: dict[str, Callable[..., Judge]] = {}

#: The judge that ``get_judge(None)`` builds (with no settings): ``KeywordJudge()``.
DEFAULT_JUDGE = "keyword"

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_KEY = re.compile(r"^[A-Za-z_]\w*$")
_SETTING_SPLIT = re.compile(r":(?=[A-Za-z_]\w*=)")


def register_judge(name: str, factory: F | None = None, *, replace: bool = False) -> Any:
    """Register ``factory`` (a judge class, or any callable returning a judge) under ``name``.

    As a decorator: ``@register_judge("says-no")`` above the class. Names are lower-case letters, digits and
    ``_ . -``. A name taken by another factory is refused unless ``replace=True``.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"judge name {name!r} must be lower-case letters, digits and '_', '.', '-' (no ':', ',' "
                         "or '=', which the spec grammar uses), e.g. 'keyword' or 'llama-guard-3-1b'")

    def add(f: F) -> F:
        if not callable(f):
            raise TypeError(f"register_judge({name!r}, ...) needs a class or a callable that returns a judge, "
                            f"got {type(f).__name__}")
        old = JUDGES.get(name)
        if old is not None and old is not f and not replace:
            raise ValueError(f"judge name {name!r} is already registered to {_qualname(old)}; pick another name "
                             "or pass replace=True")
        JUDGES[name] = f
        return f

    return add if factory is None else add(factory)


def parse_judge_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"NAME:KEY=VALUE:KEY=VALUE"`` -> ``(NAME, {KEY: VALUE, ...})`` (values stay strings)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"judge spec {spec!r} is empty: pass a name such as {DEFAULT_JUDGE!r}")
    if "," in spec:
        raise ValueError(f"judge spec {spec!r} holds ',', which separates judges: use get_judges() for a list")
    name, _, rest = spec.strip().partition(":")
    settings: dict[str, str] = {}
    for part in _SETTING_SPLIT.split(rest) if rest else []:
        key, eq, value = part.partition("=")
        if not eq or not _KEY.match(key):
            raise ValueError(f"judge spec {spec!r}: setting {part!r} is not KEY=VALUE; write e.g. "
                             "'keyword:phrases=jbb:degeneracy=off'")
        if key in settings:
            raise ValueError(f"judge spec {spec!r} sets {key!r} twice")
        settings[key] = value
    return name, settings


def _factory(name: str) -> Callable[..., Judge]:
    if name not in JUDGES:
        known = ", ".join(sorted(JUDGES)) or "none"
        raise ValueError(f"unknown judge {name!r}; registered judges: {known} (register yours with "
                         "kvgeom.judges.register_judge)")
    f = JUDGES[name]
    return getattr(f, "from_settings", f)


def _check_settings(name: str, factory: Callable[..., Any], settings: Mapping[str, str]) -> None:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"judge {name!r} has no setting {', '.join(map(repr, unknown))}; its settings: "
                         f"{', '.join(accepted) or 'none'}")


def get_judge(spec: str | Judge | None = None) -> Judge:
    """A judge from a spec string (module docstring), a judge object (returned as is) or ``None`` (the default)."""
    if spec is None:
        return _factory(DEFAULT_JUDGE)()
    if isinstance(spec, str):
        name, settings = parse_judge_spec(spec)
        factory = _factory(name)
        _check_settings(name, factory, settings)
        return factory(**settings)
    if callable(getattr(spec, "judge", None)):
        return spec
    raise TypeError(f"expected a judge name such as {DEFAULT_JUDGE!r}, a judge object (with a judge() method) or "
                    f"None, got {type(spec).__name__}")


def get_judges(specs: str | Sequence[str | Judge] | None = None) -> tuple[Judge, ...]:
    """Several judges: ``"keyword,keyword:phrases=jbb"`` (comma-separated specs), a list of specs or judges, or
    ``None`` (the default judge alone). The first one is the deciding judge."""
    if specs is None:
        return (get_judge(None),)
    items = [s.strip() for s in specs.split(",")] if isinstance(specs, str) else list(specs)
    if not items or any(isinstance(s, str) and not s for s in items):
        raise ValueError(f"judge list {specs!r} has an empty entry: write NAME[,NAME...], e.g. 'keyword'")
    return tuple(get_judge(s) for s in items)


# ------------------------------------------------------------------------------------------- identity


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _jsonable(value: Any) -> Any:
    """``value`` as JSON data that survives a ``json`` round trip unchanged (tuples become lists, ...)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, float):  # NaN != NaN and is not strict JSON: spell the non-finite ones
        return value if math.isfinite(value) else str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.init and not f.name.startswith("_")}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, set | frozenset):
        return sorted((_jsonable(v) for v in value), key=repr)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return f"<{_qualname(type(value))}>"  # no repr: it may hold a memory address


def _registered_name(judge: Any) -> str | None:
    cls = type(judge)
    return next((n for n, f in JUDGES.items() if f is cls), None)


def _settings(judge: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(judge):
        items = {f.name: getattr(judge, f.name) for f in dataclasses.fields(judge) if f.init}
    else:
        items = dict(getattr(judge, "__dict__", {}))
    return {k: _jsonable(v) for k, v in sorted(items.items()) if not k.startswith("_") and k != "name"}


def judge_identity(judge: Any) -> dict[str, Any]:
    """What ``judge`` is, as JSON-friendly data: ``{"name", "version", "settings"}`` (module docstring).

    Record it with a run and compare it on resume: two judges with equal identities give equal verdicts.
    """
    own = getattr(judge, "identity", None)
    if callable(own):
        ident = own()
        if not isinstance(ident, Mapping) or "name" not in ident:
            raise TypeError(f"{_qualname(type(judge))}.identity() must return a dict with at least 'name' "
                            f"(and 'version', 'settings'), got {ident!r}")
        out = _jsonable(dict(ident))
    else:
        name = _registered_name(judge)
        version = getattr(judge, "version", None)
        out = {"name": name or str(getattr(judge, "name", type(judge).__name__)),
               "version": None if version is None else str(version), "settings": _settings(judge)}
        if name is None:
            out.update({"class": _qualname(type(judge)), "registered": False})
    json.dumps(out, allow_nan=False)  # JSON data by construction; fail here, not when the run is saved
    return out
