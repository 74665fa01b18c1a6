"""Plain, loop-based reference implementations used by the quant tests (obviously correct, slow)."""

from __future__ import annotations

import numpy as np
import torch

KV_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
f32 = np.float32


def int_block_ref(values: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """The paper's formulas on one block (1-D fp32 tensor), element by element."""
    out = torch.empty_like(values)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = values.abs().max()
        scale = amax / torch.tensor(float(qmax))
        for i, v in enumerate(values):
            if scale == 0:
                out[i] = 0.0
                continue
            q = torch.round(v / scale)
            q = min(max(q, torch.tensor(-qmax - 1.0)), torch.tensor(float(qmax)))
            out[i] = q * scale
        return out
    levels = 2**bits - 1
    lo, hi = values.min(), values.max()
    scale = torch.clamp((hi - lo) / torch.tensor(float(levels)), min=1e-8)
    zp = torch.clamp(torch.round(-lo / scale), 0, levels)
    for i, v in enumerate(values):
        q = torch.clamp(torch.round(v / scale + zp), 0, levels)
        out[i] = (q - zp) * scale
    return out


def int_ref(x: torch.Tensor, mask: torch.Tensor, bits: int, granularity: str, symmetric: bool, group=None):
    """Loop over the blocks of ``x`` [B, P, H, D] (fp32), ranges over real positions only."""
    out = x.clone()
    B, P, H, D = x.shape
    for b in range(B):
        real = [p for p in range(P) if mask[b, p]]
        if granularity == "tensor":
            vals = torch.stack([x[b, p] for p in real]).flatten()
            res = int_block_ref(vals, bits, symmetric).reshape(len(real), H, D)
            for i, p in enumerate(real):
                out[b, p] = res[i]
        elif granularity == "channel":
            for h in range(H):
                for d in range(D):
                    vals = torch.stack([x[b, p, h, d] for p in real])
                    res = int_block_ref(vals, bits, symmetric)
                    for i, p in enumerate(real):
                        out[b, p, h, d] = res[i]
        else:
            for p in real:
                flat = x[b, p].flatten()
                if granularity == "token":
                    blocks = [range(0, H * D)]
                elif granularity == "head":
                    blocks = [range(h * D, (h + 1) * D) for h in range(H)]
                else:
                    blocks = [range(s, s + group) for s in range(0, H * D, group)]
                res = flat.clone()
                for blk in blocks:
                    idx = list(blk)
                    res[idx] = int_block_ref(flat[idx], bits, symmetric)
                out[b, p] = res.reshape(H, D)
    return out


def best_index_ref(x: np.float32) -> int:
    """ggml best_index_int8 (branchless binary search on exact midpoints)."""
    x2 = f32(x + x)
    idx = 0
    step = 8
    while step > 0:
        j = idx + step
        if x2 >= f32(KV_IQ4NL[j - 1] + KV_IQ4NL[j]):
            idx = j
        step >>= 1
    return idx


def iq4_nl_block_ref(xb: np.ndarray, ntry: int = -1) -> tuple[np.float16, list[int]]:
    """Transcription of ggml ``quantize_row_iq4_nl_impl`` for one block of 32, scalar fp32 arithmetic."""
    xb = xb.astype(np.float32)
    weight = [f32(v * v) for v in xb]
    amax, mx = f32(0), f32(0)
    for v in xb:
        if abs(v) > amax:
            amax, mx = f32(abs(v)), v
    if amax < f32(1e-15):
        codes = [0] * 32
        if ntry > 0:
            codes = [best_index_ref(f32(0) * v) for v in xb]
        return np.float16(0), codes
    d = f32(-mx / f32(KV_IQ4NL[0])) if ntry > 0 else f32(mx / f32(KV_IQ4NL[0]))
    idd = f32(f32(1) / d)
    sumqx, sumq2 = f32(0), f32(0)
    codes = []
    for j, v in enumerate(xb):
        idx = best_index_ref(f32(idd * v))
        codes.append(idx)
        q = f32(KV_IQ4NL[idx])
        sumqx = f32(sumqx + f32(f32(weight[j] * q) * v))
        sumq2 = f32(sumq2 + f32(f32(weight[j] * q) * q))
    d = f32(sumqx / sumq2) if sumq2 > 0 else f32(0)
    best = f32(d * sumqx)
    for itry in range(-ntry, ntry + 1):
        idd = f32(f32(itry + KV_IQ4NL[0]) / mx)
        sumqx, sumq2 = f32(0), f32(0)
        for j, v in enumerate(xb):
            q = f32(KV_IQ4NL[best_index_ref(f32(idd * v))])
            sumqx = f32(sumqx + f32(f32(weight[j] * q) * v))
            sumq2 = f32(sumq2 + f32(f32(weight[j] * q) * q))
        if sumq2 > 0 and f32(sumqx * sumqx) > f32(best * sumq2):
            d = f32(sumqx / sumq2)
            best = f32(d * sumqx)
    if ntry > 0:
        idd = f32(f32(1) / d) if d != 0 else f32(0)
        codes = [best_index_ref(f32(idd * v)) for v in xb]
    return np.float16(d), codes


def pack_iq4_nl(d: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """ggml ``block_iq4_nl`` bytes: fp16 d, then qs[j] = L[j] | L[j+16] << 4."""
    n = d.shape[0]
    d_bytes = d.astype(np.float16).reshape(n, 1).view(np.uint8)
    codes = codes.astype(np.uint8).reshape(n, 32)
    qs = codes[:, :16] | (codes[:, 16:] << 4)
    return np.concatenate([d_bytes, qs], axis=1)


def kivi_group_ref(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """KIVI's group quantizer written out for a 1-D group (fp32)."""
    mn, mx = vals.min(), vals.max()
    scale = (mx - mn) / torch.tensor(float(2**bits - 1))
    if scale == 0:
        return torch.full_like(vals, float(mn))
    out = torch.empty_like(vals)
    for i, v in enumerate(vals):
        q = torch.round(torch.clamp((v - mn) / scale, 0, 2**bits - 1))
        out[i] = q * scale + mn
    return out


def kivi_keys_ref(block: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Keys [T, H, D], T a multiple of ``group``: per (head, dim), groups of ``group`` consecutive tokens."""
    out = block.clone()
    T, H, D = block.shape
    for s in range(0, T, group):
        for h in range(H):
            for d in range(D):
                out[s : s + group, h, d] = kivi_group_ref(block[s : s + group, h, d], bits)
    return out


def kivi_values_ref(tok: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Values of one token [H, D]: per head, groups of ``group`` consecutive channels."""
    out = tok.clone()
    H, D = tok.shape
    for h in range(H):
        for s in range(0, D, group):
            out[h, s : s + group] = kivi_group_ref(tok[h, s : s + group], bits)
    return out
