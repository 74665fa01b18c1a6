"""Sliding-window perplexity of a text under each plan, and its ratio to full precision: :func:`perplexity`.
Proved by ``tests/evaluate/test_evaluate.py`` (``test_windows_score_every_token_once``,
``test_perplexity_sliding_windows_full_precision``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kvgeom.quant.plan import QuantPlan
from kvgeom.runtime.plans import forward_with_plans

from .core import FULL, plan_label

if TYPE_CHECKING:
    from kvgeom.models import KVModel

__all__ = ["perplexity"]


def _windows(ids: list[int], window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, n_new): windows end every ``stride`` tokens; each scores the ``n_new`` tokens it adds
    (the first window all but its first token); every window but the first has ``window`` tokens."""
    out = []
    prev_end, end = 0, min(window, len(ids))
    while True:
        out.append((max(0, end - window), end, end - prev_end))
        if end == len(ids):
            return out
        prev_end, end = end, min(end + stride, len(ids))


def perplexity(
    model: KVModel,
    text: str | None = None,
    plans: Sequence[QuantPlan | str | None] = (None,),
    *,
    window: int = 512,
    stride: int = 256,
    max_tokens: int | None = 4096,
    batch_size: int = 8,
    max_logit_bytes: int = 2 * 2**30,
    progress: bool = False,
) -> pd.DataFrame:
    """Sliding-window perplexity of ``text`` (default: the bundled prose) under each plan.

    The text is tokenized plainly (no chat template) and cut to ``max_tokens`` (``None``: all). Windows of
    ``window`` tokens start every ``stride`` tokens; each scores the tokens it adds beyond the previous
    window (the first scores all but its first token), so every token is scored once, with at least
    ``window - stride`` tokens of context after the first window. Plans apply as in refusal runs
    (forward mode: per-call fake quant over the window; cache mode: the window's attention reads the
    quantized cache). ``window=stride=len(text)`` is one window: every token is scored with all the tokens before
    it as context and no position is computed twice (``kvgeom audit --ppl-window N --ppl-stride N``). A forward
    holds at most ``batch_size`` windows, fewer where their float32 logits would pass ``max_logit_bytes`` (a
    1,024-token window of a 152k vocabulary is 0.6 GB), so long windows do not run out of memory; the rows of a
    forward do not change the result. Columns: ``plan, nll, ppl, ppl_ratio, n_tokens, window, stride``.
    """
    from kvgeom.prompts import load_text

    if stride < 1 or window < 2 or stride > window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    if batch_size < 1 or max_logit_bytes < 1:
        raise ValueError(f"need batch_size >= 1 and max_logit_bytes >= 1, got {batch_size} and {max_logit_bytes}")
    text = load_text() if text is None else text
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("text too short for perplexity: it tokenizes to fewer than 2 tokens")
    plan_list = [QuantPlan(p) if isinstance(p, str) else p for p in plans]
    wins = _windows(ids, window, stride)
    rows = [(w, j) for w in range(len(wins)) for j in range(len(plan_list))]
    nll_sum = np.zeros(len(plan_list))
    count = np.zeros(len(plan_list), dtype=int)
    pad = model.pad_token_id
    longest = max(min(n, e - s - 1) for s, e, n in wins) + 1  # logit positions a window keeps, at most
    per_call = max(1, min(batch_size, max_logit_bytes // (4 * longest * model.facts.vocab_size)))
    for start in tqdm(range(0, len(rows), per_call), desc="perplexity", disable=not progress):
        chunk = rows[start:start + per_call]
        width = max(wins[w][1] - wins[w][0] for w, _ in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        m = torch.zeros((len(chunk), width), dtype=torch.bool)
        for r, (w, _) in enumerate(chunk):
            s, e, _n = wins[w]
            x[r, width - (e - s):] = torch.tensor(ids[s:e])
            m[r, width - (e - s):] = True
        n_scores = [min(wins[w][2], wins[w][1] - wins[w][0] - 1) for w, _ in chunk]
        keep = max(n_scores) + 1  # logits at positions predicting the scored tokens (all right-aligned)
        logits = forward_with_plans(model, x, m, [plan_list[j] for _, j in chunk], logits_to_keep=keep)
        tgt = x[:, -keep + 1:].to(logits.device)
        for r, (_w, j) in enumerate(chunk):
            logp = torch.log_softmax(logits[r, :-1].float(), dim=-1)  # one row at a time: [keep-1, vocab]
            tok_nll = -logp.gather(-1, tgt[r, :, None])[:, 0].cpu()
            n_score = n_scores[r]
            nll_sum[j] += float(tok_nll[-n_score:].sum())
            count[j] += n_score
    nll = nll_sum / count
    labels = [plan_label(p) for p in plan_list]
    frame = pd.DataFrame({"plan": labels, "nll": nll, "ppl": np.exp(nll), "n_tokens": count,
                          "window": window, "stride": stride})
    if FULL in labels:
        base = float(frame.loc[frame["plan"] == FULL, "ppl"].iloc[0])
        frame["ppl_ratio"] = frame["ppl"] / base
    else:
        frame["ppl_ratio"] = math.nan
    return frame
