"""Teacher-forced logits, llama.cpp against kvgeom's simulation with and without the query-side q8_0.

``kvgeom validate`` compares greedy verdicts, where one near-tie can change everything after it. This compares the
logits themselves, position by position, on the same token sequences: each prompt (chat template applied) followed
by the 32 tokens llama.cpp generated for that format in a saved run (``docs/data/validate_llamacpp_rows.csv.gz``
or a ``kvgeom validate --out`` folder's ``rows.csv``), run in one forward pass by llama.cpp (its quantized cache,
flash attention, ``logits_all``) and by kvgeom (cache mode, the format's ``+rot`` scheme, ``query`` None or
``"engine"``). At every position that chose a generated token it reports the top-1 agreement and the logit
differences; the ``f16`` row against kvgeom's fp32 model (no cache quantization) is the floor the weights' arithmetic
leaves.

Usage::

    G=~/.cache/kvgeom/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    python benchmarks/validate_query_logits.py $G --formats q4_0,iq4_nl,q4_1,q5_0 --threads 2 --out logits.csv
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kvgeom.models import load_model
from kvgeom.quant import QuantPlan
from kvgeom.runtime.plans import forward_with_plans
from kvgeom.validate import CEILING, EngineFormat, llama_cpp_logits


def kvgeom_logits(model, seqs: list[list[int]], plan: QuantPlan | None) -> list[np.ndarray]:
    out = []
    for ids in seqs:
        x = torch.tensor([ids])
        with torch.inference_mode():
            logits = forward_with_plans(model, x, torch.ones_like(x, dtype=torch.bool), [plan])
        out.append(logits[0].float().numpy())
    return out


def compare(eng: list[np.ndarray], kv: list[np.ndarray], starts: list[int]) -> dict:
    top1, max_abs, rms = [], [], []
    for e, k, s in zip(eng, kv, starts, strict=True):
        e, k = e[s - 1 : -1], k[s - 1 : -1]  # the positions that chose each generated token
        top1.append(e.argmax(-1) == k.argmax(-1))
        d = e - k
        max_abs.append(np.abs(d).max(-1))
        rms.append(np.sqrt((d * d).mean(-1)))
    top1, max_abs, rms = (np.concatenate(v) for v in (top1, max_abs, rms))
    return {"positions": int(top1.size), "top1_agree": float(top1.mean()), "max_abs_logit_diff_mean": float(
        max_abs.mean()), "max_abs_logit_diff_median": float(np.median(max_abs)), "rms_logit_diff_mean": float(
        rms.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--rows", default="docs/data/validate_llamacpp_rows.csv.gz",
                    help="a saved kvgeom validate rows file (its engine_tokens are the sequences)")
    ap.add_argument("--formats", default="q4_0,iq4_nl,q4_1,q5_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", default="none,engine", help="kvgeom query settings to compare (none, q8_0, engine)")
    ap.add_argument("--out", default=None, help="CSV of the table")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = pd.read_csv(args.rows)
    model = load_model(device="cpu")
    d_head = model.d_head
    prompts = rows[rows["comparison"] == CEILING]["prompt"].tolist()
    texts = model.format_chat(prompts)
    prompt_ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    recs = []
    for label in [CEILING, *args.formats.split(",")]:
        sel = rows[rows["comparison"] == label]
        gen = [json.loads(t) for t in sel["engine_tokens"]]
        seqs = [p + g for p, g in zip(prompt_ids, gen, strict=True)]
        starts = [len(p) for p in prompt_ids]
        fmt = EngineFormat.parse("f16" if label == CEILING else label)
        eng = llama_cpp_logits(args.gguf, seqs, fmt, threads=args.threads)
        scheme = None if label == CEILING else fmt.kvgeom_scheme(d_head)
        queries = [None if q == "none" else q for q in args.queries.split(",")]
        for query in (None,) if scheme is None else queries:
            plan = None if scheme is None else QuantPlan(scheme, mode="cache", query=query)
            rec = {"comparison": label, "kvgeom_scheme": scheme or "none", "query": query or "none",
                   **compare(eng, kvgeom_logits(model, seqs, plan), starts)}
            recs.append(rec)
            print(json.dumps(rec), flush=True)
    table = pd.DataFrame(recs)
    print(table.to_string(index=False))
    print(f"time {time.perf_counter() - t0:.0f}s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
