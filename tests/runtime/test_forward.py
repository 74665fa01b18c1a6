import pytest
import torch

from kvgeom import capture, encode

from ..conftest import PROMPTS


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


def _run(code):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True,
                          text=True, timeout=300)


def test_old_forward_module_keeps_kvgeom_forward_callable():
    """Importing the deprecated module ``kvgeom.forward`` rebinds the attribute ``kvgeom.forward`` to it; it stays
    callable as the function (no warning for the call: ``kvgeom.forward`` is public)."""
    code = (
        "import warnings, kvgeom\n"
        "from kvgeom.runtime.forward import forward\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from kvgeom.forward import encode\n"
        "assert [x.category for x in w] == [DeprecationWarning], w\n"
        "assert 'kvgeom.runtime.forward.encode' in str(w[0].message)\n"
        "import kvgeom.runtime.forward as rf\n"
        "assert encode is rf.encode\n"
        "calls = []\n"
        "rf.forward = lambda *a, **k: calls.append((a, k)) or 'ok'\n"
        "assert kvgeom.forward('m', ids=1) == 'ok' and calls == [(('m',), {'ids': 1})]\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("old, name, new", [
    ("kvgeom.hooks", "kv_hooks", "kvgeom.runtime.hooks"),
    ("kvgeom.hooks", "SITES", "kvgeom.sites"),
    ("kvgeom.hooks", "hook_name", "kvgeom.sites"),
    ("kvgeom.generation", "generate", "kvgeom.runtime.generation"),
    ("kvgeom.generation", "greedy_uncached", "kvgeom.runtime.generation"),
    ("kvgeom.quant.plan", "apply_plans", "kvgeom.runtime.plans"),
    ("kvgeom.quant.plan", "forward_with_plans", "kvgeom.runtime.plans"),
    ("kvgeom.quant.plan", "PlanCache", "kvgeom.runtime.plans"),
])
def test_moved_names_warn_and_are_the_same_object(old, name, new):
    import importlib
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)
    assert any(issubclass(w.category, DeprecationWarning) and f"{new}.{name}" in str(w.message) for w in caught)


def test_new_paths_import_without_warnings():
    out = _run("import kvgeom, kvgeom.sites, kvgeom.hub, kvgeom.runtime, kvgeom.geometry, kvgeom.noise, "
               "kvgeom.prompts, kvgeom.models, kvgeom.quant.plan, kvgeom.testing")
    assert out.returncode == 0, out.stderr
