"""Behavioural evaluation: does the model still refuse under a KV scheme, and is perplexity still fine?

* :class:`RefusalScore` — Arditi et al.'s cheap signal: the log-odds, at the first generated position,
  of the tokens that refusals start with, against everything else. One forward pass per row.
* :func:`evaluate` — greedy generation of every (prompt × plan) row in shared batches (per-row plans),
  judged (:mod:`kvgeom.judges`), returned as one tidy DataFrame.
* :func:`summarize` — refusal rate per plan with Wilson intervals and paired flip statistics against the
  full-precision rows (:mod:`kvgeom.stats`).

A row whose logits were NaN or inf while it was generated (``Generation.extra["nonfinite"]``) gets the verdict
``nonfinite`` in place of the judge's: it is never judged refused, complied or degenerate; :func:`summarize`
counts such rows per plan (``n_nonfinite``) and leaves them out of every rate. Proved by
``tests/evaluate/test_evaluate.py::test_nonfinite_rows_are_never_judged``.
* :func:`perplexity` — sliding-window perplexity of a text under each plan, and its ratio to full precision
  (:mod:`kvgeom.evaluate.perplexity`).

The generation-based evaluation lives in :mod:`kvgeom.evaluate.core`.
"""

from .core import (
    FULL,
    REFUSAL_OPENERS,
    PrefillDecider,
    RefusalScore,
    as_prompt_set,
    completion_nll,
    evaluate,
    plan_label,
    summarize,
)
from .perplexity import perplexity

__all__ = ["FULL", "PrefillDecider", "REFUSAL_OPENERS", "RefusalScore", "as_prompt_set", "completion_nll", "evaluate",
           "perplexity", "plan_label", "summarize"]
