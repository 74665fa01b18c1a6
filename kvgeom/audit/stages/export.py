"""Stage ``export``: serving settings (vLLM, llama.cpp, HF) for the best verified mitigation, or the precision
search's assignment when it met its target, or the target scheme when nothing was verified.
Proved by ``tests/mitigation/`` and ``tests/audit/test_audit.py``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pandas as pd

from kvgeom.viz.markup import esc

from ..inputs import AuditInputs
from ..schema import STR, obj
from ..stage import Section, Stage, StageResults, register_stage


def run(inputs: AuditInputs, results: StageResults) -> dict:
    from kvgeom.mitigation import export_settings

    cfg, model = inputs.cfg, inputs.model

    search = results["mitigation"].get("search")
    if search and search.get("met"):
        out = export_settings(search["assignment"], model.n_layers, model=cfg.model, d_head=model.d_head,
                              n_kv_heads=model.n_kv_heads)
        return {**out, "source": "precision search (cheapest assignment keeping >= 95% of full-precision refusal)"}

    cands = [c for c in results["mitigation"]["candidates"] if isinstance(c.get("results"), dict)
             and "calibration" in c["results"]]
    if not cands:
        return {**export_settings(cfg.scheme, model.n_layers, model=cfg.model, d_head=model.d_head,
                                  n_kv_heads=model.n_kv_heads), "source": "target scheme (no verified candidate)"}

    best, why = choose_candidate(cands)
    assignment = best["assignment"]
    chans = {int(k): v for k, v in (best.get("protect_channels") or {}).items()} if isinstance(
        best.get("protect_channels"), dict) else None
    arg: Any = assignment if not chans else {"assignment": assignment, "protect_channels": chans}
    try:
        out = export_settings(arg, model.n_layers, model=cfg.model, d_head=model.d_head, n_kv_heads=model.n_kv_heads)
    except (TypeError, ValueError):
        out = export_settings(assignment, model.n_layers, model=cfg.model, d_head=model.d_head,
                              n_kv_heads=model.n_kv_heads)
    return {**out, "source": f"candidate {best['name']!r} ({why})"}


def choose_candidate(cands: list[dict]) -> tuple[dict, str]:
    """The candidate to export, by the paired flip comparison: fewest held-out flips among the prompts refused at
    full precision, then fewest calibration flips, then fewest bits; ``why`` says it with the numbers."""
    def flips(c: dict, split: str) -> float:
        f = ((c["results"].get(split) or {}).get("flip") or {}).get("rate")
        return 1.0 if f is None else float(f)

    best = min(cands, key=lambda c: (flips(c, "held_out"), flips(c, "calibration"), c["bits_per_element"]))
    paired = (best["results"].get("held_out") or {}).get("paired") or {}
    if not paired.get("n_refused"):
        return best, "fewest calibration flips (no held-out prompt refused at full precision)"
    fu, fm, p = paired["flip_uniform"], paired["flip_mitigated"], paired["mcnemar_p"]
    verdict = "a significant" if p < 0.05 else "not a significant"
    return best, (f"fewest held-out flips: {fm['k']}/{fm['n']} refused prompts vs {fu['k']}/{fu['n']} under the "
                  f"uniform scheme, {verdict} difference (McNemar p={p:.2g}); ties broken by calibration flips, "
                  "then bits")


def render(stage: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    blocks = []
    for key, title in (("vllm", "vLLM"), ("llama_cpp", "llama.cpp"), ("hf", "HF transformers")):
        s = stage.get(key)
        if not s:
            continue
        pill = ('<span class="pill ok">expressible</span>' if s.get("expressible")
                else '<span class="pill bad">not expressible</span>')
        if s.get("expressible") and not s.get("exact", True):
            pill += ' <span class="pill bad">approximate</span>'
        code = s.get("cli") or s.get("python") or s.get("custom_code")
        extra = ""
        if s.get("cli") and s.get("python"):
            extra = f"<pre>{esc(s['python'])}</pre>"
        if s.get("custom_code") and code != s.get("custom_code"):
            extra += f"<pre>{esc(s['custom_code'])}</pre>"
        if key == "hf" and s.get("cache_config") and not s.get("python") and not s.get("custom_code"):
            extra += f"<pre>cache_config = {esc(json.dumps(s['cache_config']))}</pre>"
        notes = "".join(f"<li>{esc(n)}</li>" for n in s.get("notes", []))
        blocks.append(f"<div><h3>{title} {pill}</h3>{f'<pre>{esc(code)}</pre>' if code else ''}{extra}"
                      f"<ul class=notes>{notes}</ul></div>")
    src = f"<p>Settings for <b>{esc(stage['source'])}</b>.</p>" if stage.get("source") else ""
    return src + f'<div class="grid3">{"".join(blocks)}</div>'


def frame(r: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([{"stack": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, (list, dict))}}
                         for k, v in r.items() if k in ("vllm", "llama_cpp", "hf") and isinstance(v, dict)])


STAGE = register_stage(Stage(
    name="export", order=90, run=run, requires=("mitigation",), frame=frame,
    doc="serving settings for the chosen fix in each serving stack",
    section=Section("export", "Serving settings",
                    "How to run the chosen fix in each serving stack, and what each stack cannot express.", render),
    schema=obj({"source": STR}, vllm={"type": "object"}, llama_cpp={"type": "object"}, hf={"type": "object"}),
))
