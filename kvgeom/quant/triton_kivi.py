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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .scheme import KIVISpec, Role
from .triton_kernels import _IO, MAX_BLOCK, _io, _load, _rint, _store

#: launch shapes. ``k_loop``: keys by the row-loop kernel (each program walks its G slots one row at a time:
#: the per-channel min/max stay in registers, no cross-warp reduction) instead of one [G, BC] tile: 0.447 ms
#: against 0.593 ms on [64, 2048, 8, 128] bf16 on an H200 (``benchmarks/triton_tune.py``, best of each).
#: Only the settings the CUDA bit-identity tests ran with are known safe: in that sweep the tile kernel at
#: k_elems=32768, k_warps=16 gave different bits (Triton 3.6; docs/benchmarks.md §2). Tried and measured no
#: better on the H200: unrolling the row loop (``tl.static_range``: 0.626 ms against 0.466 ms) and the values
#: kernel on a (slot group, batch row) grid without 64-bit divisions (0.336-0.357 ms against 0.351 ms).
KIVI_TUNE = {"perm_chunk": 1024, "k_elems": 4096, "k_warps": 4, "k_loop": True, "k_loop_cols": 256,
             "k_loop_warps": 2, "v_elems": 1024, "v_warps": 2}


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
def _kivi_quant(x, lane, AXIS: tl.constexpr, QMAX: tl.constexpr):
    """:func:`kvgeom.quant.kivi.quant_groups` along ``AXIS`` (``lane``: the group's members)."""
    mn = tl.min(tl.where(lane, x, float("inf")), axis=AXIS, keep_dims=True)
    mx = tl.max(tl.where(lane, x, float("-inf")), axis=AXIS, keep_dims=True)
    scale = tl.math.div_rn(mx - mn, QMAX)
    nz = scale > 0.0
    safe = tl.where(nz, scale, 1.0)
    q = _rint(tl.minimum(tl.maximum(tl.math.div_rn(x - mn, safe), 0.0), QMAX))
    return tl.where(nz, q * scale + mn, mn)


