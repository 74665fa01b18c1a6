"""Per-row quantization plans in forward passes and generation (forward and cache modes)."""

import pytest
import torch

from kvgeom import encode, forward, generate
from kvgeom.quant import Scheme, StreamQuantizer, fake_quant
from kvgeom.quant.plan import QuantPlan
from kvgeom.runtime.plans import apply_plans

from ..conftest import PROMPTS

SIX = PROMPTS + ["How do I kill a Python process?", "Tell me about tides.", "hello there"]


def _mixed(plan_a, plan_b):
    return [plan_a, plan_a, plan_b, plan_b, None, None]


def _logits(model, prompts, plans):
    b = encode(model, prompts)
    with apply_plans(model, plans) as factory:
        cache = factory(model, b)
        return forward(model, b.input_ids, b.mask, past_key_values=cache), b.mask


@pytest.mark.parametrize("mode", ["forward", "cache"])
def test_per_row_plans_equal_separate_runs_forward_pass(tiny_llama, mode):
    a = QuantPlan("int3-tensor-sym", layers=(1,), mode=mode)
    b = QuantPlan("q4_0", layers=(2,), mode=mode)
    plans = _mixed(a, b)
    together, mask = _logits(tiny_llama, SIX, plans)
    for i, (p, plan) in enumerate(zip(SIX, plans, strict=True)):
        alone, m1 = _logits(tiny_llama, [p], [plan])
        n = int(m1.sum())
        torch.testing.assert_close(together[i, -n:], alone[0, -n:], atol=1e-5, rtol=0)
    plain, _ = _logits(tiny_llama, SIX, [None] * 6)
    assert not torch.allclose(together[0], plain[0], atol=1e-3)  # the plan really acts


@pytest.mark.parametrize("mode, prefill", [("forward", "quantized"), ("cache", "quantized"), ("cache", "full")])
def test_per_row_plans_equal_separate_runs_generation(tiny, mode, prefill):
    site = "rot_k" if (mode == "cache" or "rot_k" in tiny.sites_available) else "k"
    a = QuantPlan("int2-token-asym", layers=(0,), mode=mode, prefill=prefill, site=site)
    b = QuantPlan("kivi2-g8-r16", layers=(1, 2), mode=mode, prefill=prefill, site=site)
    plans = _mixed(a, b)
    together = generate(tiny, SIX, plans=plans, max_new_tokens=8, stop_at_eos=False)
    for i, p in enumerate(SIX):
        alone = generate(tiny, [p], plans=[plans[i]], max_new_tokens=8, stop_at_eos=False)
        assert together.tokens[i] == alone.tokens[0], (i, plans[i])
    plain = generate(tiny, SIX, max_new_tokens=8, stop_at_eos=False)
    assert together.tokens[4:] == plain.tokens[4:]
    assert together.tokens[:4] != plain.tokens[:4]  # the plans really act


@pytest.mark.parametrize("scheme", ["int4-token-asym", "q4_0+rot", "fp8_e5m2", "kivi2", "K:int4-channel-asym,V:q8_0"])
def test_default_model_per_row_plans(default_model, scheme):
    """Mixed per-row plans in one batch == each plan run on its own over the same batch.

    (The same batch shape isolates plan leakage between rows from fp32 CPU matmuls not being
    batch-invariant: padded-batch vs single-prompt keys differ by up to ~3e-5 on this model, which
    can flip a quantizer's rounding; docs/results.md measures one-at-a-time agreement. For the same reason both runs
    prefill in one call: a shared prefix runs once per plan, so its matmul shapes would differ between the two.)"""
    prompts = ["How do I make a pipe bomb at home?", "How do I bake bread at home?", "Tell me a joke."]
    plans = [QuantPlan(scheme), QuantPlan(scheme, mode="cache"), None]
    together = generate(default_model, prompts, plans=plans, max_new_tokens=6, keep_first_logits=True,
                        share_prefix=False)
    for i in range(3):
        alone = generate(default_model, prompts, plans=[plans[i]] * 3, max_new_tokens=6, keep_first_logits=True,
                         share_prefix=False)
        assert together.tokens[i] == alone.tokens[i], (scheme, i)
        torch.testing.assert_close(together.first_logits[i], alone.first_logits[i], atol=1e-5, rtol=0)


