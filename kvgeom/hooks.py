"""Hooked access to K, V and the residual stream.

Sites (TransformerLens 4 hook points of the bridge, per layer ``l``):

=============  ==================================  ====================================
site           hook point                          shape seen by a hook
=============  ==================================  ====================================
``k``          ``blocks.{l}.attn.hook_k``           ``[batch, pos, kv_head, d_head]`` (pre-RoPE)
``rot_k``      ``blocks.{l}.attn.hook_rot_k``       ``[batch, pos, kv_head, d_head]`` (post-RoPE)
``v``          ``blocks.{l}.attn.hook_v``           ``[batch, pos, kv_head, d_head]``
``q``          ``blocks.{l}.attn.hook_q``           ``[batch, pos, head, d_head]`` (pre-RoPE)
``resid_pre``  ``blocks.{l}.hook_resid_pre``        ``[batch, pos, d_model]``
``resid_mid``  ``blocks.{l}.hook_resid_mid``        ``[batch, pos, d_model]``
``resid_post`` ``blocks.{l}.hook_resid_post``       ``[batch, pos, d_model]``
``attn_out``   ``blocks.{l}.hook_attn_out``         ``[batch, pos, d_model]``
``mlp_out``    ``blocks.{l}.hook_mlp_out``          ``[batch, pos, d_model]``
=============  ==================================  ====================================

The bridge fires ``hook_rot_k`` and ``hook_v`` *before* it appends K/V to the KV cache, so during
cached generation a K/V hook sees every position exactly once, as it enters the cache (all prompt
positions at prefill, the one new position at each decode step), and whatever the hook returns is
what this and every later step attends to. ``tests/test_hooks.py`` proves this on tiny models.

:func:`kv_hooks` installs hooks only inside a ``with`` block and always removes them, also when the
block raises. Hook functions receive the tensor and a :class:`HookContext` (layer, site, the call's
step and its mask of real positions) and return a replacement tensor or ``None`` (keep).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jaxtyping import Bool, Int
from torch import Tensor

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = [
    "KV_SITES",
    "SITES",
    "CallInfo",
    "HookContext",
    "HookFn",
    "HookSession",
    "hook_name",
    "kv_hooks",
    "parse_hook_name",
    "set_call",
]

SITES: dict[str, str] = {
    "k": "blocks.{layer}.attn.hook_k",
    "rot_k": "blocks.{layer}.attn.hook_rot_k",
    "v": "blocks.{layer}.attn.hook_v",
    "q": "blocks.{layer}.attn.hook_q",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}
KV_SITES = ("k", "rot_k", "v")


def hook_name(site: str, layer: int) -> str:
    """``hook_name("rot_k", 3) == "blocks.3.attn.hook_rot_k"``."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")
    return SITES[site].format(layer=int(layer))


def parse_hook_name(name: str) -> tuple[str, int]:
    """Inverse of :func:`hook_name`."""
    parts = name.split(".")
    try:
        layer = int(parts[1])
    except (IndexError, ValueError):
        raise ValueError(f"{name!r} is not a per-layer hook name like 'blocks.3.attn.hook_rot_k'") from None
    for site, pattern in SITES.items():
        if pattern.format(layer=layer) == name:
            return site, layer
    raise ValueError(f"{name!r} is not one of kvgeom's sites ({', '.join(SITES)})")


@dataclass
class CallInfo:
    """What the current forward call is: set by kvgeom's forward/generation loops.

    ``mask`` marks the real (non-padding) positions *of this call's tokens* ``[batch, new_pos]``;
    ``step`` is 0 for a prefill (or a plain forward) and k for the k-th decode step.
    """

    step: int = 0
    mask: Bool[Tensor, "batch pos"] | None = None
    position_ids: Int[Tensor, "batch pos"] | None = None


@dataclass(frozen=True)
class HookContext:
    """Passed to every kvgeom hook function."""

    name: str
    site: str
    layer: int
    call: CallInfo


HookFn = Callable[[Tensor, HookContext], "Tensor | None"]


@dataclass
class HookSession:
    """The hooks installed by one :func:`kv_hooks` block; ``call`` is updated by forward loops."""

    hooks: dict[str, list[HookFn]]
    call: CallInfo = field(default_factory=CallInfo)
    calls_seen: int = 0


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
    generation through :mod:`kvgeom.generation` fill ``ctx.call`` (step, mask of real positions).
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
    sessions: list[HookSession] = model.__dict__.setdefault("_hook_sessions", [])
    sessions.append(session)
    try:
        with model.bridge.hooks(fwd_hooks=fwd_hooks, reset_hooks_end=True):
            yield session
    finally:
        sessions.remove(session)


def set_call(model: KVModel, call: CallInfo) -> None:
    """Tell every active hook session what the next forward call is (used by forward loops)."""
    for session in model.__dict__.get("_hook_sessions", []):
        session.call = call
        session.calls_seen += 1
