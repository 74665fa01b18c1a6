"""Greedy, batched, left-padded generation with the KV cache, through the bridge and its hooks.

Rows stop at EOS (their later tokens are padding and are not returned). Batched generation equals
one-prompt-at-a-time generation token for token (tested), and cached generation equals uncached
full-recompute generation (tested for every supported architecture: this is what caught the
transformers 5.24 cache-argument rename). Both are in ``tests/runtime/test_generation.py``. A prompt that does
not fit in the model's context with the tokens to generate is refused before anything is allocated, or cut only
when ``truncate_prompts=True`` (:mod:`kvgeom.runtime.limits`, ``tests/runtime/test_limits.py``); that includes
a prompt too long for the device's free memory, and a batch too big for it runs as smaller batches
(:mod:`kvgeom.runtime.memory`, ``tests/runtime/test_memory.py``). Logits that are not finite (NaN/inf: fp16
overflow, an aggressive scheme) are detected per row at every step, with no extra host sync, and flagged in
``Generation.extra["nonfinite"]`` (``tests/runtime/test_generation.py::test_nonfinite_logits_are_flagged_per_row``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from kvgeom.runtime.forward import Batch, encode, forward, new_cache, position_ids_from_mask, select_cache_rows
from kvgeom.runtime.layer_skip import LayerSkip, layer_skip, prefill_skipping
from kvgeom.runtime.limits import fit_prompts, prompt_token_counts
from kvgeom.runtime.memory import fit_batch
from kvgeom.runtime.plans import apply_plans, normalise_plans
from kvgeom.runtime.prefix import SharedPrefix, cache_keeps_every_position, prefill_shared, shared_prefix

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["Generation", "generate", "greedy_uncached"]


@dataclass
class Generation:
    """Result of :func:`generate`: one entry per prompt, in input order."""

    prompts: list[str]
    texts: list[str]
    tokens: list[list[int]]
    stopped_at_eos: list[bool]
    first_logits: Float[Tensor, "batch vocab"] | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


@torch.inference_mode()
def _generate_batch(
    model: KVModel,
    batch: Batch,
    max_new_tokens: int,
    *,
    cache: Any,
    stop_at_eos: bool,
    keep_first_logits: bool,
    select: Callable[[list[int]], None] | None = None,
    stop_when: Callable[[str], bool] | None = None,
    exit_after_prefill: Callable[[Tensor], Sequence[bool]] | None = None,
    prefix: SharedPrefix | None = None,
    skip: LayerSkip | None = None,
    only: Callable[[list[int]], Any] | None = None,
) -> tuple[list[list[int]], list[bool], Tensor | None, list[bool], list[bool], list[bool]]:
    """Greedy decoding of one left-padded batch. Rows that hit EOS (or whose decoded text so far satisfies
    ``stop_when``) are dropped from the batch (and from the cache, via
    :func:`~kvgeom.runtime.forward.select_cache_rows`, and from the plan groups, via ``select``), so later steps
    compute only the rows still generating. ``exit_after_prefill(first_logits)`` (float ``[batch, vocab]``) says
    which rows stop right after the prefill, with no token generated (a screen); they are flagged in the last list.
    The list before it flags rows whose logits were not finite at some step (read once, at the end). ``prefix``:
    the batch's shared tokens are prefilled once per plan (:func:`kvgeom.runtime.prefix.prefill_shared`). ``skip``:
    the layers below each row's first quantized layer come from one full-precision prefill per prompt
    (:func:`kvgeom.runtime.layer_skip.prefill_skipping`; ``only`` restricts the plans to some rows)."""
    eos = torch.tensor(sorted(model.eos_token_ids) or [-1], device=model.device)
    eos_list = set(eos.tolist()) if stop_at_eos else set()
    if prefix is not None:
        logits, mask, pos = prefill_shared(model, batch, prefix, cache=cache, select=select)
    elif skip is not None:
        if only is None:
            raise ValueError("skip= needs only= (the plan run's only) to restrict the plans to each group of rows")
        logits, mask, pos = prefill_skipping(model, batch, skip, cache=cache, only=only)
    else:
        mask = batch.mask.to(model.device)
        pos = position_ids_from_mask(mask)
        logits = forward(model, batch.input_ids.to(model.device), mask, past_key_values=cache, position_ids=pos,
                         step=0, logits_to_keep=1)
    last = logits[:, -1].float()
    first = last.cpu().clone() if keep_first_logits else None
    b = len(batch)
    nonfinite = ~torch.isfinite(last).all(-1)
    out = torch.full((b, max_new_tokens), -1, dtype=torch.long, device=model.device)
    hit_eos = torch.zeros(b, dtype=torch.bool, device=model.device)
    alive = torch.arange(b, device=model.device)
    settled = torch.zeros(b, dtype=torch.bool)
    next_pos = pos[:, -1:] + 1
    exited = [False] * b
    if exit_after_prefill is not None:
        exited = [bool(e) for e in exit_after_prefill(last)]
        if len(exited) != b:
            raise ValueError(f"exit_after_prefill returned {len(exited)} flags for a batch of {b} rows")
        if all(exited):
            return [[] for _ in range(b)], [False] * b, first, [False] * b, nonfinite.tolist(), exited
        if any(exited):  # these rows leave the batch before any token is decoded
            keep = torch.tensor([i for i, e in enumerate(exited) if not e], device=model.device)
            alive, last, mask, next_pos = alive[keep], last[keep], mask[keep], next_pos[keep]
            select_cache_rows(cache, keep)
            if select is not None:
                select(keep.tolist())
    for step in range(1, max_new_tokens + 1):
        tok = last.argmax(-1)
        out[alive, step - 1] = tok
        is_eos = torch.isin(tok, eos)
        hit_eos[alive] |= is_eos
        if stop_when is not None:  # decode the rows still going and ask whether their outcome is settled
            now = [not e and stop_when(model.tokenizer.decode(_until_eos(r, eos_list), skip_special_tokens=True))
                   for r, e in zip(out[alive, :step].tolist(), is_eos.tolist(), strict=True)]
            now_t = torch.tensor(now, dtype=torch.bool)
            settled[alive.cpu()] |= now_t
            is_eos = is_eos | now_t.to(is_eos.device)
        n_done = int(is_eos.sum()) if stop_at_eos or stop_when is not None else 0  # the one host sync per step
        if step == max_new_tokens or n_done == len(alive):
            break
        if n_done:
            keep = (~is_eos).nonzero().squeeze(-1)
            alive, tok, mask, next_pos = alive[keep], tok[keep], mask[keep], next_pos[keep]
            select_cache_rows(cache, keep)  # each layer on its own device (several GPUs)
            if select is not None:
                select(keep.tolist())
        mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=torch.bool, device=mask.device)], dim=1)
        logits = forward(model, tok[:, None], mask, past_key_values=cache, position_ids=next_pos, step=step,
                         new_all_real=True)
        last = logits[:, -1].float()
        nonfinite[alive] |= ~torch.isfinite(last).all(-1)
        next_pos = next_pos + 1
    rows: list[list[int]] = []
    eos_set = set(eos.tolist())
    for row in out.tolist():  # one device-to-host copy, not one per row
        seq: list[int] = []
        for t in row:
            if t < 0 or (stop_at_eos and t in eos_set):
                break
            seq.append(t)
        rows.append(seq)
    return rows, hit_eos.tolist(), first, settled.tolist(), nonfinite.tolist(), exited


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def generate(
    model: KVModel,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    chat: bool = True,
    system: str | None = None,
    stop_at_eos: bool = True,
    plans: Any = None,
    cache_factory: Callable[[KVModel, Batch], Any] | None = None,
    keep_first_logits: bool = False,
    stop_when: Callable[[str], bool] | None = None,
    progress: bool | str = False,
    truncate_prompts: bool = False,
    exit_after_prefill: Callable[[list[int], Tensor], Sequence[bool]] | None = None,
    share_prefix: bool | None = None,
    skip_layers: bool = True,
) -> Generation:
    """Greedy generation with the KV cache, left-padded batches, any active :func:`kv_hooks`.

    Args:
        plans: a :class:`kvgeom.quant.QuantPlan` (or scheme string) for every row, or one plan per
            prompt (``None`` = full precision). Rows with different plans share batches.
        cache_factory: ``f(model, batch) -> cache`` building the KV cache for a batch (default: HF
            ``DynamicCache``); not combinable with ``plans``.
        keep_first_logits: also return the logits of the first generated position ``[n, vocab]``
            (what refusal scores read).
        progress: a tqdm bar of rows done (a string: the bar's label).
        stop_when: ``f(text_so_far) -> bool``; a row stops as soon as it is True for the row's decoded
            completion (e.g. a judge's ``settled``: a refusal phrase has appeared, so the verdict cannot
            change). Its text is then cut there; ``Generation.extra["settled"]`` flags such rows.
        truncate_prompts: a prompt longer than the model's context less ``max_new_tokens`` is refused
            (:class:`kvgeom.runtime.limits.PromptTooLongError`: its token count, the limit and the fix) before
            anything is allocated; with True its text is cut to fit instead (first tokens kept; the chat template
            intact), ``Generation.prompts`` holds the prompts generated from and ``extra["truncated"]`` flags them.
        exit_after_prefill: ``f(rows, first_logits) -> flags``, called once per batch after its prefill with the
            input indices of the batch's rows and their first-position logits (float ``[len(rows), vocab]``, on
            the model's device); a row flagged True leaves the batch there, with no token generated (empty text,
            ``extra["exited"]`` True; its ``first_logits`` are kept). A prefill screen
            (:class:`kvgeom.predict.PrefillScreen`) uses it, so that screening costs no pass of its own.
        share_prefix: prefill the tokens every prompt of a batch starts with (the chat template's system message
            and user header) once per plan instead of once per row (:mod:`kvgeom.runtime.prefix`); a batch shares
            only when every plan is :attr:`~kvgeom.quant.QuantPlan.per_position`, no ``cache_factory`` is given,
            the model has no sliding-window layer and no hooks but the plans' own are open, and then only when some
            plan has more than one row (else nothing is saved). ``None`` (default): on the CPU, where a row costs
            its matmuls (64 rows, 8 new tokens, default model: 25 -> 19 s, ``benchmarks/bench_shared_prefix.py``);
            off on a GPU, where it saved nothing measurable (docs/benchmarks.md §14). The same tokens within float32
            rounding;
            ``extra["shared_prefix"]`` holds each row's shared token count (0: not shared).
        skip_layers: in a batch that does not share a prefix, compute the layers below each row's first quantized
            layer once per prompt at full precision instead of once per row (:mod:`kvgeom.runtime.layer_skip`: a
            layer sweep's prefill then computes about half its layer-rows); only when every plan is in mode
            ``forward``, no ``cache_factory`` is given, the model has no sliding-window layer, no hooks but the
            plans' own are open and the saving passes 10% of the batch's layer-rows. The same tokens within float32
            rounding; ``extra["skipped_layers"]`` holds each row's layers read from the full-precision prefill.

    Memory: a batch whose estimate (:func:`kvgeom.runtime.memory.batch_bytes`) exceeds the device's free memory
    runs as smaller batches; out of memory all the same, the batch is retried at half the size (down to 1), and
    the smaller size is kept; results do not depend on the batch size (``extra["batch_size"]``: the size used
    last). More prompts than one batch run in order of token length (:func:`length_order`), so each batch pads
    only to its own longest prompt; results come back in input order. Rows whose logits were NaN or inf at any
    step are flagged in ``extra["nonfinite"]`` (their text is whatever argmax made of them: never judge it as a
    refusal or a compliance).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if plans is not None and cache_factory is not None:
        raise ValueError("pass either plans= or cache_factory=, not both")
    row_plans = _plans_for(plans, len(prompts))
    prompts, truncated = fit_prompts(model, prompts, max_new_tokens=max_new_tokens, chat=chat, system=system,
                                     truncate=truncate_prompts)
    if share_prefix is None:
        share_prefix = model.device.type == "cpu"
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat, system=system, stop_at_eos=stop_at_eos,
              cache_factory=cache_factory, keep_first_logits=keep_first_logits, stop_when=stop_when, progress=progress,
              exit_after_prefill=exit_after_prefill, share_prefix=bool(share_prefix), skip_layers=bool(skip_layers))
    extra = {"truncated": truncated} if truncate_prompts else {}
    if len(prompts) <= batch_size:
        return _run(model, prompts, row_plans, list(range(len(prompts))), extra=extra, **kw)
    # more than one batch: run them by length, so that each batch pads only to its own rows
    order = length_order(model, prompts, chat=chat, system=system)
    gen = _run(model, [prompts[i] for i in order], None if row_plans is None else [row_plans[i] for i in order],
               order, extra={}, **kw)
    back = sorted(range(len(order)), key=order.__getitem__)  # where each input row ran
    return Generation(
        prompts=prompts, texts=[gen.texts[j] for j in back], tokens=[gen.tokens[j] for j in back],
        stopped_at_eos=[gen.stopped_at_eos[j] for j in back],
        first_logits=None if gen.first_logits is None else gen.first_logits[back],
        extra={**{k: [gen.extra[k][j] for j in back] for k in ("settled", "nonfinite", "exited", "shared_prefix",
                                                                   "skipped_layers")},
               "batch_size": gen.extra["batch_size"], **extra})


