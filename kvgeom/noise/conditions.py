"""Noise conditions on one or several layers at once, their per-row deltas and the hooks that add them.

A :class:`NoiseCondition` acts on ``layers`` (one layer, or several at once) of one K/V ``site``. At each of its
layers it adds that layer's own noise of that layer's own norm (``||n|| = ||e||`` per position, ``e`` the
scheme's error at that layer measured on the clean prompt; ``subspace``/``quant_in``/``quant_out`` use that
layer's basis; ``random`` draws a fresh random subspace per layer and per draw). The noise of a condition at a
layer does not depend on the condition's other layers: a multi-layer condition adds exactly the deltas that
the single-layer conditions of the same kind and draw add (tests/noise/test_multilayer.py::
test_multilayer_deltas_are_the_single_layer_deltas), and scoring it equals adding those deltas with plain hooks
(test_multilayer_equals_manual_hooks). Rows are conditions x prompts (condition-major); a row's delta reaches
that row only (test_rows_are_independent_of_their_batch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kvgeom.runtime.forward import Batch
from kvgeom.runtime.hooks import HookFn
from kvgeom.sites import KV_SITES, hook_name

from .rows import Where, common_n_post, flatten_heads, run_rows, unflatten_heads
from .vectors import NOISE_KINDS, make_noise, random_subspace

if TYPE_CHECKING:
    from kvgeom.models import KVModel


@dataclass(frozen=True)
class NoiseCondition:
    """One intervention: ``kind`` (see :data:`NOISE_KINDS`) at ``layer`` of ``site`` or, with ``layers=(...)``, at
    several layers at once; ``draw`` numbers the random draws of stochastic kinds.

    After construction ``layers`` is always the sorted tuple of layers and ``layer`` the single layer (None for
    a condition on several layers): ``NoiseCondition("quant", 4) == NoiseCondition("quant", layers=(4,))``.
    """

    kind: str
    layer: int | None = None
    site: str = "rot_k"
    draw: int = 0
    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {self.kind!r}; valid: {', '.join(NOISE_KINDS)}")
        if self.site not in KV_SITES:
            raise ValueError(f"noise is injected at a K/V site ({', '.join(KV_SITES)}), got {self.site!r}")
        if self.layers:
            layers = tuple(sorted(int(la) for la in self.layers))
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers has a repeated layer: {self.layers}; give each layer once")
            if self.layer is not None and layers != (int(self.layer),):
                raise ValueError(f"give layer={self.layer} (one layer) or layers={self.layers} (several), not both")
        elif self.layer is None:
            raise ValueError("a NoiseCondition needs layer=L (one layer) or layers=(L1, L2, ...) (several at once)")
        else:
            layers = (int(self.layer),)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "layer", layers[0] if len(layers) == 1 else None)

    @property
    def label(self) -> str:
        at = "+".join(str(la) for la in self.layers)
        return f"{self.kind}@L{at}/{self.site}" + (f"#{self.draw}" if self.kind == "random" else "")


@dataclass(frozen=True)
class Deltas:
    """Per-row additive deltas, stored sparsely per (site, layer): ``slots[key][row]`` is the row's index into
    ``values[key]`` (``[n_acting_rows, width, heads, d_head]``), or -1 when the row does not act there."""

    n_rows: int
    slots: Mapping[tuple[str, int], Tensor]
    values: Mapping[tuple[str, int], Tensor]

    def of_row(self, site: str, layer: int, row: int) -> Tensor | None:
        """The delta row ``row`` adds at ``(site, layer)`` (None when it adds nothing there)."""
        key = (site, int(layer))
        if key not in self.slots or int(self.slots[key][row]) < 0:
            return None
        return self.values[key][int(self.slots[key][row])]


def _seed(seed: int, cond: NoiseCondition, layer: int) -> int:
    """The generator seed of ``cond``'s noise at ``layer`` (the same for a single- and a multi-layer condition)."""
    return (seed * 1_000_003 + layer * 1009 + cond.draw * 7919 + NOISE_KINDS.index(cond.kind) * 17
            + KV_SITES.index(cond.site))


