"""Batched, left-padded forward passes and activation capture.

Every batch is left-padded with an attention mask and position ids derived from it
(``cumsum(mask) - 1``), so a prompt's activations and logits do not depend on what else is in its
batch (``tests/runtime/test_forward.py``). :func:`capture` returns activations of real tokens only; like
generation it checks every prompt against the context and the free memory before any batch runs, runs smaller
batches when the asked size would not fit, and refuses a capture whose activations would not fit in the CPU's
free memory (:mod:`kvgeom.runtime.memory`, ``tests/runtime/test_memory.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kvgeom.io import format_bytes
from kvgeom.models.placement import PerDevice
from kvgeom.runtime.hooks import CallInfo, HookContext, kv_hooks, set_call
from kvgeom.runtime.limits import fit_prompts, prompt_token_counts
from kvgeom.runtime.memory import MemoryLimitError, fit_batch, free_memory
from kvgeom.sites import KV_SITES, SITES, hook_name

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["Batch", "Capture", "PositionSpec", "capture", "encode", "forward", "new_cache", "position_ids_from_mask",
           "select_cache_rows"]


@dataclass
class Batch:
    """Tokenized, left-padded prompts.

    ``n_post[i]`` is the number of trailing *post-instruction* tokens of row ``i``: the chat-template
    tokens after the user's text (``<|im_end|>\\n<|im_start|>assistant\\n`` for ChatML), where the
    refusal decision is made.
    """

    input_ids: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    texts: list[str]
    n_post: list[int]

    @property
    def lengths(self) -> list[int]:
        return self.mask.sum(1).tolist()

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def position_ids_from_mask(mask: Bool[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Positions counted over real tokens only (padding gets position 1, as HF does)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(~mask, 1)


def encode(
    model: KVModel,
    prompts: str | Sequence[str],
    *,
    chat: bool = True,
    system: str | None = None,
) -> Batch:
    """Chat-format (unless ``chat=False``) and tokenize ``prompts`` with left padding."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt string")
    texts = model.format_chat(prompts, system=system) if chat else list(prompts)
    tok = model.tokenizer
    rows: list[list[int]] = []
    n_post: list[int] = []
    for prompt, text in zip(prompts, texts, strict=True):
        enc = tok(text, add_special_tokens=not chat, return_offsets_mapping=chat and tok.is_fast)
        ids = list(enc["input_ids"])
        if not ids:
            raise ValueError(f"prompt {prompt!r} tokenized to no tokens")
        if chat:
            end = text.rfind(prompt) + len(prompt) if prompt else text.rfind("assistant")
            if "offset_mapping" in enc:
                n_post.append(sum(1 for s, _e in enc["offset_mapping"] if s >= end))
            else:
                n_post.append(len(tok(text[end:], add_special_tokens=False)["input_ids"]))
        else:
            n_post.append(0)
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad = model.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = True
    return Batch(input_ids=input_ids, mask=mask, texts=texts, n_post=n_post)


