"""Hooked access to K, V and the residual stream: hook sessions on the bridge's hook points.

Sites and hook-point names are :mod:`kvgeom.sites` (the table of sites, shapes and hook points is there).

The bridge fires ``hook_rot_k`` and ``hook_v`` *before* it appends K/V to the KV cache, so during
cached generation a K/V hook sees every position exactly once, as it enters the cache (all prompt
positions at prefill, the one new position at each decode step), and whatever the hook returns is
what this and every later step attends to. ``tests/runtime/test_hooks.py`` proves this on tiny models
(``test_each_position_seen_once_as_it_enters_the_cache``,
``test_what_the_hook_returns_is_what_later_steps_attend_to``, ``test_cache_holds_the_hook_output``).

:func:`kv_hooks` installs hooks only inside a ``with`` block and always removes them, also when the
block raises (``test_hooks_removed_after_exception``). Hook functions receive the tensor and a
:class:`HookContext` (layer, site, the call's step and its mask of real positions) and return a replacement
tensor or ``None`` (keep).

Sessions nest: the active ones are :attr:`kvgeom.models.KVModel.hook_sessions`, outermost first. At a hook
point shared by several sessions the outer session's hooks run first and the inner one's see their output;
leaving the inner block removes only its own hooks and session, leaving the outer one exactly as it was
(``test_nested_sessions_on_one_hook_point``).

:class:`CallInfo`, :class:`HookContext`, :data:`HookFn` and :class:`HookSession` are defined in :mod:`kvgeom.sites`
(the model holds its sessions and sits below the runtime) and handed on here; :meth:`kvgeom.models.KVModel.kv_hooks`
is this module's :func:`kv_hooks`, handed down to the model's class when this module is imported.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from kvgeom.models import KVModel
from kvgeom.sites import CallInfo, HookContext, HookFn, HookSession, hook_name, parse_hook_name

__all__ = ["CallInfo", "HookContext", "HookFn", "HookSession", "kv_hooks", "set_call"]


def _normalise(
    model: KVModel,
    hooks: Mapping[str, HookFn | Sequence[HookFn]] | HookFn,
    sites: Sequence[str],
    layers: Sequence[int] | None,
) -> dict[str, list[HookFn]]:
    n = model.n_layers
    if callable(hooks) and not isinstance(hooks, Mapping):
        layer_list = list(range(n)) if layers is None else list(layers)
        out: dict[str, list[HookFn]] = {}
        for layer in layer_list:
            if not 0 <= int(layer) < n:
                raise ValueError(f"layer {layer} out of range: model has {n} layers (0..{n - 1})")
            for site in sites:
                out.setdefault(hook_name(site, layer), []).append(hooks)
        return out
    out = {}
    for name, fns in dict(hooks).items():
        site, layer = parse_hook_name(name)
        if not 0 <= layer < n:
            raise ValueError(f"{name}: layer {layer} out of range: model has {n} layers (0..{n - 1})")
        out.setdefault(name, []).extend([fns] if callable(fns) else list(fns))
    return out


@contextmanager
def kv_hooks(
    model: KVModel,
    hooks: Mapping[str, HookFn | Sequence[HookFn]] | HookFn,
    *,
    sites: Sequence[str] = ("rot_k", "v"),
    layers: Sequence[int] | None = None,
) -> Iterator[HookSession]:
    """Install kvgeom hooks for the duration of a ``with`` block; always removes them.

    Args:
        hooks: either ``{hook_name: fn}`` (names as from :func:`hook_name`), or one function applied
            at every ``site`` of every layer in ``layers`` (default: all layers).

    The hook function is ``fn(x, ctx) -> Tensor | None``; see :class:`HookContext`. Forward passes and
    generation through :mod:`kvgeom.runtime.generation` fill ``ctx.call`` (step, mask of real positions).
    """
    table = _normalise(model, hooks, sites, layers)
    for name in table:
        site, _ = parse_hook_name(name)
        if site not in model.sites_available:
            raise ValueError(
                f"site {site!r} ({name}) is never fired by the TransformerLens bridge for "
                f"{model.facts.architecture}; available sites: {', '.join(model.sites_available)}. "
                "See docs/architectures.md (fused-QKV models: use 'k' for pre-RoPE keys, or quantize "
                "post-RoPE keys in the cache with a QuantPlan in mode 'cache')."
            )
    session = HookSession(hooks=table)
    fwd_hooks = []
    for name, fns in table.items():
        site, layer = parse_hook_name(name)

        def tl_hook(x: Tensor, hook: Any = None, *, _fns=fns, _name=name, _site=site, _layer=layer) -> Tensor:
            ctx = HookContext(name=_name, site=_site, layer=_layer, call=session.call)
            for fn in _fns:
                y = fn(x, ctx)
                if y is not None:
                    if y.shape != x.shape:
                        raise ValueError(f"hook at {_name} returned shape {tuple(y.shape)}, expected {tuple(x.shape)}")
                    x = y
            return x

        fwd_hooks.append((name, tl_hook))
    model.hook_sessions.append(session)
    try:
        with model.bridge.hooks(fwd_hooks=fwd_hooks, reset_hooks_end=True):
            yield session
    finally:
        model.hook_sessions.remove(session)


def set_call(model: KVModel, call: CallInfo) -> None:
    """Tell every active hook session what the next forward call is (used by forward loops)."""
    for session in model.hook_sessions:
        session.call = call
        session.calls_seen += 1


#: :meth:`kvgeom.models.KVModel.kv_hooks` opens its sessions with this (models sit below the runtime and never
#: import it: the runtime hands itself down).
KVModel.open_hooks = kv_hooks
