"""Text normalisation shared by the judges: quote mapping, tokens, decorative rule lines.

* :func:`normalize_text` lower-cases and maps curly quotes ``’ ‘`` to ``'`` and ``“ ”`` to ``"``, so that a
  phrase judge matches "I can’t" like "I can't" (``tests/judges/test_judges.py::test_spec_cases``);
* :func:`tokenize` gives the lower-cased maximal runs of word characters, single CJK characters and single
  non-space symbols that the degeneracy rule counts (``test_statistics``);
* :func:`strip_rule_lines` drops decorative rule lines (``# -----``, ``=====``, ``---``) unless nothing else is
  left (``test_statistics``, ``test_code_is_not_degenerate``).
"""

from __future__ import annotations

import re

__all__ = ["normalize_text", "strip_rule_lines", "tokenize"]

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})
# CJK ideographs, kana and hangul carry no spaces: each character is a token of its own.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])\w)+|[^\w\s]")
# A decorative rule line: an optional comment marker, then one of -=*#~_+. repeated (``# -----``, ``=====``).
_RULE_LINE = re.compile(r"^\s*(?:#|//|--|;|/\*|\*|<!--)?\s*([-=*#~_+.])\1{2,}\s*(?:\*/|-->)?\s*$")


def tokenize(text: str) -> list[str]:
    """Lower-cased tokens: runs of word characters, single CJK characters, single non-space symbols."""
    return _TOKEN.findall(text.lower())


def strip_rule_lines(text: str) -> str:
    """``text`` without decorative rule lines (``# -----``, ``=====``, ``---``), unless nothing else is left."""
    lines = text.splitlines()
    kept = [ln for ln in lines if not _RULE_LINE.match(ln)]
    return "\n".join(kept) if any(ln.strip() for ln in kept) else text


def normalize_text(text: str) -> str:
    """Lower-case ``text`` and map curly quotes to straight ones (``’ ‘`` → ``'``, ``“ ”`` → ``"``)."""
    return text.translate(_QUOTES).lower()
