"""Where a scheme is applied: :class:`QuantPlan`, one per batch row, in forward passes and generation.

Two modes:

* ``forward`` — the paper's authors' semantics: fake-quantize the K/V produced by each forward call
  (the whole prompt at prefill, then each new token on its own at each decode step), through the K/V
  hooks (site ``rot_k``: post-RoPE keys, or ``k``: pre-RoPE keys as the authors' k_proj hooks; values
  at ``v``). Stateless: ``tensor``/``channel`` ranges are those of each call.
* ``cache`` — serving semantics: what enters the KV cache is quantized with the scheme's streaming rules
  (:class:`kvgeom.quant.StreamQuantizer`: static ranges fixed at prefill for ``tensor``, ``channel`` and
  ``@amax``; KIVI's full-precision residual window), by replacing HF's ``DynamicCache`` with
  :class:`PlanCache`. The cache receives post-RoPE keys, so cache mode always quantizes post-RoPE keys.
  ``prefill="quantized"`` (vLLM-like): every call's attention, the prompt's own included, reads the
  quantized cache. ``prefill="full"`` (HF ``QuantizedCache``-like): each call's own new positions are
  attended at full precision, while everything from earlier calls is read quantized.

Per-row plans: a forward or generation call takes one plan per batch row (``None`` = full precision).
Rows with equal plans are quantized together; a row's result equals running its plan on its own,
because every scheme's ranges are per row and padding never enters a range.

Protected channels (``protect_channels={layer: [(head, dim), ...]}``) keep full precision in the keys:
they are zeroed before quantization (so their magnitude does not set any range; for ``asym`` schemes a
zero can still widen a range that excluded it) and restored exactly afterwards. Values are not affected.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from .fake import fake_quant
from .scheme import Scheme
from .stream import StreamQuantizer

if TYPE_CHECKING:
    from kvgeom.forward import Batch
    from kvgeom.hooks import HookSession
    from kvgeom.models import KVModel

__all__ = ["PlanCache", "PlanRun", "QuantPlan", "RowGroups", "apply_plans", "normalise_plans"]

Mode = Literal["forward", "cache"]


def _channels(value: Mapping[int, Sequence[Sequence[int]]] | None) -> tuple:
    if not value:
        return ()
    out = []
    for layer, chans in sorted(dict(value).items()):
        pairs = tuple(sorted((int(h), int(d)) for h, d in chans))
        if pairs:
            out.append((int(layer), pairs))
    return tuple(out)


@dataclass(frozen=True)
class QuantPlan:
    """Which scheme, where, and how: the unit a batch row runs under.

    Args:
        scheme: a :class:`Scheme` or its string (``"int4-token-asym"``, ``"K:kivi2,V:q8_0"``, ...).
        layers: layers quantized (``None``: all).
        protect_layers: layers kept in full precision (wins over ``layers``).
        protect_channels: ``{layer: [(kv_head, dim), ...]}`` key channels kept in full precision.
        layer_schemes: ``{layer: scheme}`` per-layer overrides of ``scheme`` (mixed-precision assignments);
            an overridden layer is quantized with its own scheme even if outside ``layers``.
        site: ``"rot_k"`` (post-RoPE keys, default) or ``"k"`` (pre-RoPE; mode ``forward`` only).
        mode: ``"forward"`` or ``"cache"`` (see module docstring).
        prefill: mode ``cache`` only: ``"quantized"`` or ``"full"``.
        name: an optional label for tables.
    """

    scheme: Scheme | str
    layers: tuple[int, ...] | None = None
    protect_layers: tuple[int, ...] = ()
    protect_channels: Any = ()
    layer_schemes: Any = ()
    site: Literal["rot_k", "k"] = "rot_k"
    mode: Mode = "forward"
    prefill: Literal["quantized", "full"] = "quantized"
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", Scheme.parse(self.scheme) if isinstance(self.scheme, str)
                           else self.scheme)
        if not isinstance(self.scheme, Scheme):
            raise TypeError(f"scheme must be a Scheme or a string, got {type(self.scheme).__name__}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
        object.__setattr__(self, "protect_layers", tuple(sorted({int(x) for x in self.protect_layers})))
        if isinstance(self.protect_channels, Mapping):
            object.__setattr__(self, "protect_channels", _channels(self.protect_channels))
        if isinstance(self.layer_schemes, Mapping):
            object.__setattr__(self, "layer_schemes", tuple(sorted(
                (int(k), Scheme.parse(v) if isinstance(v, str) else v) for k, v in self.layer_schemes.items())))
        if self.site not in ("rot_k", "k"):
            raise ValueError(f"site must be 'rot_k' (post-RoPE keys) or 'k' (pre-RoPE keys), got {self.site!r}")
        if self.mode not in ("forward", "cache"):
            raise ValueError(f"mode must be 'forward' (the paper's per-call fake quant) or 'cache' (serving), "
                             f"got {self.mode!r}")
        if self.prefill not in ("quantized", "full"):
            raise ValueError(f"prefill must be 'quantized' or 'full', got {self.prefill!r}")
        if self.mode == "cache" and self.site != "rot_k":
            raise ValueError("mode 'cache' quantizes what enters the KV cache, which holds post-RoPE keys: "
                             "use site='rot_k' (or mode='forward' for pre-RoPE keys)")

    # ---- queries ---------------------------------------------------------------------------------
    def quantizes(self, layer: int) -> bool:
        if layer in self.protect_layers:
            return False
        if any(lay == layer for lay, _ in self.layer_schemes):
            return True
        return self.layers is None or layer in self.layers

    def scheme_for(self, layer: int) -> Scheme:
        for lay, sch in self.layer_schemes:
            if lay == layer:
                return sch
        return self.scheme

    def channels(self, layer: int) -> tuple[tuple[int, int], ...]:
        for lay, pairs in self.protect_channels:
            if lay == layer:
                return pairs
        return ()

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = [str(self.scheme)]
        if self.layers is not None:
            parts.append("L" + ",".join(map(str, self.layers)))
        if self.protect_layers:
            parts.append("keep L" + ",".join(map(str, self.protect_layers)))
        if self.protect_channels:
            parts.append(f"keep {sum(len(p) for _, p in self.protect_channels)} ch")
        if self.layer_schemes:
            parts.append(" ".join(f"L{lay}={sch}" for lay, sch in self.layer_schemes))
        if self.site != "rot_k":
            parts.append(f"site={self.site}")
        if self.mode != "forward":
            parts.append(f"cache/{self.prefill}")
        return " ".join(parts)

    def validate(self, model: KVModel) -> None:
        n = model.n_layers
        for lay in ((self.layers or ()) + self.protect_layers + tuple(lay for lay, _ in self.protect_channels)
                    + tuple(lay for lay, _ in self.layer_schemes)):
            if not 0 <= lay < n:
                raise ValueError(f"plan {self.label!r}: layer {lay} out of range (model has {n} layers)")
        for lay, pairs in self.protect_channels:
            for h, d in pairs:
                if not (0 <= h < model.n_kv_heads and 0 <= d < model.d_head):
                    raise ValueError(f"plan {self.label!r}: protected channel (head {h}, dim {d}) at layer "
                                     f"{lay} out of range ({model.n_kv_heads} KV heads x d_head {model.d_head})")
        if self.mode == "forward" and self.site not in model.sites_available:
            raise ValueError(f"plan {self.label!r}: site {self.site!r} is not available for "
                             f"{model.facts.architecture}; use site='k' or mode='cache'")


def normalise_plans(plans: QuantPlan | str | Sequence[QuantPlan | str | None] | None, n: int) -> list:
    """One plan (or None) per row; a single plan or scheme string applies to every row."""
    if plans is None or isinstance(plans, (QuantPlan, str)):
        one = QuantPlan(plans) if isinstance(plans, str) else plans
        return [one] * n
    plans = [QuantPlan(p) if isinstance(p, str) else p for p in plans]
    if len(plans) != n:
        raise ValueError(f"got {len(plans)} plans for {n} prompts: pass one plan per prompt (None = full "
                         "precision), or a single plan for all")
    return plans


def _groups(plans: Sequence[QuantPlan | None]) -> dict[QuantPlan, list[int]]:
    groups: dict[QuantPlan, list[int]] = {}
    for i, p in enumerate(plans):
        if p is not None:
            groups.setdefault(p, []).append(i)
    return groups


class RowGroups:
    """Which batch rows run under which plan; shared by the hooks and the cache of one batch.

    :meth:`select` follows generation when it drops finished rows: the groups are re-indexed and the
    per-device index tensors rebuilt lazily (built once per group and device, never inside a hook loop).
    """

    def __init__(self, plans: Sequence[QuantPlan | None]) -> None:
        self.groups = _groups(plans)
        self._index: dict[tuple[QuantPlan, torch.device], Tensor] = {}
        self.listeners: list[Any] = []

    def items(self):
        return self.groups.items()

    def index(self, plan: QuantPlan, device: torch.device) -> Tensor:
        idx = self._index.get((plan, device))
        if idx is None:
            idx = self._index[(plan, device)] = torch.tensor(self.groups[plan], device=device)
        return idx

    def select(self, keep: Sequence[int]) -> None:
        """Keep batch rows ``keep`` (old indices, in order); tell listeners (caches) which rows of each group stay."""
        new_of = {old: new for new, old in enumerate(keep)}
        local: dict[QuantPlan, list[int]] = {}
        groups: dict[QuantPlan, list[int]] = {}
        for plan, rows in self.groups.items():
            kept = [j for j, r in enumerate(rows) if r in new_of]
            local[plan] = kept
            if kept:
                groups[plan] = [new_of[rows[j]] for j in kept]
        self.groups = groups
        self._index.clear()
        for listener in self.listeners:
            listener(local)


def _protected_quant(x: Tensor, plan: QuantPlan, layer: int, role: str, fn: Any) -> Tensor:
    """Apply ``fn(x, mask)`` (a quantizer) keeping protected key channels at full precision."""
    chans = plan.channels(layer) if role == "k" else ()
    if not chans:
        return fn(x)
    heads = torch.tensor([h for h, _ in chans], device=x.device)
    dims = torch.tensor([d for _, d in chans], device=x.device)
    kept = x[:, :, heads, dims].clone()
    x0 = x.clone()
    x0[:, :, heads, dims] = 0
    y = fn(x0).clone()
    y[:, :, heads, dims] = kept
    return y


# ---- forward mode: hooks --------------------------------------------------------------------------
class _FiniteGuard:
    """NaN/inf detection without a device-to-host sync per hook call (GPU): flags accumulate on the device
    per site and are checked once when the plans' context exits."""

    def __init__(self) -> None:
        self.flags: dict[str, Tensor] = {}

    def note(self, x: Tensor, mask: Tensor | None, site: str) -> None:
        bad = ~torch.isfinite(x)
        if mask is not None:
            bad = bad & mask[:, :, None, None]
        flag = bad.any()
        self.flags[site] = flag if site not in self.flags else self.flags[site] | flag

    def check(self) -> None:
        if not self.flags:
            return
        names = list(self.flags)
        hit = torch.stack([self.flags[n].cpu() for n in names]).tolist()
        bad = [n for n, h in zip(names, hit, strict=True) if h]
        if bad:
            raise ValueError(f"non-finite K/V at real positions at site(s) {', '.join(bad)}; quantization ranges "
                             "would be poisoned. Run the model in fp32/bf16 or fix the upstream activations.")