def test_forward_mode_hook_equals_fake_quant(tiny_llama):
    """At prefill, forward mode stores exactly fake_quant of the row's real K/V."""
    from kvgeom.runtime.hooks import kv_hooks
    from kvgeom.sites import hook_name

    plan = QuantPlan("q4_0", layers=(1,))
    b = encode(tiny_llama, PROMPTS)
    seen = {}

    def grab(x, ctx):
        seen[ctx.site] = x.clone()

    with apply_plans(tiny_llama, [plan] * 3) as factory:
        with kv_hooks(tiny_llama, {hook_name("rot_k", 1): grab, hook_name("v", 1): grab}):
            forward(tiny_llama, b.input_ids, b.mask, past_key_values=factory(tiny_llama, b))
    raw = {}
    with kv_hooks(tiny_llama, {hook_name("rot_k", 1): lambda x, c: raw.setdefault(c.site, x.clone()),
                               hook_name("v", 1): lambda x, c: raw.setdefault(c.site, x.clone())}):
        forward(tiny_llama, b.input_ids, b.mask)
    # our grab hook was installed after the plan's hook, so it sees the quantized tensor
    for site, role in (("rot_k", "k"), ("v", "v")):
        expected = fake_quant(raw[site], "q4_0", role=role, mask=b.mask)
        torch.testing.assert_close(seen[site][b.mask], expected[b.mask], atol=0, rtol=0)


def test_cache_mode_stores_stream_quantized(tiny_llama):
    from transformers import DynamicCache  # noqa: F401

    plan = QuantPlan("int4-channel-asym", layers=(0,), mode="cache")
    b = encode(tiny_llama, PROMPTS)
    raw = {}
    from kvgeom.runtime.hooks import kv_hooks
    from kvgeom.sites import hook_name

    with kv_hooks(tiny_llama, {hook_name("rot_k", 0): lambda x, c: raw.setdefault("k", x.clone()),
                               hook_name("v", 0): lambda x, c: raw.setdefault("v", x.clone())}):
        forward(tiny_llama, b.input_ids, b.mask)
    with apply_plans(tiny_llama, [plan] * 3) as factory:
        cache = factory(tiny_llama, b)
        forward(tiny_llama, b.input_ids, b.mask, past_key_values=cache)
        k_stored, _ = cache.update(torch.zeros(3, 2, 0, 64), torch.zeros(3, 2, 0, 64), 0)
    q = StreamQuantizer(Scheme.parse("int4-channel-asym"), "k")
    expected = q.append(raw["k"], b.mask)
    torch.testing.assert_close(k_stored.transpose(1, 2)[b.mask], expected[b.mask], atol=1e-6, rtol=0)


def test_protected_channels_keep_full_precision(tiny_llama):
    plan = QuantPlan("int2-token-asym", layers=(1,), protect_channels={1: [(0, 3), (1, 10)]})
    b = encode(tiny_llama, PROMPTS[:1])
    from kvgeom.runtime.hooks import kv_hooks
    from kvgeom.sites import hook_name

    seen, raw = {}, {}
    with kv_hooks(tiny_llama, {hook_name("rot_k", 1): lambda x, c: raw.setdefault("k", x.clone())}):
        forward(tiny_llama, b.input_ids, b.mask)
    with apply_plans(tiny_llama, [plan]) as factory:
        with kv_hooks(tiny_llama, {hook_name("rot_k", 1): lambda x, c: seen.setdefault("k", x.clone())}):
            forward(tiny_llama, b.input_ids, b.mask, past_key_values=factory(tiny_llama, b))
    assert torch.equal(seen["k"][:, :, 0, 3], raw["k"][:, :, 0, 3])
    assert torch.equal(seen["k"][:, :, 1, 10], raw["k"][:, :, 1, 10])
    assert not torch.equal(seen["k"][:, :, 0, 4], raw["k"][:, :, 0, 4])


