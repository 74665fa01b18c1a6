"""What a batch row runs under: :class:`QuantPlan`, a value (scheme, layers, protected channels, site, mode).

Running plans is the runtime's job: :mod:`kvgeom.runtime.plans` (``apply_plans``, ``forward_with_plans``,
``PlanCache``) installs them as hooks or a quantizing cache, and ``kvgeom.generate(..., plans=...)`` does it
for you. Two modes:

* ``forward`` -- the paper's authors' semantics: fake-quantize the K/V produced by each forward call
  (the whole prompt at prefill, then each new token on its own at each decode step), through the K/V
  hooks (site ``rot_k``: post-RoPE keys, or ``k``: pre-RoPE keys as the authors' k_proj hooks; values
  at ``v``). Stateless: ``tensor``/``channel`` ranges are those of each call.
* ``cache`` -- serving semantics: what enters the KV cache is quantized with the scheme's streaming rules
  (:class:`kvgeom.quant.StreamQuantizer`), see :mod:`kvgeom.runtime.plans`. The cache receives post-RoPE
  keys, so cache mode always quantizes post-RoPE keys (a plan with ``mode="cache", site="k"`` is refused).

Protected channels (``protect_channels={layer: [(head, dim), ...]}``) keep full precision in the keys.

``query`` (mode ``cache``, llama.cpp K types only; default None: Q exact) also simulates the query side of
llama.cpp's CPU flash attention, which converts Q to q8_0 before ``Q·K`` (:mod:`kvgeom.quant.query`; the
runtime applies it at hook site ``rot_q``, ``tests/runtime/test_query_plan.py``).
Validation (layers, channels, sites, and schemes the model's heads cannot take) and labels are tested in
``tests/runtime/test_plan.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kvgeom.deprecation import moved

from .query import check_query, query_spec_error
from .scheme import Scheme

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["Mode", "QuantPlan", "normalise_channels"]

Mode = Literal["forward", "cache"]


def normalise_channels(value: Any) -> tuple[tuple[int, tuple[tuple[int, int], ...]], ...]:
    """``{layer: [(head, dim), ...]}`` (or the tuple form a :class:`QuantPlan` holds) as sorted tuples, each channel
    once, layers without channels dropped: the one canonical form plans and mitigation candidates compare by."""
    if not value:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for layer, chans in sorted((int(k), v) for k, v in items):
        pairs = tuple(sorted({(int(h), int(d)) for h, d in chans}))
        if pairs:
            out.append((layer, pairs))
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
        query: mode ``cache`` only: ``None`` (Q exact), or how Q is quantized before ``Q·K`` in the quantized
            layers as llama.cpp's CPU flash attention does (``"q8_0"``, ``"q8_0-avx2"``, ``"engine"``; see
            :mod:`kvgeom.quant.query`), on the quantized layers whose K is a llama.cpp type (as llama.cpp, which
            converts Q to q8_0 only for a quantized K); a plan with no such layer is refused.
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
    query: str | None = None
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
            object.__setattr__(self, "protect_channels", normalise_channels(self.protect_channels))
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
        check_query(self.query)
        if self.query is not None and self.mode != "cache":
            raise ValueError(f"query={self.query!r} simulates llama.cpp's flash attention reading its KV cache: use "
                             "mode='cache' (or drop query=)")
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
    def per_position(self) -> bool:
        """Whether what this plan stores at a position depends on that position's K/V alone: every scheme it uses
        quantizes each position on its own for K and V (its cache rule is ``stateless``: not KIVI, HF quanto, nor a
        range over positions such as ``tensor``, ``channel`` or ``@amax``), and in mode ``cache`` the prefill reads the
        quantized cache (``prefill="full"`` attends a call's own positions raw, so splitting a call changes what it
        reads). Then the tokens every prompt of a batch starts with can be run once per plan
        (:mod:`kvgeom.runtime.prefix`)."""
        if self.mode == "cache" and self.prefill != "quantized":
            return False
        return all(sch.for_role(role).cache_rule(role).stateless  # type: ignore[arg-type]
                   for sch in dict.fromkeys((self.scheme, *(s for _, s in self.layer_schemes))) for role in ("k", "v"))

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
        if self.query is not None:
            parts.append(f"query={self.query}")
        return " ".join(parts)

    def validate(self, model: KVModel) -> None:
        """Raise ValueError (naming the plan) where it does not fit ``model``: a layer or protected channel out of
        range, a scheme its heads cannot take (:meth:`Scheme.check_shape`), a site the bridge does not fire."""
        for sch in dict.fromkeys((self.scheme, *(s for _, s in self.layer_schemes))):
            try:
                sch.check_shape(n_kv_heads=model.n_kv_heads, d_head=model.d_head)
            except ValueError as err:
                raise ValueError(f"plan {self.label!r} does not apply to {model.name} (d_head {model.d_head}, "
                                 f"{model.n_kv_heads} KV heads): {err}") from None
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
        if self.query is not None:
            errs = [query_spec_error(sch.for_role("k"))
                    for sch in dict.fromkeys((self.scheme, *(s for _, s in self.layer_schemes)))]
            if all(errs):  # query= acts on the layers whose K is a llama.cpp type: here there are none
                raise ValueError(f"plan {self.label!r}: {errs[0]}")
            if "rot_q" not in model.sites_available:
                raise ValueError(f"plan {self.label!r}: query= needs the post-RoPE queries (hook site 'rot_q'), "
                                 f"which the bridge does not fire for {model.facts.architecture}; drop query=")
        if self.mode == "forward" and self.site not in model.sites_available:
            raise ValueError(f"plan {self.label!r}: site {self.site!r} is not available for "
                             f"{model.facts.architecture}; use site='k' or mode='cache'")


#: The runtime half moved to :mod:`kvgeom.runtime.plans` (quant holds values and quantizers only).
__getattr__ = moved(__name__, {name: "kvgeom.runtime.plans" for name in (
    "PlanCache", "PlanRun", "RowGroups", "apply_plans", "forward_with_plans", "normalise_plans")})
