"""fake_quant throughput on CUDA: eager torch ops vs torch.compile vs the Triton kernels (issue #7).

    python benchmarks/quant_triton.py --shape 64 2048 8 128 --dtype bfloat16 --json out.json [--no-compile]

Bytes moved = one read + one write of K/V (parameters and the mask are ignored); % HBM is against
``--hbm-tbps`` (H200: 4.8 TB/s). ``identical`` compares the Triton (or fallback) output with eager by
``torch.equal``; ``backend`` says whether a kernel covers the scheme or ``fake_quant`` fell back to eager.
Keys are timed for every scheme; values too where their path differs (KIVI, ``@amax``): rows marked (V).
"""

from __future__ import annotations

import argparse
import json

import torch

from kvgeom.quant import Scheme, fake_quant
from kvgeom.quant.triton import common as tk
from kvgeom.quant.triton import dispatch
from kvgeom.quant.triton import kivi as tkv

SCHEMES = ("int4-token-asym", "int4-token-sym", "int8-token-sym", "int4-head-asym", "int4-group64-asym",
           "int4-tensor-asym", "int8-channel-asym", "q8_0", "q4_0", "q4_1", "q5_0", "fp8_e4m3", "fp8_e4m3@amax",
           "kivi2", "kivi4", "q4_0+rot")


def bench(fn, x, repeats: int, inner: int) -> float:
    """Median over ``repeats`` of the mean milliseconds per call of ``inner`` back-to-back ``fn(x)`` calls
    (CUDA events), after 3 warm-ups. Back-to-back calls overlap each launch's host overhead with the previous
    kernel, as inside a model's forward pass; ``--inner 1`` times isolated calls (launch latency included)."""
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn(x)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=4, default=[64, 2048, 8, 128])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--inner", type=int, default=10, help="back-to-back calls per timed repeat")
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    ap.add_argument("--tune", nargs="*", default=[], metavar="KEY=VALUE",
                    help="launch settings to override, e.g. fast_div=false (keys of triton.common.TUNE or "
                         "triton.kivi.KIVI_TUNE; values as JSON)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for item in args.tune:
        key, _, value = item.partition("=")
        tables = [t for t in (tk.TUNE, tkv.KIVI_TUNE) if key in t]  # fast_div is in both: set it in both
        if not tables:
            ap.error(f"--tune {item}: {key!r} is not a key of TUNE {sorted(tk.TUNE)} or KIVI_TUNE "
                     f"{sorted(tkv.KIVI_TUNE)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            ap.error(f"--tune {item}: give KEY=VALUE with a JSON value (true, false, a number), e.g. fast_div=false")
        for table in tables:
            table[key] = parsed
    x = torch.randn(*args.shape, device="cuda", dtype=getattr(torch, args.dtype))
    x[:, :, 0, :4] *= 30  # a few outlier channels, as real keys have
    nbytes = 2 * x.numel() * x.element_size()

    def gbps(ms: float | None) -> float | None:
        return None if ms is None else nbytes / ms / 1e6

    rows = []
    jobs = [(name, role) for name in args.schemes
            for role in (("k", "v") if name.startswith("kivi") or "@amax" in name else ("k",))]
    for name, role in jobs:
        covered = dispatch.supported(x, Scheme.parse(name).for_role(role))

        def eager(t, _n=name, _r=role):
            return fake_quant(t, _n, role=_r, check_finite=False, backend="eager")

        def fused(t, _n=name, _r=role, _b="triton" if covered else "auto"):
            return fake_quant(t, _n, role=_r, check_finite=False, backend=_b)

        ref = eager(x)
        out = fused(x)
        diff = (out.float() - ref.float()).abs()
        row = {"scheme": name, "role": role, "backend": "triton" if covered else "eager (fallback)",
               "bit_identical": bool(torch.equal(out, ref)), "n_mismatch": int((out != ref).sum()),
               "max_abs_diff": float(diff.max()), "eager_ms": bench(eager, x, args.repeats, args.inner),
               "triton_ms": bench(fused, x, args.repeats, args.inner), "compiled_ms": None, "compiled_identical": None}
        del out, diff
        if not args.no_compile:
            compiled = torch.compile(eager, dynamic=False)
            row["compiled_identical"] = bool(torch.equal(compiled(x), ref))
            row["compiled_ms"] = bench(compiled, x, args.repeats, args.inner)
            torch._dynamo.reset()
        for k in ("eager", "compiled", "triton"):
            row[f"{k}_gbps"] = gbps(row[f"{k}_ms"])
            row[f"{k}_hbm_frac"] = None if row[f"{k}_ms"] is None else row[f"{k}_gbps"] / 1e3 / args.hbm_tbps
        rows.append(row)
        del ref
        torch.cuda.empty_cache()

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    print(f"shape {args.shape} {args.dtype}, {nbytes / 1e6:.0f} MB moved per call, {torch.cuda.get_device_name()}, "
          f"{args.inner} back-to-back calls per timing")
    print("| scheme | backend | eager ms | compiled ms | triton ms | triton GB/s | eager % HBM | compiled % HBM "
          "| triton % HBM | bit_identical | compiled identical |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        ident = str(r["bit_identical"]) + ("" if r["bit_identical"] else f" ({r['n_mismatch']} differ, "
                                                                         f"max {r['max_abs_diff']:.3g})")
        name = f"`{r['scheme']}`" + (" (V)" if r["role"] == "v" else "")
        print(f"| {name} | {r['backend']} | {ms(r['eager_ms'])} | {ms(r['compiled_ms'])} | "
              f"{ms(r['triton_ms'])} | {r['triton_gbps']:.0f} | {pct(r['eager_hbm_frac'])} | "
              f"{pct(r['compiled_hbm_frac'])} | {pct(r['triton_hbm_frac'])} | {ident} | "
              f"{'-' if r['compiled_identical'] is None else r['compiled_identical']} |")
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "dtype": args.dtype, "bytes": nbytes, "hbm_tbps": args.hbm_tbps,
                       "inner": args.inner, "tune": {**tk.TUNE, **tkv.KIVI_TUNE}, "rows": rows,
                       "gpu": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "triton": triton.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
