"""Quantized completions of the default model, judged by several judges, for ``kvgeom judges compare``.

Generates the harmful calibration and held-out prompts under one KV scheme on every layer (default the audit's
sweep scheme, ``int3-tensor-sym``, forward mode, pre-RoPE keys) and writes ``OUT/rows/quantized.jsonl`` in the
audit's row format (:mod:`kvgeom.audit.rows`), judged by every judge of ``--judge`` (settling only where every
judge has settled). With an audit's ``rows/baseline.jsonl`` in ``OUT`` (its full-precision rows), the comparison
also gives each judge's flip rate. Usage::

    python benchmarks/judge_rows.py --out /tmp/judge18 --judge keyword,keyword:phrases=jbb,keyword:degeneracy=off
    kvgeom judges compare /tmp/judge18
"""

from __future__ import annotations

import argparse

import pandas as pd

from kvgeom.audit import AuditConfig
from kvgeom.audit.config import split_prompts
from kvgeom.audit.rows import judge_rows, save_rows
from kvgeom.evaluate import evaluate
from kvgeom.judges import JudgePanel, add_judge_argument
from kvgeom.models import load_model
from kvgeom.prompts import PromptSet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--scheme", default="int3-tensor-sym")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    add_judge_argument(ap, default="keyword,keyword:phrases=jbb,keyword:degeneracy=off")
    args = ap.parse_args()
    panel = JudgePanel.from_spec(args.judge)
    cfg = AuditConfig(device=args.device, max_new_tokens=args.max_new_tokens)
    calib, held = split_prompts(cfg)
    frame = pd.concat([calib.frame.assign(split="calibration"), held.frame.assign(split="held_out")],
                      ignore_index=True)
    model = load_model(cfg.model, device=args.device)
    plan = cfg.plan(args.scheme, name="all layers")
    rows = evaluate(model, PromptSet("harmful", frame.drop(columns="split")), [plan], judge=panel,
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, settle=True, progress="quantized")
    rows = rows.assign(stage="layer_sweep", split=frame["split"].tolist())
    save_rows(args.out, "quantized", judge_rows([rows], panel))
    print(f"wrote {args.out}/rows/quantized.jsonl ({len(rows)} rows)")


if __name__ == "__main__":
    main()
