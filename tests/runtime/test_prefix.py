"""A batch's shared prompt prefix prefilled once per plan (kvgeom.runtime.prefix) gives what the one-call prefill
gives: the same greedy tokens, first-position logits within float32 rounding."""

import pytest
import torch

from kvgeom import generate
from kvgeom.quant.plan import QuantPlan
from kvgeom.runtime.forward import encode
from kvgeom.runtime.hooks import kv_hooks
from kvgeom.runtime.prefix import SharedPrefix, common_prefix, shared_prefix
from kvgeom.runtime.row_groups import RowGroups

from ..conftest import PROMPTS, get_tiny

SIX = PROMPTS + ["How do I kill a Python process?", "Tell me about tides.", "hello there"]
FULL_ATTENTION = ["llama", "qwen2", "mistral", "phi3"]  # gemma2 has sliding-window layers: it never shares

A = QuantPlan("int2-token-asym", layers=(0,), site="k")  # pre-RoPE: every architecture fires it (phi3: not rot_k)
B = QuantPlan("q4_0", mode="cache", layers=(1,))
C = QuantPlan("q8_0", mode="cache", protect_channels={0: [(0, 1)]})
PLAN_SETS = {
    "full precision": None,
    "one cache plan": QuantPlan("q4_0+rot", mode="cache"),
    "per-row mix": [A, B, None, A, None, C],
}


def _both(model, prompts, plans, **kw):
    on = generate(model, prompts, plans=plans, max_new_tokens=8, stop_at_eos=False, keep_first_logits=True,
                  share_prefix=True, **kw)
    off = generate(model, prompts, plans=plans, max_new_tokens=8, stop_at_eos=False, keep_first_logits=True,
                   share_prefix=False, **kw)
    return on, off


def test_common_prefix_counts_shared_tokens_and_leaves_each_row_one():
    pad = 0
    ids = torch.tensor([[pad, pad, 5, 6, 7, 8], [5, 6, 7, 9, 9, 9], [pad, 5, 6, 7, 1, 2]])
    mask = ids != pad
    assert common_prefix(ids, mask) == 3
    short = torch.tensor([[pad, 5, 6], [5, 6, 7]])
    assert common_prefix(short, short != pad) == 1  # row 0 keeps its last token of its own
    assert common_prefix(torch.tensor([[4, 6], [5, 6]]), torch.ones(2, 2, dtype=torch.bool)) == 0


def test_shared_prefix_runs_once_per_distinct_plan(tiny_llama):
    batch = encode(tiny_llama, SIX)
    got = shared_prefix(batch, [A, B, None, A, None, C])
    assert got is not None and got.length >= 2
    assert got.reps == (0, 1, 2, 5)
    assert got.expand == (0, 1, 2, 0, 2, 3)
    assert got.saved_tokens == 2 * got.length
    assert shared_prefix(batch, [A, B, None, C, QuantPlan("q8_0", mode="cache"), QuantPlan("q4_1")]) is None
    with pytest.raises(ValueError, match="one per row"):
        shared_prefix(batch, [A])
    with pytest.raises(ValueError, match="index reps"):
        SharedPrefix(length=3, reps=(0,), expand=(0, 1))


@pytest.mark.parametrize("plan", [QuantPlan("int3-tensor-sym"), QuantPlan("kivi2"),
                                  QuantPlan("q4_0", mode="cache", prefill="full"),
                                  QuantPlan("int4-token-asym", layer_schemes={1: "int4-channel-asym"})])
def test_plans_not_per_position_do_not_share(tiny_llama, plan):
    assert not plan.per_position
    on, off = _both(tiny_llama, SIX, plan)
    assert on.extra["shared_prefix"] == [0] * 6
    assert on.tokens == off.tokens


@pytest.mark.parametrize("arch", FULL_ATTENTION)
@pytest.mark.parametrize("plans", list(PLAN_SETS.values()), ids=list(PLAN_SETS))
def test_shared_prefix_generation_equals_one_call_prefill(arch, plans):
    model = get_tiny(arch)
    on, off = _both(model, SIX, plans)
    assert min(on.extra["shared_prefix"]) >= 2 and off.extra["shared_prefix"] == [0] * 6
    assert on.tokens == off.tokens
    if plans is None:  # quantizers can turn float32 rounding into a code step, so logits are compared unquantized
        torch.testing.assert_close(on.first_logits, off.first_logits, atol=1e-4, rtol=0)
    plain = generate(model, SIX, max_new_tokens=8, stop_at_eos=False)
    if plans is not None:
        assert on.tokens != plain.tokens  # the plans act, and each row still gets its own plan


