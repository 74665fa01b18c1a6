"""docs/extending.md, "Adding an audit stage": its toy stage is one file, registered on import and run by name."""

import pytest

from kvgeom.audit import STAGE_REGISTRY
from kvgeom.audit.stage import unregister_stage
from kvgeom.testing import ChecksumJudge

from ..doc_examples import imported
from ..doc_examples import python_blocks as doc_blocks

HEADING = "## Adding an audit stage"


def python_blocks() -> list[str]:
    return doc_blocks(HEADING)


@pytest.fixture
def refusal_words(tmp_path):
    try:
        with imported(python_blocks()[0], "refusal_words_example", tmp_path) as module:
            yield module
    finally:
        if "refusal_words" in STAGE_REGISTRY:
            unregister_stage("refusal_words")


def test_the_doc_has_the_stage_file_and_its_use():
    blocks = python_blocks()
    assert len(blocks) == 2 and "register_stage(Stage(" in blocks[0] and "run_audit(" in blocks[1]


def test_the_worked_example_runs(refusal_words, tiny_llama, tmp_path):
    assert STAGE_REGISTRY["refusal_words"] is refusal_words.STAGE
    exec(python_blocks()[1], {"model": tiny_llama, "judge": ChecksumJudge(), "out": tmp_path / "run"})  # noqa: S102
