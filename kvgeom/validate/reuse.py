"""Reusing the llama.cpp side of an earlier ``kvgeom validate --out DIR`` run (``--engine-from DIR``).

llama.cpp's greedy tokens depend only on the GGUF, the rendered prompts, the cache format, the rotation rule,
``max_new_tokens`` and the stop tokens, none of which kvgeom's options (``--query-quant``, ``--batch-size``) change;
a second run that changes only kvgeom's side can take them from the first run's ``validate.json``.
:func:`saved_engine_runs` checks that everything they depend on is the same (else ValueError naming the difference
and the fix) and returns them. Proved by ``tests/validate/test_validate_llamacpp.py``
(``test_validate_with_query_quantization``: the reused side equals a fresh one; a mismatch is refused).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .llamacpp import EngineRun
from .types import EngineFormat

__all__ = ["saved_engine_runs"]


def saved_engine_runs(folder: str | os.PathLike, *, gguf: Path, prompts: Sequence[str], formats: Sequence[EngineFormat],
                      max_new_tokens: int, rotation: bool,
                      kv_prompt_ids: Sequence[Sequence[int]]) -> dict[EngineFormat, list[EngineRun]]:
    """The llama.cpp runs of ``formats`` saved in ``folder/validate.json``, one per prompt in order."""
    path = Path(folder) / "validate.json"
    if not path.is_file():
        raise ValueError(f"--engine-from {folder}: no validate.json there; pass the --out folder of an earlier "
                         "kvgeom validate run")
    saved = json.loads(path.read_text())
    same = {"gguf": (saved.get("gguf"), str(gguf)), "max_new_tokens": (saved.get("max_new_tokens"), max_new_tokens),
            "rotation": (saved.get("rotation"), rotation)}
    for key, (was, now) in same.items():
        if was != now:
            raise ValueError(f"--engine-from {folder}: that run had {key} {was!r}, this one {now!r}; llama.cpp's "
                             "tokens depend on it, so run without --engine-from")
    rows = saved.get("rows", [])
    out: dict[EngineFormat, list[EngineRun]] = {}
    for f in formats:
        mine = [r for r in rows if r.get("format") == str(f)]
        seen: dict[str, dict] = {}
        for r in mine:
            seen.setdefault(r["prompt"], r)
        missing = [p for p in prompts if p not in seen]
        if missing:
            raise ValueError(f"--engine-from {folder}: format {f} was not run there on {len(missing)} of these "
                             f"prompts (e.g. {missing[0][:60]!r}); run without --engine-from, or with the same "
                             "--formats and --prompts")
        out[f] = [EngineRun(tuple(ids) if seen[p]["prompt_tokens_equal"] else (-1,), tuple(seen[p]["engine_tokens"]),
                            bool(seen[p]["engine_stopped_at_eos"]))
                  for p, ids in zip(prompts, kv_prompt_ids, strict=True)]
    return out
