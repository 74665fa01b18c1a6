"""GPU results equal CPU results on the tiny models (same greedy tokens). Marked ``cuda``: run on a GPU machine."""

import pytest

from kvgeom import generate
from kvgeom.quant.plan import QuantPlan
from kvgeom.testing import tiny_model

from ..conftest import PROMPTS

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("plan", [None, QuantPlan("int4-token-asym"), QuantPlan("q4_0", mode="cache"),
                                  QuantPlan("kivi2-g8-r16", mode="cache")])
def test_gpu_equals_cpu(arch, plan):
    cpu = tiny_model(arch, device="cpu")
    gpu = tiny_model(arch, device="cuda")
    assert gpu.attention == ("eager" if arch == "gemma2" else "sdpa")  # auto: the fused kernel on CUDA
    a = generate(cpu, PROMPTS, plans=plan, max_new_tokens=8, stop_at_eos=False)
    b = generate(gpu, PROMPTS, plans=plan, max_new_tokens=8, stop_at_eos=False)
    assert a.tokens == b.tokens


def test_device_map_gpu_cpu_split_equals_one_device(tmp_path):
    """A model larger than the GPU budget placed by accelerate across GPU + CPU (max_memory): the bridge boots
    (kvgeom hides the mixed map from TransformerLens 4.3's blanket refusal) and greedy tokens, with and without
    quantization plans, equal the CPU model's."""
    import torch

    from kvgeom import load_model
    from kvgeom.testing import save_tiny_checkpoint

    hf = save_tiny_checkpoint(tmp_path, "llama", n_layers=4)
    layer_bytes = sum(p.numel() * p.element_size() for p in hf.model.layers[0].parameters())
    split = load_model(str(tmp_path), device_map="auto", dtype=torch.float32,
                       max_memory={0: int(2.5 * layer_bytes + 3 * 384 * 256 * 4), "cpu": "4GiB"})
    placed = {str(v) for v in split.hf_model.hf_device_map.values()}
    assert "cpu" in placed and placed - {"cpu", "disk"}, f"not a GPU + CPU split: {split.hf_model.hf_device_map}"
    cpu0 = load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    for plan in (None, QuantPlan("int4-token-asym"), QuantPlan("q4_0", mode="cache")):
        a = generate(cpu0, PROMPTS, plans=plan, max_new_tokens=6, stop_at_eos=False)
        b = generate(split, PROMPTS, plans=plan, max_new_tokens=6, stop_at_eos=False)
        assert a.tokens == b.tokens, plan


def test_device_map_all_gpu(tmp_path):
    import torch

    from kvgeom import load_model
    from kvgeom.testing import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path, "llama", n_layers=4)
    # an all-GPU map (here: one GPU) works through the same path and gives the CPU model's tokens
    cpu = load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    gpu = load_model(str(tmp_path), device_map="auto", dtype=torch.float32)
    for plan in (None, QuantPlan("int4-token-asym"), QuantPlan("q4_0", mode="cache")):
        a = generate(cpu, PROMPTS, plans=plan, max_new_tokens=6, stop_at_eos=False)
        b = generate(gpu, PROMPTS, plans=plan, max_new_tokens=6, stop_at_eos=False)
        assert a.tokens == b.tokens
