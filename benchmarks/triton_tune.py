"""Sweep the Triton kernels' launch shapes (``TUNE``, ``KIVI_TUNE``) on the GPU; every result checked bit-identical.

    python benchmarks/triton_tune.py --family kivi range apply block --json out.json

Launch shapes change only speed, never results: each configuration's output is compared with the eager
path by ``torch.equal`` and a configuration that differs is reported (and must never be adopted). Timing is
:func:`quant_triton.bench` (median of back-to-back calls), bytes = one read + one write, as in
``benchmarks/quant_triton.py``. Families (a kernel's knobs, swept with the others at their current values):

* ``kivi``: KIVI keys (``k_elems``, ``k_warps``); ``kivi_v``: values (``v_elems``, ``v_warps``);
* ``range``: the range pass of per-tensor / per-channel / ``@amax`` schemes (``range_*``);
* ``apply``: their elementwise pass (``apply_*``);
* ``block``: per-group schemes (int token/head/group, GGML) (``block_*``).

``fast_div`` (division by a per-divisor reciprocal, ``kvgeom.quant.triton.common.fast_div``) is swept on and
off where it applies.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import pathlib

import torch

from kvgeom.quant import fake_quant
from kvgeom.quant.triton import common as tk
from kvgeom.quant.triton import kivi as tkv

_spec = importlib.util.spec_from_file_location("quant_triton", pathlib.Path(__file__).with_name("quant_triton.py"))
quant_triton = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quant_triton)

FAMILIES = {
    "kivi": (tkv.KIVI_TUNE, [("kivi2", "k")],
             {"k_elems": (1024, 2048, 4096), "k_warps": (1, 2, 4), "fast_div": (False, True)}),
    "kivi_v": (tkv.KIVI_TUNE, [("kivi2", "v")],
               {"v_elems": (512, 1024, 2048), "v_warps": (1, 2, 4), "fast_div": (False, True)}),
    "range": (tk.TUNE, [("int4-tensor-asym", "k"), ("int8-channel-asym", "k")],
              {"range_chunk": (128, 256, 512, 1024), "range_bp": (8, 16, 32), "range_bc": (256, 512),
               "range_warps": (4, 8)}),
    "apply": (tk.TUNE, [("int4-tensor-asym", "k"), ("int8-channel-asym", "k"), ("fp8_e4m3@amax", "k")],
              {"apply_bc": (256, 512, 1024), "apply_elems": (1024, 2048, 4096), "apply_warps": (2, 4),
               "fast_div": (True,)}),
    "block": (tk.TUNE, [("int4-token-asym", "k"), ("q4_0", "k"), ("q5_0", "k")],
              {"block_elems": (1024, 2048, 4096), "block_warps": (2, 4), "fast_div": (False, True)}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", nargs="+", default=["kivi", "kivi_v", "range", "apply", "block"],
                    choices=sorted(FAMILIES))
    ap.add_argument("--shape", type=int, nargs=4, default=[64, 2048, 8, 128])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    x = torch.randn(*args.shape, device=args.device, dtype=getattr(torch, args.dtype))
    x[:, :, 0, :4] *= 30  # outlier channels, as in quant_triton.py
    nbytes = 2 * x.numel() * x.element_size()
    rows = []
    for fam in args.family:
        table, jobs, grid = FAMILIES[fam]
        saved = dict(table)
        refs = {(s, r): fake_quant(x, s, role=r, check_finite=False, backend="eager") for s, r in jobs}
        try:
            for values in itertools.product(*grid.values()):
                cfg = dict(zip(grid, values, strict=True))
                table.update(cfg)
                for s, r in jobs:
                    def fn(t, _s=s, _r=r):
                        return fake_quant(t, _s, role=_r, check_finite=False, backend="triton")

                    same = bool(torch.equal(fn(x), refs[(s, r)]))
                    ms = quant_triton.bench(fn, x, args.repeats, args.inner)
                    row = {"family": fam, "scheme": s, "role": r, **cfg, "ms": ms, "bit_identical": same,
                           "hbm_frac": nbytes / ms / 1e9 / args.hbm_tbps}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            table.clear()
            table.update(saved)
        del refs
        torch.cuda.empty_cache()
    print("\nbest per (family, scheme, role):")
    best: dict = {}
    for r in rows:
        key = (r["family"], r["scheme"], r["role"])
        if r["bit_identical"] and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    for key, r in best.items():
        print(key, {k: v for k, v in r.items() if k not in ("family", "scheme", "role")})
    if args.json:
        import triton

        with open(args.json, "w") as fh:
            json.dump({"shape": args.shape, "dtype": args.dtype,
                       "gpu": torch.cuda.get_device_name() if x.is_cuda else args.device,
                       "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
