"""The ``python`` blocks of one section of docs/extending.md, and importing one as a user's own file would be:
shared by the tests that run the doc's worked examples (formats, stages, judges)."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def python_blocks(heading: str, doc: Path = EXTENDING) -> list[str]:
    """The fenced ``python`` blocks under ``heading`` (up to the next ``## `` heading); fails if there is none."""
    text = doc.read_text()
    if heading not in text:
        raise AssertionError(f"{doc} has no section {heading!r}")
    section = text[text.index(heading):]
    nxt = section.find("\n## ", len(heading))
    section = section if nxt < 0 else section[:nxt]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    if not blocks:
        raise AssertionError(f"{doc}, {heading!r}: no python block")
    return blocks


@contextmanager
def imported(code: str, name: str, folder: Path) -> Iterator[ModuleType]:
    """``code`` saved as ``folder/name.py`` and imported as module ``name``; removed from ``sys.modules`` after."""
    path = folder / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
