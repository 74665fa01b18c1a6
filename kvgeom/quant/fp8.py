"""vLLM's fp8 KV cache: scale, saturate, cast to fp8, cast back, unscale.

``x̂ = float(fp8(clamp(x/s, -M, M))) * s`` with ``M`` = 448 (``float8_e4m3fn``) or 57344 (``float8_e5m2``),
rounding to nearest-even in the cast (``__nv_cvt_float_to_fp8(x/scale, __NV_SATFINITE, ...)`` in vLLM's
cache kernels). ``s = 1`` by default; ``@amax`` uses vLLM's ``calculate_kv_scales``:
``k_scale = amax(|K|)/200``, ``v_scale = amax(|V|)/100`` (``K_SCALE_CONSTANT`` / ``V_SCALE_CONSTANT``),
measured on the first forward pass and then frozen. vLLM measures over the whole first batch; we measure
per sequence (batch row) over its real positions, so that batching never changes a result. A row whose
amax is 0 gets ``s = 1`` (vLLM would divide by zero).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ._ops import div
from .role import Role

FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
AMAX_DIVISOR = {"k": 200.0, "v": 100.0}
FP8_DTYPE = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


class FP8Fields(Protocol):
    """The fields of an fp8 format this math reads (:class:`kvgeom.quant.formats.FP8Spec` has them)."""

    @property
    def fmt(self) -> Literal["e4m3", "e5m2"]: ...

    @property
    def dynamic(self) -> bool: ...


def fp8_scale(
    x: Float[Tensor, "batch pos kv_head d_head"], mask: Bool[Tensor, "batch pos"], spec: FP8Fields, role: Role
) -> Float[Tensor, "batch 1 1 1"]:
    """Per-row scale: 1, or ``amax/200`` (K) / ``amax/100`` (V) over real positions when ``@amax``."""
    ones = torch.ones(x.shape[0], 1, 1, 1, dtype=torch.float32, device=x.device)
    if not spec.dynamic:
        return ones
    amax = torch.where(mask[:, :, None, None], x.abs(), 0.0).amax(dim=(1, 2, 3), keepdim=True)
    scale = div(amax, AMAX_DIVISOR[role])
    return torch.where(scale > 0, scale, ones)


def fp8_apply(
    x: Float[Tensor, "batch pos kv_head d_head"], scale: Float[Tensor, "batch 1 1 1"], spec: FP8Fields
) -> Float[Tensor, "batch pos kv_head d_head"]:
    """fp32 round trip through the fp8 format with saturation to the largest finite value."""
    fmax = FP8_MAX[spec.fmt]
    y = (x / scale).clamp(-fmax, fmax)
    return y.to(FP8_DTYPE[spec.fmt]).to(torch.float32) * scale
