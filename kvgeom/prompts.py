"""Prompt sets: the bundled harmful / harmless / borderline sets, local files and public benchmarks.

Every loader returns a :class:`PromptSet`, an immutable value holding a DataFrame with at least the
columns ``id``, ``prompt`` and ``category`` (``category`` may be NA). Other columns of the source
(e.g. XSTest's ``label``, the bundled ``split``) are kept.

Sources understood by :func:`load_prompts`:

* bundled names -- ``harmful`` (170 requests over 10 harm categories), ``harmless`` (170 prompts
  matched row by row to ``harmful``), ``borderline`` (80 safe prompts that look unsafe),
  ``calibration`` (the 20 ``harmful`` rows with ``split == "calibration"``: the first two of each
  category) and ``heldout`` (the other 150). See ``data/README.md``.
* a local file -- ``.csv``, ``.jsonl``, ``.json`` or ``.txt`` (one prompt per line). The prompt column
  is detected among :data:`PROMPT_COLUMNS` and the category column among :data:`CATEGORY_COLUMNS`,
  candidate by candidate: exact name first, then case-insensitive, before trying the next candidate
  (so JailbreakBench's ``Goal`` wins over its short ``Behavior`` label, while HarmBench, which has
  only ``Behavior``, still works). When a ``FunctionalCategory`` column exists (HarmBench), only the
  rows with ``FunctionalCategory == "standard"`` are kept: the ``contextual`` and ``copyright``
  behaviours need a context string or a reference text that a bare prompt does not carry.
* public benchmark names -- ``advbench``, ``harmbench``, ``jailbreakbench``, ``xstest``: fetched
  from the Hugging Face hub with the optional ``datasets`` library when it is installed, the hub is
  not switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) and a
  quick HEAD request (3 s timeout) reaches it. Otherwise a :class:`PromptLoadError` asks for a local
  copy at once, instead of letting ``datasets`` retry against an unreachable hub.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd

__all__ = [
    "BUNDLED_SETS",
    "CATEGORY_COLUMNS",
    "PROMPT_COLUMNS",
    "PUBLIC_SETS",
    "PromptLoadError",
    "PromptSet",
    "bundled_data_dir",
    "load_prompts",
    "load_text",
]

PROMPT_COLUMNS: tuple[str, ...] = ("goal", "prompt", "Behavior", "instruction")
CATEGORY_COLUMNS: tuple[str, ...] = ("category", "SemanticCategory", "type")
SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".json", ".txt")


@dataclass(frozen=True)
class _Bundled:
    file: str
    split: str | None = None


BUNDLED_SETS: dict[str, _Bundled] = {
    "harmful": _Bundled("harmful.csv"),
    "harmless": _Bundled("harmless.csv"),
    "borderline": _Bundled("borderline.csv"),
    "calibration": _Bundled("harmful.csv", split="calibration"),
    "heldout": _Bundled("harmful.csv", split="heldout"),
}


@dataclass(frozen=True)
class _HubSet:
    repo: str
    split: str
    config: str | None = None
    column: str = "prompt"
    category: str | None = None
    expected_rows: int | None = None


PUBLIC_SETS: dict[str, _HubSet] = {
    "advbench": _HubSet("walledai/AdvBench", "train", expected_rows=520),
    "harmbench": _HubSet("walledai/HarmBench", "train", config="standard", category="category",
                         expected_rows=159),
    "jailbreakbench": _HubSet("JailbreakBench/JBB-Behaviors", "harmful", config="behaviors", column="Goal",
                              category="Category", expected_rows=100),
    "xstest": _HubSet("walledai/XSTest", "test", category="type", expected_rows=450),
}


class PromptLoadError(ValueError):
    """A prompt set could not be loaded; the message says what was expected and what to do."""


# --------------------------------------------------------------------------------------------- PromptSet


@dataclass(frozen=True, eq=False)
class PromptSet:
    """An immutable, named table of prompts.

    ``frame`` has at least the columns ``id`` (str), ``prompt`` (non-empty str) and ``category``
    (str or NA) and a 0..n-1 index. Treat it as read-only; :meth:`to_frame` returns a copy.
    """

    name: str
    frame: pd.DataFrame = field(repr=False)
    source: str = ""

    def __post_init__(self) -> None:
        missing = [c for c in ("id", "prompt", "category") if c not in self.frame.columns]
        if missing:
            raise PromptLoadError(
                f"PromptSet {self.name!r}: frame lacks column(s) {missing}; "
                f"columns found: {list(self.frame.columns)}"
            )
        bad = [i for i, p in enumerate(self.frame["prompt"]) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise PromptLoadError(f"PromptSet {self.name!r}: rows {bad[:10]} have an empty or non-text prompt")
        object.__setattr__(self, "frame", self.frame.reset_index(drop=True))

    @property
    def prompts(self) -> list[str]:
        return self.frame["prompt"].tolist()

    @property
    def ids(self) -> list[str]:
        return self.frame["id"].tolist()

    def __len__(self) -> int:
        return len(self.frame)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def __repr__(self) -> str:
        return f"PromptSet(name={self.name!r}, n={len(self)}, source={self.source!r})"

    def head(self, n: int) -> PromptSet:
        """The first ``n`` prompts (all of them when ``n >= len(self)``)."""
        _check_count(n, "head(n)")
        return PromptSet(self.name, self.frame.head(n), self.source)

    def sample(self, n: int, seed: int = 0) -> PromptSet:
        """``n`` prompts drawn without replacement with ``numpy`` seed ``seed``, kept in file order.

        Two sets of equal length sampled with the same ``n`` and ``seed`` keep the same row positions,
        so the row pairing of ``harmful`` and ``harmless`` survives sampling.
        """
        _check_count(n, "sample(n)")
        if n > len(self):
            raise ValueError(f"cannot sample {n} prompts from {self.name!r}, which has only {len(self)}")
        picked = self.frame.sample(n=n, random_state=seed).sort_index()
        return PromptSet(self.name, picked, self.source)

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()


def _check_count(n: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} needs a positive integer, got {n!r}")


# ------------------------------------------------------------------------------------------ bundled data


def bundled_data_dir() -> Any:
    """Where the bundled data lives: the ``kvgeom._data`` package in a wheel, else the repo's ``data/``.

    Returns an ``importlib.resources`` Traversable or a :class:`pathlib.Path`; both offer
    ``joinpath``, ``is_file`` and ``read_bytes``.
    """
    try:
        found = importlib.util.find_spec("kvgeom._data") is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return importlib.resources.files("kvgeom._data")
    return Path(__file__).resolve().parents[1] / "data"


def _read_bundled(file: str) -> bytes:
    res = bundled_data_dir().joinpath(file)
    if not res.is_file():
        raise PromptLoadError(
            f"bundled data file {file!r} is missing from {bundled_data_dir()}; "
            "reinstall kvgeom (pip install -e .) or pass a path to your own file"
        )
    return res.read_bytes()


def load_text(name_or_path: str | os.PathLike[str] = "text") -> str:
    """The bundled calibration text ``data/text.txt`` (name ``"text"``) or any UTF-8 text file."""
    if str(name_or_path) == "text":
        data = _read_bundled("text.txt")
        where = "bundled text.txt"
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise PromptLoadError(f"text file not found: {path}; pass 'text' for the bundled text or an existing path")
        data = path.read_bytes()
        where = str(path)
    text = data.decode("utf-8")
    if not text.strip():
        raise PromptLoadError(f"{where} is empty")
    return text


# ------------------------------------------------------------------------------------------------ loading


def load_prompts(
    name_or_path: str | os.PathLike[str], *, column: str | None = None, limit: int | None = None
) -> PromptSet:
    """Load a prompt set by bundled name, public benchmark name, or local file path.

    ``column`` names the prompt column of a file (default: detected among :data:`PROMPT_COLUMNS`).
    ``limit`` keeps the first ``limit`` prompts. Rows whose prompt is empty are dropped.
    Raises :class:`PromptLoadError` with what was expected and what was found.
    """
    if limit is not None:
        _check_count(limit, "limit")
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
    frame = pd.read_csv(io.BytesIO(_read_bundled(spec.file)), dtype=str, keep_default_na=False, na_values=[""])
    if spec.split is not None:
        frame = frame[frame["split"] == spec.split]
    return PromptSet(name, _standardize(frame, name, column="prompt", category="category"), f"bundled:{spec.file}")


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
        frame = _read_table(path, suffix)
    except (ValueError, json.JSONDecodeError, pd.errors.ParserError) as exc:
        if isinstance(exc, PromptLoadError):
            raise
        raise PromptLoadError(f"cannot parse {path} as {suffix}: {exc}") from exc
    if frame.empty:
        raise PromptLoadError(f"{path} has no rows; expected at least one prompt")
    if "FunctionalCategory" in frame.columns:  # HarmBench: keep the standard behaviours only
        frame = frame[frame["FunctionalCategory"] == "standard"]
    return PromptSet(path.stem, _standardize(frame, path.stem, column=column, where=str(path)), str(path))


def _read_table(path: Path, suffix: str) -> pd.DataFrame:
    if suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    if suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return pd.DataFrame({"prompt": [ln for ln in lines if ln]})
    if suffix == ".jsonl":
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        rows = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(rows, dict):
        lists = [v for v in rows.values() if isinstance(v, list)]
        if len(lists) == 1 and len(rows) == 1:  # {"data": [...]}
            rows = lists[0]
        else:
            return pd.DataFrame(rows)
    if not isinstance(rows, list):
        raise PromptLoadError(f"{path}: expected a list of objects or strings, got {type(rows).__name__}")
    if rows and all(isinstance(r, str) for r in rows):
        return pd.DataFrame({"prompt": rows})
    if not all(isinstance(r, dict) for r in rows):
        raise PromptLoadError(f"{path}: expected every record to be an object (or every one a string)")
    return pd.DataFrame(rows)


def _find_column(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    """First candidate present: exact name, then case-insensitive, before moving to the next candidate."""
    for cand in candidates:
        if cand in columns:
            return cand
        for col in columns:
            if isinstance(col, str) and col.lower() == cand.lower():
                return col
    return None


def _standardize(
    frame: pd.DataFrame, name: str, *, column: str | None, category: str | None = None, where: str = ""
) -> pd.DataFrame:
    """Rename the prompt / category columns to ``prompt`` / ``category`` and make an ``id`` column."""
    where = where or name
    cols = [str(c) for c in frame.columns]
    frame = frame.copy()
    frame.columns = cols
    if column is not None:
        if column not in cols:
            raise PromptLoadError(f"{where}: column {column!r} not found; columns found: {cols}")
        pcol = column
    else:
        pcol = _find_column(cols, PROMPT_COLUMNS)
        if pcol is None:
            raise PromptLoadError(
                f"{where}: no prompt column; expected one of {list(PROMPT_COLUMNS)} "
                f"(or pass column=...); columns found: {cols}"
            )
    ccol = category if category is not None and category in cols else _find_column(cols, CATEGORY_COLUMNS)
    if ccol == pcol:
        ccol = None
    id_col = "id" if "id" in cols else ("BehaviorID" if "BehaviorID" in cols else None)

    out = frame.rename(columns={c: f"original_{c}" for c in ("id", "prompt", "category")
                                if c in cols and c not in (pcol, ccol, id_col)})
    renames = {pcol: "prompt"}
    if ccol is not None:
        renames[ccol] = "category"
    if id_col is not None:
        renames[id_col] = "id"
    out = out.rename(columns=renames)
    prompts = out["prompt"]
    keep = prompts.notna() & prompts.astype(str).str.strip().ne("")
    out = out[keep].reset_index(drop=True)
    if out.empty:
        raise PromptLoadError(f"{where}: column {pcol!r} holds no non-empty prompt")
    out["prompt"] = out["prompt"].astype(str).str.strip()
    if id_col is None:
        out["id"] = [f"{name}-{i + 1:04d}" for i in range(len(out))]
    else:
        out["id"] = out["id"].astype(str)
    if ccol is None:
        out["category"] = pd.Series([pd.NA] * len(out), dtype="object")
    first = ["id", "prompt", "category"]
    return out[first + [c for c in out.columns if c not in first]]


# ------------------------------------------------------------------------------------- public benchmarks


def _hub_offline() -> str | None:
    """The reason the hub is switched off, or None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return "huggingface_hub is in offline mode" if getattr(constants, "HF_HUB_OFFLINE", False) else None


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """A quick HEAD request to the hub, so that an offline machine fails in seconds rather than retrying.

    ``urllib`` honours the ``HTTPS_PROXY`` / ``NO_PROXY`` variables, so a hub reachable only through a
    proxy counts as reachable. Any HTTP answer (even an error status) means the hub is reachable.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, malformed endpoint
        reason = getattr(exc, "reason", exc)
        return f"{urlparse(endpoint).hostname or endpoint} is unreachable ({reason})"
    return None


def _local_hint(name: str) -> str:
    return f"pass a local copy instead, e.g. load_prompts('path/to/{name}.csv')"


def _load_public(name: str, column: str | None) -> PromptSet:
    spec = PUBLIC_SETS[name]
    if importlib.util.find_spec("datasets") is None:
        raise PromptLoadError(
            f"cannot fetch {name!r} ({spec.repo}) from the Hugging Face hub: the optional `datasets` "
            f"package is not installed; {_local_hint(name)}"
        )
    reason = _hub_offline() or _hub_unreachable()
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
    std = _standardize(frame, name, column=column or spec.column, category=spec.category, where=spec.repo)
    return PromptSet(name, std, f"hf:{spec.repo}")
