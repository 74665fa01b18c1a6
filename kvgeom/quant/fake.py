"""``fake_quant``: quantize-dequantize K or V ``[batch, pos, kv_head, d_head]`` with a scheme (stateless).

Math is fp32; the output has the input's shape and dtype. Padding positions (``mask`` False) are returned
unchanged and never enter a range, so a row's result never depends on other rows or on padding.

On CUDA, when Triton is installed, the schemes :mod:`kvgeom.quant.triton_kernels` covers run as fused
kernels giving the same bits as the eager torch ops (``backend="auto"``); ``backend="eager"`` forces the
torch ops, ``backend="triton"`` the kernels (an error where none covers the scheme).
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor

from .fp8 import fp8_apply, fp8_scale
from .ggml import QK, ggml_fake_quant
from .hadamard import fwht, rotation_block
from .kivi import kivi_fake_quant
from .scheme import BaseSpec, CastSpec, FP8Spec, GGMLSpec, IntSpec, KIVISpec, Role, Scheme
from .uniform import int_fake_quant

KV = Float[Tensor, "batch pos kv_head d_head"]
Backend = Literal["auto", "eager", "triton"]
_CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@cache
def _triton_kernels():
    """The kernel module, or None when Triton is not installed (imported once, on first use)."""
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _fused(x: KV, mask: Tensor | None, spec: BaseSpec, role: Role, backend: Backend) -> KV | None:
    if backend == "eager" or (backend == "auto" and not x.is_cuda):
        return None
    kernels = _triton_kernels()
    if backend == "auto" and kernels is not None and isinstance(spec, kernels.OPT_IN):
        return None  # a kernel not yet run on a GPU: only on request (backend="triton")
    out = kernels.fused_fake_quant(x, spec, role, mask) if kernels is not None else None
    if out is None and backend == "triton":
        why = "Triton is not installed" if kernels is None else "no Triton kernel covers it"
        raise ValueError(f"backend='triton' for {spec} on {x.dtype} {x.device} {tuple(x.shape)}: {why}")
    return out


def resolve_spec(scheme: Scheme | BaseSpec | str, role: Role) -> BaseSpec:
    """The base spec ``scheme`` applies to ``role`` (parsing strings; raises ValueError on bad input)."""
    if role not in ("k", "v"):
        raise ValueError(f"role must be 'k' (keys) or 'v' (values), got {role!r}")
    return Scheme.parse(scheme).for_role(role)  # type: ignore[arg-type]


def check_input(x: Tensor, mask: Tensor | None, role: Role, site: str | None,
                check_finite: bool = True) -> Bool[Tensor, "batch pos"]:
    """Validate shape/mask, refuse NaN/inf at real positions; return the mask (all True if None).

    ``check_finite=False`` skips the NaN/inf test (it needs a device-to-host sync; callers on GPU check
    once per batch instead, see :mod:`kvgeom.quant.plan`)."""
    if x.ndim != 4:
        raise ValueError(
            f"K/V must be laid out [batch, pos, kv_head, d_head] (4 dims), got shape {tuple(x.shape)}"
            + (f" at site {site!r}" if site else "")
        )
    if not x.is_floating_point():
        raise ValueError(f"K/V must be a floating-point tensor, got {x.dtype}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    elif mask.shape != x.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor [batch, pos] = {tuple(x.shape[:2])} (True = real position), got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    if not check_finite:
        return mask
    bad = ~torch.isfinite(x) & mask[:, :, None, None]
    if bool(bad.any()):
        n_nan = int((torch.isnan(x) & bad).sum())
        b, p = (int(i) for i in bad.nonzero()[0][:2])
        where = f"site {site!r}" if site else "an unnamed site (pass site=... to name it)"
        raise ValueError(
            f"non-finite {role.upper()} at {where}: {n_nan} NaN and {int(bad.sum()) - n_nan} inf values at "
            f"real positions (first at batch {b}, pos {p}); quantization ranges would be poisoned. Fix the "
            f"upstream activations (e.g. fp16 overflow: run the model in fp32/bf16) or mask those "
            f"positions out."
        )
    return mask


def ggml_kv(x: KV, spec: GGMLSpec, role: Role) -> KV:
    """llama.cpp type on blocks of 32 along d_head (fp32), with the optional Hadamard rotation."""
    d_head = x.shape[-1]
    if d_head % QK != 0:
        raise ValueError(
            f"llama.cpp type {spec.qtype} quantizes blocks of {QK} values along d_head, but "
            f"d_head={d_head} is not a multiple of {QK}; llama.cpp refuses such a cache type for this "
            f"model, so pick another scheme"
        )
    n_rot = rotation_block(d_head, role) if spec.rotate else 0
    y = fwht(x, n_rot) if n_rot else x
    blocks = rearrange(y, "b p h (n k) -> (b p h n) k", k=QK)
    y = ggml_fake_quant(blocks.contiguous(), spec.qtype).reshape(x.shape)
    return fwht(y, n_rot) if n_rot else y


def quantize_fp32(x: KV, mask: Bool[Tensor, "batch pos"], spec: BaseSpec, role: Role) -> KV:
    """Dispatch on the spec; ``x`` fp32 with padding already zeroed. Padding outputs are arbitrary."""
    if isinstance(spec, CastSpec):
        return x if spec.dtype == "none" else x.to(_CAST[spec.dtype]).to(torch.float32)
    if isinstance(spec, IntSpec):
        return int_fake_quant(x, mask, spec)
    if isinstance(spec, GGMLSpec):
        return ggml_kv(x, spec, role)
    if isinstance(spec, FP8Spec):
        return fp8_apply(x, fp8_scale(x, mask, spec, role), spec)
    if isinstance(spec, KIVISpec):
        return kivi_fake_quant(x, mask, spec, role)
    raise TypeError(f"unknown scheme spec {spec!r}")


def fake_quant(
    x: KV,
    scheme: Scheme | BaseSpec | str,
    *,
    role: Role = "k",
    mask: Bool[Tensor, "batch pos"] | None = None,
    site: str | None = None,
    check_finite: bool = True,
    backend: Backend = "auto",
) -> KV:
    """Quantize-dequantize keys (``role="k"``) or values (``"v"``) with ``scheme``, statelessly.

    ``mask`` marks real positions (True); padding is returned unchanged and never enters any range.
    Stateful rules use the given sequence as the prefill: ``tensor``/``channel``/``@amax`` ranges are
    measured per row on it, KIVI applies its prefill rule to each row's real tokens (see
    :mod:`kvgeom.quant.kivi`). Raises ValueError (naming ``site``) on NaN/inf at real positions.
    ``backend``: ``"auto"`` (Triton kernels for CUDA tensors where covered, else torch), ``"eager"``
    (torch ops) or ``"triton"``; all give the same bits.
    """
    if backend not in ("auto", "eager", "triton"):
        raise ValueError(f"backend must be 'auto', 'eager' or 'triton', got {backend!r}")
    spec = resolve_spec(scheme, role)
    given = mask
    mask = check_input(x, mask, role, site, check_finite)
    if isinstance(spec, CastSpec) and spec.dtype == "none":
        return x.clone()
    if (out := _fused(x, given, spec, role, backend)) is not None:  # no mask given: kernels without mask loads
        return out
    m4 = mask[:, :, None, None]
    xf = torch.where(m4, x.to(torch.float32), 0.0)
    out = quantize_fp32(xf, mask, spec, role)
    return torch.where(m4, out.to(x.dtype), x)
