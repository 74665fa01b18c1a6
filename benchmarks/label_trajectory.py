"""The label's confidence as the calibration set grows (issue #15, "Measure and record"): the adaptive mode's
trajectory on the default model, drawing from every bundled non-held-out harmful prompt.

Runs :func:`kvgeom.audit.run_audit` with ``until_stable=True`` on the decision stages only (baseline, layer
sweep, PCR, label: what the label needs) and prints the trajectory saved in ``OUT/stages/_calibration.json``:
n calibration prompts, n refused, the point label and its share of resamples, the stated label, the critical
layer, seconds. ``--label-confidence 1.0`` (the default here) keeps drawing until every resample agrees or the
pool is spent, so the whole curve is seen; the n at which P(label) first reaches the audit's 0.8 is read off it.

    python benchmarks/label_trajectory.py --out /tmp/trajectory --json docs/bench/label_trajectory.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the audit's folder")
    ap.add_argument("--model", default=None, help="default: kvgeom's default model")
    ap.add_argument("--label-confidence", type=float, default=1.0)
    ap.add_argument("--max-calib", type=int, default=130)
    ap.add_argument("--max-minutes", type=float, default=90.0)
    ap.add_argument("--grow-step", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import kvgeom
    from kvgeom.audit import AuditConfig, run_audit
    from kvgeom.audit.adaptive import DECISION_STAGES

    extra = {"model": args.model} if args.model else {}
    cfg = AuditConfig(**extra, until_stable=True, label_confidence=args.label_confidence,
                      max_calib=args.max_calib, max_minutes=args.max_minutes, grow_step=args.grow_step)
    t0 = time.perf_counter()
    run_audit(cfg, args.out, stages=DECISION_STAGES, progress=lambda s, e: print(f"[{time.perf_counter() - t0:7.1f}s] "
                                                                              f"{s}: {e}", flush=True))
    wall = time.perf_counter() - t0
    record = json.loads((Path(args.out) / "stages" / "_calibration.json").read_text())
    print(f"{'n':>4} {'refused':>7} {'point label':<28} {'P':>5} {'stated':<28} critical  seconds")
    for p in record["trajectory"]:
        print(f"{p['n_calib']:>4} {p['n_refused']!s:>7} {p['point_label']!s:<28} {p['p_point'] or 0:5.2f} "
              f"{p['label']!s:<28} {p['critical_layer']!s:>8} {p['seconds']:8.1f}")
    print(f"stopped: {record['stopped']}; pool {record['pool_size']}; wall {wall:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/label_trajectory.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "json"),
            "kvgeom_commit": kvgeom.__version__, "torch": torch.__version__, "machine": platform.processor(),
            "threads": torch.get_num_threads(), "wall_s": wall, **record}, indent=1) + "\n")


if __name__ == "__main__":
    main()
