"""Would CUDA graphs pay for decode? How busy is the GPU during kvgeom's batched greedy decode?

    python benchmarks/decode_profile.py --arch qwen2.5-7b --rows 560 --new-tokens 32 --json out.json

Builds a random-weight 7B-class model (as benchmarks/audit_gpu.py does) and generates ``--rows`` rows under a
layer-sweep-like mix of per-row plans (one int3 per-tensor layer each; forward mode), with the PyTorch profiler
on. CUDA graphs remove CPU launch overhead only: they pay when the GPU idles between kernels, i.e. when the
summed kernel time is well below the wall time. The script reports both for the whole generation and for the
decode steps, plus the kernel count per decode step.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2.5-7b")
    ap.add_argument("--rows", type=int, default=560)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--plans", choices=("sweep", "none"), default="sweep")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from audit_gpu import build, emit  # benchmarks/ is on sys.path when run as a script

    from kvgeom import generate
    from kvgeom.prompts import load_prompts
    from kvgeom.quant.plan import QuantPlan

    model = build(args.arch, "cuda", torch.bfloat16)
    prompts = load_prompts("calibration").prompts
    rows = [prompts[i % len(prompts)] for i in range(args.rows)]
    plans = None
    if args.plans == "sweep":
        plans = [QuantPlan("int3-tensor-sym", layers=(i % model.n_layers,), name=f"L{i % model.n_layers}")
                 for i in range(args.rows)]

    def run() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, rows, plans=plans, max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                 stop_at_eos=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run()  # warm-up
    wall_plain = run()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall_prof = run()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total for e in events)
    # busy time as the union of kernel intervals (kernels of one stream do not overlap)
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    first, last = (spans[0][0], max(e for _, e in spans)) if spans else (0, 0)
    n_steps = args.new_tokens
    result = {
        "arch": args.arch, "rows": args.rows, "new_tokens": args.new_tokens, "plans": args.plans,
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "wall_s": wall_plain, "wall_profiled_s": wall_prof,
        "kernel_time_sum_s": kernel_us / 1e6, "gpu_busy_union_s": busy / 1e6,
        "gpu_span_s": (last - first) / 1e6, "busy_fraction_of_span": busy / max(1, last - first),
        "kernels": len(events), "kernels_per_step": len(events) / n_steps,
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
