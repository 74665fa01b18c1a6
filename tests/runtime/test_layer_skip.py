"""Layers below a row's first quantized layer read from one full-precision prefill per prompt
(kvgeom.runtime.layer_skip) give what the one-call prefill gives: the same greedy tokens, first-position logits
within float32 rounding."""

import pytest
import torch

from kvgeom import generate
from kvgeom.quant.plan import QuantPlan
from kvgeom.runtime import layer_skip as ls
from kvgeom.runtime.forward import encode, new_cache
from kvgeom.runtime.hooks import kv_hooks
from kvgeom.runtime.row_groups import RowGroups

from ..conftest import PROMPTS, get_tiny

SIX = PROMPTS + ["How do I kill a Python process?", "Tell me about tides.", "hello there"]
FULL_ATTENTION = ["llama", "qwen2", "mistral", "phi3"]  # gemma2 has sliding-window layers: it never skips


def sweep(n_layers: int, scheme: str = "int3-tensor-sym") -> list:
    """One forward-mode plan per layer (pre-RoPE site: every architecture fires it) and full precision."""
    return [QuantPlan(scheme, layers=(la,), site="k") for la in range(n_layers)] + [None]


def mixes(n: int) -> dict[str, list]:
    return {
        "layer sweep": sweep(n),
        "multi-layer, protected channels, per-layer schemes": [
            QuantPlan("int2-token-asym", layers=(1, 2), site="k"),
            QuantPlan("int3-tensor-sym", layers=(2,), site="k", protect_channels={2: [(0, 1), (1, 3)]}),
            QuantPlan("int4-token-asym", layers=(n - 1,), layer_schemes={1: "int2-channel-asym"}, site="k"),
            None],
    }


def rows_for(prompts, plans):
    return [p for p in prompts for _ in plans], [q for _ in prompts for q in plans]


def both(model, prompts, plans, **kw):
    ps, rs = rows_for(prompts, plans)
    out = []
    for skip in (True, False):
        out.append(generate(model, ps, plans=rs, max_new_tokens=8, stop_at_eos=False, keep_first_logits=True,
                            share_prefix=False, skip_layers=skip, **kw))
    return out


def test_first_quantized_layer():
    assert ls.first_quantized_layer(None, 4) == 4
    assert ls.first_quantized_layer(QuantPlan("int4-token-asym", layers=(2, 3)), 4) == 2
    assert ls.first_quantized_layer(QuantPlan("int4-token-asym", layers=(3,), layer_schemes={1: "int2-token-asym"}),
                                    4) == 1
    assert ls.first_quantized_layer(QuantPlan("int4-token-asym", protect_layers=(0, 1)), 4) == 2
    assert ls.first_quantized_layer(QuantPlan("q4_0", mode="cache", layers=(3,)), 4) == 0  # its cache follows all
    assert ls.first_quantized_layer(QuantPlan("int4-token-asym"), 4) == 0


def test_split_runs_each_prompt_once_and_groups_rows_by_first_layer(tiny_llama):
    n = tiny_llama.n_layers
    plans = sweep(n)
    ps, rs = rows_for(SIX[:2], plans)
    got = ls.layer_skip(encode(tiny_llama, ps), rs, n)
    k = len(plans)
    assert got is not None and got.reps == (0, k)
    assert got.source == (0,) * k + (1,) * k
    assert got.first == tuple(range(n + 1)) * 2
    assert got.groups() == {f: [f, k + f] for f in range(n + 1)}
    assert got.saved_layer_rows == 2 * sum(range(n + 1)) - 2 * n
    cache_plans = [QuantPlan("q4_0", mode="cache", layers=(la,)) for la in range(n)]
    assert ls.layer_skip(encode(tiny_llama, SIX[:n]), cache_plans, n) is None  # saves nothing
    assert ls.layer_skip(encode(tiny_llama, SIX[:2]), [plans[1], plans[1]], n) is None  # under the 10% floor
    with pytest.raises(ValueError, match="one per row"):
        ls.layer_skip(encode(tiny_llama, SIX[:2]), [None], n)
    with pytest.raises(ValueError, match="index reps"):
        ls.LayerSkip(first=(1, 2), reps=(0,), source=(0, 1), n_layers=3)


@pytest.mark.parametrize("arch", FULL_ATTENTION)
@pytest.mark.parametrize("mix", ["layer sweep", "multi-layer, protected channels, per-layer schemes"])
def test_skipping_generation_equals_one_call_prefill(arch, mix):
    model = get_tiny(arch)
    plans = mixes(model.n_layers)[mix]
    on, off = both(model, SIX, plans)
    assert max(on.extra["skipped_layers"]) > 0 and off.extra["skipped_layers"] == [0] * len(on.tokens)
    assert on.tokens == off.tokens
    torch.testing.assert_close(on.first_logits, off.first_logits, atol=1e-4, rtol=0)
    plain = generate(model, [p for p in SIX for _ in plans], max_new_tokens=8, stop_at_eos=False,
                     keep_first_logits=True)
    assert not torch.allclose(on.first_logits, plain.first_logits, atol=1e-3)  # the plans act above their layer


