"""Attention through torch's fused ``scaled_dot_product_attention`` for the bridge's plain rotary attention.

The TransformerLens bridge computes attention itself so that ``hook_attn_scores`` and ``hook_pattern`` can
fire: it copies K and V once per query group (``repeat_kv``), multiplies, masks, softmaxes in fp32 and
multiplies again. On an H200 those copies and matmuls were about 45% of a generation batch's kernel time
(docs/benchmarks.md, §6). kvgeom hooks neither site, so :func:`use_attention` can swap the eligible attention
components' ``forward`` for :func:`sdpa_forward`, which runs the same projections, rotary embedding and hooks
(``hook_q``/``hook_k``/``hook_v`` on the projections, ``hook_rot_q``/``hook_rot_k`` after RoPE, the KV cache's
``update``, ``hook_z``/``hook_out`` on the output) and computes the attention itself with one fused kernel,
grouped-query heads folded into the query axis (no K/V copies).

Which components: the bridge's :class:`PositionEmbeddingsAttentionBridge` itself (not a subclass: those
change the computation), whose HF module has no logit soft-capping, no attention sinks, no gates, no Q/K
norms, no K multiplier and no clipping, in a bridge that is not in compatibility mode and does not split Q/K/V
inputs per head. Llama, Qwen2 and Mistral qualify; Gemma-2 (soft-capping) and Phi-3 (fused QKV) keep the
bridge's own attention. A call still runs the bridge's eager forward when a hook is attached to
``hook_attn_scores`` or ``hook_pattern`` (those tensors do not exist in the fused kernel), when the caller asks
for the attention weights, or when the rotary embedding is partial or interleaved.

Same results: logits equal the eager forward's within float32 rounding and greedy tokens are identical, for
every qualifying architecture, with and without the KV cache and with left padding; the hooks see the same
tensors; a hook on ``hook_pattern`` gets the eager path (``tests/models/test_attention.py``). In bf16 the
fused kernel accumulates in another order than the eager one, so GPU verdicts can differ from eager GPU
verdicts as they already differ from CPU float32 ones.

``attention="auto"`` (what :func:`kvgeom.models.load_model` uses) means ``"sdpa"`` on CUDA and ``"eager"``
on the CPU, where the measured CPU results of docs/results.md were taken.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Literal

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .fast_path import is_hooked

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "resolve_attention", "sdpa_forward", "sdpa_eligible",
           "use_attention"]

AttentionBackend = Literal["auto", "sdpa", "eager"]
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "eager")

#: attributes of the HF attention module (or its config) that change the computation away from plain attention
_UNSUPPORTED_HF = ("attn_logit_softcapping", "sinks", "key_multiplier")
_UNSUPPORTED_SUBMODULES = ("q_norm", "k_norm", "gate")
_UNSUPPORTED_CONFIG = ("use_split_qkv_input", "use_attn_in", "use_attn_result", "gated_q_proj",
                       "rotary_interleaved_cos_sin", "rotary_adjacent_pairs", "qk_norm_after_rope")


#: cuDNN's attention is left out: it builds an execution plan per new shape, and generation makes a new shape at
#: every decode step and batch (on the H200 it made a powered audit 11 s slower than the eager attention;
#: docs/benchmarks.md §11). With a mask, flash attention does not apply and the memory-efficient kernel runs.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def resolve_attention(backend: str, device: torch.device | str) -> str:
    """``"auto"`` → ``"sdpa"`` on CUDA, ``"eager"`` elsewhere; ``"sdpa"``/``"eager"`` pass through."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)} "
                         "('auto': sdpa on CUDA, the bridge's eager attention on the CPU)")
    if backend != "auto":
        return backend
    return "sdpa" if torch.device(device).type == "cuda" else "eager"


def _bridge_class() -> type:
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    return PositionEmbeddingsAttentionBridge


