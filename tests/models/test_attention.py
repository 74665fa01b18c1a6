"""The fused attention path (:mod:`kvgeom.models.attention`) computes what the bridge's eager attention does."""

import pytest
import torch

from kvgeom import encode, forward, generate
from kvgeom.models import wrap_hf_model
from kvgeom.models.attention import resolve_attention, sdpa_eligible, use_attention
from kvgeom.quant.plan import QuantPlan
from kvgeom.runtime.hooks import kv_hooks
from kvgeom.sites import hook_name
from kvgeom.testing import tiny_hf_model, tiny_model

from ..conftest import PROMPTS

FUSED = ("llama", "qwen2", "mistral")
PROMPTS6 = PROMPTS + ["How do I kill a Python process?", "Tell me about tides.", "hi"]


@pytest.fixture(scope="module", params=FUSED)
def fused_model(request):
    return tiny_model(request.param, n_layers=3)


def _count_sdpa(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def _logits(model, prompts, backend):
    use_attention(model, backend)
    b = encode(model, prompts)
    with torch.inference_mode():
        return forward(model, b.input_ids, b.mask), b.mask


def test_fused_logits_equal_eager_logits_with_left_padding(fused_model, monkeypatch):
    eager, mask = _logits(fused_model, PROMPTS6, "eager")
    calls = _count_sdpa(monkeypatch)
    fused, _ = _logits(fused_model, PROMPTS6, "sdpa")
    use_attention(fused_model, "eager")
    assert len(calls) == fused_model.n_layers  # the fused kernel really ran, once per layer
    torch.testing.assert_close(fused[mask], eager[mask], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["forward", "cache"])
def test_fused_generation_equals_eager_generation_with_plans(fused_model, mode):
    site = "rot_k" if mode == "cache" else "k"
    plans = [QuantPlan("int3-token-asym", layers=(0, 2), mode=mode, site=site), None] * 3
    out = {}
    for backend in ("eager", "sdpa"):
        use_attention(fused_model, backend)
        out[backend] = generate(fused_model, PROMPTS6, plans=plans, max_new_tokens=10, stop_at_eos=False,
                                keep_first_logits=True)
    use_attention(fused_model, "eager")
    assert out["sdpa"].tokens == out["eager"].tokens
    torch.testing.assert_close(out["sdpa"].first_logits, out["eager"].first_logits, atol=2e-5, rtol=1e-5)


def test_fused_path_hooks_see_the_same_tensors(fused_model):
    """Layer 0 sees the very same Q/K/V (its inputs are the embeddings); later layers differ by attention's
    float rounding only."""
    b = encode(fused_model, PROMPTS6)
    sites = [s for s in ("q", "k", "v", "rot_q", "rot_k") if s in fused_model.sites_available]
    seen = {}
    for backend in ("eager", "sdpa"):
        use_attention(fused_model, backend)
        grabbed = {}
        hooks = {hook_name(s, layer): (lambda x, ctx, _k=(s, layer), _g=grabbed: _g.setdefault(_k, x.clone()))
                 for s in sites for layer in (0, 1)}
        with torch.inference_mode(), kv_hooks(fused_model, hooks):
            forward(fused_model, b.input_ids, b.mask)
        seen[backend] = grabbed
    use_attention(fused_model, "eager")
    assert set(seen["sdpa"]) == {(s, layer) for s in sites for layer in (0, 1)} and len(sites) >= 3
    for s in sites:
        torch.testing.assert_close(seen["sdpa"][s, 0], seen["eager"][s, 0], atol=0, rtol=0)
        torch.testing.assert_close(seen["sdpa"][s, 1], seen["eager"][s, 1], atol=1e-4, rtol=1e-4)


def test_a_hook_on_the_pattern_gets_the_eager_attention(fused_model, monkeypatch):
    """hook_pattern and hook_attn_scores do not exist in the fused kernel: hooking one runs the bridge's path."""
    use_attention(fused_model, "sdpa")
    calls = _count_sdpa(monkeypatch)
    patterns = []
    b = encode(fused_model, PROMPTS)
    attn = fused_model.bridge.blocks[0].attn
    handle = attn.hook_pattern.register_forward_hook(lambda mod, inp, out: patterns.append(out.shape))
    try:
        with torch.inference_mode():
            forward(fused_model, b.input_ids, b.mask)
    finally:
        handle.remove()
        use_attention(fused_model, "eager")
    assert len(patterns) == 1  # layer 0 ran eager and fired its pattern hook
    assert len(calls) == fused_model.n_layers - 1  # every other layer stayed fused


@pytest.mark.parametrize("arch, reason", [("gemma2", "attn_logit_softcapping"), ("phi3", "JointQKV")])
def test_other_attentions_keep_the_bridge_and_say_why(arch, reason):
    model = tiny_model(arch, n_layers=2)
    summary = use_attention(model, "sdpa")
    assert summary["backend"] == "eager" and model.attention == "eager"
    assert summary["fused_layers"] == [] and summary["eager_layers"] == [0, 1]
    assert any(reason in why for why in summary["why_eager"])
    assert sdpa_eligible(model.bridge.blocks[0].attn) is not None


def test_use_attention_switches_back_and_records_the_choice():
    model = tiny_model("llama", n_layers=2)
    assert model.attention == "eager" and model.info["attention"]["backend"] == "eager"  # auto on the CPU
    assert use_attention(model, "sdpa")["fused_layers"] == [0, 1] and model.attention == "sdpa"
    assert "forward" in vars(model.bridge.blocks[0].attn)
    use_attention(model, "eager")
    assert "forward" not in vars(model.bridge.blocks[0].attn) and model.attention == "eager"


def test_resolve_attention():
    assert resolve_attention("auto", "cpu") == "eager"
    assert resolve_attention("auto", "cuda") == "sdpa"
    assert resolve_attention("sdpa", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="choose one of auto, sdpa, eager"):
        resolve_attention("flash", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        wrap_hf_model(*tiny_hf_model("llama", n_layers=1), attention="flash")
