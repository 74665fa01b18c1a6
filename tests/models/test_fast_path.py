"""The bridge's linear and normalization components without idle hook points (kvgeom.models.fast_path) compute what
the bridge computes, bit for bit, and hand over to the bridge's own forward as soon as one of their points is
hooked."""

import pytest
import torch

from kvgeom import encode, forward, generate
from kvgeom.models.fast_path import use_fast_components
from kvgeom.quant.plan import QuantPlan
from kvgeom.testing import ARCHITECTURES, tiny_model

from ..conftest import PROMPTS


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request):
    return tiny_model(request.param)


def _both(model, fn):
    try:
        use_fast_components(model, False)
        off = fn()
    finally:
        use_fast_components(model, True)
    return fn(), off


def test_loaded_models_bind_the_fast_forwards(model):
    n = model.n_layers
    got = model.info["fast_components"]
    assert got["linear"] >= 7 * n and got["norm"] >= 2 * n + 1
    assert got == use_fast_components(model)  # binding again binds the same components


def test_logits_and_tokens_equal_the_bridge_s_own(model):
    batch = encode(model, PROMPTS)
    on, off = _both(model, lambda: forward(model, batch.input_ids, batch.mask))
    assert torch.equal(on, off)
    plans = [None, QuantPlan("int4-token-asym", site="k"), QuantPlan("q4_0", mode="cache")]
    on, off = _both(model, lambda: generate(model, PROMPTS, plans=plans, max_new_tokens=6, keep_first_logits=True))
    assert on.tokens == off.tokens and torch.equal(on.first_logits, off.first_logits)


@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")  # the bridge's own note on its edit path
def test_hooked_points_fire_and_their_edits_propagate(model):
    """A hook on a projection's ``hook_out`` or a norm's ``hook_normalized`` runs the bridge's path: it fires, and
    what it returns is what the model computes with (the fast path skipping it would leave the logits unchanged)."""
    batch = encode(model, PROMPTS[:2])
    clean = forward(model, batch.input_ids, batch.mask)
    block = model.bridge.blocks[0]
    for point in (block.mlp.out.hook_out, block.attn.o.hook_in, block.ln1.hook_normalized, block.ln1.hook_in):
        seen = []

        def edit(x, hook, _seen=seen):
            _seen.append(x.shape)
            return x * 0.5

        point.add_hook(edit)
        try:
            hooked = forward(model, batch.input_ids, batch.mask)
        finally:
            point.remove_hooks()
        assert seen, f"{point.name} did not fire"
        assert not torch.allclose(hooked, clean), f"{point.name}'s edit did not reach the logits"
    assert torch.equal(forward(model, batch.input_ids, batch.mask), clean)  # hooks gone: the fast path again


def test_unbinding_restores_the_bridge_s_forward(model):
    from transformer_lens.model_bridge.generalized_components.linear import LinearBridge

    use_fast_components(model, False)
    try:
        lin = next(m for m in model.bridge.modules() if isinstance(m, LinearBridge))
        assert "forward" not in vars(lin)
    finally:
        use_fast_components(model, True)
    assert "forward" in vars(lin)
