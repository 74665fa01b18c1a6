"""Cache mode: :class:`PlanCache`, a ``transformers.DynamicCache`` whose update returns K/V as each row's
cache-mode :class:`~kvgeom.quant.QuantPlan` stores them (:mod:`kvgeom.runtime.plans` builds it for a batch).

What the parent class stores is what attention reads. Formats whose stored positions never change after
arrival are quantized on the new positions only, before they enter the cache (a decode step costs the same
however long the history is); KIVI and HF quanto keep their history in their quantizer. On a GPU the rows of every
llama.cpp type of a layer are quantized by one launch (:class:`kvgeom.quant.RowMix`), not one per format
(``tests/quant/test_triton_kernels.py::test_plan_cache_mixes_llama_cpp_rows_with_the_same_bits``). Proved by
``tests/runtime/test_plan.py``: ``test_cache_returns_what_the_stream_quantizer_stores`` (call by call, a row reads
what a lone :class:`~kvgeom.quant.StreamQuantizer` stores), ``test_plans_that_store_a_layer_alike_share_a_unit_and_
equal_separate_runs`` and ``test_nonfinite_kv_in_one_row_flags_that_row_only``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kvgeom.quant.fake import resolve_spec
from kvgeom.quant.plan import QuantPlan
from kvgeom.quant.row_mix import RowMix, mix_code
from kvgeom.quant.stream import StreamQuantizer
from kvgeom.runtime.finite import nonfinite_rows
from kvgeom.runtime.hooks import HookSession
from kvgeom.runtime.row_groups import RowGroups

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["PlanCache", "channel_index", "plan_cache_class"]


@functools.lru_cache(maxsize=4096)
def channel_index(chans: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(heads, dims)`` index tensors of protected channels ``chans`` on ``device``: built once per channel set and
    device (layers of a dispatched model differ in device), never per hook call."""
    return (torch.tensor([h for h, _ in chans], dtype=torch.long).to(device),
            torch.tensor([d for _, d in chans], dtype=torch.long).to(device))



# ---- cache mode: a quantizing DynamicCache ---------------------------------------------------------
class _Unit:
    """The streaming state of one (layer, role, spec, prefill, protected channels): the rows of every plan that
    stores this layer's ``role`` the same way share one :class:`StreamQuantizer` (a row's result does not depend
    on the other rows, so this equals one quantizer per plan, with one set of quantizer calls instead of one per
    plan: the engine matrix's fix candidates differ only in a few layers)."""

    __slots__ = ("quant", "members", "raw", "pending")

    def __init__(self, quant: StreamQuantizer, members: list[tuple[QuantPlan, int]]) -> None:
        self.quant = quant
        self.members = members  # (plan, its rows here), in row order
        self.raw: list[Tensor] = []  # protected key channels as they arrived, per call (unstable rules only)
        self.pending: Tensor | None = None  # prefill="full": the last call's positions, stored from the next call