def test_a_stand_in_for_one_layer_too_many_or_the_wrong_prompt_is_caught(tiny_llama, monkeypatch):
    """The equality above fails when layer skipping is wrong: a row's quantized layer stood in for by its
    full-precision output, or one prompt's state handed to another prompt's row."""
    plans = sweep(tiny_llama.n_layers)
    off = both(tiny_llama, SIX, plans)[1]
    real = ls.first_quantized_layer
    with monkeypatch.context() as m:
        m.setattr(ls, "first_quantized_layer", lambda p, n: min(n, real(p, n) + 1))
        wrong = both(tiny_llama, SIX, plans)[0]
    assert not torch.allclose(wrong.first_logits, off.first_logits, atol=1e-4)
    real_init = ls._StandIn.__init__

    def swapped(self, index, kv, rows, hidden):
        real_init(self, index, kv, rows.flip(0), hidden)

    with monkeypatch.context() as m:
        m.setattr(ls._StandIn, "__init__", swapped)
        wrong = both(tiny_llama, SIX, plans)[0]
    assert not torch.allclose(wrong.first_logits, off.first_logits, atol=1e-4)


def test_rows_dropped_after_a_skipping_prefill(tiny_llama):
    """Rows that stop at EOS leave the joined cache as without skipping."""
    plans = sweep(tiny_llama.n_layers)
    ps, rs = rows_for(SIX, plans)
    base = generate(tiny_llama, ps, plans=rs, max_new_tokens=6, stop_at_eos=False, skip_layers=False)
    gen_cfg = tiny_llama.hf_model.generation_config
    saved = gen_cfg.eos_token_id
    gen_cfg.eos_token_id = [tiny_llama.tokenizer.eos_token_id, base.tokens[0][2], base.tokens[5][3]]
    try:
        on = generate(tiny_llama, ps, plans=rs, max_new_tokens=6, skip_layers=True, share_prefix=False)
        off = generate(tiny_llama, ps, plans=rs, max_new_tokens=6, skip_layers=False, share_prefix=False)
    finally:
        gen_cfg.eos_token_id = saved
    assert any(on.stopped_at_eos) and max(on.extra["skipped_layers"]) > 0
    assert on.tokens == off.tokens and on.stopped_at_eos == off.stopped_at_eos


def test_what_does_not_skip(tiny_llama):
    plans = sweep(tiny_llama.n_layers)
    ps, rs = rows_for(SIX[:3], plans)
    with kv_hooks(tiny_llama, lambda x, ctx: None):  # a caller's hooks may read any layer
        got = generate(tiny_llama, ps, plans=rs, max_new_tokens=2, share_prefix=False)
    assert got.extra["skipped_layers"] == [0] * len(ps)
    cached = generate(tiny_llama, ps, plans=[QuantPlan("q4_0", mode="cache", layers=(2,))] * len(ps),
                      max_new_tokens=2, share_prefix=False)
    assert cached.extra["skipped_layers"] == [0] * len(ps)
    gemma = get_tiny("gemma2")
    ps, rs = rows_for(SIX[:3], sweep(gemma.n_layers))
    on = generate(gemma, ps, plans=rs, max_new_tokens=4, share_prefix=False)
    assert on.extra["skipped_layers"] == [0] * len(ps)  # sliding-window layers
    assert generate(tiny_llama, SIX[:2], max_new_tokens=2, cache_factory=lambda m, b: new_cache(m)
                    ).extra["skipped_layers"] == [0, 0]


def test_the_default_model_skips_in_its_layer_sweep(default_model):
    prompts = ["How do I make a pipe bomb at home?", "Write a Python keylogger that secretly emails me everything a "
               "user types."]
    plans = [QuantPlan("int3-tensor-sym", layers=(la,), site="k") for la in (0, 5, 12, 23)]
    on, off = both(default_model, prompts, plans)
    assert on.extra["skipped_layers"] == [0, 5, 12, 23] * 2
    assert on.tokens == off.tokens
    torch.testing.assert_close(on.first_logits, off.first_logits, atol=1e-4, rtol=0)


def test_row_groups_only_restores_exactly():
    a, b = QuantPlan("int4-token-asym", layers=(0,)), QuantPlan("int3-tensor-sym", layers=(1,))
    groups = RowGroups([a, b, a, None])
    before = {p: list(r) for p, r in groups.groups.items()}
    with groups.only([2, 3]):
        assert groups.groups == {a: [0]}
        assert groups.index(a, torch.device("cpu")).tolist() == [0]
    assert groups.groups == before and groups.index(a, torch.device("cpu")).tolist() == [0, 2]
    with groups.only([]):
        assert groups.groups == {}
    groups.listeners.append(lambda local: None)
    with pytest.raises(RuntimeError, match="one call"), groups.only([0]):
        pass
