import pytest
import torch

from kvgeom import encode, forward, generate, hook_name, kv_hooks
from kvgeom.runtime.generation import greedy_uncached

from ..conftest import PROMPTS


def test_hooks_removed_after_exception(tiny_llama):
    b = encode(tiny_llama, PROMPTS)
    plain = forward(tiny_llama, b.input_ids, b.mask)
    with pytest.raises(RuntimeError, match="boom"):
        with kv_hooks(tiny_llama, lambda x, ctx: x * 0.0, sites=("v",)):
            hooked = forward(tiny_llama, b.input_ids, b.mask)
            assert not torch.allclose(hooked, plain)
            raise RuntimeError("boom")
    after = forward(tiny_llama, b.input_ids, b.mask)
    torch.testing.assert_close(after, plain, atol=0, rtol=0)
    assert tiny_llama.hook_sessions == []
    for layer in range(tiny_llama.n_layers):
        hp = tiny_llama.bridge.hook_dict[hook_name("v", layer)]
        assert len(hp._forward_hooks) == 0


def test_each_position_seen_once_as_it_enters_the_cache(tiny):
    site = "rot_k" if "rot_k" in tiny.sites_available else "k"
    seen = []

    def record(x, ctx):
        seen.append((ctx.call.step, x.shape[1], ctx.call.position_ids[:, -1].tolist()))

    b = encode(tiny, PROMPTS)
    with kv_hooks(tiny, {hook_name(site, 1): record, hook_name("v", 1): record}):
        generate(tiny, PROMPTS, max_new_tokens=5, stop_at_eos=False)
    width = b.input_ids.shape[1]
    last = (b.mask.sum(1) - 1).tolist()
    # two sites per call: prefill sees all (padded) prompt positions, each decode step one new position
    assert [s[:2] for s in seen[::2]] == [(0, width)] + [(k, 1) for k in range(1, 5)]
    for k, (_, _, pos) in enumerate(seen[::2]):
        assert pos == [p + k for p in last]


def test_identity_hooks_reproduce_plain_generation(tiny):
    plain = generate(tiny, PROMPTS, max_new_tokens=6, stop_at_eos=False)
    sites = [s for s in ("k", "rot_k", "v") if s in tiny.sites_available]
    with kv_hooks(tiny, lambda x, ctx: x.clone(), sites=sites):
        hooked = generate(tiny, PROMPTS, max_new_tokens=6, stop_at_eos=False)
    assert hooked.tokens == plain.tokens


def _position_noise(x, position_ids, limit):
    """Deterministic perturbation of positions < limit, a function of the absolute position only."""
    pos = position_ids.to(x.dtype)[:, :, None, None]
    d = torch.arange(x.shape[-1], dtype=x.dtype)[None, None, None, :]
    bump = 3.0 * torch.sin(pos * 1.3 + d * 0.7)
    keep = (position_ids < limit)[:, :, None, None]
    return x + bump * keep


def test_what_the_hook_returns_is_what_later_steps_attend_to(tiny):
    """Perturb K/V of prompt positions at prefill only; cached generation must equal a full-recompute
    reference that perturbs the same prompt positions at every step. This holds only if the hooked
    tensors are what was stored in the cache and read by every later decode step."""
    site = "rot_k" if "rot_k" in tiny.sites_available else "k"
    prompt = PROMPTS[0]
    n_prompt = int(encode(tiny, [prompt]).mask.sum())

    def at_prefill(x, ctx):
        return _position_noise(x, ctx.call.position_ids, n_prompt) if ctx.call.step == 0 else None

    def every_call(x, ctx):
        return _position_noise(x, ctx.call.position_ids, n_prompt)

    sites = (site, "v")
    with kv_hooks(tiny, at_prefill, sites=sites):
        cached = generate(tiny, [prompt], max_new_tokens=6, stop_at_eos=False).tokens[0]
    with kv_hooks(tiny, every_call, sites=sites):
        reference = greedy_uncached(tiny, prompt, max_new_tokens=6)
    plain = generate(tiny, [prompt], max_new_tokens=6, stop_at_eos=False).tokens[0]
    assert cached == reference
    assert cached != plain  # the perturbation matters, so the equality above is informative


