""":func:`load_prompts`: a prompt set by bundled name, public benchmark name, or local file path."""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path

import pandas as pd

from kvgeom.hub import hub_problem
from kvgeom.prompts.sets import PromptLoadError, PromptSet, check_count
from kvgeom.prompts.sources import BUNDLED_SETS, PUBLIC_SETS, read_bundled
from kvgeom.prompts.tables import SUFFIXES, read_table, standardize

__all__ = ["load_prompts"]


def load_prompts(
    name_or_path: str | os.PathLike[str], *, column: str | None = None, limit: int | None = None
) -> PromptSet:
    """Load a prompt set by bundled name, public benchmark name, or local file path.

    ``column`` names the prompt column of a file (default: detected among :data:`PROMPT_COLUMNS`).
    ``limit`` keeps the first ``limit`` prompts. Rows whose prompt is empty are dropped.
    Raises :class:`PromptLoadError` with what was expected and what was found.
    """
    if limit is not None:
        check_count(limit, "limit")
    key = str(name_or_path)
    if not isinstance(name_or_path, os.PathLike) and key in BUNDLED_SETS:
        ps = _load_bundled(key)
    elif not isinstance(name_or_path, os.PathLike) and key.lower() in PUBLIC_SETS:
        ps = _load_public(key.lower(), column)
    elif isinstance(name_or_path, os.PathLike) or _looks_like_path(key):
        ps = _load_file(Path(name_or_path).expanduser(), column)
    else:
        raise PromptLoadError(
            f"unknown prompt set {key!r}: expected a bundled name {sorted(BUNDLED_SETS)}, "
            f"a public benchmark {sorted(PUBLIC_SETS)}, or a path to a {'/'.join(SUFFIXES)} file"
        )
    return ps.head(limit) if limit is not None else ps


def _looks_like_path(s: str) -> bool:
    return Path(s).suffix.lower() in SUFFIXES or os.sep in s or "/" in s or Path(s).exists()


def _load_bundled(name: str) -> PromptSet:
    spec = BUNDLED_SETS[name]
    frame = pd.read_csv(io.BytesIO(read_bundled(spec.file)), dtype=str, keep_default_na=False, na_values=[""])
    if spec.split is not None:
        frame = frame[frame["split"] == spec.split]
    return PromptSet(name, standardize(frame, name, column="prompt", category="category"), f"bundled:{spec.file}")


def _load_file(path: Path, column: str | None) -> PromptSet:
    if not path.is_file():
        raise PromptLoadError(
            f"prompt file not found: {path}; expected a bundled name {sorted(BUNDLED_SETS)}, "
            f"a public benchmark {sorted(PUBLIC_SETS)}, or an existing {'/'.join(SUFFIXES)} file"
        )
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PromptLoadError(f"cannot read {path}: unknown file type {suffix!r}; expected one of {SUFFIXES}")
    if not path.read_bytes().strip():
        raise PromptLoadError(f"{path} is empty; expected at least one prompt")
    try:
        frame = read_table(path, suffix)
    except (ValueError, json.JSONDecodeError, pd.errors.ParserError) as exc:
        if isinstance(exc, PromptLoadError):
            raise
        raise PromptLoadError(f"cannot parse {path} as {suffix}: {exc}") from exc
    if frame.empty:
        raise PromptLoadError(f"{path} has no rows; expected at least one prompt")
    if "FunctionalCategory" in frame.columns:  # HarmBench: keep the standard behaviours only
        frame = frame[frame["FunctionalCategory"] == "standard"]
    return PromptSet(path.stem, standardize(frame, path.stem, column=column, where=str(path)), str(path))


def _local_hint(name: str) -> str:
    return f"pass a local copy instead, e.g. load_prompts('path/to/{name}.csv')"


def _load_public(name: str, column: str | None) -> PromptSet:
    spec = PUBLIC_SETS[name]
    if importlib.util.find_spec("datasets") is None:
        raise PromptLoadError(
            f"cannot fetch {name!r} ({spec.repo}) from the Hugging Face hub: the optional `datasets` "
            f"package is not installed; {_local_hint(name)}"
        )
    reason = hub_problem(datasets=True)
    if reason is not None:
        raise PromptLoadError(
            f"cannot fetch {name!r} ({spec.repo}) from the Hugging Face hub: offline ({reason}); {_local_hint(name)}"
        )
    try:
        import datasets

        ds = datasets.load_dataset(spec.repo, spec.config, split=spec.split)
        frame = ds.to_pandas()
    except Exception as exc:  # network, auth, renamed repo... all mean "use a local file"
        raise PromptLoadError(
            f"cannot fetch {name!r} ({spec.repo}) from the Hugging Face hub: {type(exc).__name__}: {exc}; "
            f"{_local_hint(name)}"
        ) from exc
    std = standardize(frame, name, column=column or spec.column, category=spec.category, where=spec.repo)
    return PromptSet(name, std, f"hf:{spec.repo}")
