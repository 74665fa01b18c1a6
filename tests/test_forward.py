import pytest
import torch

from kvgeom import capture, encode

from .conftest import PROMPTS


def _sites(model):
    return [s for s in ("k", "rot_k", "v", "resid_pre") if s in model.sites_available]


def test_left_padding_and_post_instruction_count(tiny_llama):
    b = encode(tiny_llama, PROMPTS)
    assert b.input_ids.shape[0] == 3
    lengths = b.mask.sum(1)
    for i in range(3):  # left padded: real tokens are the trailing ones
        assert b.mask[i, -lengths[i]:].all() and not b.mask[i, : b.mask.shape[1] - lengths[i]].any()
    # post-instruction tokens == tokens of the template suffix after the user's text
    suffix = "<|im_end|>\n<|im_start|>assistant\n"
    expected = len(tiny_llama.tokenizer(suffix, add_special_tokens=False)["input_ids"])
    assert b.n_post == [expected] * 3


def test_capture_shapes(tiny):
    sites = _sites(tiny)
    cap = capture(tiny, PROMPTS, sites=sites, positions="post")
    n_post = encode(tiny, PROMPTS).n_post[0]
    for layer in range(tiny.n_layers):
        for s in sites:
            x = cap[(s, layer)]
            if s == "resid_pre":
                assert x.shape == (3, n_post, tiny.d_model)
            else:
                assert x.shape == (3, n_post, tiny.n_kv_heads, tiny.d_head)
            assert x.dtype == torch.float32


def test_capture_batched_equals_one_by_one(tiny):
    sites = _sites(tiny)
    together = capture(tiny, PROMPTS, sites=sites, positions="all", batch_size=3)
    for i, p in enumerate(PROMPTS):
        alone = capture(tiny, [p], sites=sites, positions="all", batch_size=1)
        for key in together.acts:
            torch.testing.assert_close(together[key][i], alone[key][0], atol=1e-5, rtol=0)


def test_capture_positions(tiny_llama):
    full = capture(tiny_llama, PROMPTS, sites=["v"], layers=[1], positions="all")
    last2 = capture(tiny_llama, PROMPTS, sites=["v"], layers=[1], positions="last 2")
    post = capture(tiny_llama, PROMPTS, sites=["v"], layers=[1], positions="post")
    n_post = post[("v", 1)].shape[1]
    for i in range(3):
        torch.testing.assert_close(last2[("v", 1)][i], full[("v", 1)][i][-2:])
        torch.testing.assert_close(post[("v", 1)][i], full[("v", 1)][i][-n_post:])
    assert len(full[("v", 1)][2]) > len(full[("v", 1)][1])  # ragged: real tokens only


@pytest.mark.parametrize("kwargs, match", [
    ({"sites": ["nope"]}, "unknown site"),
    ({"layers": [99]}, "out of range"),
    ({"positions": "middle"}, "unknown positions"),
])
def test_capture_bad_input(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        capture(tiny_llama, PROMPTS, **kwargs)


def test_capture_no_prompts(tiny_llama):
    with pytest.raises(ValueError, match="no prompts"):
        capture(tiny_llama, [])
