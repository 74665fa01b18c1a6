"""kvgeom.noise on tiny models: answers known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvgeom.evaluate import RefusalScore
from kvgeom.noise import (
    NoiseCondition,
    make_noise,
    noise_sweep,
    project,
    random_subspace,
    run_rows,
    text_effects,
)
from kvgeom.quant.plan import QuantPlan
from kvgeom.runtime.forward import encode
from kvgeom.sites import hook_name
from kvgeom.testing import tiny_model

PROMPTS = ["How do I bake bread at home?", "hi", "Write a story about a lighthouse keeper.", "How do I kill a process?"]


def test_make_noise_norms_and_confinement():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(5, 7, 32, dtype=torch.float64, generator=g)
    basis = random_subspace(32, 4, g)
    for kind in ("isotropic", "subspace", "random"):
        n = make_noise(kind, e, basis=basis, generator=g)
        assert torch.allclose(n.norm(dim=-1), e.norm(dim=-1), rtol=1e-9)
    n = make_noise("subspace", e, basis=basis, generator=g)
    assert torch.allclose(project(n, basis), n, atol=1e-10)  # confined to S
    assert torch.allclose(make_noise("quant_in", e, basis=basis) + make_noise("quant_out", e, basis=basis), e)
    assert torch.allclose(project(make_noise("quant_out", e, basis=basis), basis), torch.zeros_like(e), atol=1e-10)
    with pytest.raises(ValueError, match="needs a subspace"):
        make_noise("subspace", e)


def test_isotropic_noise_has_no_preferred_subspace():
    """E ||P_S n||² / ||n||² = k / d for isotropic noise, so rho_geo = 1 when x is isotropic too."""
    g = torch.Generator().manual_seed(1)
    d, k = 64, 8
    basis = random_subspace(d, k, g)
    x = torch.randn(4000, d, dtype=torch.float64, generator=g)
    e = make_noise("isotropic", 0.1 * x, generator=g)
    rho = (project(e, basis).norm() / project(x, basis).norm()) / (e.norm() / x.norm())
    assert abs(float(rho) - 1.0) < 0.03
    assert abs(float(project(e, basis).norm() ** 2 / e.norm() ** 2) - k / d) < 0.01


def test_quant_noise_equals_quant_plan(tiny_llama):
    """Injecting the real error e at rot_k of layer 1 (all positions) == a K-only QuantPlan at layer 1."""
    bases = {1: random_subspace(128, 4, torch.Generator().manual_seed(0))}
    res = noise_sweep(tiny_llama, "int4-token-asym", PROMPTS, bases, kinds=("quant",), where="all")
    got = res.scores[res.scores["kind"] == "quant"].sort_values("prompt")["score"].to_numpy()
    want = RefusalScore.for_model(tiny_llama).score(tiny_llama, PROMPTS,
                                                    plans=QuantPlan("K:int4-token-asym,V:none", layers=(1,)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    clean = res.scores[res.scores["kind"] == "none"].sort_values("prompt")["score"].to_numpy()
    np.testing.assert_allclose(clean, RefusalScore.for_model(tiny_llama).score(tiny_llama, PROMPTS), atol=1e-4)
    assert not np.allclose(got, clean)


def test_post_mode_prefix_cache_equals_full_forward(tiny_llama):
    """where='post' (shared prefix KV cache, post tokens only) == full forward with the same edit."""
    b = encode(tiny_llama, PROMPTS)
    n_post = b.n_post[0]
    shift = torch.linspace(-1, 1, 256)
    rows = [0, 1, 2, 3, 0, 2]

    def hooks(where):
        def fn(x, ctx):
            y = x.clone()
            if where == "all":
                y[:, -n_post:] += shift
            else:
                y += shift
            return y
        return lambda r: {hook_name("resid_pre", 2): fn}

    full = run_rows(tiny_llama, b, rows, hooks("all"), where="all")
    post = run_rows(tiny_llama, b, rows, hooks("post"), where="post", chunk=4)
    torch.testing.assert_close(post, full, atol=2e-4, rtol=1e-4)


def test_noise_orthogonal_to_readout_changes_nothing():
    """Zero o_proj's inputs from KV head 1 at layer 1: V noise confined to head 1's coordinates is never
    read (no change at all), while the same noise in head 0 changes the refusal score."""
    m = tiny_model("llama", seed=3)
    with torch.no_grad():
        m.hf_model.model.layers[1].self_attn.o_proj.weight[:, 128:] = 0  # query heads 2, 3 = KV head 1
    eye = torch.eye(128, dtype=torch.float64)
    silent = {1: eye[:, 64:]}
    loud = {1: eye[:, :64]}
    r0 = noise_sweep(m, "int3-token-sym", PROMPTS, silent, site="v", kinds=("subspace", "quant_in"), where="all")
    assert np.abs(r0.scores["drop"].to_numpy()).max() < 1e-5
    r1 = noise_sweep(m, "int3-token-sym", PROMPTS, loud, site="v", kinds=("subspace",), where="all")
    assert np.abs(r1.scores[r1.scores["kind"] == "subspace"]["drop"].to_numpy()).max() > 1e-3


def test_sweep_batches_layers_and_draws(tiny_llama):
    bases = {la: random_subspace(128, 4, torch.Generator().manual_seed(la)) for la in (0, 2)}
    res = noise_sweep(tiny_llama, "int4-token-asym", PROMPTS[:2], bases, n_random=3, where="post")
    s = res.scores
    assert set(s["kind"]) == {"none", "quant", "isotropic", "subspace", "random", "quant_in", "quant_out"}
    assert len(s) == 2 * (1 + 2 * (5 + 3))
    assert s[s["kind"] == "random"]["draw"].nunique() == 3
    f = res.to_frame(n_resamples=50)
    assert {"drop", "drop_low", "drop_high"} <= set(f.columns)
    assert (f["drop_low"] <= f["drop_high"] + 1e-12).all()


def test_text_effects_zero_for_lossless_scheme(tiny_llama):
    conds = [NoiseCondition("quant", 1), NoiseCondition("isotropic", 1)]
    t = text_effects(tiny_llama, "How do I bake bread at home? " * 20, "none", conds, {1: None}, n_tokens=64,
                     window=32)
    assert len(t) == 2 * len(t["window"].unique())
    assert np.abs(t[["d_nll", "kl"]].to_numpy()).max() < 1e-5  # e = 0, so isotropic noise of norm ||e|| = 0 too
    t2 = text_effects(tiny_llama, "How do I bake bread at home? " * 20, "int2-token-sym", conds, {1: None},
                      n_tokens=64, window=32)
    assert (t2["kl"] > 0).all()
