"""Split the disagreement between kvgeom and llama.cpp: rerun llama.cpp's side on kvgeom's own fp32 weights.

``kvgeom validate`` on the Q4_K_M GGUF compares two things that differ in the weights' arithmetic (llama.cpp
multiplies Q4_K/Q6_K blocks by activations quantized to q8_K; kvgeom multiplies the de-quantized fp32 weights in
fp32) as well as in the KV cache. This script gives llama.cpp the very fp32 values kvgeom runs (the cached fp32
conversion written back as an F32 GGUF by llama.cpp's own ``convert_hf_to_gguf.py --outtype f32``) and compares it
with the kvgeom side saved by a ``kvgeom validate --out DIR`` run (same prompts, schemes, tokens, judge: kvgeom's
side is not recomputed), so what is left between the two is the cache, the attention kernel (flash attention, Q
converted to the K type's dot-product type, an f16 V accumulator) and the order of accumulation.

Usage (the F32 GGUF is ~2.5 GB)::

    V=<llama.cpp source, e.g. llama-cpp-python's vendor/llama.cpp>
    PYTHONPATH=$V/gguf-py python $V/convert_hf_to_gguf.py ~/.cache/kvgeom/converted/qwen2.5-coder-0.5b-instruct-* \\
        --outtype f32 --outfile /tmp/qwen-f32.gguf
    python benchmarks/validate_f32_weights.py /tmp/qwen-f32.gguf results/validate --formats f16,q8_0,q4_0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from kvgeom.judges import get_judge, judge_identity
from kvgeom.models import load_model
from kvgeom.validate import CEILING, EngineFormat, agreement_summary, llama_cpp_generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", help="F32 GGUF written from kvgeom's fp32 conversion of the model")
    ap.add_argument("validated", help="the --out folder of a kvgeom validate run on the same model")
    ap.add_argument("--formats", default="f16,q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    saved = json.loads((Path(args.validated) / "validate.json").read_text())
    rows = pd.DataFrame(saved["rows"])
    model = load_model(saved["model"]["name"], device="cpu")
    judge = get_judge(saved["judge"]["name"])
    if judge_identity(judge) != saved["judge"]:
        raise SystemExit(f"the saved run used judge {saved['judge']}, not {saved['judge']['name']}'s defaults")
    prompts = rows[rows["comparison"] == CEILING]["prompt"].tolist()
    texts = model.format_chat(prompts)
    keep = [CEILING, *args.formats.split(",")]
    rows = rows[rows["comparison"].isin(keep)].copy()
    for f in dict.fromkeys(["f16", *args.formats.split(",")]):
        runs = llama_cpp_generate(args.gguf, texts, EngineFormat.parse(f), max_new_tokens=saved["max_new_tokens"],
                                  rotation=saved["rotation"], threads=args.threads, stop_tokens=model.eos_token_ids,
                                  progress=f"llama.cpp F32 weights {f}")
        for comp in ([CEILING] if f == "f16" else []) + ([f] if f in keep else []):
            sel = rows["comparison"] == comp
            rows.loc[sel, "engine_tokens"] = pd.Series([list(r.tokens) for r in runs], index=rows.index[sel])
    rows["engine_completion"] = [model.tokenizer.decode(t, skip_special_tokens=True) for t in rows["engine_tokens"]]
    rows["engine_verdict"] = [getattr(v, "value", v) for v in
                              judge.judge(rows["prompt"].tolist(), rows["engine_completion"].tolist())]
    s = agreement_summary(rows, baselines={"engine": CEILING, "kvgeom": CEILING})
    cols = ["comparison", "kvgeom_scheme", "agree_k", "agree_n", "agree_rate", "agree_low", "agree_high",
            "identical_k", "first_divergence_median", "engine_refusal_k", "kvgeom_refusal_k", "engine_flip_k",
            "engine_flip_n", "kvgeom_flip_k", "kvgeom_flip_n"]
    print(s[[c for c in cols if c in s]].to_string(index=False))


if __name__ == "__main__":
    main()
