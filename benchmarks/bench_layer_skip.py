"""Time a layer sweep's rows with and without layer skipping (:mod:`kvgeom.runtime.layer_skip`).

    python benchmarks/bench_layer_skip.py [--prompts 11] [--new-tokens 32] [--repeats 2] [--json out.json]

Rows: the first ``--prompts`` bundled harmful prompts, each under one forward-mode ``int3-tensor-sym`` plan per layer
(pre-RoPE keys: the audit's layer sweep), one batch of all rows, settling on the keyword judge as the audit does.
Reports the seconds of each run, the prefill's share (the first forward call, timed through the bridge) and whether
the two runs decoded the same tokens; docs/benchmarks.md §16.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from audit_gpu import emit  # noqa: E402  (run from benchmarks/ or with it on sys.path)

from kvgeom import generate
from kvgeom.judges import KeywordJudge
from kvgeom.models import load_model
from kvgeom.prompts import load_prompts
from kvgeom.quant.plan import QuantPlan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=11)
    ap.add_argument("--scheme", default="int3-tensor-sym")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = load_model(device=args.device)
    prompts = load_prompts("harmful").prompts[:args.prompts]
    plans = [QuantPlan(args.scheme, layers=(layer,), site="k") for layer in range(model.n_layers)]
    rows = [p for p in prompts for _ in plans]
    row_plans = [plan for _ in prompts for plan in plans]
    settled = KeywordJudge().settled
    generate(model, rows[:2], plans=row_plans[:2], max_new_tokens=2)  # warm-up
    out: dict = {"rows": len(rows), "new_tokens": args.new_tokens, "scheme": args.scheme, "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                 "seconds": {"skip": [], "no_skip": []}, "prefill_seconds": {"skip": [], "no_skip": []}}
    tokens = {}
    for _ in range(args.repeats):
        for skip in (True, False):
            key = "skip" if skip else "no_skip"
            calls: list[float] = []
            t0 = [0.0]
            pre = model.bridge.register_forward_pre_hook(lambda *a, _t=t0: _t.__setitem__(0, time.perf_counter()))
            post = model.bridge.register_forward_hook(
                lambda *a, _c=calls, _t=t0: _c.append(time.perf_counter() - _t[0]))
            t = time.perf_counter()
            try:
                gen = generate(model, rows, plans=row_plans, max_new_tokens=args.new_tokens, batch_size=len(rows),
                               share_prefix=False, skip_layers=skip, stop_when=settled)
            finally:
                pre.remove()
                post.remove()
            out["seconds"][key].append(round(time.perf_counter() - t, 2))
            n_pre = model.n_layers + 1 if skip else 1  # the full-precision pass, then one call per layer
            out["prefill_seconds"][key].append(round(sum(calls[:n_pre]), 2))
            tokens[key] = gen.tokens
            out["decoded_tokens_" + key] = sum(len(t) for t in gen.tokens)
    out["same_tokens"] = tokens["skip"] == tokens["no_skip"]
    out["rows_with_other_tokens"] = sum(a != b for a, b in zip(tokens["skip"], tokens["no_skip"], strict=True))
    emit(out, args.json)


if __name__ == "__main__":
    main()
