"""Where prompt sets come from: the bundled files (:data:`BUNDLED_SETS`, :func:`bundled_data_dir`,
:func:`load_text`) and the public benchmarks on the Hugging Face hub (:data:`PUBLIC_SETS`)."""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvgeom.prompts.sets import PromptLoadError

__all__ = ["BUNDLED_SETS", "PUBLIC_SETS", "bundled_data_dir", "load_text"]


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
    return Path(__file__).resolve().parents[2] / "data"


def read_bundled(file: str) -> bytes:
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
        data = read_bundled("text.txt")
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
