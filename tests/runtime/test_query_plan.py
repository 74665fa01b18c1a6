"""``QuantPlan(..., mode="cache", query=...)``: llama.cpp's Q quantization before ``Q·K`` (``kvgeom.runtime.query``)
on tiny random models: it changes logits only through Q, per-row plans still equal separate runs, and the plan
value carries the option."""

import dataclasses

import pytest
import torch

from kvgeom import encode, forward, generate
from kvgeom.quant import QuantPlan, fake_quant
from kvgeom.runtime.hooks import kv_hooks
from kvgeom.runtime.plans import apply_plans

from ..conftest import PROMPTS

SIX = PROMPTS + ["How do I kill a Python process?", "Tell me about tides.", "hello there"]


def _logits(model, prompts, plans, extra_hooks=None):
    b = encode(model, prompts)
    with apply_plans(model, plans) as factory:
        cache = factory(model, b)
        if extra_hooks is None:
            return forward(model, b.input_ids, b.mask, past_key_values=cache), b.mask
        with kv_hooks(model, extra_hooks, sites=("rot_q",)):
            return forward(model, b.input_ids, b.mask, past_key_values=cache), b.mask


@pytest.mark.parametrize("scheme", ["q4_0+rot", "K:q4_1+rot,V:q8_0", "iq4_nl"])
def test_query_changes_logits_only_through_q(tiny_llama, scheme):
    """The plan with query="q8_0" gives exactly the logits of the same plan without it plus a hand-written hook that
    fake-quantizes Q at rot_q with q8_0 (rotated with K's block when K is +rot): nothing else changes."""
    m = tiny_llama
    with_q, _ = _logits(m, SIX, [QuantPlan(scheme, mode="cache", query="q8_0")] * len(SIX))
    q_scheme = "q8_0+rot" if QuantPlan(scheme).scheme.for_role("k").rotate else "q8_0"

    def manual(x, ctx):
        return fake_quant(x, q_scheme, role="k", mask=ctx.call.mask)

    by_hand, _ = _logits(m, SIX, [QuantPlan(scheme, mode="cache")] * len(SIX), extra_hooks=manual)
    without, _ = _logits(m, SIX, [QuantPlan(scheme, mode="cache")] * len(SIX))
    assert torch.equal(with_q, by_hand)
    assert not torch.allclose(with_q, without, atol=1e-4)  # the option really acts


def test_query_follows_layers_and_per_layer_schemes(tiny_llama):
    """Only the layers a plan quantizes get a quantized Q: a plan on layer 1 equals the manual hook on layer 1."""
    m = tiny_llama
    plan = QuantPlan("q4_0+rot", layers=(1,), mode="cache", query="engine")
    got, _ = _logits(m, SIX, [plan] * 6)

    def manual(x, ctx):
        if ctx.layer != 1:
            return None
        from kvgeom.quant.query import query_fake_quant

        return query_fake_quant(x, plan.scheme.for_role("k"), "q8_0-avx2", ctx.call.mask)

    want, _ = _logits(m, SIX, [dataclasses.replace(plan, query=None)] * 6, extra_hooks=manual)
    assert torch.equal(got, want)


def test_per_row_query_plans_equal_separate_runs(tiny_llama):
    a = QuantPlan("q4_0+rot", mode="cache", query="engine")
    b = QuantPlan("q4_0+rot", mode="cache")
    plans = [a, a, b, b, None, None]
    together, mask = _logits(tiny_llama, SIX, plans)
    for i, (p, plan) in enumerate(zip(SIX, plans, strict=True)):
        alone, m1 = _logits(tiny_llama, [p], [plan])
        n = int(m1.sum())
        torch.testing.assert_close(together[i, -n:], alone[0, -n:], atol=1e-5, rtol=0)
    gen = generate(tiny_llama, SIX, plans=plans, max_new_tokens=6, stop_at_eos=False)
    for i, p in enumerate(SIX):
        assert gen.tokens[i] == generate(tiny_llama, [p], plans=[plans[i]], max_new_tokens=6,
                                         stop_at_eos=False).tokens[0], i


def test_plan_value_carries_query():
    p = QuantPlan("q4_0+rot", mode="cache", query="engine")
    assert p.query == "engine" and "query=engine" in p.label
    assert p != QuantPlan("q4_0+rot", mode="cache") and hash(p) != hash(QuantPlan("q4_0+rot", mode="cache"))
    assert QuantPlan(str(p.scheme), mode=p.mode, query=p.query) == p
    assert dataclasses.replace(p, query=None) == QuantPlan("q4_0+rot", mode="cache")
    assert QuantPlan("q4_0+rot", mode="cache").query is None  # the default: Q exact


def test_query_errors(tiny_llama):
    with pytest.raises(ValueError, match="use mode='cache'"):
        QuantPlan("q4_0+rot", query="engine")
    with pytest.raises(ValueError, match="not a query conversion kvgeom simulates"):
        QuantPlan("q4_0+rot", mode="cache", query="q4_0")
    for scheme in ("fp16", "K:int4-token-asym,V:q4_0", "kivi2"):
        plan = QuantPlan(scheme, mode="cache", query="engine")
        with pytest.raises(ValueError, match="not a llama.cpp cache type"):
            plan.validate(tiny_llama)
    mixed = QuantPlan("int4-token-asym", mode="cache", query="q8_0", layer_schemes={1: "kivi2"})
    with pytest.raises(ValueError, match="not a llama.cpp cache type"):
        generate(tiny_llama, ["hi"], plans=[mixed], max_new_tokens=1)


def test_query_acts_only_on_layers_with_a_llama_cpp_k(tiny_llama):
    """A mixed plan (fp16 layers next to q4_0+rot ones, as the engine matrix's fixes): Q is quantized only where K
    is a llama.cpp type, exactly as a manual hook on those layers."""
    m = tiny_llama
    plan = QuantPlan("q4_0+rot", mode="cache", query="q8_0", layer_schemes={0: "fp16", 2: "fp16"})
    got, _ = _logits(m, SIX, [plan] * 6)

    def manual(x, ctx):
        return fake_quant(x, "q8_0+rot", role="k", mask=ctx.call.mask) if ctx.layer == 1 else None

    want, _ = _logits(m, SIX, [dataclasses.replace(plan, query=None)] * 6, extra_hooks=manual)
    assert torch.equal(got, want)
