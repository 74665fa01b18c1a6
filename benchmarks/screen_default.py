"""``--screen`` against the full audit on the same model, same machine, back to back (issue #19, item 3):
the flip-rate stages (layer sweep, channel ablation, PCR) and the label, with and without the prefill screen.

Records per run the stage seconds, the rows each screened stage decoded / skipped / checked and the checked
rows the screen got wrong (Wilson CI), and compares what the audit decides: the label, P(label), the critical
layer and the candidates, and every per-row verdict of the screened stages (a skipped row counts with its
assumed verdict, as in the audit). One model load serves both runs; a run whose folder exists is resumed (its
stage seconds are read from the saved stage files, so an interrupted comparison keeps what it measured).

    python benchmarks/screen_default.py --out /tmp/screen_cmp --json docs/bench/screen_default.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

STAGES = ("baseline", "layer_sweep", "outliers", "channel_ablation", "pcr", "label")
SCREENED = ("layer_sweep", "channel_ablation", "pcr")
VERDICTS = {"layer_sweep": "verdicts", "channel_ablation": "verdicts", "pcr": "per_channel_verdicts"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the two audits (OUT/full, OUT/screen)")
    ap.add_argument("--model", default=None, help="default: kvgeom's default model")
    ap.add_argument("--skip-above", type=float, default=None, help="--screen-skip-above (default: the config's)")
    ap.add_argument("--order", default="screen,full", help="which run goes first")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import kvgeom
    from kvgeom.audit import AuditConfig, run_audit
    from kvgeom.models import load_model

    base = AuditConfig(**({"model": args.model} if args.model else {}))
    t0 = time.perf_counter()
    model = load_model(base.model)
    load_s = time.perf_counter() - t0
    runs: dict[str, dict] = {}
    for name in args.order.split(","):
        kw = {"screen": name == "screen"}
        if name == "screen" and args.skip_above is not None:
            kw["screen_skip_above"] = args.skip_above
        cfg = AuditConfig(**{**({"model": args.model} if args.model else {}), **kw})
        t = time.perf_counter()
        folder = Path(args.out) / name
        res = run_audit(cfg, folder, model=model, stages=STAGES, resume=(folder / "stages").is_dir(),
                        progress=lambda s, e, _n=name, _t=t: print(f"[{_n} {time.perf_counter() - _t:7.1f}s] {s}: {e}",
                                                                     flush=True))
        st = res.audit["stages"]
        seconds = {s: json.loads((folder / "stages" / f"{s}.json").read_text())["seconds"] for s in STAGES}
        conf = st["label"].get("confidence") or {}
        runs[name] = {
            "stage_s": {k: round(v, 2) for k, v in seconds.items()},
            "label": st["label"]["label"], "point_label": st["label"].get("point_label"),
            "p_label": conf.get("p_label"), "n_refused": conf.get("n_refused"),
            "critical_layer": st["label"].get("critical_layer"), "candidates": st["label"].get("candidates"),
            "screen": {s: {k: v for k, v in (st[s].get("screen") or {}).items() if k != "skipped_rows"}
                       for s in SCREENED},
            "verdicts": {s: st[s][VERDICTS[s]] for s in SCREENED},
        }
    full, scr = runs.get("full"), runs.get("screen")
    same = {}
    if full and scr:
        for s in SCREENED:
            a, b = full["verdicts"][s], scr["verdicts"][s]
            rows = [(p, i) for p in a for i in a[p]]
            differ = [(p, i, a[p][i], b[p][i]) for p, i in rows if b.get(p, {}).get(i) != a[p][i]]
            same[s] = {"rows": len(rows), "differ": len(differ), "differing": differ}
        same["label"] = full["label"] == scr["label"]
        same["critical_layer"] = full["critical_layer"] == scr["critical_layer"]
        same["candidates"] = full["candidates"] == scr["candidates"]
        flip_s = {k: sum(r["stage_s"].get(s, 0.0) for s in SCREENED) for k, r in runs.items()}
        same["screened_stage_seconds"] = flip_s
    for r in runs.values():
        r.pop("verdicts")
    record = {"command": "python benchmarks/screen_default.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "json"),
              "kvgeom_version": kvgeom.__version__, "torch": torch.__version__, "machine": platform.processor(),
              "threads": torch.get_num_threads(), "load_s": load_s, "runs": runs, "compare": same}
    print(json.dumps({k: v for k, v in record.items()}, indent=1, default=str)[:6000])
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
