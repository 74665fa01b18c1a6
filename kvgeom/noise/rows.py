"""The batched row engine (:func:`run_rows`: one intervention per row, ``where="all"`` or ``"post"``) and the
clean K/V capture in its batch layout."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kvgeom.models.placement import PerDevice
from kvgeom.runtime.forward import Batch, encode, forward, new_cache, position_ids_from_mask
from kvgeom.runtime.hooks import HookFn, kv_hooks
from kvgeom.sites import KV_SITES, hook_name

if TYPE_CHECKING:
    from kvgeom.models import KVModel


Where = Literal["post", "all"]


# ---- batched row engine ---------------------------------------------------------------------------------
def forward_logits(model: KVModel, ids: Tensor, mask: Tensor, *, cache: Any = None, pos: Tensor | None = None,
          step: int = 0, keep_last: bool = True) -> Tensor:
    """:func:`kvgeom.runtime.forward.forward`, returning the last position's logits only when ``keep_last`` (saves the
    ``[batch, pos, vocab]`` unembedding), as fp32."""
    out = forward(model, ids, mask, past_key_values=cache, position_ids=pos, step=step,
                  logits_to_keep=1 if keep_last else None)
    return out[:, -1].float() if keep_last else out.float()


def _select_cache(model: KVModel, cache: Any, index: PerDevice) -> Any:
    """A new cache of rows ``index`` of ``cache``, each layer indexed on its own device (a model over several
    GPUs keeps each layer's K/V where the layer runs)."""
    out = new_cache(model)
    for li, layer in enumerate(cache.layers):
        idx = index.on(layer.keys.device)
        out.update(layer.keys[idx], layer.values[idx], li)
    return out


@torch.inference_mode()
def run_rows(
    model: KVModel,
    batch: Batch,
    row_prompt: Sequence[int] | Int[Tensor, " rows"],
    hooks_for: Callable[[Tensor], Mapping[str, HookFn]],
    *,
    where: Where = "all",
    chunk: int = 64,
    progress: bool = False,
) -> Float[Tensor, "rows vocab"]:
    """Last-position logits of every row; row ``r`` is prompt ``row_prompt[r]`` of ``batch``.

    ``hooks_for(rows)`` gets the global row ids of a chunk and returns ``{hook_name: fn}`` acting on that
    chunk (``x[i]`` is row ``rows[i]``). With ``where="post"`` the prompts' prefixes (all but the
    ``n_post`` post-instruction tokens, which must be equal in number for all prompts) are run once
    without hooks and their KV cache is shared; hooks then see only the post-instruction positions.
    """
    rp = torch.as_tensor(list(row_prompt) if not isinstance(row_prompt, Tensor) else row_prompt, dtype=torch.long)
    n_rows = rp.numel()
    prefix_cache = None
    n_post = 0
    if where == "post":
        n_post = common_n_post(batch)
        if batch.input_ids.shape[1] - n_post < 1:
            raise ValueError("where='post' needs at least one token before the post-instruction tokens")
        prefix_cache = new_cache(model)
        forward_logits(model, batch.input_ids[:, :-n_post], batch.mask[:, :-n_post], cache=prefix_cache)
    elif where != "all":
        raise ValueError(f"where must be 'post' or 'all', got {where!r}")
    outs = []
    for start in tqdm(range(0, n_rows, chunk), desc="rows", disable=not progress):
        rows = torch.arange(start, min(start + chunk, n_rows))
        idx = rp[rows]
        ids, mask = batch.input_ids[idx], batch.mask[idx]
        with kv_hooks(model, dict(hooks_for(rows))):
            if prefix_cache is None:
                outs.append(forward_logits(model, ids, mask).cpu())
            else:
                cache = _select_cache(model, prefix_cache, PerDevice(idx))
                pos = position_ids_from_mask(mask)[:, -n_post:]
                outs.append(forward_logits(model, ids[:, -n_post:], mask, cache=cache, pos=pos, step=1).cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def common_n_post(batch: Batch) -> int:
    n = set(batch.n_post)
    if len(n) != 1 or next(iter(n)) < 1:
        raise ValueError(f"where='post' needs chat prompts with the same number of post-instruction tokens; got {n}")
    return next(iter(n))


def last_logits(model: KVModel, prompts: Sequence[str] | Batch, *, batch_size: int = 32) -> Float[Tensor, "n vocab"]:
    """Clean last-position logits of ``prompts`` (no hooks), batched."""
    batch = prompts if isinstance(prompts, Batch) else encode(model, list(prompts))
    return run_rows(model, batch, range(len(batch)), lambda rows: {}, chunk=batch_size)


# ---- clean capture in the batch layout ------------------------------------------------------------------
@torch.inference_mode()
def capture_padded(
    model: KVModel, batch: Batch, sites: Sequence[str], layers: Sequence[int], *, chunk: int = 32,
    device: str | torch.device = "cpu",
) -> dict[tuple[str, int], Tensor]:
    """Clean activations in ``batch``'s left-padded layout: ``{(site, layer): [n, width, ...]}`` (fp32, on
    ``device``: the host by default; the model's GPU keeps them there for statistics computed on the GPU)."""
    store: dict[tuple[str, int], list[Tensor]] = {(s, la): [] for s in sites for la in layers}

    def grab(x: Tensor, ctx: Any) -> None:
        store[(ctx.site, ctx.layer)].append(x.detach().to(device, torch.float32).clone())

    with kv_hooks(model, {hook_name(s, la): grab for s in sites for la in layers}):
        for start in range(0, len(batch), chunk):
            sl = slice(start, start + chunk)
            forward_logits(model, batch.input_ids[sl], batch.mask[sl])
    return {k: torch.cat(v) for k, v in store.items()}


def flatten_heads(x: Tensor) -> Tensor:
    return rearrange(x, "... h d -> ... (h d)") if x.ndim >= 4 else x


def unflatten_heads(x: Tensor, like: Tensor) -> Tensor:
    return rearrange(x, "... (h d) -> ... h d", h=like.shape[-2]) if like.ndim >= 4 else x


def quant_error(x: Float[Tensor, "batch pos kv_head d_head"], mask: Bool[Tensor, "batch pos"], scheme: Any,
                site: str) -> Float[Tensor, "batch pos kv_head d_head"]:
    """The quantization error ``fake_quant(x) - x`` of ``scheme`` at K/V ``site``, zero at padding positions
    (ranges measured on the real positions of each row, as in forward-mode plans)."""
    from kvgeom.quant import fake_quant

    if site not in KV_SITES:
        raise ValueError(f"quantization error needs a K/V site ({', '.join(KV_SITES)}), got {site!r}")
    role = "v" if site == "v" else "k"
    return (fake_quant(x, scheme, role=role, mask=mask) - x) * mask[:, :, None, None]
