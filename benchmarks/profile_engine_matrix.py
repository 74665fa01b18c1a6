"""Where the engine matrix's time goes on a random-weight 7B-class model (issue #16's <= 15 s target).

    python benchmarks/profile_engine_matrix.py --arch qwen2.5-7b --engines vllm,hf --prompts 40 --json out.json

Times, on ``--prompts`` harmful prompts (the refused prompts the stage decodes) x every format of ``--engines``
in cache mode, 32 new tokens, one batch: generation without plans (the floor), with every format's plan, and
with each format alone; the perplexity pass of all formats; and a CUDA profile of the all-formats batch (time in
kernels vs wall time: the gap is host overhead, i.e. kernel launches of the eager quantizers).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from audit_gpu import ARCHS, build, sync  # noqa: E402  (run from benchmarks/ or with it on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2.5-7b", choices=sorted(ARCHS))
    ap.add_argument("--engines", default="vllm,hf")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="also a torch.profiler table of the all-formats batch")
    ap.add_argument("--cprofile", default=None, metavar="DIR",
                    help="also cProfile (host Python time) of the no-plans and all-formats batches: DIR/*.txt")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import kvgeom
    from kvgeom.engines import ModelShape, get_engine
    from kvgeom.evaluate import perplexity
    from kvgeom.prompts import load_prompts
    from kvgeom.quant import QuantPlan

    model = build(args.arch, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    shape = ModelShape.of(model)
    fmts = {}
    for name in args.engines.split(","):
        for f in get_engine(name).formats(shape):
            fmts.setdefault((f.scheme, f.prefill), f.name)
    plans = {n: QuantPlan(s, mode="cache", site="rot_k", prefill=p, name=n) for (s, p), n in fmts.items()}
    prompts = load_prompts("harmful").prompts[: args.prompts]
    out: dict = {"arch": args.arch, "engines": args.engines, "prompts": len(prompts), "formats": list(plans),
                 "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "torch": torch.__version__}

    def gen(rows_plans, rows_prompts):
        sync(model)
        t0 = time.perf_counter()
        kvgeom.generate(model, rows_prompts, plans=rows_plans, max_new_tokens=args.tokens, batch_size=4096,
                        stop_at_eos=False)
        sync(model)
        return time.perf_counter() - t0

    every = [p for p in plans.values() for _ in prompts]
    every_prompts = [q for _ in plans for q in prompts]
    gen(every[:64], every_prompts[:64])  # warm-up (Triton, cuBLAS)
    out["generate_s"] = {"no plans": gen(None, every_prompts), "all formats": gen(every, every_prompts)}
    out["generate_s"]["per format"] = {n: gen([p] * len(prompts), prompts) for n, p in plans.items()}
    out["generate_s"]["no plans, one format's rows"] = gen(None, prompts)
    print(json.dumps(out["generate_s"], indent=1), flush=True)
    for full in (False, True):
        group = [p for p in plans.values() if (p.prefill == "full") == full]
        if group:
            sync(model)
            t0 = time.perf_counter()
            perplexity(model, None, group, max_tokens=1024, batch_size=max(4, len(group)))
            sync(model)
            out.setdefault("perplexity_s", {})["prefill full" if full else "prefill quantized"] = \
                time.perf_counter() - t0
    print(json.dumps(out["perplexity_s"]), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            wall = gen(every, every_prompts)
        ka = prof.key_averages()
        out["profiled"] = {"wall_s": wall, "kernel_s": sum(e.self_device_time_total for e in ka) / 1e6,
                           "kernel_launches": sum(e.count for e in ka if "LaunchKernel" in e.key)}
        print(ka.table(sort_by="self_device_time_total", row_limit=20))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=25))
        print(json.dumps(out["profiled"]))
    if args.cprofile:
        import cProfile
        import io
        import os
        import pstats

        os.makedirs(args.cprofile, exist_ok=True)
        for name, rows_plans in (("no_plans", None), ("all_formats", every)):
            prof = cProfile.Profile()
            prof.enable()
            wall = gen(rows_plans, every_prompts)
            prof.disable()
            buf = io.StringIO()
            st = pstats.Stats(prof, stream=buf)
            st.sort_stats("tottime").print_stats(45)
            st.sort_stats("cumulative").print_stats(60)
            with open(os.path.join(args.cprofile, f"{name}.txt"), "w") as fh:
                fh.write(f"wall {wall:.3f} s (profiled)\n" + buf.getvalue())
            out.setdefault("cprofile_wall_s", {})[name] = wall
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
