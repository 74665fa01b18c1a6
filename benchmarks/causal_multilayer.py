"""Causal ratios with noise at several layers at once and every prompt position (:func:`kvgeom.noise.causal_ratio`).

    python benchmarks/causal_multilayer.py --json docs/bench/causal_multilayer_default.json     # default model, CPU
    python benchmarks/causal_multilayer.py --arch qwen2.5-7b --device cuda --json out.json      # timing, GPU

* Model: kvgeom's registered default (``kvgeom.models.load_model()``) on ``--device`` (CPU by default), or with
  ``--arch`` a random-weight model built as ``benchmarks/audit_gpu.py`` builds it (bf16 on CUDA; timing only: its
  numbers mean nothing).
* Safety subspace ``S`` per layer: the sensitivity stage's own (``kvgeom.geometry.sensitivity_profile(...)
  .subspaces``: uncentred PCA of harmful minus harmless ``--site`` vectors at the post-instruction tokens,
  ``var=0.9``), fitted on ``--n-fit`` harmful prompts *after* the measured ones (bundled rows ``n .. n+n_fit``) and
  the first ``--n-fit`` harmless prompts, so the prompts the noise is measured on are held out from ``S``.
* Noise: for each ``--schemes`` scheme, ``none``, ``quant``, ``subspace`` and ``isotropic`` (``--n-draws`` draws
  each), ``random`` (``--n-random`` draws; ``--attribution`` adds ``quant_in``/``quant_out``) on all ``--layers`` at
  once, at every prompt position (``where="all"``), on the first ``--n`` bundled harmful prompts. Bootstrap CIs
  over prompts (draws averaged per prompt first).
* The JSON has wall seconds per phase (load, subspaces, then per scheme capture / rows / stats) and the drops
  and ratios (``CausalRatio.to_dict()``), plus the GPU's peak memory on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=None, help="random-weight model of benchmarks/audit_gpu.py (timing only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=32, help="harmful prompts the noise is measured on")
    p.add_argument("--n-fit", type=int, default=32, help="harmful and harmless prompts S is fitted on (held out)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layers noised at once (default: 6 evenly spaced, 2 6 10 14 18 22 on a 24-layer model)")
    p.add_argument("--schemes", nargs="+", default=["int4-token-asym"])
    p.add_argument("--site", default="rot_k")
    p.add_argument("--n-random", type=int, default=8)
    p.add_argument("--n-draws", type=int, default=1, help="draws of subspace and isotropic noise per prompt")
    p.add_argument("--attribution", action="store_true", help="also quant_in / quant_out (P_S e, e - P_S e)")
    p.add_argument("--n-resamples", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=None, help="rows per batched pass (default 64 CPU, 256 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from kvgeom.geometry import sensitivity_profile
    from kvgeom.noise import CAUSAL_KINDS, causal_ratio
    from kvgeom.prompts import load_prompts

    cuda = a.device.startswith("cuda")
    chunk = a.chunk or (256 if cuda else 64)
    seconds: dict = {}
    t = time.perf_counter()
    if a.arch:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from audit_gpu import build  # benchmarks/ is on sys.path

        model = build(a.arch, a.device, torch.bfloat16 if cuda else torch.float32)
    else:
        from kvgeom.models import load_model

        model = load_model(device=a.device)
    sync(a.device)
    seconds["load"] = time.perf_counter() - t
    n_layers = model.n_layers
    layers = a.layers or ([round(2 + i * (n_layers - 4) / 5) for i in range(6)] if n_layers >= 8 else
                          list(range(n_layers)))
    harmful, harmless = load_prompts("harmful").prompts, load_prompts("harmless").prompts
    if a.n + a.n_fit > len(harmful) or a.n_fit > len(harmless):
        raise SystemExit(f"--n + --n-fit = {a.n + a.n_fit} exceeds the {len(harmful)} bundled harmful prompts")
    measured, fit_h, fit_b = harmful[:a.n], harmful[a.n:a.n + a.n_fit], harmless[:a.n_fit]

    t = time.perf_counter()
    prof = sensitivity_profile(model, a.schemes[0], fit_h, fit_b, site=a.site, layers=layers, causal_layers=[],
                               n_resamples=200, seed=a.seed, chunk=chunk)
    sync(a.device)
    seconds["subspaces"] = time.perf_counter() - t
    subs = prof.subspaces
    undefined = [la for la in layers if not subs[la].defined]
    if undefined:
        print(f"S undefined at layers {undefined} ({subs[undefined[0]].note}); they are left out", flush=True)
    bases = {la: subs[la].basis for la in layers if subs[la].defined}
    kinds = tuple(CAUSAL_KINDS) + (("quant_in", "quant_out") if a.attribution else ())
    results = {}
    for scheme in a.schemes:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        r = causal_ratio(model, scheme, measured, bases, site=a.site, kinds=kinds, n_random=a.n_random,
                         n_draws=a.n_draws, where="all", n_resamples=a.n_resamples, seed=a.seed, chunk=chunk)
        sync(a.device)
        seconds[f"causal[{scheme}]"] = time.perf_counter() - t
        results[scheme] = r.to_dict()
        if cuda:
            results[scheme]["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        print(f"[{scheme}] {seconds[f'causal[{scheme}]']:.1f} s  rows {r.settings['n_rows']}", flush=True)
        print(r.drops.to_string(index=False), flush=True)
        print(r.ratios.to_string(index=False), flush=True)
    geo = prof.to_frame()[["layer", "k", "effective_rank", "rel_err", "rho_geo", "rho_geo_low", "rho_geo_high"]]
    out = {"model": model.name, "arch": a.arch, "device": a.device,
           "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
           "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "torch": torch.__version__, "args": vars(a), "layers": sorted(bases), "n_layers": n_layers,
           "chunk": chunk, "seconds": seconds, "subspaces": geo.to_dict(orient="records"), "results": results,
           "command": "python benchmarks/causal_multilayer.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    text = json.dumps(out, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    print(text if not a.json else f"wrote {a.json}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