def sdpa_eligible(component: Any) -> str | None:
    """``None`` when :func:`sdpa_forward` computes what ``component``'s own forward does; else the reason why not."""
    if type(component) is not _bridge_class():
        return f"{type(component).__name__} is not the plain PositionEmbeddingsAttentionBridge"
    hf = getattr(component, "original_component", None)
    if hf is None:
        return "no HF attention module bound"
    if getattr(component, "compatibility_mode", False):
        return "the bridge is in compatibility mode"
    hf_config = getattr(hf, "config", None)
    for name in _UNSUPPORTED_HF:
        if getattr(hf, name, None) is not None or getattr(hf_config, name, None) is not None:
            return f"the attention has {name}"
    if getattr(hf_config, "clip_qkv", None) is not None:
        return "the attention clips Q/K/V"
    subs = getattr(component, "submodules", {}) or {}
    for name in _UNSUPPORTED_SUBMODULES:
        if name in subs:
            return f"the attention has a {name} submodule"
    cfg = getattr(component, "config", None)
    for name in _UNSUPPORTED_CONFIG:
        if getattr(cfg, name, False):
            return f"the bridge config sets {name}"
    rope = getattr(hf_config, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
        return "the attention scales queries by position (llama-4 scaling)"
    if getattr(hf, "is_causal", True) is False or getattr(component, "is_cross_attention", False):
        return "the attention is not causal self-attention"
    return None


def _sdpa(
    q: Float[Tensor, "batch head q_pos d_head"],
    k: Float[Tensor, "batch kv_head kv_pos d_head"],
    v: Float[Tensor, "batch kv_head kv_pos d_head"],
    mask: Tensor | None,
    scale: float,
) -> Float[Tensor, "batch head q_pos d_head"]:
    """Grouped-query attention with one fused kernel: each KV head's query group is folded into the query axis."""
    groups = q.shape[1] // k.shape[1]
    n_q = q.shape[2]
    folded = rearrange(q, "b (h g) q d -> b h (g q) d", g=groups)
    if mask is not None:
        mask = rearrange(mask.expand(-1, -1, n_q, -1).unsqueeze(2).expand(-1, -1, groups, -1, -1),
                         "b one g q k -> b one (g q) k")
    with sdpa_kernel(_BACKENDS):
        out = torch.nn.functional.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
    return rearrange(out, "b h (g q) d -> b (h g) q d", g=groups)


def _mask(attention_mask: Tensor | None, q_len: int, kv_len: int, like: Tensor) -> Tensor | None:
    """The additive (or boolean) mask the eager path adds to the scores, as ``[batch, 1, q_pos, kv_pos]``."""
    if attention_mask is not None and attention_mask.ndim >= 4:  # HF's 4-D mask carries causality and padding
        m = attention_mask[..., -q_len:, :kv_len]
        return m if m.dtype == torch.bool else m.to(like.dtype)
    causal = torch.ones(q_len, kv_len, device=like.device, dtype=torch.bool).tril(diagonal=kv_len - q_len)
    mask = torch.zeros(q_len, kv_len, device=like.device, dtype=like.dtype).masked_fill(
        ~causal, torch.finfo(like.dtype).min)[None, None]
    if attention_mask is not None:
        extra = attention_mask[..., :kv_len]
        if extra.dtype == torch.bool:
            extra = torch.zeros((), dtype=like.dtype, device=like.device).masked_fill(
                ~extra, torch.finfo(like.dtype).min)
        while extra.ndim < 4:
            extra = extra.unsqueeze(1)
        mask = mask + extra.to(like.dtype)
    return mask


def sdpa_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The bridge attention's forward with the score/softmax/value block done by one fused kernel.

    Bound to a :class:`PositionEmbeddingsAttentionBridge` by :func:`use_attention`; falls back to the bridge's
    own forward wherever that block would be observable or is not plain attention (module docstring)."""
    eager = _bridge_class().forward
    position_embeddings = kwargs.get("position_embeddings")
    if (is_hooked(getattr(self, "hook_attn_scores", None)) or is_hooked(getattr(self, "hook_pattern", None))
            or kwargs.get("output_attentions") or self.training or position_embeddings is None):
        return eager(self, *args, **kwargs)
    hf: Any = self.original_component
    head_dim = hf.head_dim
    if position_embeddings[0].shape[-1] != head_dim:  # partial or half-width rotary: the bridge knows how
        return eager(self, *args, **kwargs)
    if "hidden_states" in kwargs:
        hidden_states = kwargs.pop("hidden_states")
    elif args and isinstance(args[0], torch.Tensor):
        hidden_states, args = args[0], args[1:]
    else:
        return eager(self, *args, **kwargs)
    kwargs.pop("position_embeddings")
    attention_mask = kwargs.pop("attention_mask", None)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hidden_states = self.hook_in(hidden_states)
    input_shape = hidden_states.shape[:-1]
    q = rearrange(self.q(hidden_states), "... s (h d) -> ... h s d", d=head_dim)
    k = rearrange(self.k(hidden_states), "... s (h d) -> ... h s d", d=head_dim)
    v = rearrange(self.v(hidden_states), "... s (h d) -> ... h s d", d=head_dim)
    cos, sin = self._apply_position_embedding_hooks(position_embeddings)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if hasattr(self, "hook_rot_q"):
        q = self.hook_rot_q(q)
    if hasattr(self, "hook_rot_k"):
        k = self.hook_rot_k(k)
    k, v = self._update_kv_cache(k, v, **kwargs)
    scale = getattr(hf, "scaling", head_dim**-0.5)
    mask = _mask(attention_mask, q.shape[-2], k.shape[-2], q)
    out = _sdpa(q, k.to(q.dtype), v.to(q.dtype), mask, scale)
    out = rearrange(out, "b h s d -> b s (h d)").reshape(*input_shape, -1)
    o_weight = getattr(getattr(getattr(self, "o", None), "original_component", None), "weight", None)
    if isinstance(o_weight, torch.Tensor) and o_weight.dtype.is_floating_point and out.dtype != o_weight.dtype:
        out = out.to(dtype=o_weight.dtype)
    out = self.hook_out(self.o(out))
    return out, None


def use_attention(model: Any, backend: str = "auto") -> dict[str, Any]:
    """Set how ``model``'s attention is computed: ``"sdpa"`` binds :func:`sdpa_forward` to every eligible
    component, ``"eager"`` restores the bridge's own forward, ``"auto"`` picks by device (:func:`resolve_attention`).

    Records the choice in ``model.attention`` and returns a summary: ``{"backend", "fused_layers",
    "eager_layers", "why_eager"}`` (the reasons, one per distinct reason)."""
    chosen = resolve_attention(backend, model.device)
    fused: list[int] = []
    why: dict[str, list[int]] = {}
    for layer, block in enumerate(model.bridge.blocks):
        attn = getattr(block, "attn", None)
        if attn is None:
            why.setdefault("no attention component", []).append(layer)
            continue
        vars(attn).pop("forward", None)  # back to the class's (the bridge's eager) forward
        if chosen != "sdpa":
            continue
        reason = sdpa_eligible(attn)
        if reason is None:
            # the bridge's __setattr__ forwards unknown names to the HF module: bind on the component itself
            object.__setattr__(attn, "forward", MethodType(sdpa_forward, attn))
            fused.append(layer)
        else:
            why.setdefault(reason, []).append(layer)
    model.attention = chosen if fused else "eager"
    eager_layers = sorted(set(range(len(model.bridge.blocks))) - set(fused))
    return {"backend": model.attention, "fused_layers": fused, "eager_layers": eager_layers,
            "why_eager": {r: layers for r, layers in why.items()}}
