"""Host-side cost of the per-layer sensitivity statistics (the audit's ``sensitivity`` stage), serial vs threaded.

    python benchmarks/sensitivity_threads.py --workers 1 4 8 --json out.json

A random-weight model with Llama-3.1-8B's K geometry (32 layers, 8 KV heads x 128) but a small residual
stream (the statistics depend only on the K/V shape), the audit's prompts (20 calibration, 20 harmless) and
settings (``rot_k``, int4-token-asym, 200 bootstrap resamples, no causal rows). The clean captures are taken
once and shared (``capture_cache``), so each timing is the statistics alone: fake-quant error, PCA, random
subspaces (QR) and bootstrap CIs. Threaded runs use one thread per op, so float64 sums may round
differently: each row reports the largest relative difference from the first row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import transformers

    from kvgeom.geometry import sensitivity_profile
    from kvgeom.models import wrap_hf_model
    from kvgeom.prompts import load_prompts
    from kvgeom.testing import random_model, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=1024, num_hidden_layers=args.layers,
                                   num_attention_heads=8, num_key_value_heads=8, head_dim=128, vocab_size=len(tok),
                                   max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = wrap_hf_model(random_model(cfg), tok, name="random-llama-kv-geometry", device="cpu", dtype=torch.float32)
    harmful = load_prompts("calibration").prompts[:20]
    harmless = load_prompts("harmless").prompts[:20]
    cache: dict = {}
    kw = dict(site="rot_k", causal_layers=[], n_resamples=200, seed=0, capture_cache=cache)
    t = time.perf_counter()
    sensitivity_profile(model, "int4-token-asym", harmful, harmless, workers=1, **kw)
    first = time.perf_counter() - t
    rows, ref = [], None
    for w in args.workers:
        t = time.perf_counter()
        f = sensitivity_profile(model, "int4-token-asym", harmful, harmless, workers=w, **kw).to_frame()
        rows.append({"workers": w, "seconds": time.perf_counter() - t})
        ref = f if ref is None else ref
        num = ref.select_dtypes("number").columns
        a, b = ref[num].to_numpy(dtype=float), f[num].to_numpy(dtype=float)
        rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-300)
        rows[-1]["identical_to_first"] = bool(f.equals(ref))
        rows[-1]["max_rel_diff"] = float(np.nanmax(rel)) if np.isfinite(rel).any() else 0.0
        rows[-1]["same_non_numeric"] = bool(ref.drop(columns=num).equals(f.drop(columns=num)))
        print(json.dumps(rows[-1]), flush=True)
    out = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.processor(),
           "torch": torch.__version__, "layers": args.layers, "first_call_with_capture_s": first, "rows": rows}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
