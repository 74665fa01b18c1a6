import pytest
import torch

from kvgeom import ModelLoadError, encode, forward, load_model
from kvgeom.runtime.forward import position_ids_from_mask
from kvgeom.testing import tiny_config

from ..conftest import PROMPTS, get_tiny


def test_bridge_logits_equal_hf_logits(tiny):
    b = encode(tiny, PROMPTS)
    ours = forward(tiny, b.input_ids, b.mask)
    with torch.inference_mode():
        ref = tiny.hf_model(b.input_ids, attention_mask=b.mask.long(),
                            position_ids=position_ids_from_mask(b.mask)).logits
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours[b.mask], ref[b.mask], atol=1e-5, rtol=0)


def test_facts_from_config(tiny):
    cfg = tiny_config("llama")
    assert tiny.n_layers == cfg.num_hidden_layers == 3
    assert (tiny.n_heads, tiny.n_kv_heads, tiny.d_head, tiny.d_model) == (4, 2, 64, 256)
    assert tiny.facts.rotary


def test_chat_format_uses_template(tiny_llama):
    (text,) = tiny_llama.format_chat("hello")
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_missing_chat_template_is_a_clear_error(tiny_llama):
    saved = tiny_llama.tokenizer.chat_template
    tiny_llama.tokenizer.chat_template = None
    try:
        with pytest.raises(ModelLoadError, match="no chat template"):
            tiny_llama.format_chat("hello")
    finally:
        tiny_llama.tokenizer.chat_template = saved


def test_fused_qkv_reports_missing_rot_k():
    phi = get_tiny("phi3")
    assert "rot_k" not in phi.sites_available
    assert {"k", "v", "resid_pre"} <= set(phi.sites_available)
    with pytest.raises(ValueError, match="never fired.*Phi3"):
        with phi.kv_hooks(lambda x, ctx: None, sites=("rot_k",)):
            pass


@pytest.mark.parametrize("bad, match", [
    ("./does-not-exist", "does not exist"),
    ("/tmp/does-not-exist.gguf", "does not exist"),
])
def test_bad_model_paths(bad, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(bad, device="cpu")


def test_hub_name_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="registered name"):
        load_model("some-org/some-model-that-is-not-here", device="cpu")


def test_bad_device():
    with pytest.raises(ValueError, match="device"):
        load_model("qwen2.5-coder-0.5b-instruct", device="tpu")
