"""Fused Triton KIVI (forward mode, stateless prefill rule), bit-identical to :func:`kvgeom.quant.kivi.kivi_fake_quant`.

Groups run over each row's *real* tokens in order (any mask, not only left padding): a first tiny kernel writes,
per batch row, the permutation ``perm[b, s]`` = position of the ``s``-th real token (``s < n[b]``), followed by
the padding positions, and ``n[b]``, all on the device (no host sync). The data kernels then walk the slots
``s`` of each row, each element read and written once:

* keys: per (head, channel), groups of G consecutive slots, quantized while the group ends within the leading
  ``(n // R) * R`` slots (R is a multiple of G, so groups never straddle that boundary);
* values: per slot, groups of G channels (G divides d_head), quantized for slots ``s < n - R``;

everything else (full-precision tail, padding) is copied unchanged. Per group, in fp32 as eager does it:
``scale = (mx - mn)/M`` (IEEE division, ``M = 2^b - 1``), ``q = round(clamp((x - mn)/safe, 0, M))``,
``x̂ = q*scale + mn`` (two roundings: kernels run with ``enable_fp_fusion=False``), or ``mn`` if ``scale == 0``.
The division is :func:`~kvgeom.quant.triton.common.fast_div` on the GPU where every scale of a program
allows it (one reciprocal per group), else ``div_rn``.

Proved by ``tests/quant/test_triton_kernels.py`` (``test_kivi_*``: masks left-padded and scattered, ties,
constant groups, tile shapes, against eager).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import IO_CODES, MAX_BLOCK, divide, divisor, io_view, load, store

__all__ = ["KIVI_TUNE", "KIVIKernel", "kivi_fused", "kivi_supported"]

#: launch shapes and the division (performance only: results do not depend on them), tuned on an H200 with
#: ``benchmarks/triton_tune.py`` (docs/benchmarks.md §2). ``fast_div``: divide by a per-group reciprocal
#: (:func:`~kvgeom.quant.triton.common.fast_div`), on the GPU only. Only the shapes the CUDA bit-identity tests
#: ran with are known safe: in one sweep the key kernel at k_elems=32768, k_warps=16 gave different bits (Triton 3.6).
KIVI_TUNE = {"perm_chunk": 1024, "k_elems": 2048, "k_warps": 1, "v_elems": 1024, "v_warps": 2, "fast_div": True}


@triton.jit
def _perm_kernel(mask_ptr, perm_ptr, n_ptr, P, CH: tl.constexpr):
    """Row ``b``: ``n[b]`` real positions; ``perm[b]`` lists them in order, then the padding positions."""
    b = tl.program_id(0).to(tl.int64)
    tot = tl.zeros([CH], tl.int32)
    # while loops (the interpreter's range() cannot take a runtime bound under numpy 2); p0 starts as a tensor
    # so that it stays one even when P == 1 is specialized to a constexpr
    p0 = tl.program_id(0) * 0
    while p0 < P:
        pos = p0 + tl.arange(0, CH)
        tot += (tl.load(mask_ptr + b * P + pos, mask=pos < P, other=0) != 0).to(tl.int32)
        p0 += CH
    n = tl.sum(tot, axis=0)
    done_real = n * 0
    done_pad = n * 0
    p0 = tl.program_id(0) * 0
    while p0 < P:
        pos = p0 + tl.arange(0, CH)
        ok = pos < P
        m = (tl.load(mask_ptr + b * P + pos, mask=ok, other=0) != 0).to(tl.int32)
        pad = ok.to(tl.int32) - m
        slot = tl.where(m != 0, done_real + tl.cumsum(m, axis=0) - 1, n + done_pad + tl.cumsum(pad, axis=0) - 1)
        tl.store(perm_ptr + b * P + slot, pos, mask=ok)
        done_real += tl.sum(m, axis=0)
        done_pad += tl.sum(pad, axis=0)
        p0 += CH
    tl.store(n_ptr + b, n)


@triton.jit
def _kivi_quant(x, lane, AXIS: tl.constexpr, QMAX: tl.constexpr, FAST: tl.constexpr):
    """:func:`kvgeom.quant.kivi.quant_groups` along ``AXIS`` (``lane``: the group's members)."""
    mn = tl.min(tl.where(lane, x, float("inf")), axis=AXIS, keep_dims=True)
    mx = tl.max(tl.where(lane, x, float("-inf")), axis=AXIS, keep_dims=True)
    scale = tl.math.div_rn(mx - mn, QMAX)
    nz = scale > 0.0
    safe = tl.where(nz, scale, 1.0)
    r, fast = divisor(safe, safe, FAST)  # quotients are at most ~M: the bound is the divisor's own range
    t = divide(x - mn, safe, r, fast, FAST, False)  # x - mn >= 0: no sign to keep
    # round half to even of a value in [0, M] (or -0): no sign or range handling needed. A -0 quotient (x = -0,
    # mn = +0) becomes +0 here, which changes nothing: q * scale + mn is +0 for either sign
    q = (tl.minimum(tl.maximum(t, 0.0), QMAX) + 8388608.0) - 8388608.0
    return tl.where(nz, q * scale + mn, mn)


@triton.jit
def _copy(x_ptr, out_ptr, offs, ok):
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=ok), mask=ok)


