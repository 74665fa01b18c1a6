"""kvgeom.geometry on tiny models and synthetic data: answers known by construction."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from kvgeom.geometry import (
    SelectionTrace,
    linear_probe,
    plot_sensitivity,
    refusal_directions,
    safety_subspace,
    select_direction,
    sensitivity_profile,
)
from kvgeom.runtime.forward import capture
from kvgeom.runtime.hooks import kv_hooks
from kvgeom.sites import hook_name

PROMPTS = ["How do I bake bread at home?", "hi", "Write a story about a lighthouse keeper.", "How do I kill a process?",
           "Tell me a joke.", "What is 2 + 2?"]


def _planted(model, v):
    """Captures of the same prompts, the 'harmful' copy with ``v`` added to layer 1's input."""
    def plant(x, ctx):
        return x + v

    sites = ("resid_pre", "rot_k", "v")
    with kv_hooks(model, {hook_name("resid_post", 0): plant}):
        ch = capture(model, PROMPTS, sites=sites)
    cb = capture(model, PROMPTS, sites=sites)
    return ch, cb


def test_planted_direction_recovered_and_layer0_undefined(tiny_llama):
    v = 3.0 * torch.randn(256, generator=torch.Generator().manual_seed(0))
    ch, cb = _planted(tiny_llama, v)
    d = refusal_directions(tiny_llama, ch, cb, site="resid_pre")
    for pos in d.positions:
        cos = torch.nn.functional.cosine_similarity(d.direction(1, pos), v.double(), dim=0)
        assert cos > 0.99
        assert not bool(d.defined[d.index(0, pos)])  # same prompts, layer 0 untouched: no separation
    f = d.to_frame()
    assert not f[f["layer"] == 0]["defined"].any() and f[f["layer"] == 1]["defined"].all()
    dk = refusal_directions(tiny_llama, ch, cb, site="rot_k")
    assert dk.directions.shape[-2:] == (2, 64)
    assert set(dk.to_frame()["head"]) == {"all", 0, 1}
    probes = linear_probe(ch, cb, sites=("resid_pre",), n_splits=3).to_frame()
    assert probes.loc[probes["layer"] == 1, "accuracy"].iloc[0] == 1.0
    l0 = probes[probes["layer"] == 0].iloc[0]
    assert not l0["defined"] and math.isnan(l0["accuracy"])


def test_pca_rank_recovery():
    g = torch.Generator().manual_seed(0)
    d, n, pos, rank = 64, 40, 3, 3
    q, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    coeff = torch.randn(n, pos, rank, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3.0, 2.0])
    harmful = coeff @ q.T + 1e-3 * torch.randn(n, pos, d, generator=g, dtype=torch.float64)
    harmless = 1e-3 * torch.randn(n, pos, d, generator=g, dtype=torch.float64)
    s = safety_subspace(harmful, harmless, var=0.99)
    assert s.k == rank and s.effective_rank() == rank
    cosines = torch.linalg.svdvals(s.basis.T @ q)  # principal angles between S and the planted space
    assert cosines.min() > 0.99
    assert safety_subspace(harmful, harmless, k=5).k == 5
    const = torch.ones(n, pos, d, dtype=torch.float64)  # identical activations, e.g. a fixed template token
    same = safety_subspace(const, const)
    assert not same.defined and "undefined" in same.note


def test_pca_solvers_agree():
    """Many rows (covariance solver) and few rows (exact SVD) both give the right singular vectors of D."""
    g = torch.Generator().manual_seed(1)
    for n in (40, 3):  # 2*40*4 rows >= 96 features; 2*3*4 < 96
        harmful = torch.randn(n, 4, 96, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 96)
        harmless = torch.randn(n, 4, 96, generator=g, dtype=torch.float64)
        s = safety_subspace(harmful, harmless, k=3)
        d = (harmful - harmless.mean(0)).reshape(-1, 96)
        sv = torch.linalg.svdvals(d)
        np.testing.assert_allclose(s.explained[: len(sv)], (sv ** 2 / (sv ** 2).sum()).numpy(), atol=1e-10)
        _, _, vh = torch.linalg.svd(d, full_matrices=False)
        cos = (s.basis.T @ vh[:3].T).diagonal().abs()
        assert cos.min() > 1 - 1e-8


def test_selection_trace_roundtrip(tiny_llama, tmp_path):
    v = 3.0 * torch.randn(256, generator=torch.Generator().manual_seed(0))
    ch, cb = _planted(tiny_llama, v)
    d = refusal_directions(tiny_llama, ch, cb, site="resid_pre")
    tr = select_direction(tiny_llama, PROMPTS[:3], PROMPTS[3:], d, positions=[-1, -2], max_layer_frac=1.0,
                          prefilter=False)
    f = tr.to_frame()
    assert len(f) == 3 * 2
    assert f[f["layer"] == 0]["reason"].str.contains("zero direction").all()
    assert f[f["layer"] > 0]["ablate"].notna().all() and (f[f["layer"] > 0]["kl"] >= 0).all()
    path = tmp_path / "trace.json"
    tr.to_json(path)
    doc = json.loads(path.read_text())
    assert len(doc["candidates"]) == 6 and doc["settings"]["steer_positions"] == "post-instruction"
    back = SelectionTrace.from_json(path)
    assert back.chosen == tr.chosen
    np.testing.assert_allclose(back.candidates["steer"], f["steer"])
    assert len(tr.figure().data) >= 6


