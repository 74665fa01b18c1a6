"""Where GPU generation waits for the device: every host sync of one batch, counted by Python call site.

    python benchmarks/host_syncs.py --arch qwen2.5-7b --workloads none,vllm,hf,llama.cpp,layers --json out.json

A host sync (``.item()``, ``.tolist()``, ``nonzero``, a boolean-mask index, a device-to-host copy) makes the host
wait until the GPU has run everything queued, so the launches after it cannot overlap the kernels before it: on a
launch-bound decode step (docs/benchmarks.md §11-§14) each one costs the step its overlap. This runs one batch of
each workload under ``torch.cuda.set_sync_debug_mode("warn")`` and counts the warnings by the kvgeom / library
frames that raised them, per decode step. Workloads: ``none`` (no plans), an engine's KV formats in cache mode
(``vllm``, ``hf``, ``llama.cpp``: every format's rows in one batch, as the engine matrix runs them), ``layers``
(one-layer forward-mode plans of ``int3-tensor-sym``, as the layer sweep runs them).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import traceback
import warnings

import torch
from audit_gpu import ARCHS, build, sync  # noqa: E402  (run from benchmarks/ or with it on sys.path)


def _plans(model, workload: str, n_prompts: int) -> list | None:
    from kvgeom.engines import ModelShape, get_engine
    from kvgeom.quant import QuantPlan

    if workload == "none":
        return None
    if workload == "layers":
        per = [QuantPlan("int3-tensor-sym", layers=(i,), site="k") for i in range(model.n_layers)]
    else:
        shape = ModelShape.of(model)
        keys = dict.fromkeys((f.scheme, f.prefill) for f in get_engine(workload).formats(shape))
        per = [QuantPlan(s, mode="cache", site="rot_k", prefill=p) for s, p in keys]
    return [p for p in per for _ in range(n_prompts)]


def _site(stack: list[traceback.FrameSummary], depth: int) -> str:
    mine = [f for f in stack if "/kvgeom/" in f.filename or "transformer" in f.filename or "torch/" in f.filename]
    keep = mine[-depth:]
    return " <- ".join(f"{f.filename.rsplit('site-packages/', 1)[-1].rsplit('/work/', 1)[-1]}:{f.lineno}"
                       for f in reversed(keep))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2.5-7b", choices=sorted(ARCHS))
    ap.add_argument("--workloads", default="none,vllm,hf,llama.cpp,layers")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per plan")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4, help="frames named per call site")
    ap.add_argument("--device", default="cuda", help="cuda (what it is for); cpu only runs the code (no syncs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import kvgeom
    from kvgeom.prompts import load_prompts

    model = build(args.arch, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    prompts = load_prompts("harmful").prompts[: args.prompts]
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    out: dict = {"arch": args.arch, "tokens": args.tokens, "gpu": gpu, "torch": torch.__version__, "workloads": {}}
    for workload in args.workloads.split(","):
        plans = _plans(model, workload, len(prompts))
        rows = prompts * (len(plans) // len(prompts) if plans else 1)

        def run(rows=rows, plans=plans):
            return kvgeom.generate(model, rows, plans=plans, max_new_tokens=args.tokens, batch_size=4096,
                                   stop_at_eos=False)

        run()  # warm-up: Triton compiles, cuBLAS plans
        sync(model)
        t0 = time.perf_counter()
        run()
        sync(model)
        wall = time.perf_counter() - t0
        counts: collections.Counter = collections.Counter()

        def show(message, category, filename, lineno, file=None, line=None, _c=counts):  # noqa: ANN001
            _c[_site(traceback.extract_stack()[:-1], args.depth)] += 1

        old = warnings.showwarning
        warnings.showwarning = show
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            if args.device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                if args.device == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old
        total = sum(counts.values())
        out["workloads"][workload] = {"rows": len(rows), "wall_s": wall, "syncs": total,
                                      "syncs_per_step": total / (args.tokens + 1),
                                      "sites": dict(counts.most_common(40))}
        print(f"== {workload}: {len(rows)} rows, {wall:.2f} s, {total} syncs ({total / (args.tokens + 1):.1f} per "
              "forward)", flush=True)
        for site, n in counts.most_common(25):
            print(f"{n:7d}  {site}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
