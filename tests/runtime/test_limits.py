"""Prompts longer than the model's context are refused before anything is allocated, or cut only on request
(issue #17; ``kvgeom.runtime.limits``)."""

import pytest

import kvgeom
from kvgeom.runtime import PromptTooLongError, context_length, fit_prompts, prompt_token_counts

from ..conftest import get_tiny

LONG = "bread and water " * 400  # ~1,600 tokens for the tiny tokenizer; the tiny models' context is 512


def test_context_length_is_the_configs():
    assert context_length(get_tiny("llama")) == 512


def test_a_long_prompt_is_refused_before_any_batch(monkeypatch):
    import kvgeom.runtime.generation as gen

    def boom(*a, **k):
        raise AssertionError("a batch was encoded or run before the length check")

    monkeypatch.setattr(gen, "encode", boom)
    monkeypatch.setattr(gen, "forward", boom)
    model = get_tiny("llama")
    n = prompt_token_counts(model, [LONG])[0]
    assert n > 512
    with pytest.raises(PromptTooLongError) as err:
        kvgeom.generate(model, ["hi", LONG], max_new_tokens=8)
    msg = str(err.value)
    assert "prompt 1 ('bread and water" in msg
    assert f"is {n:,} tokens chat-formatted" in msg and f"needs {n + 8:,} positions" in msg
    assert "context of 512 tokens" in msg and "at most 504 tokens" in msg and "truncate_prompts=True" in msg
    assert err.value.n_tokens == n and err.value.limit == 512 and err.value.prompt == LONG


def test_the_limit_is_exact():
    model = get_tiny("llama")
    n = prompt_token_counts(model, [LONG[:600]])[0]
    assert n < 512
    assert fit_prompts(model, [LONG[:600]], max_new_tokens=512 - n) == ([LONG[:600]], [False])
    with pytest.raises(PromptTooLongError, match=f"is {n} tokens"):
        fit_prompts(model, [LONG[:600]], max_new_tokens=513 - n)


def test_max_new_tokens_filling_the_context_is_refused():
    with pytest.raises(PromptTooLongError, match="max_new_tokens=512 leaves no room.*context of 512"):
        kvgeom.generate(get_tiny("llama"), "hi", max_new_tokens=512)


def test_several_long_prompts_name_the_longest():
    with pytest.raises(PromptTooLongError, match=r"prompt 2 .*\(2 prompts do not fit; this is the longest\)") as err:
        fit_prompts(get_tiny("llama"), ["hi", LONG[:3000], LONG], max_new_tokens=8)
    assert err.value.n_long == 2


def test_truncation_only_when_asked_keeps_the_head_and_fits():
    model = get_tiny("llama")
    out = kvgeom.generate(model, [LONG, "hi"], max_new_tokens=4, truncate_prompts=True)
    assert out.extra["truncated"] == [True, False]
    cut = out.prompts[0]
    assert LONG.startswith(cut.strip()) and len(cut) < len(LONG)
    n = prompt_token_counts(model, [cut])[0]
    assert 500 <= n <= 512 - 4  # as much of the prompt as fits
    assert out.prompts[1] == "hi" and len(out.texts) == 2
    assert "truncated" not in kvgeom.generate(model, "hi", max_new_tokens=2).extra  # off by default
