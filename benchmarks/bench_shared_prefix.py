"""Time ``generate`` with and without the shared prompt prefix (:mod:`kvgeom.runtime.prefix`).

    python benchmarks/bench_shared_prefix.py [--prompts 8] [--layers 8] [--new-tokens 8] [--repeats 2] [--json out.json]

Rows: the first ``--prompts`` bundled harmful prompts, each under ``--layers`` one-layer ``int4-token-asym`` plans
(pre-RoPE keys, forward mode: a layer sweep's rows), in one batch; docs/benchmarks.md §14.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from kvgeom import generate
from kvgeom.models import load_model
from kvgeom.prompts import load_prompts
from kvgeom.quant.plan import QuantPlan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = load_model(device=args.device)
    prompts = load_prompts("harmful").prompts[:args.prompts]
    plans = [QuantPlan("int4-token-asym", layers=(layer,), site="k") for layer in range(args.layers)]
    rows = [p for p in prompts for _ in plans]
    row_plans = [plan for _ in prompts for plan in plans]
    generate(model, rows[:2], plans=row_plans[:2], max_new_tokens=2)  # warm-up
    out: dict = {"rows": len(rows), "new_tokens": args.new_tokens, "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                 "seconds": {"shared": [], "not_shared": []}}
    for _ in range(args.repeats):
        for share in (True, False):
            t = time.perf_counter()
            gen = generate(model, rows, plans=row_plans, max_new_tokens=args.new_tokens, batch_size=len(rows),
                           share_prefix=share)
            dt = time.perf_counter() - t
            out["seconds"]["shared" if share else "not_shared"].append(round(dt, 2))
            if share:
                out["shared_tokens"] = gen.extra["shared_prefix"][0]
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
