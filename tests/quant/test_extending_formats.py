"""The worked example of ``docs/extending.md`` (section "Adding a KV-cache format", drafted in
``docs/extending.md``): a new format in one block of code, registered, parsed, fake-quantized,
streamed in cache mode, counted, regrouped and exported. The test runs the documented code itself."""

from __future__ import annotations

import sys
import types

import pytest

from kvgeom.quant import FORMATS, Scheme, valid_forms
from kvgeom.quant.formats import unregister_format
from tests.doc_examples import python_blocks


def example_code() -> str:
    """The first ``python`` block of docs/extending.md's section on formats."""
    return python_blocks("## Adding a KV-cache format")[0]


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
