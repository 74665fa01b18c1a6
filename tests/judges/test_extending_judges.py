"""docs/extending.md, "Adding a judge": its toy judge is one file, registered on import and used by name by evaluate."""

import pytest

from kvgeom.evaluate import evaluate
from kvgeom.judges import JUDGES, Verdict, tokenize

from ..conftest import PROMPTS
from ..doc_examples import imported
from ..doc_examples import python_blocks as doc_blocks

HEADING = "## Adding a judge"


def python_blocks() -> list[str]:
    return doc_blocks(HEADING)


@pytest.fixture
def says_no(tmp_path):
    """The doc's first block saved as a file and imported, as a user would; unregistered afterwards."""
    try:
        with imported(python_blocks()[0], "says_no_example", tmp_path) as module:
            yield module
    finally:
        JUDGES.pop("says-no", None)


def test_the_doc_has_the_judge_file_and_its_use():
    blocks = python_blocks()
    assert len(blocks) == 2 and "@register_judge(\"says-no\")" in blocks[0] and "evaluate(" in blocks[1]


def test_the_worked_example_runs(says_no, tiny_llama):
    assert JUDGES["says-no"] is says_no.SaysNoJudge
    exec(python_blocks()[1], {"model": tiny_llama})  # noqa: S102 - the doc's own example


def test_evaluate_uses_the_new_judge_by_name(says_no, tiny_llama):
    rows = evaluate(tiny_llama, PROMPTS, judge="says-no", max_new_tokens=8, score=False)
    words = [t for t in tokenize(rows["completion"].iloc[0]) if t.isalnum()]
    assert words, "the tiny model produced no word to judge by"
    picked = evaluate(tiny_llama, PROMPTS, judge=f"says-no:word={words[0]}", max_new_tokens=8, score=False)
    assert picked["completion"].tolist() == rows["completion"].tolist()
    assert picked["verdict"].iloc[0] == Verdict.REFUSED.value
    expected = says_no.SaysNoJudge(words[0]).judge(rows["prompt"].tolist(), rows["completion"].tolist())
    assert picked["verdict"].tolist() == [v.value for v in expected]