def _forward_hook(groups: RowGroups, guard: _FiniteGuard | None = None):
    def hook(x: Tensor, ctx: Any) -> Tensor | None:
        role = "v" if ctx.site == "v" else "k"
        out = None
        for plan, _rows in groups.items():
            if plan.mode != "forward" or not plan.quantizes(ctx.layer):
                continue
            if role == "k" and ctx.site != plan.site:
                continue
            idx = groups.index(plan, x.device)  # built once per group: no host-to-device copy per hook call
            mask = ctx.call.mask.to(x.device)[idx] if ctx.call.mask is not None else None
            scheme = plan.scheme_for(ctx.layer)
            xi = x[idx]  # gathered once for the guard and the quantizer
            if guard is not None:
                guard.note(xi, mask, ctx.name)

            def quantize(t: Tensor, _s: Scheme = scheme, _m: Tensor | None = mask, _r: str = role) -> Tensor:
                return fake_quant(t, _s, role=_r, mask=_m, site=ctx.name, check_finite=guard is None)

            y = _protected_quant(xi, plan, ctx.layer, role, quantize)
            if out is None:
                out = x.clone()
            out[idx] = y
        return out

    return hook


# ---- cache mode: a quantizing DynamicCache ---------------------------------------------------------
def _dynamic_cache_cls():
    from transformers import DynamicCache

    return DynamicCache


