"""Noise conditions, :func:`noise_sweep` over layers x kinds x draws, :func:`inject_noise` and text effects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from kvgeom.runtime.forward import Batch, encode
from kvgeom.runtime.hooks import kv_hooks
from kvgeom.stats import bootstrap_ci

from .conditions import NoiseCondition, condition_deltas, delta_hooks, score_conditions
from .rows import Where, capture_padded, forward_logits, quant_error

if TYPE_CHECKING:
    from kvgeom.models import KVModel


# ---- sweeps ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseResult:
    """Scores of a noise sweep. ``scores`` has one row per (condition, prompt): ``kind, layer, site, draw,
    prompt, score, clean, drop`` with ``drop = clean - score`` (refusal-score decrease). ``text`` (when
    measured) has one row per (condition, window): ``nll, clean_nll, d_nll, kl``."""

    scheme: str
    where: str
    scores: pd.DataFrame = field(repr=False)
    text: pd.DataFrame | None = field(default=None, repr=False)
    k: Mapping[int, int] = field(default_factory=dict)

    def to_frame(self, *, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
        """Per (kind, layer, site): mean drop in refusal score with a bootstrap CI over prompts (random
        draws averaged per prompt first), and ``d_nll`` / ``kl`` means when text was measured."""
        recs = []
        s = self.scores
        for (kind, layer, site), g in s.groupby(["kind", "layer", "site"], sort=False):
            per_prompt = g.groupby("prompt")["drop"].mean().to_numpy()
            ci = bootstrap_ci(lambda i, v=per_prompt: float(v[i].mean()), len(per_prompt),
                              n_resamples=n_resamples, seed=seed)
            rec = {"kind": kind, "layer": layer, "site": site, "n_prompts": len(per_prompt),
                   "n_draws": int(g["draw"].nunique()), "drop": ci.estimate, "drop_low": ci.low,
                   "drop_high": ci.high, "drop_sd_draws": float(g.groupby("draw")["drop"].mean().std(ddof=0))}
            if self.text is not None:
                t = self.text[(self.text["kind"] == kind) & (self.text["layer"] == layer) & (self.text["site"] == site)]
                rec["d_nll"] = float(t["d_nll"].mean()) if len(t) else np.nan
                rec["kl"] = float(t["kl"].mean()) if len(t) else np.nan
            recs.append(rec)
        return pd.DataFrame(recs)


def _conditions(kinds: Sequence[str], layers: Sequence[int], site: str, n_random: int) -> list[NoiseCondition]:
    out = [NoiseCondition("none", layers[0], site)]
    for layer in layers:
        for kind in kinds:
            if kind == "none":
                continue
            draws = n_random if kind == "random" else 1
            out.extend(NoiseCondition(kind, layer, site, d) for d in range(draws))
    return out


def noise_sweep(
    model: KVModel,
    scheme: Any,
    prompts: Sequence[str],
    bases: Mapping[int, Float[Tensor, "d k"] | None],
    *,
    site: str = "rot_k",
    kinds: Sequence[str] = ("quant", "isotropic", "subspace", "random", "quant_in", "quant_out"),
    n_random: int = 8,
    where: Where = "post",
    text: str | None = None,
    text_kinds: Sequence[str] = ("quant", "isotropic", "subspace"),
    n_text_tokens: int = 1024,
    window: int = 128,
    seed: int = 0,
    chunk: int = 64,
    progress: bool = False,
) -> NoiseResult:
    """Inject every ``kind`` at every layer of ``bases`` (``{layer: orthonormal S basis [D, k]}``) into
    ``site`` and read the refusal score of ``prompts`` — all (layer × kind × draw × prompt) rows in
    batched passes. ``text`` (e.g. ``kvgeom.prompts.load_text()``) adds NLL/KL rows for ``text_kinds``.

    The scheme's error ``e`` is measured on each clean prompt (all real positions, forward-mode ranges);
    with ``where="post"`` only its post-instruction part is injected.
    """
    from kvgeom.quant import Scheme

    layers = sorted(int(la) for la in bases)
    if not layers:
        raise ValueError("bases is empty: give {layer: basis} for at least one layer")
    if n_random < 1 and "random" in kinds:
        raise ValueError("n_random must be >= 1")
    batch = encode(model, list(prompts))
    n = len(batch)
    clean = capture_padded(model, batch, [site], layers, chunk=chunk)
    errors = {key: quant_error(x, batch.mask, scheme, site) for key, x in clean.items()}
    k_random = {la: (bases[la].shape[1] if bases[la] is not None else 1) for la in layers}
    conds = _conditions(kinds, layers, site, n_random)
    score = score_conditions(model, batch, conds, errors, bases, where=where, k_random=k_random, seed=seed,
                             chunk=chunk, progress=progress).numpy()
    clean_score = score[0]  # conds[0] is "none"
    recs = []
    for c, cond in enumerate(conds):
        for i in range(n):
            s = float(score[c, i])
            recs.append({"kind": cond.kind, "layer": cond.layer if cond.kind != "none" else -1, "site": site,
                         "draw": cond.draw, "prompt": i, "score": s, "clean": float(clean_score[i]),
                         "drop": float(clean_score[i]) - s})
    text_frame = None
    if text is not None:
        tconds = [c for c in _conditions(text_kinds, layers, site, n_random) if c.kind != "none"]
        text_frame = text_effects(model, text, scheme, tconds, bases, n_tokens=n_text_tokens, window=window,
                                  seed=seed, progress=progress)
    return NoiseResult(scheme=str(Scheme.parse(scheme) if isinstance(scheme, str) else scheme), where=where,
                       scores=pd.DataFrame(recs), text=text_frame, k=k_random)


def inject_noise(
    model: KVModel, scheme: Any, prompts: Sequence[str], *, layer: int, basis: Float[Tensor, "d k"],
    site: str = "rot_k", **kwargs: Any,
) -> NoiseResult:
    """:func:`noise_sweep` at one layer (all kinds (a)-(e) by default)."""
    return noise_sweep(model, scheme, prompts, {int(layer): basis}, site=site, **kwargs)


@torch.inference_mode()
def text_effects(
    model: KVModel,
    text: str,
    scheme: Any,
    conditions: Sequence[NoiseCondition],
    bases: Mapping[int, Tensor | None],
    *,
    n_tokens: int = 1024,
    window: int = 128,
    seed: int = 0,
    chunk: int = 8,
    progress: bool = False,
) -> pd.DataFrame:
    """Per (condition, window): mean next-token NLL with the noise, clean NLL, ``d_nll`` and mean
    ``KL(p_clean || p_noisy)`` over the window's predicted tokens (nats).

    The text (plain, no chat template) is cut to ``n_tokens`` and split into non-overlapping windows of
    ``window`` tokens, each a row of its own; the noise is injected at every position of the window, its
    scheme error measured per window (forward-mode ranges over the window).
    """
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    n_win = len(ids) // window
    if n_win < 1:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    x = torch.tensor(ids[:n_win * window]).reshape(n_win, window)
    batch = Batch(input_ids=x, mask=torch.ones_like(x, dtype=torch.bool), texts=[], n_post=[0] * n_win)
    sites = sorted({c.site for c in conditions})
    layers = sorted({la for c in conditions for la in c.layers})
    clean = capture_padded(model, batch, sites, layers, chunk=chunk)
    errors = {key: quant_error(v, batch.mask, scheme, key[0]) for key, v in clean.items()}
    recs = []
    for site in sites:
        conds = [c for c in conditions if c.site == site]
        k_random = {la: (b.shape[1] if b is not None else 1) for la, b in bases.items()}
        deltas = condition_deltas(conds, {k: v for k, v in errors.items() if k[0] == site}, bases, n_win,
                                  k_random=k_random, seed=seed + 1)
        hooks_for = delta_hooks(deltas)
        for w in tqdm(range(n_win), desc="text", disable=not progress):
            rows = torch.arange(len(conds)) * n_win + w
            clean = forward_logits(model, x[w:w + 1], batch.mask[w:w + 1], keep_last=False)
            clean_lp = torch.log_softmax(clean[0, :-1], -1)
            tgt = x[w, 1:]
            clean_nll = float(-clean_lp.gather(-1, tgt[:, None]).mean())
            for start in range(0, len(rows), chunk):
                r = rows[start:start + chunk]
                with kv_hooks(model, hooks_for(r)):
                    logits = forward_logits(model, x[r % n_win], batch.mask[r % n_win], keep_last=False)
                lp = torch.log_softmax(logits[:, :-1], -1)
                nll = -lp.gather(-1, tgt[None, :, None].expand(len(r), -1, 1))[..., 0].mean(-1)
                kl = (clean_lp.exp()[None] * (clean_lp[None] - lp)).sum(-1).mean(-1)
                for j, row in enumerate(r.tolist()):
                    cond = conds[row // n_win]
                    recs.append({"kind": cond.kind, "layer": cond.layer, "site": site, "draw": cond.draw,
                                 "window": w, "nll": float(nll[j]), "clean_nll": clean_nll,
                                 "d_nll": float(nll[j]) - clean_nll, "kl": float(kl[j])})
    return pd.DataFrame(recs)
