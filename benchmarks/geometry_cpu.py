"""Geometry and sensitivity on the default model, on CPU: what docs/results.md ("Geometry") reports.

Stages (each timed; outputs written to ``--out`` as they finish):

1. capture ``resid_pre``, ``rot_k``, ``v`` at the post-instruction tokens of ``--n`` harmful and ``--n``
   harmless bundled prompts (all layers) -> refusal directions, safety subspaces, probes;
2. Arditi selection over ``--sel-layers`` x the post-instruction positions with ``--n-sel`` prompts per
   class (trace JSON + figure);
3. causal check of the chosen direction by greedy generation (``--n-gen`` prompts per class);
4. sensitivity profiles (geometric ratios, all layers) for each of ``--schemes`` at ``rot_k`` and ``v``;
   causal ratios at ``--causal-layers`` for ``--causal-schemes`` at ``rot_k`` (``--n-causal`` prompts,
   ``--text-tokens`` tokens of the bundled text).

    python benchmarks/geometry_cpu.py --out /tmp/kvgeom_geometry
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/kvgeom_geometry")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--n-sel", type=int, default=12)
    p.add_argument("--sel-layers", type=int, nargs="+", default=list(range(2, 24, 2)))
    p.add_argument("--n-gen", type=int, default=16)
    p.add_argument("--n-causal", type=int, default=16)
    p.add_argument("--schemes", nargs="+", default=["int4-token-asym", "int3-tensor-sym", "q4_0", "fp8_e5m2"])
    p.add_argument("--causal-schemes", nargs="+", default=["int4-token-asym", "int3-tensor-sym"])
    p.add_argument("--causal-layers", type=int, nargs="+", default=[2, 6, 10, 14, 18, 22])
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--stages", nargs="+", default=["geometry", "select", "check", "sensitivity"])
    p.add_argument("--steer-min", default="0", help="(b) filter: a number (Arditi: 0), 'harmful' or 'harmless'")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import kvgeom
    from kvgeom import geometry as G
    from kvgeom.prompts import load_prompts, load_text

    times: dict[str, float] = {}
    t0 = time.time()
    model = kvgeom.load_model()
    times["load"] = time.time() - t0
    harmful, harmless = load_prompts("harmful").prompts, load_prompts("harmless").prompts
    H, B = harmful[:a.n], harmless[:a.n]

    def done(stage: str, t: float) -> None:
        times[stage] = time.time() - t
        (out / "times.json").write_text(json.dumps({"times_s": times, "args": vars(a), "cpus": os.cpu_count(),
                                                    "threads": a.threads}, indent=1))
        print(f"[{stage}] {times[stage]:.1f} s", flush=True)

    directions = None
    if "geometry" in a.stages or "select" in a.stages:
        t = time.time()
        ch, cb = G.capture_pair(model, H, B, sites=("resid_pre", "rot_k", "v"))
        directions = G.refusal_directions(model, ch, cb, site="resid_pre")
        directions.to_frame().to_csv(out / "directions_resid_pre.csv", index=False)
        for site in ("rot_k", "v"):
            G.refusal_directions(model, ch, cb, site=site).to_frame().to_csv(out / f"directions_{site}.csv",
                                                                              index=False)
        G.safety_subspaces(ch, cb, sites=("resid_pre", "rot_k", "v")).to_frame().to_csv(out / "subspaces.csv",
                                                                                        index=False)
        G.linear_probe(ch, cb, sites=("resid_pre", "rot_k", "v")).to_frame().to_csv(out / "probes.csv", index=False)
        done("geometry", t)
    trace = None
    if "select" in a.stages:
        t = time.time()
        smin = a.steer_min if a.steer_min in ("harmful", "harmless") else float(a.steer_min)
        trace = G.select_direction(model, H[:a.n_sel], B[:a.n_sel], directions, layers=a.sel_layers,
                                   steer_min=smin)
        trace.to_json(out / "selection_trace.json")
        trace.figure().write_html(out / "selection.html", include_plotlyjs="cdn")
        print(trace.chosen, trace.chosen_row(), flush=True)
        done("select", t)
    if "check" in a.stages and trace is not None and trace.chosen is not None:
        t = time.time()
        cc = G.direction_causal_check(model, trace.direction, trace.chosen[0], harmful[a.n:a.n + a.n_gen],
                                      harmless[a.n:a.n + a.n_gen], max_new_tokens=16)
        cc.to_frame().to_csv(out / "causal_check.csv", index=False)
        cc.completions.to_csv(out / "causal_check_completions.csv", index=False)
        print(cc.to_frame(), flush=True)
        done("check", t)
    if "sensitivity" in a.stages:
        cache: dict = {}
        for scheme in a.schemes:
            for site in ("rot_k", "v"):
                t = time.time()
                causal = a.causal_layers if (scheme in a.causal_schemes and site == "rot_k") else []
                prof = G.sensitivity_profile(model, scheme, H, B, site=site, causal_layers=causal,
                                             text=load_text() if causal else None, n_text_tokens=a.text_tokens,
                                             capture_cache=cache, n_causal=a.n_causal)
                name = f"sensitivity_{scheme}_{site}"
                prof.to_frame().to_csv(out / f"{name}.csv", index=False)
                G.plot_sensitivity(prof).write_html(out / f"{name}.html", include_plotlyjs="cdn")
                done(name, t)
    print(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