def condition_deltas(
    conditions: Sequence[NoiseCondition],
    errors: Mapping[tuple[str, int], Tensor],
    bases: Mapping[int, Tensor | None],
    n_prompts: int,
    *,
    k_random: Mapping[int, int] | None = None,
    seed: int = 0,
) -> Deltas:
    """The deltas of rows = conditions x prompts (condition-major) from the scheme's errors ``{(site, layer):
    [n_prompts, width, heads, d_head]}`` and ``bases`` ``{layer: orthonormal [D, k] or None}``; random subspaces
    have rank ``k_random[layer]`` (default: the basis's rank, 1 without a basis)."""
    n_rows = len(conditions) * n_prompts
    parts: dict[tuple[str, int], list[tuple[int, Tensor]]] = {}
    for c, cond in enumerate(conditions):
        if cond.kind == "none":
            continue
        for la in cond.layers:
            key = (cond.site, la)
            if key not in errors:
                raise ValueError(f"no scheme error at {key}: capture {cond.site} at layer {la} first")
            like = errors[key]
            e = flatten_heads(like)
            gen = torch.Generator().manual_seed(_seed(seed, cond, la))
            basis = bases.get(la)
            if cond.kind == "random":
                k = (k_random or {}).get(la, basis.shape[1] if basis is not None else 1)
                basis = random_subspace(e.shape[-1], k, gen)
            noise = make_noise(cond.kind, e, basis=basis, generator=gen)
            parts.setdefault(key, []).append((c, unflatten_heads(noise, like)))
    slots, values = {}, {}
    for key, lst in parts.items():
        slot = torch.full((n_rows,), -1, dtype=torch.long)
        for j, (c, _) in enumerate(lst):
            slot[c * n_prompts:(c + 1) * n_prompts] = torch.arange(j * n_prompts, (j + 1) * n_prompts)
        slots[key], values[key] = slot, torch.cat([v for _, v in lst])
    return Deltas(n_rows, slots, values)


def delta_hooks(deltas: Deltas, where: Where = "all", n_post: int = 0) -> Callable[[Tensor], dict[str, HookFn]]:
    """``hooks_for(rows)`` for :func:`kvgeom.noise.run_rows`: at each (site, layer) add each row's delta there
    (its last ``n_post`` positions with ``where="post"``), leaving the other rows untouched."""

    def hooks_for(rows: Tensor) -> dict[str, HookFn]:
        def fn(x: Tensor, ctx: Any) -> Tensor | None:
            key = (ctx.site, ctx.layer)
            s = deltas.slots[key][rows]
            sel = s >= 0
            if not bool(sel.any()):
                return None
            d = deltas.values[key][s[sel]]
            if where == "post":
                d = d[:, -n_post:]
            y = x.clone()
            idx = sel.nonzero()[:, 0].to(x.device)
            y[idx] = x[idx] + d.to(x.device, x.dtype)
            return y

        return {hook_name(site, la): fn for site, la in deltas.slots}

    return hooks_for


def score_conditions(
    model: KVModel,
    batch: Batch,
    conditions: Sequence[NoiseCondition],
    errors: Mapping[tuple[str, int], Tensor],
    bases: Mapping[int, Tensor | None],
    *,
    where: Where = "all",
    k_random: Mapping[int, int] | None = None,
    seed: int = 0,
    chunk: int = 64,
    progress: bool = False,
) -> Tensor:
    """Refusal scores ``[len(conditions), len(batch)]`` of every (condition, prompt) row, in batched passes."""
    from kvgeom.evaluate import RefusalScore

    n = len(batch)
    deltas = condition_deltas(conditions, errors, bases, n, k_random=k_random, seed=seed)
    n_post = common_n_post(batch) if where == "post" else 0
    row_prompt = torch.arange(n).repeat(len(conditions))
    logits = run_rows(model, batch, row_prompt, delta_hooks(deltas, where, n_post), where=where, chunk=chunk,
                      progress=progress)
    return RefusalScore.for_model(model).from_logits(logits).reshape(len(conditions), n)