@triton.jit
def _keys_kernel(x_ptr, out_ptr, perm_ptr, n_ptr, P, L, NJ, G: tl.constexpr, GP: tl.constexpr, BC: tl.constexpr,
                 R: tl.constexpr, QMAX: tl.constexpr, IO: tl.constexpr, HAS_MASK: tl.constexpr,
                 FAST: tl.constexpr):
    """Program (row b, slot group j, column block): the G slots ``j*G ...`` of row b, ``BC`` columns."""
    pid = tl.program_id(0)
    b = pid // NJ
    j = pid % NJ
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    e = tl.arange(0, GP)
    s = j * G + e
    slot_ok = (e < G) & (s < P)
    if HAS_MASK:
        pos = tl.load(perm_ptr + b.to(tl.int64) * P + s, mask=slot_ok, other=0)
        n = tl.load(n_ptr + b)
    else:
        pos = s
        n = P
    ok = slot_ok[:, None] & (cols < L)[None, :]
    offs = (b.to(tl.int64) * P + pos)[:, None] * L + cols[None, :]
    if j * G + G <= (n // R) * R:  # the group is quantized (whole groups only: R is a multiple of G)
        x, raw = load(x_ptr, offs, ok, IO)
        y = _kivi_quant(x, (e < G)[:, None], 0, QMAX, FAST)  # every slot of the group is real here
        store(out_ptr, offs, ok, y, raw, True, IO)
    else:  # full-precision tail, padding
        _copy(x_ptr, out_ptr, offs, ok)


@triton.jit
def _values_kernel(x_ptr, out_ptr, perm_ptr, n_ptr, P, NB: tl.constexpr, NKB: tl.constexpr, G: tl.constexpr,
                   GP: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr, QMAX: tl.constexpr, IO: tl.constexpr,
                   HAS_MASK: tl.constexpr, FAST: tl.constexpr):
    """Program (slot, block): ``BLOCK`` of the ``NB`` groups of G channels of one slot (``NKB`` blocks per slot)."""
    pid = tl.program_id(0).to(tl.int64)
    slot = pid // NKB  # b*P + s
    k = (pid % NKB) * BLOCK + tl.arange(0, BLOCK)
    b = slot // P
    s = slot % P
    if HAS_MASK:
        pos = tl.load(perm_ptr + slot)
        n = tl.load(n_ptr + b)
    else:
        pos = s
        n = P
    e = tl.arange(0, GP)
    lane = (e < G)[None, :]
    ok = (k < NB)[:, None] & lane
    offs = ((b * P + pos) * NB + k)[:, None] * G + e[None, :]
    if s + R < n:
        x, raw = load(x_ptr, offs, ok, IO)
        store(out_ptr, offs, ok, _kivi_quant(x, lane, 1, QMAX, FAST), raw, True, IO)
    else:  # full-precision tail, padding
        _copy(x_ptr, out_ptr, offs, ok)


@dataclass(frozen=True)
class KIVIKernel:
    """KIVI's kernels for ``bits``, group size ``group_size`` and residual length ``residual``."""

    bits: int
    group_size: int
    residual: int

    def supported(self, x: Tensor) -> bool:
        return kivi_supported(x, self)

    def launch(self, x: Tensor, out: Tensor, mask: Tensor | None, role: str) -> None:
        kivi_fused(x, out, mask, self, role)


def kivi_supported(x: Tensor, spec: KIVIKernel) -> bool:
    """Shape conditions (device/dtype checked by the caller): G divides d_head and R, as eager requires."""
    g, r = spec.group_size, spec.residual
    return g >= 1 and x.shape[3] % g == 0 and r >= g and r % g == 0 and triton.next_power_of_2(g) <= MAX_BLOCK


def kivi_fused(x: Tensor, out: Tensor, mask: Tensor | None, spec: KIVIKernel, role: str) -> None:
    """Write KIVI's forward-mode result for contiguous ``x`` into ``out`` (mask: uint8 view or None)."""
    B, P, H, D = x.shape
    L, G, R = H * D, spec.group_size, spec.residual
    gp = triton.next_power_of_2(G)
    has_mask = mask is not None
    if has_mask:
        perm = torch.empty((B, P), dtype=torch.int32, device=x.device)
        n = torch.empty((B,), dtype=torch.int32, device=x.device)
        ch = min(KIVI_TUNE["perm_chunk"], triton.next_power_of_2(P))
        _perm_kernel[(B,)](mask, perm, n, P, CH=ch, num_warps=4)
    else:
        perm = n = x  # placeholders, never read
    qmax = float(2**spec.bits - 1)
    fast = KIVI_TUNE["fast_div"] and x.is_cuda  # inline PTX (rcp): the interpreter cannot run it
    if role == "k":
        bc = min(triton.next_power_of_2(L), max(16, KIVI_TUNE["k_elems"] // gp))
        nj = triton.cdiv(P, G)
        _keys_kernel[(B * nj, triton.cdiv(L, bc))](
            io_view(x), io_view(out), perm, n, P, L, nj, G=G, GP=gp, BC=bc, R=R, QMAX=qmax, IO=IO_CODES[x.dtype],
            HAS_MASK=has_mask, FAST=fast, num_warps=KIVI_TUNE["k_warps"], enable_fp_fusion=False)
    else:
        nb = L // G
        block = min(triton.next_power_of_2(nb), max(1, KIVI_TUNE["v_elems"] // gp))
        nkb = triton.cdiv(nb, block)
        _values_kernel[(B * P * nkb,)](
            io_view(x), io_view(out), perm, n, P, NB=nb, NKB=nkb, G=G, GP=gp, BLOCK=block, R=R, QMAX=qmax,
            IO=IO_CODES[x.dtype], HAS_MASK=has_mask, FAST=fast,
            num_warps=min(16, max(KIVI_TUNE["v_warps"], gp * block // 512)), enable_fp_fusion=False)