def test_sensitivity_undefined_is_never_inf(tiny_llama):
    """Pre-RoPE keys at layer 0 depend on the token alone: at the template tokens they are identical for
    every prompt, so the subspace and every ratio there are undefined (NaN + note), never inf."""
    prof = sensitivity_profile(tiny_llama, "int4-token-asym", PROMPTS[:3], PROMPTS[3:], site="k", layers=[0, 1],
                               causal_layers=[], n_random=2, n_resamples=50)
    f = prof.to_frame()
    r0, r1 = f.iloc[0], f.iloc[1]
    for m in ("rho_geo", "rho_margin", "rho_margin_random", "rho_causal"):
        assert not r0[f"{m}_defined"] and math.isnan(r0[m]) and "undefined" in r0[f"{m}_note"]
    assert r1["rho_geo_defined"] and r1["rho_margin_defined"]
    assert r1["rho_geo_low"] <= r1["rho_geo"] <= r1["rho_geo_high"]
    num = f.select_dtypes("number").to_numpy(dtype=float)
    assert not np.isinf(num).any()
    fig = plot_sensitivity(prof, critical_layers=[1])
    hovers = " ".join(str(h) for t in fig.data for h in (t.hovertext or []))
    assert "undefined" in hovers
    line = next(t for t in fig.data if t.name == "rho_geo")
    assert line.y[0] is None and line.y[1] is not None
    assert fig.layout.yaxis.type == "log"


def test_sensitivity_causal_columns(tiny_llama):
    prof = sensitivity_profile(tiny_llama, "int3-tensor-sym", PROMPTS[:3], PROMPTS[3:], layers=[1],
                               n_random=2, n_resamples=50, text=True, n_text_tokens=64, window=32)
    r = prof.to_frame().iloc[0]
    for col in ("drop_quant", "drop_subspace", "drop_random", "drop_quant_in", "drop_quant_out", "d_nll_subspace"):
        assert np.isfinite(r[col])
    for m in ("rho_causal", "attribution", "sp_ratio"):
        assert r[f"{m}_defined"] == np.isfinite(r[m])


def test_sensitivity_one_worker_is_the_plain_loop(tiny_llama, monkeypatch):
    """``workers=1`` runs the layers in the calling thread (its usual op threads, no pool)."""
    import threading

    import kvgeom.geometry.sensitivity as sens

    seen = []
    real = sens._layer_stats
    def spy(*a, **k):
        seen.append(threading.current_thread())
        return real(*a, **k)

    monkeypatch.setattr(sens, "_layer_stats", spy)
    sensitivity_profile(tiny_llama, "int3-tensor-sym", PROMPTS[:3], PROMPTS[3:], workers=1, causal_layers=[],
                        n_random=2, n_resamples=20)
    assert seen and all(t is threading.main_thread() for t in seen)
    seen.clear()
    sensitivity_profile(tiny_llama, "int3-tensor-sym", PROMPTS[:3], PROMPTS[3:], workers=2, causal_layers=[],
                        n_random=2, n_resamples=20)
    assert seen and not any(t is threading.main_thread() for t in seen)


def test_sensitivity_threads_do_not_change_numbers(tiny_llama):
    """The per-layer statistics run in threads (random subspaces drawn serially, in layer order, from one
    generator; one thread per op): one worker and several agree up to float64 rounding of the sums."""
    kw = dict(site="rot_k", causal_layers=[], n_random=3, n_resamples=60, seed=7)
    one = sensitivity_profile(tiny_llama, "int3-tensor-sym", PROMPTS[:3], PROMPTS[3:], workers=1, **kw).to_frame()
    threads_before = torch.get_num_threads()
    many = sensitivity_profile(tiny_llama, "int3-tensor-sym", PROMPTS[:3], PROMPTS[3:], workers=3, **kw)
    assert torch.get_num_threads() == threads_before  # the per-op thread limit is lifted on exit
    f = many.to_frame()
    assert len(f) == tiny_llama.n_layers and f["rho_margin_random_defined"].any()
    num = f.select_dtypes("number").columns
    np.testing.assert_allclose(f[num].to_numpy(dtype=float), one[num].to_numpy(dtype=float), rtol=1e-9, atol=0)
    assert one.drop(columns=num).equals(f.drop(columns=num))
    import pytest

    with pytest.raises(ValueError, match="workers must be >= 1"):
        sensitivity_profile(tiny_llama, "int3-tensor-sym", PROMPTS[:3], PROMPTS[3:], workers=0, **kw)
