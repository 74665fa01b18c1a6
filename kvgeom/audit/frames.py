"""Tables of the audit's stages: :func:`stage_frame` turns a stage's result (the ``audit.json`` dict) into a
DataFrame, one row per layer, channel, candidate... — what a notebook shows and what you filter and plot."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

__all__ = ["stage_frame"]


def _rates(d: Mapping[str, Any], keys: tuple[str, ...], prefix: str = "") -> list[dict]:
    return [{"what": f"{prefix}{k}", **(d.get(k) or {})} for k in keys if k in d]


def _mitigation(r: Mapping[str, Any]) -> pd.DataFrame:
    rows = []
    for split, ref in (r.get("reference") or {}).items():
        for what in ("full", "uniform"):
            v = ref.get(what) or {}
            rows.append({"candidate": what if what == "full" else f"uniform {r.get('target_scheme')}",
                         "split": split, "bits_per_element": 16.0 if what == "full" else r.get("uniform_bits"),
                         "refusal": v.get("rate"), "refusal_low": v.get("low"), "refusal_high": v.get("high"),
                         "flip": (ref.get("uniform_flip") or {}).get("rate") if what == "uniform" else None})
    for c in r.get("candidates", []):
        res = c.get("results") or {}
        for split in ("calibration", "held_out"):
            s = res.get(split)
            if not s:
                continue
            rec, flip, ref = s.get("recovery") or {}, s.get("flip") or {}, s.get("refusal") or {}
            rows.append({"candidate": c["name"], "split": split, "bits_per_element": c.get("bits_per_element"),
                         "refusal": ref.get("rate"), "refusal_low": ref.get("low"), "refusal_high": ref.get("high"),
                         "flip": flip.get("rate"), "flip_low": flip.get("low"), "flip_high": flip.get("high"),
                         "recovery": rec.get("estimate"), "recovery_low": rec.get("low"),
                         "recovery_high": rec.get("high"), "source": c.get("source")})
    return pd.DataFrame(rows)


def stage_frame(name: str, result: Mapping[str, Any]) -> pd.DataFrame:
    """A table of one stage's result (``audit["stages"][name]`` or the return of ``stage_NAME``).

    baseline: one row per rate (calibration, held-out, over-refusal) · layer_sweep: one row per layer plus
    ``all layers`` · sensitivity: one row per layer · outliers: one row per key channel (``is_outlier``) ·
    channel_ablation: one row per quantized subset · pcr: one row · label: one row per decision rule ·
    mitigation: one row per (candidate, split), with the full-precision and uniform references · export: one row
    per serving stack · bit_sweep: one row per bit-width · agreement: one row per prompt split.
    """
    r = result
    if name == "baseline":
        rows = _rates(r, ("calibration", "held_out", "over_refusal"))
        ppl = r.get("perplexity") or {}
        return pd.DataFrame(rows).assign(ppl=ppl.get("ppl"), ppl_target=ppl.get("ppl_target"),
                                         ppl_ratio=ppl.get("ppl_ratio"))
    if name == "layer_sweep":
        f = pd.DataFrame(r["layers"]).assign(layer=lambda d: d["layer"].astype(object))
        return pd.concat([f, pd.DataFrame([{"layer": "all layers", **r["all_layer"]}])], ignore_index=True)
    if name == "sensitivity":
        return pd.DataFrame(r["layers"])
    if name == "outliers":
        f = pd.DataFrame(r["magnitudes"])
        out = {(c["layer"], c["head"], c["dim"]) for c in r["channels"]}
        return f.assign(is_outlier=[(a, b, c) in out for a, b, c in zip(f["layer"], f["head"], f["dim"], strict=True)])
    if name == "channel_ablation":
        return pd.DataFrame(r["rows"]).assign(layer=r["layer"])
    if name == "pcr":
        return pd.DataFrame([{"layer": r["layer"], "pcr": r.get("estimate"), "low": r.get("low"), "high": r.get("high"),
                              "flip_per_tensor": r["flip_per_tensor"]["rate"],
                              "flip_per_channel": r["flip_per_channel"]["rate"],
                              "scheme_per_tensor": r["scheme_per_tensor"],
                              "scheme_per_channel": r["scheme_per_channel"]}])
    if name == "label":
        return pd.DataFrame([{**t, "label_if_fired": t.get("label")} for t in r["trace"]]).drop(columns="label")
    if name == "mitigation":
        return _mitigation(r)
    if name == "export":
        return pd.DataFrame([{"stack": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, (list, dict))}}
                             for k, v in r.items() if k in ("vllm", "llama_cpp", "hf") and isinstance(v, dict)])
    if name == "bit_sweep":
        return pd.DataFrame(r["rows"])
    if name == "agreement":
        if "agree" not in r:
            return pd.DataFrame([r])
        return pd.DataFrame([{"split": s, **{k: v for k, v in r[s].items() if k != "layer_sweep"}}
                             for s in ("calibration", "held_out")]).assign(agree=r["agree"])
    raise ValueError(f"unknown stage {name!r}; stages: baseline, layer_sweep, sensitivity, outliers, channel_ablation, "
                     "pcr, label, mitigation, export, bit_sweep, agreement")
