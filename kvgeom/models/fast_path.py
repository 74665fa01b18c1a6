"""The bridge's linear and normalization components without the work of hook points nobody hooks.

Every projection of the TransformerLens bridge (:class:`LinearBridge`) calls two hook points around its
``nn.Linear``, and every normalization (:class:`NormalizationBridge`, HF's native path) computes the variance,
``rsqrt``, ``sqrt`` and normalized tensor for its ``hook_scale``/``hook_normalized`` and then, when no hook edited
them, throws them away and returns the HF module's own output. A decode step of a 32-layer model makes ~65 such
norms (six extra kernels each) and ~225 linears; on an H200, where a powered audit's decode is bound by the host
launching kernels, that work is pure overhead (docs/benchmarks.md §16).

:func:`use_fast_components` binds :func:`linear_forward` and :func:`norm_forward` to those components. Each checks
its hook points at call time: with none hooked it runs only the wrapped HF module (the result the bridge's forward
returns in that case, bit for bit); with any hooked, and for paths it does not cover (the python-norm path, an
``Identity`` slot, a subclass that changes ``forward``), it runs the bridge's own forward. So hooks added at any time
(``run_with_cache``, kvgeom's K/V hooks on ``hook_v``) fire as before. Proved by ``tests/models/test_fast_path.py``
(identical logits and tokens with and without, every architecture; hooks on a linear's and a norm's points fire and
their edits propagate).
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from torch import Tensor

__all__ = ["is_hooked", "linear_forward", "norm_forward", "use_fast_components"]


def _classes() -> tuple[type, type]:
    from transformer_lens.model_bridge.generalized_components.linear import LinearBridge
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

    return LinearBridge, NormalizationBridge


def is_hooked(point: Any) -> bool:
    """Whether a hook point (a module, or None) has any forward, forward-pre or backward hook attached."""
    return bool(point is not None and (point._forward_hooks or point._forward_pre_hooks or point._backward_hooks))


def linear_forward(self: Any, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """:class:`LinearBridge`'s forward, calling its hook points only when they are hooked (same protocol flags)."""
    if self._suppress_next_hook_in:
        object.__setattr__(self, "_suppress_next_hook_in", False)
    elif is_hooked(self.hook_in):
        input = self.hook_in(input)
    output = self.original_component(input, *args, **kwargs)
    if is_hooked(self.hook_out):
        output = self.hook_out(output)
    object.__setattr__(self, "_fired_hook_out", True)
    return output


def norm_forward(self: Any, hidden_states: Tensor, **kwargs: Any) -> Tensor:
    """:class:`NormalizationBridge`'s native-path forward with no hook point hooked: the HF module's output in the
    input's dtype (what the bridge returns then); anything else runs the bridge's own forward."""
    native = self.use_native_layernorm_autograd or bool(getattr(self.config, "layer_norm_folding", False))
    points = ("hook_in", "hook_out", "hook_scale", "hook_normalized")
    if (not native or isinstance(self.original_component, torch.nn.Identity)
            or any(is_hooked(getattr(self, n, None)) for n in points)):
        return _classes()[1].forward(self, hidden_states, **kwargs)
    out = self.original_component(hidden_states)
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


def use_fast_components(model: Any, on: bool = True) -> dict[str, int]:
    """Bind (``on``) or unbind the fast forwards on every plain linear and normalization component of
    ``model``'s bridge; returns how many of each were bound."""
    linear_cls, norm_cls = _classes()
    count = {"linear": 0, "norm": 0}
    for module in model.bridge.modules():
        for kind, cls, fast in (("linear", linear_cls, linear_forward), ("norm", norm_cls, norm_forward)):
            if isinstance(module, cls):
                vars(module).pop("forward", None)
                if on and type(module).forward is cls.forward:
                    # the bridge's __setattr__ forwards unknown names to the HF module: bind on the component itself
                    object.__setattr__(module, "forward", MethodType(fast, module))
                    count[kind] += 1
    return count