def _run(model: KVModel, prompts: list[str], row_plans: list | None, index: list[int], *, max_new_tokens: int,
         batch_size: int, chat: bool, system: str | None, stop_at_eos: bool, cache_factory: Any,
         keep_first_logits: bool, stop_when: Callable[[str], bool] | None, progress: bool | str,
         exit_after_prefill: Callable[[list[int], Tensor], Sequence[bool]] | None, share_prefix: bool,
         skip_layers: bool, extra: dict) -> Generation:
    """The batches of :func:`generate`, in the order given (``index``: each prompt's index in the caller's input,
    what ``exit_after_prefill`` is told)."""
    tokens: list[list[int]] = []
    eos_flags: list[bool] = []
    firsts: list[Tensor] = []
    settled: list[bool] = []
    nonfinite: list[bool] = []
    exited: list[bool] = []
    shared: list[int] = []
    skipped: list[int] = []
    start, size = 0, batch_size
    bar = tqdm(total=len(prompts), desc=progress if isinstance(progress, str) else "generate", unit="row",
               disable=not progress)
    while start < len(prompts):
        batch = encode(model, prompts[start:start + size], chat=chat, system=system)
        fits = fit_batch(model, len(batch), batch.input_ids.shape[1], new_tokens=max_new_tokens)
        if fits < len(batch):  # the estimate says this batch would not fit in the free memory: fewer rows
            size = fits
            continue
        try:
            with _plan_context(model, row_plans, start, len(batch)) as plan_factory:
                factory = plan_factory or cache_factory
                cache = factory(model, batch) if factory else new_cache(model)
                rows_in = index[start:start + len(batch)]
                plain = cache_factory is None and cache_keeps_every_position(cache) and _own_hooks_only(model,
                                                                                                      plan_factory)
                prefix = _prefix_of(batch, row_plans, start) if share_prefix and plain else None
                skip = (layer_skip(batch, row_plans[start:start + len(batch)], model.n_layers)
                        if skip_layers and plain and prefix is None and plan_factory is not None
                        and not plan_factory.needs_cache else None)
                rows, hit, first, done, bad, out = _generate_batch(
                    model, batch, max_new_tokens, cache=cache, stop_at_eos=stop_at_eos,
                    keep_first_logits=keep_first_logits, select=getattr(plan_factory, "select", None),
                    stop_when=stop_when,
                    exit_after_prefill=None if exit_after_prefill is None else (
                        lambda logits, _r=rows_in: exit_after_prefill(_r, logits)),
                    prefix=prefix, skip=skip, only=getattr(plan_factory, "only", None),
                )
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            size = max(1, len(batch) // 2)  # back off and retry this batch; the smaller size is kept for the rest
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        tokens.extend(rows)
        eos_flags.extend(hit)
        settled.extend(done)
        nonfinite.extend(bad)
        exited.extend(out)
        shared.extend([prefix.length if prefix is not None else 0] * len(batch))
        skipped.extend(list(skip.first) if skip is not None else [0] * len(batch))
        if first is not None:
            firsts.append(first)
        start += len(batch)
        bar.update(len(batch))
    bar.close()
    texts = [model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return Generation(
        prompts=prompts, texts=texts, tokens=tokens, stopped_at_eos=eos_flags,
        first_logits=torch.cat(firsts) if firsts else None,
        extra={"settled": settled, "nonfinite": nonfinite, "exited": exited, "shared_prefix": shared,
               "skipped_layers": skipped, "batch_size": size, **extra},
    )


def _own_hooks_only(model: KVModel, plan_run: Any) -> bool:
    """Whether the only open hooks are the batch's plans' own: hooks of a caller's (a capture, noise) may read
    positions as a whole call's, or layers a split prefill does not run, so neither sharing nor skipping applies."""
    own = {id(s) for s in getattr(plan_run, "sessions", ())}
    return all(id(s) in own for s in model.hook_sessions)


def _prefix_of(batch: Batch, row_plans: list | None, start: int) -> SharedPrefix | None:
    """The batch's shared prefix (:func:`kvgeom.runtime.prefix.shared_prefix`)."""
    plans = [None] * len(batch) if row_plans is None else row_plans[start:start + len(batch)]
    return shared_prefix(batch, plans)


def length_order(model: KVModel, prompts: Sequence[str], *, chat: bool = True, system: str | None = None) -> list[int]:
    """Row indices of ``prompts`` from the fewest tokens to the most (ties keep input order); each distinct prompt
    is tokenized once."""
    unique = list(dict.fromkeys(prompts))
    n = dict(zip(unique, prompt_token_counts(model, unique, chat=chat, system=system), strict=True))
    return sorted(range(len(prompts)), key=lambda i: n[prompts[i]])


def _plans_for(plans: Any, n: int) -> list | None:
    if plans is None:
        return None
    return normalise_plans(plans, n)


@contextmanager
def _plan_context(model: KVModel, row_plans: list | None, start: int, n: int) -> Iterator[Any]:
    """Install the batch's plans (rows ``start:start+n``); yields a cache factory or None."""
    if row_plans is None or all(p is None for p in row_plans[start:start + n]):
        yield None
        return
    with apply_plans(model, row_plans[start:start + n]) as factory:
        yield factory


@torch.inference_mode()
def greedy_uncached(model: KVModel, prompt: str, *, max_new_tokens: int = 8, chat: bool = True) -> list[int]:
    """Reference greedy decoding by full recomputation (no KV cache), for one prompt.

    Slow (quadratic); used by tests to check that cached generation is right.
    """
    batch = encode(model, [prompt], chat=chat)
    ids = batch.input_ids.to(model.device)
    eos = model.eos_token_ids
    out: list[int] = []
    for _ in range(max_new_tokens):
        mask = torch.ones_like(ids, dtype=torch.bool)
        logits = forward(model, ids, mask)
        tok = int(logits[0, -1].argmax())
        if tok in eos:
            break
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]], device=ids.device)], dim=1)
    return out
