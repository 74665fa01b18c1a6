"""The memory-derived prompt limit and batch fit (issue #17; ``kvgeom.runtime.memory``): a prompt whose one-row batch
would not fit in the device's free memory is refused before anything is allocated, naming the limit and the fix;
a batch too big runs as smaller batches; a capture too big for the CPU is refused."""

import pytest

import kvgeom
import kvgeom.runtime.memory as memory
from kvgeom.runtime import PromptTooLongError, fit_prompts, prompt_token_counts
from kvgeom.runtime.memory import MemoryLimitError, batch_bytes, fit_batch, memory_token_limit

from ..conftest import get_tiny

PROMPT = "bread and water " * 60  # ~240 tokens for the tiny tokenizer: inside the tiny models' 512-token context


def _free(monkeypatch, n_bytes):
    monkeypatch.setattr(memory, "free_memory", lambda device: n_bytes)


def test_the_estimate_grows_with_rows_and_tokens():
    model = get_tiny("llama")
    one = batch_bytes(model, 1, 100, new_tokens=8)
    assert batch_bytes(model, 2, 100, new_tokens=8) == 2 * one
    assert batch_bytes(model, 1, 200, new_tokens=8) > one
    assert batch_bytes(model, 1, 100, new_tokens=16) > one
    assert batch_bytes(model, 1, 100, new_tokens=8, logit_positions=100) > one
    assert memory.free_memory("cpu") > 0  # this machine can tell its free memory


def test_memory_limit_is_exact_for_the_estimate(monkeypatch):
    model = get_tiny("llama")
    _free(monkeypatch, 50_000_000)
    limit, free = memory_token_limit(model, new_tokens=8)
    assert free == 50_000_000
    allowed = int(free * memory.SAFETY)
    assert batch_bytes(model, 1, limit - 8, new_tokens=8) <= allowed < batch_bytes(model, 1, limit - 7, new_tokens=8)


def test_a_prompt_over_the_memory_limit_is_refused_before_any_batch(monkeypatch):
    import kvgeom.runtime.generation as gen

    def boom(*a, **k):
        raise AssertionError("a batch was encoded or run before the memory check")

    model = get_tiny("llama")
    n = prompt_token_counts(model, [PROMPT])[0]
    need = batch_bytes(model, 1, n, new_tokens=8)
    _free(monkeypatch, int(need * 0.5))  # half of what the prompt needs alone
    monkeypatch.setattr(gen, "encode", boom)
    monkeypatch.setattr(gen, "forward", boom)
    with pytest.raises(PromptTooLongError) as err:
        kvgeom.generate(model, ["hi", PROMPT], max_new_tokens=8)
    msg = str(err.value)
    assert err.value.reason == "memory" and err.value.n_tokens == n and err.value.limit < n + 8
    assert "prompt 1 ('bread and water" in msg and f"is {n:,} tokens chat-formatted" in msg
    assert "free: the memory limit is" in msg and f"{err.value.limit:,} tokens" in msg
    assert "Shorten it to at most" in msg and "truncate_prompts=True" in msg and "free memory" in msg


def test_truncation_fits_the_memory_limit(monkeypatch):
    model = get_tiny("llama")
    n = prompt_token_counts(model, [PROMPT])[0]
    _free(monkeypatch, int(batch_bytes(model, 1, n, new_tokens=4) * 0.6))
    limit, _ = memory_token_limit(model, new_tokens=4)
    out, cut = fit_prompts(model, [PROMPT, "hi"], max_new_tokens=4, truncate=True)
    assert cut == [True, False] and out[1] == "hi"
    assert prompt_token_counts(model, [out[0]])[0] <= limit - 4 and PROMPT.startswith(out[0][:20])
    gen = kvgeom.generate(model, [PROMPT], max_new_tokens=4, truncate_prompts=True)
    assert gen.extra["truncated"] == [True]


def test_max_new_tokens_that_cannot_fit_in_memory_is_refused(monkeypatch):
    _free(monkeypatch, 1000)
    with pytest.raises(PromptTooLongError, match="max_new_tokens=8 does not fit in memory") as err:
        kvgeom.generate(get_tiny("llama"), "hi", max_new_tokens=8)
    assert err.value.reason == "memory"


def test_a_batch_too_big_runs_as_smaller_batches(monkeypatch):
    import kvgeom.runtime.generation as gen

    model = get_tiny("llama")
    prompts = ["How do I bake bread at home?", "hi", "Write a story.", "Sure, a poem."] * 2
    ref = kvgeom.generate(model, prompts, max_new_tokens=4, batch_size=8, stop_at_eos=False)
    width = max(len(r) for r in gen.encode(model, prompts).input_ids.tolist())
    _free(monkeypatch, int(batch_bytes(model, 3, width, new_tokens=4) / memory.SAFETY) + 1)
    assert fit_batch(model, 8, width, new_tokens=4) == 3
    sizes = []
    real = gen._generate_batch

    def spy(model, batch, *a, **k):
        sizes.append(len(batch))
        return real(model, batch, *a, **k)

    monkeypatch.setattr(gen, "_generate_batch", spy)
    out = kvgeom.generate(model, prompts, max_new_tokens=4, batch_size=8, stop_at_eos=False)
    assert max(sizes) <= 3 and sum(sizes) == len(prompts) and out.extra["batch_size"] <= 3
    assert out.tokens == ref.tokens  # results do not depend on the batch size


def test_capture_checks_length_and_memory_first(monkeypatch):
    import kvgeom.runtime.forward as fwd

    model = get_tiny("llama")
    with pytest.raises(PromptTooLongError, match="context of 512 tokens"):
        kvgeom.capture(model, ["bread and water " * 400], sites=("k",))
    real = fwd.free_memory
    monkeypatch.setattr(fwd, "free_memory", lambda device: 10_000 if device == "cpu" else real(device))
    with pytest.raises(MemoryLimitError, match=r"capture of 2 prompts .* of CPU memory .* positions='post'"):
        kvgeom.capture(model, [PROMPT, "hi"], sites=("k", "v"), positions="all")
    monkeypatch.setattr(fwd, "free_memory", real)
    acts = kvgeom.capture(model, [PROMPT, "hi"], sites=("k",), positions="post", layers=[0])
    assert acts[("k", 0)].shape[0] == 2
