"""Prompt lengths against the model's context and the device's memory, checked before anything is allocated.

:func:`context_length` is the model's limit (``max_position_embeddings`` of its config); the memory limit is
:func:`kvgeom.runtime.memory.memory_token_limit` (the longest row whose one-row batch fits in the free memory).
:func:`fit_prompts` counts each distinct prompt's tokens as :func:`kvgeom.runtime.generate` feeds them
(chat-formatted unless ``chat=False``) and refuses, with :class:`PromptTooLongError`, a prompt whose tokens plus
the tokens to generate exceed either limit, naming the prompt, its token count, the limit (which one, and for
memory the bytes needed and free) and the fix; only with ``truncate=True`` is the user's text cut instead (its
first tokens kept, the chat template's own tokens intact).
Proved by ``tests/runtime/test_limits.py`` (refused before any forward call; truncation fits and is flagged) and
``tests/runtime/test_memory.py`` (the memory limit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvgeom.io import format_bytes
from kvgeom.runtime.memory import batch_bytes, memory_token_limit

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["PromptTooLongError", "context_length", "fit_prompts", "preview", "prompt_token_counts"]

#: a token is at least one byte of the text for every tokenizer kvgeom meets (byte-level BPE, SentencePiece with
#: byte fallback); a text this many bytes under the budget fits without being tokenized
_SLACK = 8


class PromptTooLongError(ValueError):
    """A prompt plus the tokens to generate does not fit in the model's context; the message says what to do.

    ``prompt``, ``n_tokens``, ``limit``, ``max_new_tokens``, ``n_long`` (how many prompts do not fit) and
    ``reason`` (``"context"`` or ``"memory"``: which limit; ``need`` and ``free`` bytes for memory) let a caller
    word its own fix (the audit names its options)."""

    def __init__(self, message: str, *, prompt: str | None = None, n_tokens: int | None = None,
                 limit: int | None = None, max_new_tokens: int | None = None, n_long: int = 1,
                 reason: str = "context", need: int | None = None, free: int | None = None) -> None:
        super().__init__(message)
        self.prompt, self.n_tokens, self.limit = prompt, n_tokens, limit
        self.max_new_tokens, self.n_long = max_new_tokens, n_long
        self.reason, self.need, self.free = reason, need, free


def context_length(model: KVModel) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), None when its config does not say."""
    config = model.hf_model.config
    text = getattr(config, "text_config", None) or config
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if n else None


def prompt_token_counts(model: KVModel, prompts: Sequence[str], *, chat: bool = True,
                        system: str | None = None) -> list[int]:
    """How many tokens each prompt is when fed to the model (chat-formatted unless ``chat=False``)."""
    texts = model.format_chat(list(prompts), system=system) if chat else list(prompts)
    return [len(model.tokenizer(t, add_special_tokens=not chat)["input_ids"]) for t in texts]


def preview(text: str, n: int = 40) -> str:
    """``text``'s first ``n`` characters, quoted, for a message."""
    return repr(text if len(text) <= n else text[:n] + "...")


def _cut(model: KVModel, prompt: str, budget: int, chat: bool, system: str | None) -> str:
    """The longest head of ``prompt``'s tokens that fits in ``budget`` tokens once formatted."""
    tok = model.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    keep = len(ids)
    while keep > 0:
        text = tok.decode(ids[:keep])
        n = prompt_token_counts(model, [text], chat=chat, system=system)[0]
        if n <= budget:
            return text
        keep -= max(1, n - budget)
    raise PromptTooLongError(f"prompt {preview(prompt)} cannot be truncated to fit: the chat template alone "
                             f"(with the system prompt) takes more than {budget:,} tokens; lower max_new_tokens")


def _memory_error(model: KVModel, index: int, prompt: str, n: int, max_new_tokens: int, limit: int, free: int,
                  others: str, chat: bool, logit_positions: int, option: str) -> PromptTooLongError:
    need = batch_bytes(model, 1, n, new_tokens=max_new_tokens, logit_positions=logit_positions)
    return PromptTooLongError(
        f"prompt {index} ({preview(prompt)}) is {n:,} tokens{' chat-formatted' if chat else ''}{others}; with "
        f"max_new_tokens={max_new_tokens:,} it needs {n + max_new_tokens:,} positions, and even alone in a batch "
        f"about {format_bytes(need)} for its KV cache and activations, but {model.device} has {format_bytes(free)} "
        f"free: the memory limit is {limit:,} tokens. Shorten it to at most {limit - max_new_tokens:,} tokens, "
        f"{option} to keep its first tokens, or free memory (or use a device with more)",
        prompt=prompt, n_tokens=n, limit=limit, max_new_tokens=max_new_tokens, reason="memory", need=need,
        free=free)