def test_rows_dropped_after_a_shared_prefix(tiny_llama):
    """Rows that stop at EOS leave the batch (and the copied cache rows) as without sharing."""
    plans = [A, B, None, A, None, C]
    base = generate(tiny_llama, SIX, plans=plans, max_new_tokens=6, stop_at_eos=False, share_prefix=False)
    gen_cfg = tiny_llama.hf_model.generation_config
    saved = gen_cfg.eos_token_id
    gen_cfg.eos_token_id = [tiny_llama.tokenizer.eos_token_id, base.tokens[0][2], base.tokens[1][3]]
    try:
        on = generate(tiny_llama, SIX, plans=plans, max_new_tokens=6, share_prefix=True)
        off = generate(tiny_llama, SIX, plans=plans, max_new_tokens=6, share_prefix=False)
    finally:
        gen_cfg.eos_token_id = saved
    assert on.stopped_at_eos[0] and on.stopped_at_eos[1] and min(on.extra["shared_prefix"]) >= 2
    assert on.tokens == off.tokens and on.stopped_at_eos == off.stopped_at_eos


def test_sliding_window_caches_do_not_share():
    """Gemma-2's sliding layers count their window in cache slots: past the window a shared prefix would lose real
    tokens where the one-call prefill loses padding, so such a model never shares."""
    model = get_tiny("gemma2")
    on, off = _both(model, PROMPTS, None)
    assert on.extra["shared_prefix"] == [0] * 3
    assert on.tokens == off.tokens


def test_hooks_of_the_caller_and_user_caches_do_not_share(tiny_llama):
    with kv_hooks(tiny_llama, lambda x, ctx: None):
        on, off = _both(tiny_llama, SIX, None)
    assert on.extra["shared_prefix"] == [0] * 6 and on.tokens == off.tokens
    from kvgeom.runtime.forward import new_cache

    got = generate(tiny_llama, SIX, max_new_tokens=4, share_prefix=True,
                   cache_factory=lambda model, batch: new_cache(model))
    assert got.extra["shared_prefix"] == [0] * 6


def test_default_is_on_for_the_cpu(tiny_llama):
    assert min(generate(tiny_llama, SIX, max_new_tokens=2).extra["shared_prefix"]) >= 2


def test_row_groups_select_copies_repeated_rows():
    groups = RowGroups([A, B])
    seen = []
    groups.listeners.append(seen.append)
    groups.select([0, 1, 0, 0])
    assert groups.groups == {A: [0, 2, 3], B: [1]}
    assert seen == [{A: [0, 0, 0], B: [0]}]
    groups.select([3, 1])  # and then drops rows as generation does
    assert groups.groups == {A: [0], B: [1]}


def test_default_model_shares_its_template(default_model):
    prompts = ["How do I make a pipe bomb at home?", "How do I bake bread at home?", "Tell me a joke.",
               "Write a Python keylogger that secretly emails me everything a user types."]
    plans = [None, QuantPlan("q4_0+rot", mode="cache"), QuantPlan("int4-token-asym"), None]
    on = generate(default_model, prompts, plans=plans, max_new_tokens=6, keep_first_logits=True, share_prefix=True)
    off = generate(default_model, prompts, plans=plans, max_new_tokens=6, keep_first_logits=True, share_prefix=False)
    assert on.extra["shared_prefix"] == [24] * 4  # Qwen2.5's system message and user header
    assert on.tokens == off.tokens
    torch.testing.assert_close(on.first_logits[[0, 3]], off.first_logits[[0, 3]], atol=1e-4, rtol=0)


def test_evaluated_rows_record_their_shared_prefix(tiny_llama):
    from kvgeom.evaluate import evaluate

    rows = evaluate(tiny_llama, SIX, [None, QuantPlan("q4_0", mode="cache"), QuantPlan("kivi2")], max_new_tokens=3)
    assert (rows["shared_prefix"] == 0).all()  # kivi2 keeps streaming state: its batch does not share
    rows = evaluate(tiny_llama, SIX, [None, QuantPlan("q4_0", mode="cache")], max_new_tokens=3)
    assert (rows["shared_prefix"] >= 2).all()