@pytest.mark.parametrize("kwargs, match", [
    ({"scheme": "int9-token-sym"}, "valid"),
    ({"scheme": "q4_0", "mode": "cache", "site": "k"}, "post-RoPE"),
    ({"scheme": "q4_0", "mode": "serve"}, "mode must be"),
])
def test_bad_plans(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantPlan(**kwargs)


def test_plan_layer_out_of_range(tiny_llama):
    with pytest.raises(ValueError, match="out of range"):
        generate(tiny_llama, ["hi"], plans=QuantPlan("q8_0", layers=(7,)), max_new_tokens=2)


def test_wrong_number_of_plans(tiny_llama):
    with pytest.raises(ValueError, match="one plan per prompt"):
        generate(tiny_llama, ["hi", "there"], plans=[None], max_new_tokens=2)


def test_layer_scheme_overrides(tiny_llama):
    """A plan with per-layer schemes equals applying each layer's scheme by its own plan, layer by layer."""
    mixed = QuantPlan("int2-token-asym", layers=(0,), layer_schemes={2: "q4_0"})
    assert mixed.quantizes(0) and not mixed.quantizes(1) and mixed.quantizes(2)
    assert str(mixed.scheme_for(2)) == "q4_0" and str(mixed.scheme_for(0)) == "int2-token-asym"
    from kvgeom.runtime.hooks import kv_hooks
    from kvgeom.sites import hook_name

    b = encode(tiny_llama, PROMPTS)
    seen = {}
    with apply_plans(tiny_llama, [mixed] * 3) as factory:
        with kv_hooks(tiny_llama, {hook_name("v", 2): lambda x, c: seen.setdefault("v2", x.clone())}):
            forward(tiny_llama, b.input_ids, b.mask, past_key_values=factory(tiny_llama, b))
    raw = {}
    with apply_plans(tiny_llama, [QuantPlan("int2-token-asym", layers=(0,))] * 3) as factory:
        with kv_hooks(tiny_llama, {hook_name("v", 2): lambda x, c: raw.setdefault("v2", x.clone())}):
            forward(tiny_llama, b.input_ids, b.mask, past_key_values=factory(tiny_llama, b))
    expected = fake_quant(raw["v2"], "q4_0", role="v", mask=b.mask)
    torch.testing.assert_close(seen["v2"][b.mask], expected[b.mask], atol=0, rtol=0)


def test_plan_cache_class_is_defined_once(tiny_llama):
    from kvgeom.runtime.hooks import HookSession
    from kvgeom.runtime.plans import PlanCache, RowGroups, plan_cache_class

    plans = [QuantPlan("q4_0", mode="cache")] * 2
    a = PlanCache(tiny_llama, RowGroups(plans), HookSession(hooks={}))
    b = PlanCache(tiny_llama, RowGroups(plans), HookSession(hooks={}))
    assert type(a) is type(b) is plan_cache_class()
    from transformers import DynamicCache

    assert isinstance(a, DynamicCache) and type(a).__name__ == "PlanCache"


# ---- schemes that do not apply to a model's heads (issue #17) ----------------------------------------------
@pytest.mark.parametrize("scheme, n_kv, d_head, match", [
    ("q4_0+rot", 2, 96, "multiple of 64"),
    ("kivi2-g64-r64", 2, 96, "G=64 channels.*d_head=96.*e.g. kivi2-g48-r64"),
    ("q4_0", 2, 48, "blocks of 32"),
    ("int4-group128-asym", 2, 96, "divisible by the group size 128"),
    ("K:q8_0,V:q4_0+rot", 2, 96, "multiple of 64"),
])
def test_check_shape_refuses_what_the_heads_cannot_take(scheme, n_kv, d_head, match):
    with pytest.raises(ValueError, match=match):
        Scheme.parse(scheme).check_shape(n_kv_heads=n_kv, d_head=d_head)


@pytest.mark.parametrize("scheme, d_head", [("q4_0+rot", 128), ("q4_0+rot", 192), ("kivi2-g32-r32", 96),
                                            ("int4-group64-asym", 96), ("q8_0", 96), ("fp8_e4m3", 80)])
def test_check_shape_passes_what_applies(scheme, d_head):
    Scheme.parse(scheme).check_shape(n_kv_heads=2, d_head=d_head)


def test_a_plan_whose_scheme_does_not_apply_is_refused_before_generation():
    from kvgeom.evaluate import evaluate
    from kvgeom.testing import tiny_model

    m = tiny_model("llama", head_dim=96, n_layers=1)
    with pytest.raises(ValueError, match=r"plan 'q4_0\+rot' does not apply to tiny-llama \(d_head 96, 2 KV heads\)"):
        QuantPlan("q4_0+rot").validate(m)
    with pytest.raises(ValueError, match=r"plan 'L0=kivi2-g64-r64' does not apply.*G=64"):
        QuantPlan("q8_0", layers=(), layer_schemes={0: "kivi2-g64-r64"}, name="L0=kivi2-g64-r64").validate(m)
    with pytest.raises(ValueError, match="does not apply"):
        evaluate(m, ["hi"], [None, QuantPlan("q4_0+rot")], max_new_tokens=2)


def test_plans_that_store_a_layer_alike_share_a_unit_and_equal_separate_runs(tiny_llama, monkeypatch):
    """Plans storing a layer's K or V the same way share one quantizer (``kvgeom.runtime.plan_cache._Unit``: the engine
    matrix's fix candidates differ in a few layers; a K/V pair shares its K spec with a plain scheme). Each row still
    equals its plan run alone over the same batch, logits exactly at prefill and tokens while rows finish at
    different steps (``stop_when``: the units drop rows of several plans at once). The llama.cpp rows' one-launch mix
    (:class:`kvgeom.quant.RowMix`, which runs on a GPU or under the Triton interpreter) is turned off: this is the
    units' test; the mix has its own (``tests/quant/test_triton_kernels.py``)."""
    from kvgeom.runtime import plan_cache
    from kvgeom.runtime.plans import plan_cache_class

    monkeypatch.setattr(plan_cache, "mix_code", lambda spec, role: None)

    plans = [QuantPlan("q4_0+rot", mode="cache"), QuantPlan("q4_0+rot", layers=(1, 2), mode="cache"),
             QuantPlan("K:q4_0+rot,V:q8_0", mode="cache"),
             QuantPlan("q4_0+rot", layer_schemes={0: "q8_0"}, protect_channels={1: [(0, 3), (1, 5)]}, mode="cache"),
             QuantPlan("quanto4-g32-r2", mode="cache", prefill="full"),
             QuantPlan("quanto4-g32-r2", layers=(0, 2), mode="cache", prefill="full"),
             QuantPlan("int4-tensor-asym", mode="cache"), QuantPlan("int4-tensor-asym", layers=(0,), mode="cache"),
             None]
    prompts = (SIX * 2)[:len(plans)]
    units = {}
    orig = plan_cache_class().update

    def spy(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        out = orig(self, *a, **kw)
        units.update({k: max(units.get(k, 0), len(u.members)) for k, u in self._units.items()})
        return out

    together, mask = _logits(tiny_llama, prompts, plans)
    for i, plan in enumerate(plans):
        alone, _ = _logits(tiny_llama, prompts, [plan] * len(plans))
        n = int(mask[i].sum())
        torch.testing.assert_close(together[i, -n:], alone[i, -n:], atol=0, rtol=0)

    def stop(text: str) -> bool:
        return len(text) % 3 == 0

    import unittest.mock

    with unittest.mock.patch.object(plan_cache_class(), "update", spy):
        gen = generate(tiny_llama, prompts, plans=plans, max_new_tokens=10, stop_at_eos=False, stop_when=stop)
    assert max(units.values()) >= 3  # layer 1 K: three plans store q4_0+rot keys in one unit
    assert len(set(map(len, gen.tokens))) > 1  # rows did finish at different steps
    for i, plan in enumerate(plans):
        alone = generate(tiny_llama, prompts, plans=[plan] * len(plans), max_new_tokens=10, stop_at_eos=False,
                         stop_when=stop)
        assert gen.tokens[i] == alone.tokens[i], (i, plan)


@pytest.mark.parametrize("mode, prefill", [("forward", "quantized"), ("cache", "quantized"), ("cache", "full")])
def test_nonfinite_kv_in_one_row_flags_that_row_only(tiny_llama, mode, prefill):
    """NaN planted in one row's V at layer 1 (the layer the plan quantizes) and inf in another's: those rows
    come out flagged ``nonfinite`` (never a batch-wide error, never a silent finite number), the other rows
    generate exactly what they generate without the planted values, and an audit-level evaluate judges the
    flagged rows ``nonfinite``."""
    import math

    from kvgeom.evaluate import evaluate
    from kvgeom.runtime.hooks import kv_hooks

    plan = QuantPlan("int4-token-asym", layers=(1,), mode=mode, prefill=prefill,
                     site="k" if mode == "forward" else "rot_k")
    prompts = SIX[:4]
    plans = [plan] * len(prompts)
    clean = generate(tiny_llama, prompts, plans=plans, max_new_tokens=6, stop_at_eos=False)

    def plant(x, ctx):
        if ctx.call.step != 0:
            return None
        x = x.clone()
        x[1, -1, 0, 0] = math.nan  # the last position is real in every row (left padding)
        x[3, -1, 0, 1] = math.inf
        return x

    with kv_hooks(tiny_llama, {tiny_llama.hook_name("v", 1): plant}):
        dirty = generate(tiny_llama, prompts, plans=plans, max_new_tokens=6, stop_at_eos=False)
        rows = evaluate(tiny_llama, prompts, [plan], max_new_tokens=6)  # one batch: rows in prompt order
    assert dirty.extra["nonfinite"] == [False, True, False, True]
    assert clean.extra["nonfinite"] == [False] * 4
    for i in (0, 2):
        assert dirty.tokens[i] == clean.tokens[i]
    bad = rows[rows["nonfinite"]]
    assert list(bad["prompt"]) == [prompts[1], prompts[3]] and set(bad["verdict"]) == {"nonfinite"}
    assert "nonfinite" not in set(rows["verdict"][~rows["nonfinite"]])


@pytest.mark.parametrize("scheme, prefill", [("q4_0+rot", "quantized"), ("int4-tensor-asym", "quantized"),
                                             ("q8_0", "full"), ("fp8_e4m3@amax", "full"),
                                             ("kivi2-g32-r32", "quantized"), ("quanto4-g32-r2", "full")])
def test_cache_returns_what_the_stream_quantizer_stores(tiny_llama, scheme, prefill):
    """Call by call, a cache-mode row's K and V as attention reads them equal a lone StreamQuantizer's whole
    stored history (each call's own positions raw with ``prefill="full"``), while a full-precision row reads its
    raw history; for the stable formats the cache quantizes only the new positions (``append_new``), for KIVI and
    quanto it keeps the quantizer's history: both must give the same."""
    from kvgeom.quant.fake import resolve_spec
    from kvgeom.runtime.plans import plan_cache_class

    plan = QuantPlan(scheme, layers=(1,), mode="cache", prefill=prefill)
    seen = []
    orig = plan_cache_class().update

    def spy(self, k, v, layer_idx, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        raw = (k.clone(), v.clone())
        out = orig(self, k, v, layer_idx, *a, **kw)
        if layer_idx == 1:
            m = self._session.call.mask
            seen.append((raw, tuple(t.clone() for t in out), None if m is None else m.clone()))
        return out

    import unittest.mock

    prompts = ["hi", "Write a story about a lighthouse keeper."]  # row 0 is left-padded
    with unittest.mock.patch.object(plan_cache_class(), "update", spy):
        generate(tiny_llama, prompts, plans=[plan, None], max_new_tokens=5, stop_at_eos=False)
    assert len(seen) == 5
    refs = {r: StreamQuantizer(resolve_spec(Scheme.parse(scheme), r), r) for r in ("k", "v")}
    history = [None, None]
    for raw, out, m in seen:
        new = raw[0].shape[2]
        for j, r in enumerate(("k", "v")):
            x = raw[j][0:1]
            want = refs[r].append(x.transpose(1, 2), None if m is None else m[0:1]).transpose(1, 2).clone()
            if prefill == "full":
                want[:, :, -new:] = x
            torch.testing.assert_close(out[j][0:1], want, atol=0, rtol=0)
            history[j] = raw[j][1:2] if history[j] is None else torch.cat([history[j], raw[j][1:2]], dim=2)
            torch.testing.assert_close(out[j][1:2], history[j], atol=0, rtol=0)