def new_cache(model: KVModel) -> Any:
    """An empty HF ``DynamicCache`` for ``model`` (transformers is imported only when a cache is needed)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.hf_model.config)


def select_cache_rows(cache: Any, keep: Tensor) -> None:
    """Keep batch rows ``keep`` of every layer of an HF cache, indexing each layer on its own device.

    ``DynamicCache.batch_select_indices`` indexes every layer with the one ``keep`` tensor, which fails (or on some
    device pairs reads the wrong memory) when a dispatched model's layers live on several GPUs; here ``keep`` is
    copied once per device (:class:`kvgeom.models.placement.PerDevice`), each layer uses the copy on its device
    (``tests/models/test_placement.py::test_cache_rows_selected_on_each_layers_device``).
    """
    layers = getattr(cache, "layers", None)
    if layers is None:  # a cache of another kind: its own selection
        cache.batch_select_indices(keep)
        return
    index = PerDevice(keep)
    for layer in layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, Tensor):  # None: a layer not filled yet (nothing to select)
            layer.batch_select_indices(index.on(keys.device))


@torch.inference_mode()
def forward(
    model: KVModel,
    input_ids: Int[Tensor, "batch new_pos"],
    mask: Bool[Tensor, "batch pos"],
    *,
    past_key_values: Any = None,
    position_ids: Int[Tensor, "batch new_pos"] | None = None,
    step: int = 0,
    logits_to_keep: int | None = None,
    new_all_real: bool = False,
) -> Float[Tensor, "batch new_pos vocab"]:
    """One forward call of the bridge with hooks informed of the call (step, real-position mask).

    ``mask`` spans the cached prefix plus the new tokens, as HF expects. ``logits_to_keep=k`` computes the
    unembedding for the last ``k`` positions only (the vocabulary projection is a quarter of a small
    model's compute). ``new_all_real=True`` (a decode step) tells the hooks that every new position is real
    (``CallInfo.mask`` None), so the quantizers skip their padding masks.
    """
    dev = model.device
    input_ids = input_ids.to(dev)
    mask = mask.to(dev)
    new = input_ids.shape[1]
    if position_ids is None:
        position_ids = position_ids_from_mask(mask)[:, -new:]
    position_ids = position_ids.to(dev)
    set_call(model, CallInfo(step=step, mask=None if new_all_real else mask[:, -new:], position_ids=position_ids))
    kwargs: dict[str, Any] = {"attention_mask": mask.long(), "position_ids": position_ids}
    if past_key_values is not None:
        kwargs["past_key_values"] = past_key_values
    if logits_to_keep:
        kwargs["logits_to_keep"] = int(logits_to_keep)
    return model.bridge(input_ids, return_type="logits", **kwargs)


# ---- capture -------------------------------------------------------------------------------------
PositionSpec = str | int


def _select(n_real: int, n_post: int, positions: PositionSpec) -> slice:
    """Which of a row's real positions to keep (as a slice over its real tokens)."""
    if positions == "all":
        return slice(0, n_real)
    if positions in ("post", "post_instruction", "post-instruction"):
        if n_post <= 0:
            raise ValueError("positions='post' needs chat-formatted prompts (no post-instruction tokens found)")
        return slice(n_real - n_post, n_real)
    if isinstance(positions, str) and positions.startswith("last"):
        k = int(positions[4:].strip(" _-") or 1)
        positions = -k
    if isinstance(positions, int) and positions < 0:
        k = -positions
        if k > n_real:
            raise ValueError(f"positions=last {k} but a prompt has only {n_real} tokens")
        return slice(n_real - k, n_real)
    raise ValueError(
        f"unknown positions {positions!r}; use 'all', 'post' (post-instruction template tokens), "
        "'last' / 'last 3' / -3 (last k tokens)"
    )


@dataclass
class Capture:
    """Captured activations of real tokens.

    ``acts[(site, layer)]`` is ``[n_prompts, n_sel, ...]`` for fixed-length selections ("post", "last k")
    and a list of per-prompt ``[n_real, ...]`` tensors for ``positions="all"``. K/V sites carry
    ``[..., kv_head, d_head]``, ``resid_pre`` carries ``[..., d_model]``. Tensors are fp32 on CPU.
    """

    acts: dict[tuple[str, int], Any]
    prompts: list[str]
    positions: PositionSpec
    token_ids: list[list[int]] = field(default_factory=list)

    def __getitem__(self, key: tuple[str, int]) -> Any:
        if key not in self.acts:
            have = sorted({s for s, _ in self.acts})
            raise KeyError(f"{key} not captured; captured sites {have}, layers 0..{self.n_layers - 1}")
        return self.acts[key]

    @property
    def n_layers(self) -> int:
        return 1 + max(layer for _, layer in self.acts)

    def stack(self, site: str) -> Tensor:
        """``[layer, n_prompts, n_sel, ...]`` for a fixed-length selection."""
        layers = sorted(layer for s, layer in self.acts if s == site)
        return torch.stack([self.acts[(site, layer)] for layer in layers])


def capture(
    model: KVModel,
    prompts: str | Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    sites: Sequence[str] = ("k", "rot_k", "v", "resid_pre"),
    positions: PositionSpec = "post",
    batch_size: int = 16,
    chat: bool = True,
    progress: bool = False,
) -> Capture:
    """Run batched, left-padded forward passes and collect activations of real tokens.

    Args:
        positions: ``"all"`` (every real token; ragged, returned as lists), ``"post"`` (the
            post-instruction template tokens, where refusal is decided), or ``"last k"`` / ``-k``.
    """
    for s in sites:
        if s not in SITES:
            raise ValueError(f"unknown site {s!r}; valid: {', '.join(SITES)}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt string")
    layer_list = list(range(model.n_layers)) if layers is None else [int(x) for x in layers]
    for layer in layer_list:
        if not 0 <= layer < model.n_layers:
            raise ValueError(f"layer {layer} out of range: model has {model.n_layers} layers")
    store: dict[tuple[str, int], list[Tensor]] = {(s, la): [] for s in sites for la in layer_list}
    token_ids: list[list[int]] = []
    current: dict[str, Any] = {}

    def grab(x: Tensor, ctx: HookContext) -> None:
        b = current["batch"]
        for i in range(x.shape[0]):
            n_real = int(b.mask[i].sum())
            sel = _select(n_real, b.n_post[i], positions)
            real = x[i, x.shape[1] - n_real:]
            store[(ctx.site, ctx.layer)].append(real[sel].detach().to("cpu", torch.float32).clone())
        return None

    fit_prompts(model, prompts, max_new_tokens=0, chat=chat)  # context and memory, before any batch
    _check_capture_size(model, prompts, sites, len(layer_list), positions, chat)
    hooks = {hook_name(s, la): grab for s in sites for la in layer_list}
    start, size = 0, batch_size
    bar = tqdm(total=len(prompts), desc="capture", unit="row", disable=not progress)
    with kv_hooks(model, hooks):
        while start < len(prompts):
            b = encode(model, prompts[start:start + size], chat=chat)
            fits = fit_batch(model, len(b), b.input_ids.shape[1])
            if fits < len(b):  # would not fit in the free memory: fewer rows per batch
                size = fits
                continue
            current["batch"] = b
            forward(model, b.input_ids, b.mask, logits_to_keep=1)  # the logits are not read: one position
            token_ids.extend(b.input_ids[i][b.mask[i]].tolist() for i in range(len(b)))
            start += len(b)
            bar.update(len(b))
    bar.close()
    acts: dict[tuple[str, int], Any] = {}
    for key, rows in store.items():
        if positions == "all" or len({r.shape[0] for r in rows}) > 1:
            acts[key] = rows
        else:
            acts[key] = torch.stack(rows)
    return Capture(acts=acts, prompts=prompts, positions=positions, token_ids=token_ids)


def _site_width(model: KVModel, site: str) -> int:
    if site in KV_SITES:
        return model.n_kv_heads * model.d_head
    if site == "q":
        return model.n_heads * model.d_head
    return model.d_model


def _check_capture_size(model: KVModel, prompts: list[str], sites: Sequence[str], n_layers: int,
                        positions: PositionSpec, chat: bool) -> None:
    """Refuse (:class:`~kvgeom.runtime.memory.MemoryLimitError`) a capture whose fp32 CPU copies would not fit in
    the CPU's free memory; cheap bounds first, real token counts only for ``positions="all"``."""
    per_token = 4 * n_layers * sum(_site_width(model, s) for s in sites)
    if positions == "all":
        n_tokens = sum(prompt_token_counts(model, prompts, chat=chat))
    elif isinstance(positions, int) and positions < 0:
        n_tokens = len(prompts) * -positions
    elif isinstance(positions, str) and positions.startswith("last"):
        n_tokens = len(prompts) * int(positions[4:].strip(" _-") or 1)
    else:  # "post": the template tokens after the user's text, a handful per prompt
        n_tokens = len(prompts) * 16
    need = n_tokens * per_token
    free = free_memory("cpu")
    if free is not None and need > free * 0.8:
        raise MemoryLimitError(
            f"capture of {len(prompts):,} prompts ({n_tokens:,} positions x {len(sites)} sites x {n_layers} layers) "
            f"needs about {format_bytes(need)} of CPU memory for the activations, but {format_bytes(free)} is free: "
            "capture fewer prompts, sites or layers, or positions='post' / 'last k' instead of 'all'")