class PlanCache:
    """A ``transformers.DynamicCache`` whose update returns K/V as per-row cache-mode plans store them.

    The raw (full-precision) K/V are kept by the parent class; per (plan group, layer, role) a
    :class:`StreamQuantizer` keeps the quantized view. ``session`` supplies each call's real-position
    mask (prefill: the left-padding mask; decode: all real).
    """

    def __new__(cls, model: KVModel, groups: RowGroups, session: HookSession):
        base = _dynamic_cache_cls()

        class _PlanCache(base):  # type: ignore[misc, valid-type]
            def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # noqa: ANN001
                new = key_states.shape[2]
                k_all, v_all = super().update(key_states, value_states, layer_idx, *args, **kwargs)
                out_k = out_v = None
                mask = self._session.call.mask
                for plan, _rows in self._groups.items():
                    if plan.mode != "cache" or not plan.quantizes(layer_idx):
                        continue
                    idx = self._groups.index(plan, key_states.device)  # per device: dispatched layers may differ
                    m = mask.to(idx.device)[idx] if mask is not None and mask.shape[1] == new else None
                    ks, vs = [], []
                    for role, x, store in (("k", key_states, ks), ("v", value_states, vs)):
                        q = self._quant.setdefault(
                            (plan, layer_idx, role),
                            StreamQuantizer(plan.scheme_for(layer_idx), role,
                                            site=f"cache layer {layer_idx} {role.upper()}"),
                        )
                        x_rows = x[idx].transpose(1, 2)  # [b, new, h, d]
                        if role == "k" and plan.channels(layer_idx):
                            store.append(self._append_protected(q, x_rows, plan, layer_idx, m))
                        else:
                            store.append(q.append(x_rows, m))
                    total = k_all.shape[2]
                    k_q = ks[0][:, -total:].transpose(1, 2).to(k_all.dtype)
                    v_q = vs[0][:, -total:].transpose(1, 2).to(v_all.dtype)
                    if plan.prefill == "full":
                        k_q = k_q.clone()
                        v_q = v_q.clone()
                        k_q[:, :, -new:] = key_states[idx]
                        v_q[:, :, -new:] = value_states[idx]
                    if out_k is None:
                        out_k, out_v = k_all.clone(), v_all.clone()
                    out_k[idx] = k_q
                    out_v[idx] = v_q
                return (out_k, out_v) if out_k is not None else (k_all, v_all)

            def _append_protected(self, q, x_rows, plan, layer_idx, m):  # noqa: ANN001
                chans = plan.channels(layer_idx)
                heads = torch.tensor([h for h, _ in chans], device=x_rows.device)
                dims = torch.tensor([d for _, d in chans], device=x_rows.device)
                raw = self._raw_protected.setdefault((plan, layer_idx), [])
                raw.append(x_rows[:, :, heads, dims].clone())
                x0 = x_rows.clone()
                x0[:, :, heads, dims] = 0
                stored = q.append(x0, m).clone()
                stored[:, :, heads, dims] = torch.cat(raw, dim=1).to(stored.dtype)
                return stored

            def select_groups(self, local: dict) -> None:  # noqa: ANN001
                """Follow RowGroups.select: keep each group's surviving rows in its quantizers."""
                for (plan, layer, role), q in list(self._quant.items()):
                    rows = local.get(plan, [])
                    if rows:
                        q.select(torch.tensor(rows))
                    else:
                        del self._quant[(plan, layer, role)]
                for (plan, layer), chunks in list(self._raw_protected.items()):
                    rows = local.get(plan, [])
                    if rows:
                        idx = torch.tensor(rows, device=chunks[0].device)
                        self._raw_protected[(plan, layer)] = [c[idx] for c in chunks]
                    else:
                        del self._raw_protected[(plan, layer)]

        obj = _PlanCache(config=model.hf_model.config)
        obj._session = session
        obj._groups = groups
        obj._quant = {}
        obj._raw_protected = {}
        groups.listeners.append(obj.select_groups)
        return obj


