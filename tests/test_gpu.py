"""GPU results equal CPU results on the tiny models (same greedy tokens). Marked ``cuda``: run on a GPU machine."""

import pytest

from kvgeom import generate
from kvgeom.quant.plan import QuantPlan
from kvgeom.testing import tiny_model

from .conftest import PROMPTS

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("plan", [None, QuantPlan("int4-token-asym"), QuantPlan("q4_0", mode="cache"),
                                  QuantPlan("kivi2-g8-r16", mode="cache")])
def test_gpu_equals_cpu(arch, plan):
    cpu = tiny_model(arch, device="cpu")
    gpu = tiny_model(arch, device="cuda")
    a = generate(cpu, PROMPTS, plans=plan, max_new_tokens=8, stop_at_eos=False)
    b = generate(gpu, PROMPTS, plans=plan, max_new_tokens=8, stop_at_eos=False)
    assert a.tokens == b.tokens
