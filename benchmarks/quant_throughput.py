"""Throughput of ``kvgeom.quant.fake_quant`` per scheme, in GB/s.

Bytes moved per call = input bytes read + output bytes written (2 x numel x element size); the reported time
is the median over ``--repeats`` timed calls after ``--warmup`` untimed ones (CUDA is synchronised around
each call). Prints a markdown table; ``--json PATH`` also writes the rows with the machine/versions.

    python benchmarks/quant_throughput.py                      # CPU, [8, 512, 2, 64] fp32
    python benchmarks/quant_throughput.py --device cuda --dtype bfloat16 --shape 8 4096 8 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from kvgeom.quant import Scheme, fake_quant

DEFAULT_SCHEMES = [
    "int4-tensor-asym",
    "int4-token-asym",
    "int4-channel-asym",
    "int4-group64-asym",
    "q8_0",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "iq4_nl",
    "q4_0+rot",
    "fp8_e4m3",
    "fp8_e5m2",
    "kivi2",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=4, default=[8, 512, 2, 64], metavar=("B", "P", "H", "D"))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--role", default="k", choices=["k", "v"])
    p.add_argument("--schemes", nargs="+", default=DEFAULT_SCHEMES, help="scheme strings (Scheme.parse)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(x: torch.Tensor, scheme: str, role: str, repeats: int, warmup: int) -> float:
    """Median seconds per ``fake_quant`` call."""
    for _ in range(warmup):
        fake_quant(x, scheme, role=role)  # type: ignore[arg-type]
    times = []
    for _ in range(repeats):
        _sync(x.device)
        t0 = time.perf_counter()
        fake_quant(x, scheme, role=role)  # type: ignore[arg-type]
        _sync(x.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(*args.shape, generator=gen).to(device=device, dtype=dtype)
    nbytes = 2 * x.numel() * x.element_size()
    rows = []
    for name in args.schemes:
        canonical = str(Scheme.parse(name))
        sec = bench(x, canonical, args.role, args.repeats, args.warmup)
        rows.append(
            {
                "scheme": canonical,
                "ms": sec * 1e3,
                "gb_per_s": nbytes / sec / 1e9,
                "bits_per_element": Scheme.parse(canonical).bits_per_element_for(
                    d_head=args.shape[3], n_kv_heads=args.shape[2], seq_len=args.shape[1]
                ),
            }
        )
    meta = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({_cpu_name()})",
        "dtype": args.dtype,
        "role": args.role,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "bytes_per_call": nbytes,
    }
    print(
        f"fake_quant throughput: shape {args.shape} {args.dtype} on {meta['device']} "
        f"(torch {meta['torch']}, {meta['torch_threads']} threads), role {args.role}, "
        f"median of {args.repeats}, bytes = read + written = {nbytes / 1e6:.1f} MB\n"
    )
    print("| scheme | bits/elem | ms | GB/s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['scheme']}` | {r['bits_per_element']:.3g} | {r['ms']:.2f} | {r['gb_per_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
