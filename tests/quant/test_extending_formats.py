"""The worked example of ``docs/extending.md`` (section "Adding a KV-cache format", drafted in
``docs/extending.md``): a new format in one block of code, registered, parsed, fake-quantized,
streamed in cache mode, counted, regrouped and exported. The test runs the documented code itself."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from kvgeom.quant import FORMATS, Scheme, valid_forms
from kvgeom.quant.formats import unregister_format

DOCS = Path(__file__).parents[2] / "docs"


def example_code() -> str:
    """The ``python`` block of the section on formats, from docs/extending.md once merged, else the draft."""
    for name in ("extending.md", "_extending_formats.md"):
        path = DOCS / name
        if path.exists():
            text = path.read_text()
            section = text[text.find("## Adding a KV-cache format"):]
            blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
            if "## Adding a KV-cache format" in text and blocks:
                return blocks[0]
    raise AssertionError("no '## Adding a KV-cache format' section with a python block in docs/")


@pytest.fixture
def example_module():
    """A real module to run the example in (dataclasses look their module up), removed afterwards with the
    format it registers."""
    module = types.ModuleType("kvgeom_docs_format_example")
    sys.modules[module.__name__] = module
    try:
        yield module
    finally:
        sys.modules.pop(module.__name__, None)
        if "sign" in FORMATS:
            unregister_format("sign")


def test_documented_format_example_runs(example_module):
    exec(compile(example_code(), "docs: Adding a KV-cache format", "exec"), example_module.__dict__)
    assert FORMATS["sign"] is example_module.SignSpec
    assert "sign1-g{G}" in valid_forms()
    unregister_format("sign")  # and it is gone again
    assert "sign1-g{G}" not in valid_forms()
    with pytest.raises(ValueError, match="matches none"):
        Scheme.parse("sign1-g8")
