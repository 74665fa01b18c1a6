"""Split the disagreement between kvgeom and llama.cpp: run llama.cpp on kvgeom's own fp32 weights.

``kvgeom validate`` on the Q4_K_M GGUF compares two things that differ in the weights' arithmetic (llama.cpp
multiplies Q4_K/Q6_K blocks by activations quantized to q8_K; kvgeom multiplies the de-quantized fp32 weights in
fp32) as well as in the KV cache. This script gives llama.cpp the very fp32 values kvgeom runs (the cached fp32
conversion written back as an F32 GGUF by llama.cpp's own ``convert_hf_to_gguf.py --outtype f32``), so that what
is left between the two sides is the cache, the attention kernel (flash attention, Q converted to the K type's
dot-product type, an f16 V accumulator) and the order of accumulation.

Usage (the F32 GGUF is ~2.5 GB; decoding it is memory-bound, minutes per format on 2 cores)::

    V=<llama.cpp source, e.g. llama-cpp-python's vendor/llama.cpp>
    PYTHONPATH=$V/gguf-py python $V/convert_hf_to_gguf.py ~/.cache/kvgeom/converted/qwen2.5-coder-0.5b-instruct-* \\
        --outtype f32 --outfile /tmp/qwen-f32.gguf
    python benchmarks/validate_f32_weights.py /tmp/qwen-f32.gguf --formats f16,q8_0,q4_0 --out results/validate_f32
"""

from __future__ import annotations

import argparse

from kvgeom.models import load_model
from kvgeom.validate import validate_engine, validation_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", help="F32 GGUF written from kvgeom's fp32 conversion of MODEL")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="what kvgeom loads (default model)")
    ap.add_argument("--formats", default="f16,q8_0,q4_0")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = load_model(args.model, device="cpu")
    v = validate_engine(args.gguf, formats=args.formats, n=args.n, threads=args.threads, out=args.out,
                        kv_model=model, progress=lambda m: print(m, flush=True), bars=True)
    print(validation_summary(v))


if __name__ == "__main__":
    main()