@triton.jit
def _keys_kernel(x_ptr, out_ptr, perm_ptr, n_ptr, P, L, NJ, G: tl.constexpr, GP: tl.constexpr, BC: tl.constexpr,
                 R: tl.constexpr, QMAX: tl.constexpr, IO: tl.constexpr, HAS_MASK: tl.constexpr):
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
    quant = j * G + G <= (n // R) * R
    ok = slot_ok[:, None] & (cols < L)[None, :]
    offs = (b.to(tl.int64) * P + pos)[:, None] * L + cols[None, :]
    x, raw = _load(x_ptr, offs, ok, IO)
    x = tl.where(quant, x, 0.0)
    y = _kivi_quant(x, slot_ok[:, None], 0, QMAX)
    _store(out_ptr, offs, ok, y, raw, quant, IO)


@triton.jit
def _keys_loop_kernel(x_ptr, out_ptr, perm_ptr, n_ptr, P, L, NJ, G: tl.constexpr, BC: tl.constexpr,
                      R: tl.constexpr, QMAX: tl.constexpr, IO: tl.constexpr, HAS_MASK: tl.constexpr):
    """As :func:`_keys_kernel`, one slot (row of ``BC`` columns) at a time: min/max, then quantize and store."""
    pid = tl.program_id(0)
    b = pid // NJ
    j = pid % NJ
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = cols < L
    if HAS_MASK:
        n = tl.load(n_ptr + b)
    else:
        n = P
    quant = j * G + G <= (n // R) * R
    mn = tl.full([BC], float("inf"), tl.float32)
    mx = tl.full([BC], float("-inf"), tl.float32)
    for t in range(G):
        s = j * G + t
        if HAS_MASK:
            pos = tl.load(perm_ptr + b.to(tl.int64) * P + s, mask=s < P, other=0)
        else:
            pos = s
        ok = col_ok & (s < P)
        x, _ = _load(x_ptr, (b.to(tl.int64) * P + pos) * L + cols, ok, IO)
        x = tl.where(quant, x, 0.0)
        mn = tl.minimum(mn, tl.where(s < P, x, float("inf")))
        mx = tl.maximum(mx, tl.where(s < P, x, float("-inf")))
    scale = tl.math.div_rn(mx - mn, QMAX)
    nz = scale > 0.0
    safe = tl.where(nz, scale, 1.0)
    for t in range(G):
        s = j * G + t
        if HAS_MASK:
            pos = tl.load(perm_ptr + b.to(tl.int64) * P + s, mask=s < P, other=0)
        else:
            pos = s
        ok = col_ok & (s < P)
        offs = (b.to(tl.int64) * P + pos) * L + cols
        x, raw = _load(x_ptr, offs, ok, IO)
        x = tl.where(quant, x, 0.0)
        q = _rint(tl.minimum(tl.maximum(tl.math.div_rn(x - mn, safe), 0.0), QMAX))
        y = tl.where(nz, q * scale + mn, mn)
        _store(out_ptr, offs, ok, y, raw, quant, IO)


@triton.jit
def _values_kernel(x_ptr, out_ptr, perm_ptr, n_ptr, n_groups, P, NB: tl.constexpr, G: tl.constexpr,
                   GP: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr, QMAX: tl.constexpr, IO: tl.constexpr,
                   HAS_MASK: tl.constexpr):
    """``BLOCK`` groups of G channels (``NB`` per slot) per program."""
    blk = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    blk_ok = blk < n_groups
    slot = blk // NB  # b*P + s
    k = blk % NB
    b = slot // P
    s = slot % P
    if HAS_MASK:
        pos = tl.load(perm_ptr + slot, mask=blk_ok, other=0)
        n = tl.load(n_ptr + b, mask=blk_ok, other=0)
    else:
        pos = s
        n = P
    quant = blk_ok & (s + R < n)
    e = tl.arange(0, GP)
    lane = (e < G)[None, :]
    ok = blk_ok[:, None] & lane
    offs = ((b * P + pos) * NB + k)[:, None] * G + e[None, :]
    x, raw = _load(x_ptr, offs, ok, IO)
    x = tl.where(quant[:, None], x, 0.0)
    y = _kivi_quant(x, lane, 1, QMAX)
    _store(out_ptr, offs, ok, y, raw, quant[:, None], IO)


def kivi_supported(x: Tensor, spec: KIVISpec) -> bool:
    """Shape conditions (device/dtype checked by the caller): G divides d_head and R, as eager requires."""
    g, r = spec.group_size, spec.residual
    return g >= 1 and x.shape[3] % g == 0 and r >= g and r % g == 0 and triton.next_power_of_2(g) <= MAX_BLOCK


def kivi_fused(x: Tensor, out: Tensor, mask: Tensor | None, spec: KIVISpec, role: Role) -> None:
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
    if role == "k" and KIVI_TUNE["k_loop"]:
        bc = min(triton.next_power_of_2(L), KIVI_TUNE["k_loop_cols"])
        nj = triton.cdiv(P, G)
        _keys_loop_kernel[(B * nj, triton.cdiv(L, bc))](
            _io(x), _io(out), perm, n, P, L, nj, G=G, BC=bc, R=R, QMAX=qmax, IO=_IO[x.dtype], HAS_MASK=has_mask,
            num_warps=KIVI_TUNE["k_loop_warps"], enable_fp_fusion=False)
    elif role == "k":
        bc = min(triton.next_power_of_2(L), max(16, KIVI_TUNE["k_elems"] // gp))
        nj = triton.cdiv(P, G)
        _keys_kernel[(B * nj, triton.cdiv(L, bc))](
            _io(x), _io(out), perm, n, P, L, nj, G=G, GP=gp, BC=bc, R=R, QMAX=qmax, IO=_IO[x.dtype],
            HAS_MASK=has_mask, num_warps=KIVI_TUNE["k_warps"], enable_fp_fusion=False)
    else:
        block = max(1, KIVI_TUNE["v_elems"] // gp)
        n_groups = B * P * (L // G)
        _values_kernel[(triton.cdiv(n_groups, block),)](
            _io(x), _io(out), perm, n, n_groups, P, NB=L // G, G=G, GP=gp, BLOCK=block, R=R, QMAX=qmax,
            IO=_IO[x.dtype], HAS_MASK=has_mask, num_warps=min(16, max(KIVI_TUNE["v_warps"], gp * block // 512)),
            enable_fp_fusion=False)
