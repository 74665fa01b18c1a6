"""docs/extending.md, "Adding an audit stage": its toy stage is one file, registered on import and run by name."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from kvgeom.audit import STAGE_REGISTRY
from kvgeom.audit.stage import unregister_stage
from kvgeom.testing import ChecksumJudge

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"
HEADING = "## Adding an audit stage"


def python_blocks() -> list[str]:
    text = DOC.read_text()
    section = text[text.index(HEADING):]
    nxt = section.find("\n## ", len(HEADING))
    section = section if nxt < 0 else section[:nxt]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


@pytest.fixture
def refusal_words(tmp_path):
    path = tmp_path / "refusal_words_example.py"
    path.write_text(python_blocks()[0])
    spec = importlib.util.spec_from_file_location("refusal_words_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        if "refusal_words" in STAGE_REGISTRY:
            unregister_stage("refusal_words")
        sys.modules.pop(spec.name, None)


def test_the_doc_has_the_stage_file_and_its_use():
    blocks = python_blocks()
    assert len(blocks) == 2 and "register_stage(Stage(" in blocks[0] and "run_audit(" in blocks[1]


def test_the_worked_example_runs(refusal_words, tiny_llama, tmp_path):
    assert STAGE_REGISTRY["refusal_words"] is refusal_words.STAGE
    exec(python_blocks()[1], {"model": tiny_llama, "judge": ChecksumJudge(), "out": tmp_path / "run"})  # noqa: S102