class _QuantizingCache:
    """The quantizing half of :class:`PlanCache`, mixed in before ``transformers.DynamicCache``.

    What the parent class stores is what attention reads: per (layer, role) the plans that store it the same way
    (same spec, prefill and protected channels) share a :class:`_Unit`, and rows outside every unit stay raw.
    A format whose stored positions never change (``StreamQuantizer.stable``: all but KIVI's and HF quanto's
    rules) is quantized on the new positions only, before they enter the parent's cache, so a decode step costs
    the same however long the history is; ``prefill="full"`` rows enter raw and their positions are overwritten
    with the stored values at the next call. The others keep their history in their quantizer and overwrite
    their rows of the whole history each call.
    """

    def __init__(self, model: KVModel, groups: RowGroups, session: HookSession) -> None:
        super().__init__(config=model.hf_model.config)  # type: ignore[call-arg]
        self._session = session
        self._groups = groups
        self._units: dict[tuple, _Unit] = {}
        self._layout: dict[tuple[int, torch.device], tuple[dict, list]] = {}
        self._mixes: dict[tuple, RowMix | None] = {}
        groups.listeners.append(self.select_groups)

    def _unit_layout(self, layer_idx: int, device: torch.device, n_rows: int, d_head: int) -> tuple[dict, list]:
        """This layer's :class:`~kvgeom.quant.RowMix` per role (the rows of every llama.cpp type quantized by one
        launch, where the device runs one) and its units ``[(role, key, plans, rows index, prefill)]`` for the
        other rows; built once per set of groups."""
        got = self._layout.get((layer_idx, device))
        if got is not None:
            return got
        out, mixes = [], {}
        for role in ("k", "v"):
            members: dict[tuple, list[QuantPlan]] = {}
            for plan in self._groups.groups:
                if plan.mode != "cache" or not plan.quantizes(layer_idx):
                    continue
                spec = resolve_spec(plan.scheme_for(layer_idx), role)
                chans = plan.channels(layer_idx) if role == "k" else ()
                members.setdefault((spec, plan.prefill, chans), []).append(plan)
            row_specs: list = [None] * n_rows
            mixed = {key for key in members
                     if key[1] == "quantized" and not key[2] and mix_code(key[0], role) is not None}
            for key in mixed:
                for p in members[key]:
                    for r in self._groups.groups[p]:
                        row_specs[r] = key[0]
            mix = None
            if mixed:  # layers whose rows store alike share one mix (its codes copied to the device once)
                mkey = (role, tuple(row_specs), device)
                if mkey not in self._mixes:
                    self._mixes[mkey] = RowMix.of(row_specs, role, d_head, device)
                mix = self._mixes[mkey]
            if mix is not None:
                mixes[role] = mix
            for key, plans in members.items():
                if mix is not None and key in mixed:
                    continue  # these rows are the mix's
                idx = [self._groups.index(p, device) for p in plans]
                out.append((role, (layer_idx, role, *key), plans, idx[0] if len(idx) == 1 else torch.cat(idx),
                            key[1]))
        self._layout[(layer_idx, device)] = got = (mixes, out)
        return got

    def _unit(self, key: tuple, plans: list[QuantPlan]) -> _Unit:
        unit = self._units.get(key)
        if unit is None:
            layer_idx, role, spec = key[:3]
            unit = self._units[key] = _Unit(StreamQuantizer(spec, role, site=f"cache layer {layer_idx} {role.upper()}"),
                                            [(p, len(self._groups.groups[p])) for p in plans])
        return unit

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # noqa: ANN001
        mixes, layout = self._unit_layout(layer_idx, key_states.device, key_states.shape[0], key_states.shape[-1])
        if not layout and not mixes:  # per device: dispatched layers may differ
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)  # type: ignore[misc]
        new = key_states.shape[2]
        mask = self._session.call.mask
        m_all = self._session.call.mask_on(key_states.device) if mask is not None and mask.shape[1] == new else None
        raw = {"k": key_states, "v": value_states}
        # rows with NaN/inf at a real position of this call, once per role and call, not per unit: they come out
        # NaN (kvgeom.runtime.finite), whatever a saturating quantizer makes of the bad values
        bad = {r: nonfinite_rows(raw[r].transpose(1, 2), m_all)[:, None, None, None] for r in raw}
        nan = torch.full((), float("nan"), dtype=key_states.dtype, device=key_states.device)
        enc = {}  # what enters the cache: the mix's rows quantized, the others raw until their units run
        for r in raw:
            enc[r] = mixes[r](raw[r].transpose(1, 2), m_all).transpose(1, 2) if r in mixes else raw[r].clone()
        pending, late = [], []
        for role, key, plans, idx, prefill in layout:
            unit = self._unit(key, plans)
            m = m_all[idx] if m_all is not None else None
            x_rows = raw[role][idx].transpose(1, 2)  # [b, new, h, d]
            if not unit.quant.stable:
                late.append((role, unit, idx, x_rows, m, key[4], prefill))
                continue
            if unit.pending is not None:
                pending.append((role, idx, unit.pending))
            q = self._encode_new(unit, x_rows, key[4], m).transpose(1, 2)
            if prefill == "full":  # attended raw now, read as stored from the next call on
                unit.pending = torch.where(bad[role][idx], nan, q)
            else:
                enc[role][idx] = q
        for r in enc:
            enc[r] = torch.where(bad[r], nan, enc[r])
        k_all, v_all = super().update(enc["k"], enc["v"], layer_idx, *args, **kwargs)  # type: ignore[misc]
        out = {"k": k_all, "v": v_all}  # written in place: the parent's storage (or a view of it) is these
        total = k_all.shape[2]
        for role, idx, q_prev in pending:
            n = min(q_prev.shape[2], total - new)  # a sliding-window layer may have dropped older positions
            if n > 0:
                out[role][idx, :, total - new - n: total - new] = q_prev[:, :, -n:]
        for role, unit, idx, x_rows, m, chans, prefill in late:
            stored = (self._append_protected(unit, x_rows, chans, m) if chans else
                      unit.quant.append(x_rows, m, check_finite=False))
            q = stored[:, -total:].transpose(1, 2).to(k_all.dtype)
            if prefill == "full":
                q = q.clone()
                q[:, :, -new:] = raw[role][idx]
            out[role][idx] = torch.where(bad[role][idx], nan, q)
        return k_all, v_all

    @staticmethod
    def _encode_new(unit: _Unit, x_rows: Tensor, chans: tuple, m: Tensor | None) -> Tensor:
        """The stored values of the new positions (a stable rule), protected key channels kept exact."""
        if not chans:
            return unit.quant.append_new(x_rows, m, check_finite=False)
        heads, dims = channel_index(tuple(chans), x_rows.device)
        x0 = x_rows.clone()
        x0[:, :, heads, dims] = 0
        q = unit.quant.append_new(x0, m, check_finite=False)
        q[:, :, heads, dims] = x_rows[:, :, heads, dims]
        return q

    def _append_protected(self, unit: _Unit, x_rows: Tensor, chans: tuple, m: Tensor | None) -> Tensor:
        heads, dims = channel_index(tuple(chans), x_rows.device)
        unit.raw.append(x_rows[:, :, heads, dims].clone())
        x0 = x_rows.clone()
        x0[:, :, heads, dims] = 0
        stored = unit.quant.append(x0, m, check_finite=False).clone()
        stored[:, :, heads, dims] = torch.cat(unit.raw, dim=1).to(stored.dtype)
        return stored

    def select_groups(self, local: dict) -> None:
        """Follow RowGroups.select: keep each unit's surviving rows (each plan's kept rows, at its offset)."""
        self._layout.clear()
        self._mixes.clear()
        for key, unit in list(self._units.items()):
            rows, members, offset = [], [], 0
            for plan, n in unit.members:
                kept = local.get(plan, [])
                rows += [offset + j for j in kept]
                if kept:
                    members.append((plan, len(kept)))
                offset += n
            if not rows:
                del self._units[key]
                continue
            unit.members = members
            idx = torch.tensor(rows)
            unit.quant.select(idx)
            if unit.raw:
                idx = idx.to(unit.raw[0].device)
                unit.raw = [c[idx] for c in unit.raw]
            if unit.pending is not None:
                unit.pending = unit.pending[idx.to(unit.pending.device)]


@functools.cache
def plan_cache_class() -> type:
    """The one ``PlanCache`` class: :class:`_QuantizingCache` over ``transformers.DynamicCache``, defined on
    first use (importing transformers only then) and the same class ever after."""
    from transformers import DynamicCache

    return type("PlanCache", (_QuantizingCache, DynamicCache), {"__module__": __name__,
                                                                 "__doc__": PlanCache.__doc__})


class PlanCache:
    """A ``transformers.DynamicCache`` whose update returns K/V as per-row cache-mode plans store them.

    ``PlanCache(model, groups, session)`` builds an instance of :func:`plan_cache_class` (one class for the
    process, ``tests/runtime/test_plan.py::test_plan_cache_class_is_defined_once``). ``session`` supplies each
    call's real-position mask (prefill: the left-padding mask; decode: all real).
    """

    def __new__(cls, model: KVModel, groups: RowGroups, session: HookSession) -> Any:
        return plan_cache_class()(model, groups, session)
