"""Where a fused fake-quant call spends its GPU time, kernel by kernel (PyTorch profiler), for issue #7.

    python benchmarks/quant_kernels.py --schemes int4-tensor-asym int8-channel-asym kivi2 --json out.json

For each (scheme, role) the call ``fake_quant(x, scheme, role=role, backend="triton")`` runs ``--calls`` times
under ``torch.profiler``; the table lists every device kernel it launched (the Triton kernels, the ``torch.full``
fills of the range buffers, the output allocation's none) with its mean microseconds per call and the share of
the call's device time. Bytes as in ``quant_triton.py`` (one read + one write of K/V): the % HBM column is what
the whole call would reach if only that kernel ran, which shows which pass bounds a scheme.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from kvgeom.quant import fake_quant


def kernel_times(x: torch.Tensor, scheme: str, role: str, calls: int) -> pd.DataFrame:
    """Mean device microseconds per call of each kernel one fused ``fake_quant`` call launches."""
    for _ in range(3):
        fake_quant(x, scheme, role=role, check_finite=False, backend="triton")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fake_quant(x, scheme, role=role, check_finite=False, backend="triton")
        torch.cuda.synchronize()
    us: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us[ev.name] += ev.device_time / calls
    df = pd.DataFrame({"kernel": list(us), "us_per_call": list(us.values())})
    return df.sort_values("us_per_call", ascending=False, ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[64, 2048, 8, 128])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--schemes", nargs="+", default=["int4-tensor-asym", "int8-channel-asym", "fp8_e4m3@amax",
                                                       "kivi2", "int4-token-asym"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    x = torch.randn(*args.shape, device="cuda", dtype=getattr(torch, args.dtype))
    x[:, :, 0, :4] *= 30  # outlier channels, as in quant_triton.py
    nbytes = 2 * x.numel() * x.element_size()
    frames = []
    for scheme in args.schemes:
        for role in ("k", "v") if scheme.startswith("kivi") else ("k",):
            df = kernel_times(x, scheme, role, args.calls)
            df.insert(0, "role", role)
            df.insert(0, "scheme", scheme)
            df["share"] = df["us_per_call"] / df["us_per_call"].sum()
            df["hbm_frac_if_alone"] = nbytes / (df["us_per_call"] * 1e-6) / 1e12 / args.hbm_tbps
            frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    print(f"shape {args.shape} {args.dtype}, {torch.cuda.get_device_name()}, {args.calls} calls profiled")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.json:
        import triton

        with open(args.json, "w") as fh:
            json.dump({"shape": args.shape, "dtype": args.dtype, "gpu": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "triton": triton.__version__,
                       "rows": table.to_dict(orient="records")}, fh, indent=2)


if __name__ == "__main__":
    main()
