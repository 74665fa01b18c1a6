"""Site names, hook-point names and what a hook at a site is given: the ground floor every other kvgeom module
may import (it imports nothing of kvgeom).

Sites (TransformerLens 4 hook points of the bridge, per layer ``l``):

=============  ==================================  ====================================
site           hook point                          shape seen by a hook
=============  ==================================  ====================================
``k``          ``blocks.{l}.attn.hook_k``           ``[batch, pos, kv_head, d_head]`` (pre-RoPE)
``rot_k``      ``blocks.{l}.attn.hook_rot_k``       ``[batch, pos, kv_head, d_head]`` (post-RoPE)
``v``          ``blocks.{l}.attn.hook_v``           ``[batch, pos, kv_head, d_head]``
``q``          ``blocks.{l}.attn.hook_q``           ``[batch, pos, head, d_head]`` (pre-RoPE)
``rot_q``      ``blocks.{l}.attn.hook_rot_q``       ``[batch, pos, head, d_head]`` (post-RoPE)
``resid_pre``  ``blocks.{l}.hook_resid_pre``        ``[batch, pos, d_model]``
``resid_mid``  ``blocks.{l}.hook_resid_mid``        ``[batch, pos, d_model]``
``resid_post`` ``blocks.{l}.hook_resid_post``       ``[batch, pos, d_model]``
``attn_out``   ``blocks.{l}.hook_attn_out``         ``[batch, pos, d_model]``
``mlp_out``    ``blocks.{l}.hook_mlp_out``          ``[batch, pos, d_model]``
=============  ==================================  ====================================

:func:`hook_name` and :func:`parse_hook_name` are inverse (``tests/test_sites.py``).

The words of a hook, here so that the model (which holds its open sessions, :attr:`kvgeom.models.KVModel.hook_sessions`)
and the runtime (which opens them) share them from below: :class:`CallInfo` (the forward call), :class:`HookContext`
(what a hook function receives), :data:`HookFn` and :class:`HookSession` (the hooks of one ``kv_hooks`` block).
Installing hooks is the runtime's: what a hook at a site sees and may change is documented, and proved, in
:mod:`kvgeom.runtime.hooks` (which hands these names on too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Bool, Int
from torch import Tensor

__all__ = ["KV_SITES", "SITES", "CallInfo", "HookContext", "HookFn", "HookSession", "hook_name", "parse_hook_name"]

#: site -> hook-point pattern (``{layer}`` is the layer index).
SITES: dict[str, str] = {
    "k": "blocks.{layer}.attn.hook_k",
    "rot_k": "blocks.{layer}.attn.hook_rot_k",
    "v": "blocks.{layer}.attn.hook_v",
    "q": "blocks.{layer}.attn.hook_q",
    "rot_q": "blocks.{layer}.attn.hook_rot_q",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}
#: The sites that carry keys or values (what KV-cache quantization changes).
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
    _masks: dict = field(default_factory=dict, repr=False, compare=False)

    def mask_on(self, device: Any) -> Bool[Tensor, "batch pos"] | None:
        """:attr:`mask` on ``device`` (a layer's device, when a model is spread over several): copied once per
        call and device, never once per hook (``tests/models/test_placement.py``)."""
        if self.mask is None or self.mask.device == device:
            return self.mask
        out = self._masks.get(device)
        if out is None:
            out = self._masks[device] = self.mask.to(device)
        return out


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
    """The hooks installed by one :func:`kvgeom.runtime.hooks.kv_hooks` block; ``call`` is updated by forward
    loops."""

    hooks: dict[str, list[HookFn]]
    call: CallInfo = field(default_factory=CallInfo)
    calls_seen: int = 0