def fit_prompts(model: KVModel, prompts: Sequence[str], *, max_new_tokens: int, chat: bool = True,
                system: str | None = None, truncate: bool = False, memory: bool = True,
                logit_positions: int = 1, truncate_option: str = "pass truncate_prompts=True"
                ) -> tuple[list[str], list[bool]]:
    """``(prompts, truncated)``: the prompts as given when each fits in the context with ``max_new_tokens`` to
    generate (and, with ``memory=True``, in the device's free memory at one row per batch, computing logits at
    ``logit_positions`` positions); else :class:`PromptTooLongError` naming the longest one, its token count, the
    limit and the fix, or, with ``truncate=True``, those prompts cut to fit (``truncated`` flags them). Each
    distinct prompt is tokenized once; a prompt whose bytes are well under the budget is not tokenized at all."""
    limit = context_length(model)
    prompts = list(prompts)
    mem = memory_token_limit(model, new_tokens=max_new_tokens, logit_positions=logit_positions) if memory else None
    if limit is None and mem is None:
        return prompts, [False] * len(prompts)
    if limit is not None and limit - max_new_tokens < 1:
        raise PromptTooLongError(f"max_new_tokens={max_new_tokens:,} leaves no room for a prompt: {model.name} has "
                                 f"a context of {limit:,} tokens; pass max_new_tokens below {limit:,}", limit=limit,
                                 max_new_tokens=max_new_tokens, n_long=len(prompts))
    if mem is not None and mem[0] - max_new_tokens < 1:
        need = batch_bytes(model, 1, 1, new_tokens=max_new_tokens, logit_positions=logit_positions)
        raise PromptTooLongError(
            f"max_new_tokens={max_new_tokens:,} does not fit in memory: one row would need about "
            f"{format_bytes(need)} for its KV cache and activations, but {model.device} has {format_bytes(mem[1])} "
            f"free (the memory limit is {mem[0]:,} tokens); lower max_new_tokens or free memory",
            limit=mem[0], max_new_tokens=max_new_tokens, n_long=len(prompts), reason="memory", need=need,
            free=mem[1])
    ctx_budget = limit - max_new_tokens if limit is not None else None
    mem_budget = mem[0] - max_new_tokens if mem is not None else None
    budget = min(b for b in (ctx_budget, mem_budget) if b is not None)
    unique = list(dict.fromkeys(prompts))
    texts = model.format_chat(unique, system=system) if chat else unique
    maybe = [p for p, t in zip(unique, texts, strict=True) if len(t.encode("utf-8")) + _SLACK > budget]
    long = {p: n for p, n in zip(maybe, prompt_token_counts(model, maybe, chat=chat, system=system), strict=True)
            if n > budget}
    if not long:
        return prompts, [False] * len(prompts)
    if not truncate:
        worst = max(long, key=long.get)
        n = long[worst]
        others = f" ({len(long)} prompts do not fit; this is the longest)" if len(long) > 1 else ""
        if ctx_budget is None or n <= ctx_budget:
            assert mem is not None
            raise _memory_error(model, prompts.index(worst), worst, n, max_new_tokens, mem[0], mem[1], others, chat,
                                logit_positions, truncate_option)
        raise PromptTooLongError(
            f"prompt {prompts.index(worst)} ({preview(worst)}) is {n:,} tokens{' chat-formatted' if chat else ''}"
            f"{others}; with max_new_tokens={max_new_tokens:,} it needs {n + max_new_tokens:,} positions, but "
            f"{model.name} has a context of {limit:,} tokens (max_position_embeddings). Shorten it to at most "
            f"{ctx_budget:,} tokens, lower max_new_tokens, or {truncate_option} to keep its first tokens",
            prompt=worst, n_tokens=n, limit=limit, max_new_tokens=max_new_tokens, n_long=len(long))
    cut = {p: _cut(model, p, budget, chat, system) for p in long}
    return [cut.get(p, p) for p in prompts], [p in cut for p in prompts]
