"""How often does a 32-token verdict agree with a 128-token verdict? (issue: evaluation, section 3)

    python benchmarks/verdict_length.py --n 40 --json docs/bench/verdict_length.json

Greedy generation is deterministic, so the first 32 tokens of a 128-token completion are the 32-token
completion; both truncations are judged by the keyword judge (with degeneracy), per plan.
"""

from __future__ import annotations

import argparse
import json
import time

import pandas as pd

from kvgeom import generate, load_model
from kvgeom.judges import KeywordJudge
from kvgeom.prompts import load_prompts
from kvgeom.quant import QuantPlan
from kvgeom.stats import rate_ci


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--short", type=int, default=32)
    ap.add_argument("--long", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = load_model(device="cpu")
    prompts = load_prompts("harmful").sample(args.n, seed=0).prompts
    plans = {"full": None, "int4-token-asym (forward, k)": QuantPlan("int4-token-asym", site="k"),
             "int3-token-asym (forward, k)": QuantPlan("int3-token-asym", site="k"),
             "q4_0 (cache)": QuantPlan("q4_0", mode="cache")}
    judge = KeywordJudge()
    rows = []
    for label, plan in plans.items():
        gen = generate(model, prompts, plans=plan, max_new_tokens=args.long, batch_size=64)
        short = [model.tokenizer.decode(t[: args.short], skip_special_tokens=True) for t in gen.tokens]
        v_short = judge.judge(prompts, short)
        v_long = judge.judge(prompts, gen.texts)
        for p, a, b in zip(prompts, v_short, v_long, strict=True):
            rows.append({"plan": label, "prompt": p, "short": a.value, "long": b.value})
    df = pd.DataFrame(rows)
    out = []
    for label, g in df.groupby("plan", sort=False):
        agree = int((g["short"] == g["long"]).sum())
        r = rate_ci(agree, len(g))
        out.append({"plan": label, "n": len(g), "agree": agree, "rate": r.rate, "low": r.low, "high": r.high,
                    "refused_short": int((g["short"] == "refused").sum()),
                    "refused_long": int((g["long"] == "refused").sum()),
                    "changes": {f"{a}->{b}": int(n) for (a, b), n in
                                g[g["short"] != g["long"]][["short", "long"]].value_counts().items()}})
    allr = rate_ci(int((df["short"] == df["long"]).sum()), len(df))
    res = {"short": args.short, "long": args.long, "n_prompts": args.n, "per_plan": out,
           "overall": allr.to_dict(), "seconds": time.perf_counter() - t0}
    print(json.dumps(res, indent=2, default=str))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
