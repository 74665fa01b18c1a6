"""Rows per generation batch on the CPU: what a decode step's matmuls cost with more rows, and two audit workloads.

    python benchmarks/bench_batch_size.py --sizes 64,256 --json docs/bench/bench_batch_size_cpu_s17.json

* ``linear``: one decoder layer's seven weight matmuls of the default model (d_model 896, MLP 4,864, 2 KV heads
  of 64) and its vocabulary projection (151,936 rows), timed on ``M`` input rows: GFLOP/s per ``M``. A decode step
  of ``M`` live rows runs these shapes, so the step's cost per row falls as ``M`` grows.
* ``workloads``: :func:`kvgeom.evaluate.evaluate` with the keyword judge, settling on, 32 new tokens, 29 harmful
  prompts, at each ``--sizes`` batch size: ``cache`` (6 llama.cpp types in cache mode: the engine matrix's rows,
  whose chat-template prefix is prefilled once per plan) and ``layers`` (8 one-layer forward-mode
  ``int3-tensor-sym`` plans: the layer sweep's rows, which share no prefix, so a bigger batch pads more).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def linear_gflops(rows: list[int], repeats: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    shapes = [(4864, 896), (4864, 896), (896, 4864), (896, 896), (128, 896), (128, 896), (896, 896)]
    ws = [torch.randn(*s, generator=g) for s in shapes]
    head = torch.randn(151936, 896, generator=g)
    out = []
    for m in rows:
        x, h = torch.randn(m, 896, generator=g), torch.randn(m, 4864, generator=g)

        def layer(x=x, h=h):
            for w in ws:
                torch.nn.functional.linear(h if w.shape[1] == 4864 else x, w)

        layer()
        t0 = time.perf_counter()
        for _ in range(repeats):
            layer()
        dt = (time.perf_counter() - t0) / repeats
        torch.nn.functional.linear(x, head)
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, head)
        dh = time.perf_counter() - t0
        flops = 2 * m * sum(w.numel() for w in ws)
        out.append({"rows": m, "layer_ms": 1000 * dt, "layer_gflops": flops / dt / 1e9, "head_ms": 1000 * dh,
                    "head_gflops": 2 * m * head.numel() / dh / 1e9})
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--prompts", type=int, default=29)
    ap.add_argument("--skip-workloads", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "linear": linear_gflops([1, 4, 16, 32, 64, 128, 256, 512, 1024])}
    if not args.skip_workloads:
        from kvgeom.evaluate import evaluate
        from kvgeom.judges import KeywordJudge
        from kvgeom.models import load_model
        from kvgeom.prompts import load_prompts
        from kvgeom.quant.plan import QuantPlan

        model = load_model()
        prompts = load_prompts("harmful").head(args.prompts)
        work = {"cache": [QuantPlan(s, mode="cache", site="rot_k", name=s)
                          for s in ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")],
                "layers": [QuantPlan("int3-tensor-sym", layers=(i,), site="k", name=f"L{i}") for i in range(0, 24, 3)]}
        result["workloads"] = []
        for bs in sizes:
            for name, plans in work.items():
                t0 = time.perf_counter()
                rows = evaluate(model, prompts, plans, max_new_tokens=32, batch_size=bs, judge=KeywordJudge(),
                                settle=True)
                result["workloads"].append({"workload": name, "batch_size": bs, "rows": len(rows),
                                            "seconds": time.perf_counter() - t0,
                                            "tokens": int(rows["n_tokens"].sum()),
                                            "verdicts": rows["verdict"].value_counts().to_dict()})
                print(result["workloads"][-1], flush=True)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
