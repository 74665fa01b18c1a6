"""Refusal directions by difference of means (Arditi et al. 2024).

For a site ``s``, layer ``l`` and post-instruction position ``p`` (counted from the end of the prompt,
``-n_post .. -1``)::

    r[l, p] = mean_i x_i^harmful[l, p] - mean_j x_j^harmless[l, p]        (accumulated in float64)

For K/V sites ``x`` is ``[kv_head, d_head]``: ``r`` is kept per KV head, and the concatenated direction
is ``rearrange(r, "h d -> (h d)")``. Norms are reported per head and concatenated, with the relative norm
``||r|| / mean_i ||x_i||`` (activations of both classes) beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from kvgeom.runtime.forward import Capture, capture
from kvgeom.sites import KV_SITES

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["RefusalDirections", "as_matrix", "capture_pair", "refusal_directions"]

#: Relative norm below which a direction counts as zero (activations identical across classes).
ZERO_REL = 1e-6


def as_matrix(x: Tensor, site: str) -> Float[Tensor, "... feat"]:
    """Flatten K/V ``[..., kv_head, d_head]`` to ``[..., kv_head * d_head]`` (residual sites unchanged)."""
    return rearrange(x, "... h d -> ... (h d)") if site in KV_SITES else x


def capture_pair(
    model: KVModel, harmful: Sequence[str], harmless: Sequence[str], *, sites: Sequence[str],
    layers: Sequence[int] | None = None, positions: Any = "post", batch_size: int = 16, progress: bool = False,
) -> tuple[Capture, Capture]:
    """One :func:`kvgeom.capture` per class (the inputs every geometry function can reuse)."""
    kw = dict(sites=tuple(sites), layers=layers, positions=positions, batch_size=batch_size, progress=progress)
    return capture(model, list(harmful), **kw), capture(model, list(harmless), **kw)


@dataclass(frozen=True)
class RefusalDirections:
    """Difference-of-means directions ``[layer, pos, *feat]`` (float64) with the class means.

    ``positions`` are offsets from the end of the prompt (``-5..-1`` for the default model's five
    post-instruction tokens); ``tokens`` their strings. ``feat`` is ``[kv_head, d_head]`` for K/V
    sites and ``[d_model]`` for residual sites.
    """

    site: str
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    directions: Float[Tensor, "layer pos ..."] = field(repr=False)
    mean_harmful: Float[Tensor, "layer pos ..."] = field(repr=False)
    mean_harmless: Float[Tensor, "layer pos ..."] = field(repr=False)
    act_norm: Float[Tensor, "layer pos"] = field(repr=False)
    n_harmful: int = 0
    n_harmless: int = 0
    tokens: tuple[str, ...] = ()

    @property
    def is_kv(self) -> bool:
        return self.site in KV_SITES

    @property
    def flat(self) -> Float[Tensor, "layer pos feat"]:
        """Concatenated directions (heads flattened for K/V)."""
        return as_matrix(self.directions, self.site)

    @property
    def norms(self) -> Float[Tensor, "layer pos"]:
        return self.flat.norm(dim=-1)

    @property
    def defined(self) -> torch.Tensor:
        """``||r|| > ZERO_REL * mean ||x||``: False where the classes are indistinguishable."""
        return self.norms > ZERO_REL * self.act_norm.clamp_min(1e-30)

    def index(self, layer: int, position: int) -> tuple[int, int]:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} not in directions (layers {self.layers})")
        if position not in self.positions:
            raise KeyError(f"position {position} not in directions (positions {self.positions})")
        return self.layers.index(layer), self.positions.index(position)

    def direction(self, layer: int, position: int, *, unit: bool = False) -> Float[Tensor, " feat"]:
        """The concatenated direction at (layer, position); ``unit=True`` normalises it (zero stays zero)."""
        li, pi = self.index(layer, position)
        r = self.flat[li, pi]
        if unit:
            n = r.norm()
            return r / n if n > 0 else r
        return r

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, position, head): ``norm``, ``rel_norm = norm / mean ||x||``, ``defined``.
        ``head = "all"`` is the concatenated direction."""
        recs = []
        norms = self.norms
        for li, layer in enumerate(self.layers):
            for pi, pos in enumerate(self.positions):
                an = float(self.act_norm[li, pi])
                tok = self.tokens[pi] if pi < len(self.tokens) else ""
                heads: list[tuple[Any, float]] = [("all", float(norms[li, pi]))]
                if self.is_kv:
                    hn = self.directions[li, pi].norm(dim=-1)
                    heads += [(h, float(hn[h])) for h in range(hn.shape[0])]
                for head, nrm in heads:
                    recs.append({"site": self.site, "layer": layer, "position": pos, "token": tok, "head": head,
                                 "norm": nrm, "rel_norm": nrm / an if an > 0 else float("nan"),
                                 "defined": bool(nrm > ZERO_REL * an)})
        return pd.DataFrame(recs)


def _stack(cap: Capture, site: str, layers: Sequence[int]) -> Tensor:
    out = []
    for layer in layers:
        a = cap[(site, layer)]
        if isinstance(a, list):
            raise ValueError("refusal directions need a fixed-length position selection ('post' or 'last k')")
        out.append(a)
    return torch.stack(out).to(torch.float64)  # [layer, n, pos, ...]


def refusal_directions(
    model: KVModel | None,
    harmful: Sequence[str] | Capture,
    harmless: Sequence[str] | Capture,
    *,
    site: str = "resid_pre",
    positions: Any = "post",
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> RefusalDirections:
    """Difference-of-means refusal directions per layer and post-instruction position (see module doc).

    ``harmful`` / ``harmless`` are prompt lists (captured here with ``positions``) or ready
    :class:`kvgeom.Capture` objects holding ``site`` (then ``model`` may be None).
    """
    caps = []
    for what, p in (("harmful", harmful), ("harmless", harmless)):
        if isinstance(p, Capture):
            caps.append(p)
        else:
            if model is None:
                raise ValueError(f"{what} prompts given without a model: pass model= or a Capture")
            caps.append(capture(model, list(p), sites=(site,), layers=layers, positions=positions,
                                batch_size=batch_size, progress=progress))
    ch, cb = caps
    if layers is None:
        layers = sorted({la for s, la in ch.acts if s == site})
    layers = [int(la) for la in layers]
    xh, xb = _stack(ch, site, layers), _stack(cb, site, layers)
    if xh.shape[2] != xb.shape[2]:
        raise ValueError(f"harmful and harmless selections differ in length ({xh.shape[2]} vs {xb.shape[2]})")
    mh, mb = xh.mean(1), xb.mean(1)
    act = torch.cat([as_matrix(xh, site), as_matrix(xb, site)], dim=1).norm(dim=-1).mean(1)  # [layer, pos]
    n_pos = xh.shape[2]
    tokens: tuple[str, ...] = ()
    if model is not None and ch.token_ids:
        tokens = tuple(model.tokenizer.decode([t]) for t in ch.token_ids[0][-n_pos:])
    return RefusalDirections(
        site=site, layers=tuple(layers), positions=tuple(range(-n_pos, 0)), directions=mh - mb,
        mean_harmful=mh, mean_harmless=mb, act_norm=act, n_harmful=xh.shape[1], n_harmless=xb.shape[1],
        tokens=tokens,
    )