# ---- the context that runs a batch under its plans -------------------------------------------------
@contextmanager
def apply_plans(model: KVModel, plans: Sequence[QuantPlan | None]) -> Iterator[Any]:
    """Install what a batch's per-row plans need; yields a cache factory ``f(model, batch) -> cache``.

    Forward-mode plans become K/V hooks; cache-mode plans become a :class:`PlanCache`. Use with
    :func:`kvgeom.generation.generate` / :func:`kvgeom.forward.forward` on a batch of ``len(plans)`` rows
    (``generate(..., plans=...)`` does this for you).
    """
    from kvgeom.hooks import kv_hooks

    for p in {p for p in plans if p is not None}:
        p.validate(model)
    groups = RowGroups(plans)
    fwd = [p for p in groups.groups if p.mode == "forward"]
    guard = _FiniteGuard() if model.device.type == "cuda" else None  # CPU: check in place (no sync cost)
    with ExitStack() as stack:
        sites = sorted({p.site for p in fwd} | ({"v"} if fwd else set()))
        layers = sorted({lay for p in fwd for lay in range(model.n_layers) if p.quantizes(lay)})
        hook = _forward_hook(groups, guard) if fwd else (lambda x, ctx: None)
        session = stack.enter_context(
            kv_hooks(model, hook, sites=sites or ("v",), layers=layers if fwd else [0])
        )
        yield PlanRun(groups, session, len(plans), any(p.mode == "cache" for p in groups.groups))
        if guard is not None:
            guard.check()


