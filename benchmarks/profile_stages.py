"""Where the time of the two slowest powered-audit stages goes, on a random-weight 7B-class model.

    python benchmarks/profile_stages.py --arch llama-3.1-8b --n 64 --rows 1000 --json out.json

* ``sensitivity``: :func:`kvgeom.geometry.sensitivity_profile` on ``--n`` harmful and harmless prompts, timed
  phase by phase (capture, per-layer statistics, random draws, per-layer records) by wrapping the module's
  phase functions; run with several ``--workers`` values.
* ``layer sweep``: one :func:`kvgeom.generate` batch of ``--rows`` rows spread over one-layer plans (as the
  layer-sweep stage builds them), with and without the plans, and a CUDA profile of the planned batch (time
  in kernels vs wall time: the gap is host overhead).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from audit_gpu import ARCHS, build, sync  # noqa: E402  (run from benchmarks/ or with it on sys.path)


def timed(mod, name, log):
    fn = getattr(mod, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            log.setdefault(name, []).append(time.perf_counter() - t0)

    setattr(mod, name, wrapper)
    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHS))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--workers", default="8")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attention", default="eager,sdpa",
                    help="attention backends to time the generation batch with (kvgeom.models.attention); the "
                    "CUDA profile runs under the last")
    ap.add_argument("--skip-sensitivity", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import kvgeom.geometry.sensitivity as sens
    from kvgeom.prompts import load_prompts
    from kvgeom.quant import QuantPlan

    model = build(args.arch, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    harmful = (load_prompts("harmful").prompts * 4)[: args.n]
    harmless = (load_prompts("harmless").prompts * 4)[: args.n]
    out: dict = {"arch": args.arch, "n": args.n, "sensitivity": {}, "layer_sweep": {}}
    for w in ([] if args.skip_sensitivity else [int(x) for x in args.workers.split(",")]):
        log: dict = {}
        orig = [timed(sens, f, log) for f in ("capture_padded", "_layer_stats", "_layer_record")]
        sync(model)
        t0 = time.perf_counter()
        sens.sensitivity_profile(model, "int4-token-asym", harmful, harmless, causal_layers=[], n_resamples=200,
                                 workers=w)
        sync(model)
        for f, fn in zip(("capture_padded", "_layer_stats", "_layer_record"), orig, strict=True):
            setattr(sens, f, fn)
        out["sensitivity"][w] = {"wall_s": time.perf_counter() - t0,
                                 **{k: {"calls": len(v), "sum_s": sum(v), "max_s": max(v)} for k, v in log.items()}}
        print(w, json.dumps(out["sensitivity"][w]), flush=True)

    prompts = (load_prompts("harmful").prompts * 64)[: args.rows]
    n_layers = model.n_layers
    plans = [QuantPlan("int3-tensor-sym", layers=(i % n_layers,)) for i in range(args.rows)]
    import kvgeom
    from kvgeom.models.attention import use_attention

    tokens: dict = {}
    for backend in args.attention.split(","):
        use_attention(model, backend)
        for name, pl in (("no plans", None), ("one-layer plans", plans)):
            kvgeom.generate(model, prompts[:64], plans=None if pl is None else pl[:64], max_new_tokens=4,
                            batch_size=64)
            sync(model)
            t0 = time.perf_counter()
            g = kvgeom.generate(model, prompts, plans=pl, max_new_tokens=32, batch_size=args.rows,
                                stop_at_eos=False)
            sync(model)
            key = f"{name} [{model.attention}]"
            out["layer_sweep"][key] = time.perf_counter() - t0
            tokens[backend, name] = g.tokens
            print(key, out["layer_sweep"][key], flush=True)
    backends = args.attention.split(",")
    if len(backends) > 1:  # how often the fused kernel's rounding changes a greedy row (bf16)
        for name in ("no plans", "one-layer plans"):
            a, b = tokens[backends[0], name], tokens[backends[1], name]
            same = sum(x == y for x, y in zip(a, b, strict=True))
            out["layer_sweep"][f"rows with identical tokens, {name}"] = same / len(a)
        print({k: v for k, v in out["layer_sweep"].items() if k.startswith("rows")}, flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        kvgeom.generate(model, prompts, plans=plans, max_new_tokens=32, batch_size=args.rows, stop_at_eos=False)
        sync(model)
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in ka) / 1e6
    out["layer_sweep"]["profiled"] = {"wall_s": wall, "kernel_s": cuda_total, "attention": model.attention}
    table = ka.table(sort_by="self_device_time_total", row_limit=25)
    table_cpu = ka.table(sort_by="self_cpu_time_total", row_limit=25)
    print(table)
    print(table_cpu)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        with open(args.json.replace(".json", "_tables.txt"), "w") as fh:
            fh.write(table + "\n\n" + table_cpu)


if __name__ == "__main__":
    main()
