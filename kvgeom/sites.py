"""Site names and hook-point names: the ground floor every other kvgeom module may import (it imports nothing
of kvgeom).

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

:func:`hook_name` and :func:`parse_hook_name` are inverse (``tests/test_sites.py``). What a hook at a site
sees and may change is documented, and proved, in :mod:`kvgeom.runtime.hooks`.
"""

from __future__ import annotations

__all__ = ["KV_SITES", "SITES", "hook_name", "parse_hook_name"]

#: site -> hook-point pattern (``{layer}`` is the layer index).
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
