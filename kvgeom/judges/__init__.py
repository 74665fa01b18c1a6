"""Judging completions: did the model refuse, comply, or fall apart? Judges by name, with an identity.

* :mod:`kvgeom.judges.base` -- :class:`Verdict` (refused / complied / degenerate), the :class:`Judge`
  protocol, :func:`verdict_frame`;
* :mod:`kvgeom.judges.registry` -- :func:`register_judge`, :data:`JUDGES`, :func:`get_judge` (a spec such as
  ``"keyword:phrases=jbb"``, a judge object, or ``None`` for the default ``KeywordJudge()``),
  :func:`get_judges` (``"NAME[,NAME...]"``) and :func:`judge_identity` (what a run records, and what
  ``--resume`` compares);
* :mod:`kvgeom.judges.text` -- quote mapping, tokens, decorative rule lines;
* :mod:`kvgeom.judges.degeneracy` -- :class:`DegeneracyRule`, the degeneracy rule and why its thresholds;
* :mod:`kvgeom.judges.keyword` -- :class:`KeywordJudge` (registered as ``"keyword"``): the paper's 22 refusal
  phrases or JailbreakBench's list, then the degeneracy rule (a refusal phrase wins);
* :mod:`kvgeom.judges.panel` -- :class:`JudgePanel` (``--judge A,B``: the first decides, the others re-judge the
  same completions), :func:`rejudge` (every judge's verdict, and per-row errors), :func:`add_judge_argument`;
* classifier judges, loaded with transformers from a local path or the HF cache only (:mod:`kvgeom.judges.hf`):
  ``wildguard`` (:mod:`kvgeom.judges.wildguard`), ``llama-guard-3-1b`` / ``llama-guard-3-8b``
  (:mod:`kvgeom.judges.llama_guard`), ``harmbench`` / ``harmbench-mistral`` (:mod:`kvgeom.judges.harmbench`),
  ``strongreject`` (:mod:`kvgeom.judges.strongreject`, a rubric graded by a model you name).

A new judge is one file that defines it and decorates it with ``@register_judge("NAME")``
(``docs/extending.md``; ``tests/judges/test_extending_judges.py`` runs the example). Tests:
``tests/judges/``.
"""

from kvgeom.judges import harmbench, llama_guard, strongreject, wildguard  # noqa: F401  (registers them)
from kvgeom.judges.base import Judge, Verdict, check_lengths, to_verdict, verdict_frame
from kvgeom.judges.degeneracy import DegeneracyRule, periodic_share, repeated_ngram_share
from kvgeom.judges.hf import GeneratingClassifier, JudgeWeightsMissing, MalformedAnswers
from kvgeom.judges.keyword import FAMILY_A_PHRASES, JBB_PHRASES, PHRASE_LISTS, KeywordJudge
from kvgeom.judges.panel import JUDGE_HELP, JudgePanel, add_judge_argument, judge_keys, rejudge
from kvgeom.judges.registry import (
    DEFAULT_JUDGE,
    JUDGES,
    get_judge,
    get_judges,
    judge_identity,
    parse_judge_spec,
    register_judge,
)
from kvgeom.judges.text import normalize_text, strip_rule_lines, tokenize

__all__ = [
    "DEFAULT_JUDGE",
    "JUDGE_HELP",
    "JudgePanel",
    "add_judge_argument",
    "judge_keys",
    "rejudge",
    "FAMILY_A_PHRASES",
    "JBB_PHRASES",
    "JUDGES",
    "PHRASE_LISTS",
    "DegeneracyRule",
    "GeneratingClassifier",
    "JudgeWeightsMissing",
    "MalformedAnswers",
    "Judge",
    "KeywordJudge",
    "Verdict",
    "check_lengths",
    "get_judge",
    "get_judges",
    "judge_identity",
    "normalize_text",
    "parse_judge_spec",
    "periodic_share",
    "register_judge",
    "repeated_ngram_share",
    "strip_rule_lines",
    "to_verdict",
    "tokenize",
    "verdict_frame",
]