class PlanRun:
    """What :func:`apply_plans` yields: call it as a cache factory ``run(model, batch)``; ``run.select(keep)``
    drops finished rows from the plan groups (and from the cache it built, via ``cache.batch_select_indices``)."""

    def __init__(self, groups: RowGroups, session: HookSession, n_rows: int, needs_cache: bool) -> None:
        self.groups, self.session, self.n_rows, self.needs_cache = groups, session, n_rows, needs_cache

    def __call__(self, model: KVModel, batch: Batch) -> Any:
        if len(batch) != self.n_rows:
            raise ValueError(f"batch has {len(batch)} rows but {self.n_rows} plans were given")
        if self.needs_cache:
            return PlanCache(model, self.groups, self.session)
        return _dynamic_cache_cls()(config=model.hf_model.config)

    def select(self, keep: Sequence[int]) -> None:
        self.groups.select(list(keep))


def forward_with_plans(
    model: KVModel,
    input_ids: Tensor,
    mask: Tensor,
    plans: Sequence[QuantPlan | None],
    *,
    chunk: int | None = None,
    logits_to_keep: int | None = None,
) -> Tensor:
    """Logits of one forward pass (no generation) with per-row plans; ``[batch, pos, vocab]``.

    Cache-mode plans read the quantized cache during this pass (``prefill="quantized"``). With
    ``prefill="full"`` a single pass would never read quantized K/V, so the sequence is fed in chunks of
    ``chunk`` tokens (default 64 when any row has such a plan): each chunk attends to its own K/V in full
    precision and to earlier chunks' quantized K/V. ``logits_to_keep=k``: logits of the last ``k``
    positions only.
    """
    from kvgeom.forward import forward, position_ids_from_mask

    if len(plans) != input_ids.shape[0]:
        raise ValueError(f"{len(plans)} plans for a batch of {input_ids.shape[0]} rows: pass one per row")
    with apply_plans(model, plans) as factory:
        from kvgeom.forward import Batch

        cache = factory(model, Batch(input_ids, mask, [], [0] * len(plans)))
        if chunk is None and any(p is not None and p.mode == "cache" and p.prefill == "full" for p in plans):
            chunk = 64
        if not chunk or chunk >= input_ids.shape[1]:
            return forward(model, input_ids, mask, past_key_values=cache, logits_to_keep=logits_to_keep)
        pos = position_ids_from_mask(mask)
        outs = []
        for start in range(0, input_ids.shape[1], chunk):
            stop = min(start + chunk, input_ids.shape[1])
            outs.append(forward(model, input_ids[:, start:stop], mask[:, :stop], past_key_values=cache,
                                position_ids=pos[:, start:stop], step=0 if start == 0 else 1))
        logits = torch.cat(outs, dim=1)
        return logits[:, -logits_to_keep:] if logits_to_keep else logits
