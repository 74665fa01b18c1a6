"""Noise at several layers at once (kvgeom.noise.conditions) and causal_ratio (kvgeom.noise.causal), on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvgeom.evaluate import RefusalScore
from kvgeom.noise import (
    NoiseCondition,
    capture_padded,
    causal_ratio,
    condition_deltas,
    quant_error,
    random_subspace,
    ratio_ci,
    run_rows,
    score_conditions,
)
from kvgeom.runtime.forward import encode
from kvgeom.sites import hook_name
from kvgeom.testing import tiny_model

PROMPTS = ["How do I bake bread at home?", "hi", "Write a story about a lighthouse keeper.", "How do I kill a process?"]
LAYERS = (0, 2)


def _errors(model, batch, scheme, site, layers):
    clean = capture_padded(model, batch, [site], list(layers))
    return {key: quant_error(x, batch.mask, scheme, site) for key, x in clean.items()}


def _bases(layers, k=4, d=128):
    return {la: random_subspace(d, k, torch.Generator().manual_seed(100 + la)) for la in layers}


def test_condition_single_and_multi_layer_forms():
    assert NoiseCondition("quant", 4) == NoiseCondition("quant", layers=(4,))
    c = NoiseCondition("random", layers=(16, 4, 10), draw=2)
    assert c.layers == (4, 10, 16) and c.layer is None
    assert c.label == "random@L4+10+16/rot_k#2"
    assert NoiseCondition("quant", 3, "v").layers == (3,)
    with pytest.raises(ValueError, match="layer=L"):
        NoiseCondition("quant")
    with pytest.raises(ValueError, match="not both"):
        NoiseCondition("quant", 1, layers=(1, 2))
    with pytest.raises(ValueError, match="repeated"):
        NoiseCondition("quant", layers=(1, 1))
    with pytest.raises(ValueError, match="unknown noise kind"):
        NoiseCondition("gaussian", 1)


def test_multilayer_deltas_are_the_single_layer_deltas(tiny_llama):
    """A condition on layers (0, 2) adds at each layer exactly what the single-layer condition of the same kind
    and draw adds there; random subspaces differ between layers and between draws."""
    batch = encode(tiny_llama, PROMPTS)
    errors = _errors(tiny_llama, batch, "int4-token-asym", "rot_k", LAYERS)
    bases = _bases(LAYERS)
    n = len(PROMPTS)
    for kind in ("quant", "isotropic", "subspace", "random", "quant_in", "quant_out"):
        conds = [NoiseCondition(kind, layers=LAYERS, draw=1), NoiseCondition(kind, 0, draw=1),
                 NoiseCondition(kind, 2, draw=1)]
        d = condition_deltas(conds, errors, bases, n)
        for i in range(n):
            torch.testing.assert_close(d.of_row("rot_k", 0, i), d.of_row("rot_k", 0, n + i), rtol=0, atol=0)
            torch.testing.assert_close(d.of_row("rot_k", 2, i), d.of_row("rot_k", 2, 2 * n + i), rtol=0, atol=0)
            assert d.of_row("rot_k", 2, n + i) is None and d.of_row("rot_k", 0, 2 * n + i) is None
            for la in LAYERS:  # ||n|| = ||e|| per position, each layer its own
                if kind in ("isotropic", "subspace", "random"):
                    torch.testing.assert_close(d.of_row("rot_k", la, i).flatten(-2).norm(dim=-1),
                                               errors[("rot_k", la)][i].flatten(-2).norm(dim=-1), rtol=1e-5, atol=1e-6)
    two = condition_deltas([NoiseCondition("random", layers=LAYERS, draw=0),
                            NoiseCondition("random", layers=LAYERS, draw=1)], errors, bases, n)
    assert not torch.allclose(two.of_row("rot_k", 0, 0), two.of_row("rot_k", 0, n))


@pytest.mark.parametrize("where", ["all", "post"])
def test_multilayer_equals_manual_hooks(tiny_llama, where):
    """Scoring a multi-layer condition == adding each layer's own delta with plain per-layer hooks (where='post':
    its post-instruction part, in a full forward)."""
    batch = encode(tiny_llama, PROMPTS)
    n, n_post = len(PROMPTS), batch.n_post[0]
    errors = _errors(tiny_llama, batch, "int3-token-sym", "rot_k", LAYERS)
    bases = _bases(LAYERS)
    conds = [NoiseCondition("none", layers=LAYERS), NoiseCondition("quant", layers=LAYERS),
             NoiseCondition("subspace", layers=LAYERS)]
    got = score_conditions(tiny_llama, batch, conds, errors, bases, where=where)
    single = condition_deltas([NoiseCondition("subspace", la) for la in LAYERS], errors, bases, n)
    manual = {"quant": {la: errors[("rot_k", la)] for la in LAYERS},
              "subspace": {la: torch.stack([single.of_row("rot_k", la, j * n + i) for i in range(n)])
                           for j, la in enumerate(LAYERS)}}
    rs = RefusalScore.for_model(tiny_llama)
    for c, kind in ((1, "quant"), (2, "subspace")):
        def hooks(rows, kind=kind):
            def add(la):
                def fn(x, ctx):
                    d = manual[kind][la].to(x.dtype).clone()
                    if where == "post":
                        d[:, :-n_post] = 0
                    return x + d[rows]
                return fn
            return {hook_name("rot_k", la): add(la) for la in LAYERS}

        want = rs.from_logits(run_rows(tiny_llama, batch, range(n), hooks, where="all"))
        torch.testing.assert_close(got[c], want, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got[c], got[0], atol=1e-3)  # the noise does something
    clean = rs.from_logits(run_rows(tiny_llama, batch, range(n), lambda rows: {}, where="all"))
    torch.testing.assert_close(got[0], clean, atol=1e-4, rtol=1e-4)


def test_rows_are_independent_of_their_batch(tiny_llama):
    """A row's score does not depend on the rows it is batched with (chunk 64 vs 1), and a deterministic
    condition on one prompt alone scores what it scores among all prompts."""
    bases = _bases(LAYERS)
    kw = dict(kinds=("quant", "subspace", "random"), n_random=2, n_resamples=20)
    big = causal_ratio(tiny_llama, "int3-token-sym", PROMPTS, bases, chunk=64, **kw).scores
    one = causal_ratio(tiny_llama, "int3-token-sym", PROMPTS, bases, chunk=1, **kw).scores
    np.testing.assert_allclose(big["score"].to_numpy(), one["score"].to_numpy(), atol=1e-4)
    for i, p in enumerate(PROMPTS):
        alone = causal_ratio(tiny_llama, "int3-token-sym", [p], bases, kinds=("quant",), n_resamples=10).scores
        want = big[(big["kind"] == "quant") & (big["prompt"] == i)]["score"].to_numpy()
        np.testing.assert_allclose(alone[alone["kind"] == "quant"]["score"].to_numpy(), want, atol=1e-4)


def _silenced(layers):
    """Tiny llama whose o_proj ignores KV head 1 (query heads 2, 3) at ``layers``: V in head 1 is never read."""
    m = tiny_model("llama", seed=3)
    with torch.no_grad():
        for la in layers:
            m.hf_model.model.layers[la].self_attn.o_proj.weight[:, 128:] = 0
    return m


def test_planted_silent_subspace_gives_zero_ratio():
    """S = KV head 1's V coordinates at every layer, which no layer reads: noise in S (and P_S e) changes nothing,
    random-subspace and isotropic noise of the same norm do, so rho_causal = 0 with CI [0, 0] and attribution 0."""
    layers = (0, 1, 2)
    m = _silenced(layers)
    silent = {la: torch.eye(128, dtype=torch.float64)[:, 64:] for la in layers}
    r = causal_ratio(m, "int2-token-sym", PROMPTS, silent, site="v", n_random=4, n_resamples=200,
                     kinds=("quant", "subspace", "random", "isotropic", "quant_in", "quant_out"))
    s = r.scores
    assert np.abs(s[s["kind"].isin(["subspace", "quant_in"])]["drop"].to_numpy()).max() < 1e-5
    drops = r.drops.set_index("kind")["drop"]
    assert abs(drops["random"]) > 1e-2 and abs(drops["isotropic"]) > 1e-2
    rho = r.rho_causal
    assert rho.defined and abs(rho.estimate) < 1e-3 and abs(rho.low) < 1e-3 and abs(rho.high) < 1e-3
    att = r.ratios.set_index("ratio").loc["attribution"]
    assert bool(att["defined"]) and abs(att["estimate"]) < 1e-3


def test_full_basis_attributes_everything_to_s(tiny_llama):
    """S = all of R^D at both layers: P_S e = e, so quant_in rows score exactly as quant rows and quant_out rows
    as clean ones; attribution = 1."""
    full = {la: torch.eye(128, dtype=torch.float64) for la in LAYERS}
    r = causal_ratio(tiny_llama, "int2-token-sym", PROMPTS, full, kinds=("quant", "quant_in", "quant_out"),
                     n_resamples=100)
    s = r.scores.set_index(["kind", "prompt"])["score"]
    np.testing.assert_allclose(s["quant_in"].to_numpy(), s["quant"].to_numpy(), atol=1e-5)
    np.testing.assert_allclose(s["quant_out"].to_numpy(), s["none"].to_numpy(), atol=1e-5)
    att = r.ratios.set_index("ratio").loc["attribution"]
    assert bool(att["defined"]) and abs(att["estimate"] - 1) < 1e-4


def test_causal_ratio_shapes(tiny_llama):
    r = causal_ratio(tiny_llama, "int4-token-asym", PROMPTS[:3], _bases(LAYERS), n_random=3, n_resamples=50)
    assert r.layers == LAYERS and r.where == "all"
    assert len(r.scores) == 3 * (1 + 1 + 1 + 3 + 1)
    assert r.scores.groupby("kind")["draw"].nunique().to_dict() == {"none": 1, "quant": 1, "subspace": 1,
                                                                     "random": 3, "isotropic": 1}
    assert list(r.drops["kind"]) == ["quant", "subspace", "random", "isotropic"]
    assert (r.drops["low"] <= r.drops["high"]).all()
    rnd = r.drops.set_index("kind").loc["random"]
    assert len(rnd["by_draw"]) == 3 and abs(np.mean(rnd["by_draw"]) - rnd["drop"]) < 1e-9
    assert list(r.ratios["ratio"]) == ["rho_causal", "rho_isotropic"]
    assert {"capture", "rows", "stats", "total"} <= set(r.seconds)
    assert r.settings["n_rows"] == len(r.scores) and r.settings["k"] == {0: 4, 2: 4}
    json.dumps(r.to_dict(), default=float)
    two = causal_ratio(tiny_llama, "int4-token-asym", PROMPTS[:2], _bases(LAYERS), kinds=("subspace", "isotropic"),
                       n_draws=2, n_resamples=20)
    assert two.scores.groupby("kind")["draw"].nunique().to_dict() == {"none": 1, "subspace": 2, "isotropic": 2}
    assert list(two.drops["n_draws"]) == [2, 2] and (two.drops["sd_draws"] > 0).all()
    with pytest.raises(ValueError, match="S undefined"):
        causal_ratio(tiny_llama, "int4-token-asym", PROMPTS[:2], {0: None})


def test_ratio_ci_known_answers():
    g = np.random.default_rng(0)
    den = g.normal(1.0, 0.2, 30)
    r = ratio_ci(2 * den, den, n_resamples=200)
    assert r.defined and abs(r.estimate - 2) < 1e-12 and abs(r.low - 2) < 1e-12 and abs(r.high - 2) < 1e-12
    assert r.den_excludes_0 and r.den_low < 1 < r.den_high
    flat = ratio_ci(den, np.full(30, 5e-4), n_resamples=50, what="random-subspace noise has no effect")
    assert not flat.defined and np.isnan(flat.estimate)
    assert flat.note == "undefined: random-subspace noise has no effect (|drop| <= 0.001)"
    noisy = ratio_ci(den, g.normal(0.01, 0.5, 30), n_resamples=200)  # |mean| > 1e-3 but its CI spans 0
    assert not noisy.den_excludes_0 and not noisy.defined and np.isnan(noisy.estimate)
    assert "within noise" in noisy.note and "includes 0" in noisy.note
    with pytest.raises(ValueError, match="equal-length"):
        ratio_ci(den, den[:5])
