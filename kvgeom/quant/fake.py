"""``fake_quant``: quantize-dequantize K or V ``[batch, pos, kv_head, d_head]`` with a scheme (stateless).

Math is fp32; the output has the input's shape and dtype. Padding positions (``mask`` False) are returned
unchanged and never enter a range, so a row's result never depends on other rows or on padding. Each
format does its own math (:meth:`kvgeom.quant.formats.KVFormat.quantize`).

On CUDA, when Triton is installed, a format's fused kernel (:meth:`~kvgeom.quant.formats.KVFormat.kernel`,
run by :mod:`kvgeom.quant.triton.dispatch`) gives the same bits as the eager torch ops (``backend="auto"``);
``backend="eager"`` forces the torch ops, ``backend="triton"`` the kernels (an error where none covers the
scheme). Proved by ``tests/quant/test_quant_fake.py`` (dispatch) and ``tests/quant/test_triton_kernels.py``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kvgeom.deprecation import moved

from .formats import KVFormat, Role
from .kernels import fused_auto, triton_package
from .scheme import Scheme

KV = Float[Tensor, "batch pos kv_head d_head"]
Backend = Literal["auto", "eager", "triton"]


def _dispatch() -> ModuleType | None:
    """:mod:`kvgeom.quant.triton.dispatch`, or None when Triton is not installed."""
    package = triton_package()
    return None if package is None else package.dispatch


def _fused(x: KV, mask: Tensor | None, spec: KVFormat, role: Role, backend: Backend) -> KV | None:
    if backend == "eager":
        return None
    if backend == "auto":  # CUDA only; a kernel not yet run on a GPU (OPT_IN) only on request (backend="triton")
        return fused_auto(x, spec, role, mask)
    kernels = _dispatch()
    out = kernels.fused_fake_quant(x, spec, role, mask) if kernels is not None else None
    if out is None and backend == "triton":
        why = "Triton is not installed" if kernels is None else "no Triton kernel covers it"
        raise ValueError(f"backend='triton' for {spec} on {x.dtype} {x.device} {tuple(x.shape)}: {why}")
    return out


def resolve_spec(scheme: Scheme | KVFormat | str, role: Role) -> KVFormat:
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


def quantize_fp32(x: KV, mask: Bool[Tensor, "batch pos"], spec: KVFormat, role: Role) -> KV:
    """The format's eager math; ``x`` fp32 with padding already zeroed. Padding outputs are arbitrary."""
    return spec.quantize(x, mask, role)


def fake_quant(
    x: KV,
    scheme: Scheme | KVFormat | str,
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
    if spec.is_identity:
        return x.clone()
    if (out := _fused(x, given, spec, role, backend)) is not None:  # no mask given: kernels without mask loads
        return out
    m4 = mask[:, :, None, None]
    xf = torch.where(m4, x.to(torch.float32), 0.0)
    out = spec.quantize(xf, mask, role)
    return torch.where(m4, out.to(x.dtype), x)


#: moved to the format that uses it
__getattr__ = moved(__name__, {"ggml_kv": "kvgeom.quant.formats.ggml"})
