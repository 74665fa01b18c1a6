"""Does torch.compile fuse fake_quant enough to approach HBM bandwidth? Eager vs compiled, same outputs.

    python benchmarks/quant_compile.py --shape 64 2048 8 128 --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

from kvgeom.quant import fake_quant

SCHEMES = ("int4-token-asym", "int4-tensor-asym", "int4-group64-asym", "q4_0", "q8_0", "fp8_e4m3")


def bench(fn, x, repeats: int = 20) -> float:
    """Median milliseconds per isolated call (CUDA events): :func:`quant_triton.bench` with one call per repeat."""
    from quant_triton import bench as timed  # benchmarks/ is on sys.path when run as a script

    return timed(fn, x, repeats=repeats, inner=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=4, default=[64, 2048, 8, 128])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    x = torch.randn(*args.shape, device="cuda", dtype=getattr(torch, args.dtype))
    nbytes = 2 * x.numel() * x.element_size()
    rows = []
    for name in SCHEMES:
        def eager(t, _n=name):
            return fake_quant(t, _n, role="k", check_finite=False)
        compiled = torch.compile(eager, dynamic=False)
        same = bool(torch.equal(eager(x), compiled(x)))
        te, tc = bench(eager, x), bench(compiled, x)
        rows.append({"scheme": name, "eager_ms": te, "compiled_ms": tc, "eager_gbps": nbytes / te / 1e6,
                     "compiled_gbps": nbytes / tc / 1e6, "compiled_hbm_frac": nbytes / tc / 1e9 / args.hbm_tbps,
                     "bit_identical": same})
    print("| scheme | eager ms | eager GB/s | compiled ms | compiled GB/s | % of HBM | identical |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| `{r['scheme']}` | {r['eager_ms']:.2f} | {r['eager_gbps']:.0f} | {r['compiled_ms']:.2f} | "
              f"{r['compiled_gbps']:.0f} | {100 * r['compiled_hbm_frac']:.1f}% | {r['bit_identical']} |")
    if args.json:
        json.dump({"shape": args.shape, "dtype": args.dtype, "bytes": nbytes, "rows": rows,
                   "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
