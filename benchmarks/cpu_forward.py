"""Where a CPU audit's time goes: prefill and decode cost of the default model, bridge vs HF, fp32 vs bf16.

    python benchmarks/cpu_forward.py [--dtype float32] [--json out.json]

Times (wall clock, one run each after a warm-up): greedy generation of 1 and of 9 tokens for batches of 1, 8,
32 and 64 calibration prompts (the difference / 8 = one decode step), and one prefill of 60 prompts through the
TransformerLens bridge and through the HF model directly (last-position logits only).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from kvgeom.models import load_model
    from kvgeom.prompts import load_prompts
    from kvgeom.runtime.forward import encode, forward
    from kvgeom.runtime.generation import generate

    model = load_model(dtype=args.dtype)
    calib = load_prompts("calibration", limit=20).prompts
    out: dict = {"dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "cpu": platform.processor() or platform.machine(), "batches": []}
    for bs in (1, 8, 32, 64):
        rows = (calib * 4)[:bs]
        generate(model, rows[:2], max_new_tokens=2, batch_size=bs, stop_at_eos=False)  # warm-up
        t = time.perf_counter()
        generate(model, rows, max_new_tokens=1, batch_size=bs, stop_at_eos=False)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        generate(model, rows, max_new_tokens=9, batch_size=bs, stop_at_eos=False)
        t9 = time.perf_counter() - t
        step = (t9 - t1) / 8
        rec = {"batch": bs, "prefill_s": t1, "decode_step_ms": 1000 * step, "decode_ms_per_row": 1000 * step / bs}
        out["batches"].append(rec)
        print(f"batch {bs:>2}: prefill {t1:.2f} s, decode step {1000 * step:.0f} ms "
              f"({1000 * step / bs:.1f} ms per row)", flush=True)
    b = encode(model, calib * 3)
    with torch.inference_mode():
        t = time.perf_counter()
        model.hf_model(input_ids=b.input_ids, attention_mask=b.mask.long(), logits_to_keep=1)
        out["prefill60_hf_s"] = time.perf_counter() - t
        t = time.perf_counter()
        forward(model, b.input_ids, b.mask, logits_to_keep=1)
        out["prefill60_bridge_s"] = time.perf_counter() - t
    out["prefill60_tokens"] = int(b.mask.sum())
    out["prefill_ms_per_token"] = 1000 * out["prefill60_bridge_s"] / out["prefill60_tokens"]
    print(f"prefill of 60 prompts ({out['prefill60_tokens']} tokens): HF {out['prefill60_hf_s']:.1f} s, "
          f"bridge {out['prefill60_bridge_s']:.1f} s ({out['prefill_ms_per_token']:.1f} ms per token)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