def test_cache_holds_the_hook_output(tiny_llama):
    from transformers import DynamicCache

    b = encode(tiny_llama, PROMPTS[:1])
    out = {}

    def mark(x, ctx):
        y = x + 1.0
        out[ctx.site] = y.clone()
        return y

    cache = DynamicCache(config=tiny_llama.hf_model.config)
    with kv_hooks(tiny_llama, {hook_name("rot_k", 2): mark, hook_name("v", 2): mark}):
        forward(tiny_llama, b.input_ids, b.mask, past_key_values=cache)
    layer = cache.layers[2]
    torch.testing.assert_close(layer.keys.transpose(1, 2), out["rot_k"])
    torch.testing.assert_close(layer.values.transpose(1, 2), out["v"])


def test_hook_bad_return_shape(tiny_llama):
    b = encode(tiny_llama, PROMPTS)
    with pytest.raises(ValueError, match="returned shape"):
        with kv_hooks(tiny_llama, lambda x, ctx: x[:, :1], sites=("v",)):
            forward(tiny_llama, b.input_ids, b.mask)


def _attached(model, name):
    return list(model.bridge.hook_dict[name]._forward_hooks.values())


def test_nested_sessions_on_one_hook_point(tiny_llama):
    """Two kv_hooks blocks on one hook point: both run, the outer first (the inner sees its output); leaving
    the inner block restores the outer session exactly; leaving both leaves no hook and no session."""
    name = hook_name("v", 1)
    b = encode(tiny_llama, PROMPTS)
    plain = forward(tiny_llama, b.input_ids, b.mask)
    order = []

    def outer(x, ctx):
        order.append(("outer", ctx.call.step))
        return x + 1.0

    def inner(x, ctx):
        order.append(("inner", ctx.call.step))
        return x * 2.0

    assert _attached(tiny_llama, name) == []
    with kv_hooks(tiny_llama, {name: outer}) as s_outer:
        only_outer = forward(tiny_llama, b.input_ids, b.mask)
        outer_hooks = _attached(tiny_llama, name)
        assert tiny_llama.hook_sessions == [s_outer] and len(outer_hooks) == 1
        seen_outer = s_outer.calls_seen
        with kv_hooks(tiny_llama, {name: inner}) as s_inner:
            assert tiny_llama.hook_sessions == [s_outer, s_inner]
            order.clear()
            both = forward(tiny_llama, b.input_ids, b.mask, step=0)
            assert order == [("outer", 0), ("inner", 0)]
            assert s_outer.call is s_inner.call  # every session hears of each call
        # leaving the inner block: the outer session exactly as before (same hook object, same session)
        assert tiny_llama.hook_sessions == [s_outer]
        assert _attached(tiny_llama, name) == outer_hooks
        assert s_outer.calls_seen == seen_outer + 1
        order.clear()
        again = forward(tiny_llama, b.input_ids, b.mask)
        assert order == [("outer", 0)]
        torch.testing.assert_close(again, only_outer, atol=0, rtol=0)
    assert tiny_llama.hook_sessions == []
    assert _attached(tiny_llama, name) == []
    torch.testing.assert_close(forward(tiny_llama, b.input_ids, b.mask), plain, atol=0, rtol=0)
    # the order matters: (x + 1) * 2 is what the model saw, not x * 2 + 1
    assert not torch.allclose(both, only_outer)
    with kv_hooks(tiny_llama, {name: [outer, inner]}):
        torch.testing.assert_close(forward(tiny_llama, b.input_ids, b.mask), both, atol=0, rtol=0)
