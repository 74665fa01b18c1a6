"""Device ops the cache-mode quantizers dispatch per (layer, K/V, unit) and call: a proxy for GPU kernel launches.

    python benchmarks/cache_ops.py --engines llama.cpp --json out.json

On the GPU the engine matrix is launch-bound (docs/benchmarks.md §8: about 37 kernel launches per cache unit,
layer, K/V and step), so the number of ops the cache issues is what its cost follows. This counts every op that
reaches the backend (a ``TorchDispatchMode``: composite ops arrive decomposed, as they would launch) during one
greedy generation of a tiny random model on the CPU, with every format of ``--engines`` in cache mode, minus the
same generation without plans, per (layer, role, unit) and forward call (views are not counted: they launch
nothing). The CPU runs the eager quantizers; on a GPU the formats with a fused kernel issue fewer.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # views launch nothing
            self.ops[str(func.overloadpacket)] += 1
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="llama.cpp")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import kvgeom
    from kvgeom.engines import ModelShape, get_engine
    from kvgeom.prompts import load_prompts
    from kvgeom.quant import QuantPlan
    from kvgeom.testing import tiny_model

    model = tiny_model("qwen2", n_layers=2, head_dim=128)
    shape = ModelShape.of(model)
    fmts = {}
    for name in args.engines.split(","):
        for f in get_engine(name).formats(shape):
            fmts.setdefault((f.scheme, f.prefill), f.name)
    plans = [QuantPlan(s, mode="cache", site="rot_k", prefill=p, name=n) for (s, p), n in fmts.items()]
    prompts = load_prompts("harmful").prompts[: args.prompts]
    rows = [p for p in plans for _ in prompts]
    texts = [q for _ in plans for q in prompts]
    counts = {}
    for name, pl in (("no plans", None), ("all formats", rows)):
        with Count() as c:
            kvgeom.generate(model, texts, plans=pl, max_new_tokens=args.tokens, stop_at_eos=False, batch_size=4096)
        counts[name] = sum(c.ops.values())
        if pl is not None:
            top = c.ops
    calls = args.tokens  # prefill + tokens - 1 decode calls
    per = (counts["all formats"] - counts["no plans"]) / (calls * model.n_layers * 2 * len(plans))
    out = {"engines": args.engines, "formats": [p.name for p in plans], "rows": len(rows), "calls": calls,
           "ops": counts, "cache_ops_per_unit_call": per, "torch": torch.__version__,
           "top_ops": dict(top.most_common(12))}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
