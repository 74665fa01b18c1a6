"""The judge registry (kvgeom/judges/registry.py): lookup by spec, clear errors, and judge identities."""

import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import dataclass

import pytest

from kvgeom.judges import (
    DEFAULT_JUDGE,
    JUDGES,
    DegeneracyRule,
    KeywordJudge,
    Verdict,
    get_judge,
    get_judges,
    judge_identity,
    parse_judge_spec,
    register_judge,
)
from kvgeom.testing import ChecksumJudge

TEXTS = ["I'm sorry, I can't.", "Sure, here is how to bake bread: mix flour and water.", "", "I won't.",
         "the the the the the the the the"]


@pytest.fixture
def scratch_names():
    """Names a test registers are removed again afterwards (the registry is process-wide)."""
    before = dict(JUDGES)
    yield
    JUDGES.clear()
    JUDGES.update(before)


def test_default_is_todays_keyword_judge():
    judge = get_judge(None)
    assert DEFAULT_JUDGE == "keyword" and judge == KeywordJudge() and judge.name == "keyword-family_a"
    assert judge.judge(["p"] * len(TEXTS), TEXTS) == KeywordJudge().judge(["p"] * len(TEXTS), TEXTS)
    assert get_judge("keyword") == KeywordJudge() and JUDGES["keyword"] is KeywordJudge


def test_specs_build_the_keyword_options():
    assert get_judge("keyword:phrases=jbb") == KeywordJudge("jbb")
    assert get_judge(" keyword:phrases=family_a ") == KeywordJudge()
    assert get_judge("keyword:degeneracy=off") == KeywordJudge(degeneracy=None)
    j = get_judge("keyword:phrases=jbb:degeneracy=off")
    assert j == KeywordJudge("jbb", degeneracy=None)
    assert j.judge(["p"], ["I won't."]) == [Verdict.COMPLIED]


def test_spec_grammar():
    assert parse_judge_spec("keyword") == ("keyword", {})
    assert parse_judge_spec("x:a=1:b=two") == ("x", {"a": "1", "b": "two"})
    assert parse_judge_spec("x:path=C:/models/guard:rev=main") == ("x", {"path": "C:/models/guard", "rev": "main"})
    assert parse_judge_spec("x:a=") == ("x", {"a": ""})
    for bad, match in [("", "empty"), ("keyword:phrases", "KEY=VALUE"), ("keyword:a=1:a=2", "twice"),
                       ("keyword,keyword", "get_judges")]:
        with pytest.raises(ValueError, match=match):
            parse_judge_spec(bad)


def test_judge_objects_pass_through():
    j, c = KeywordJudge("jbb"), ChecksumJudge()
    assert get_judge(j) is j and get_judge(c) is c


def test_clear_errors():
    with pytest.raises(ValueError, match=r"unknown judge 'no-such-judge'; registered judges: .*keyword"):
        get_judge("no-such-judge")
    with pytest.raises(ValueError, match=r"no setting 'phrase'; its settings: phrases, degeneracy"):
        get_judge("keyword:phrase=jbb")
    with pytest.raises(ValueError, match="unknown phrase list"):
        get_judge("keyword:phrases=family_b")
    with pytest.raises(ValueError, match="degeneracy=on or degeneracy=off"):
        get_judge("keyword:degeneracy=yes")
    with pytest.raises(TypeError, match="judge name"):
        get_judge(3)


def test_several_judges():
    a, b = get_judges("keyword, keyword:phrases=jbb")
    assert a == KeywordJudge() and b == KeywordJudge("jbb")
    assert get_judges(None) == (KeywordJudge(),)
    c = ChecksumJudge()
    assert get_judges(["keyword", c])[1] is c
    with pytest.raises(ValueError, match="empty entry"):
        get_judges("keyword,")


def test_register_forms_and_name_clashes(scratch_names):
    @register_judge("toy-a")
    class Toy:
        name = "toy"

        def judge(self, prompts, completions, *, nll=None):  # noqa: ANN001
            return [Verdict.COMPLIED] * len(completions)

    assert JUDGES["toy-a"] is Toy and isinstance(get_judge("toy-a"), Toy)
    assert register_judge("toy-b", Toy) is Toy
    register_judge("toy-a", Toy)  # the same factory again: fine (a module imported twice)
    with pytest.raises(ValueError, match="already registered"):
        register_judge("toy-a", lambda: Toy())
    register_judge("toy-a", KeywordJudge, replace=True)
    assert get_judge("toy-a:phrases=jbb") == KeywordJudge("jbb")
    for bad in ("Toy", "toy:x", "a,b", "", "x=y"):
        with pytest.raises(ValueError, match="lower-case"):
            register_judge(bad, Toy)


def test_identity_records_the_settings_that_change_verdicts():
    ident = judge_identity(KeywordJudge())
    rule = dataclasses.asdict(DegeneracyRule())
    assert ident == {"name": "keyword", "version": KeywordJudge.version,
                     "settings": {"phrases": "family_a", "degeneracy": rule}}
    assert ident["settings"]["degeneracy"]["nll_threshold"] == 6.0
    assert judge_identity(get_judge(None)) == ident == judge_identity(get_judge("keyword"))
    variants = [KeywordJudge("jbb"), KeywordJudge(degeneracy=None), KeywordJudge(["no way"]),
                KeywordJudge(degeneracy=DegeneracyRule(nll_threshold=None)),
                KeywordJudge(degeneracy=DegeneracyRule(periodic_share=0.4))]
    idents = [json.dumps(judge_identity(j), sort_keys=True) for j in [KeywordJudge(), *variants]]
    assert len(set(idents)) == len(idents)
    assert judge_identity(KeywordJudge(["no way"]))["settings"]["phrases"] == ["no way"]
    for j in variants:  # JSON data: a saved identity compares equal to a fresh one
        assert json.loads(json.dumps(judge_identity(j))) == judge_identity(j)


def test_identity_is_stable_across_processes():
    code = ("import json; from kvgeom.judges import get_judge, judge_identity; from kvgeom.testing import "
            "ChecksumJudge; print(json.dumps([judge_identity(get_judge(s)) for s in ('keyword', "
            "'keyword:phrases=jbb:degeneracy=off')] + [judge_identity(ChecksumJudge(5))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = [judge_identity(get_judge(s)) for s in ("keyword", "keyword:phrases=jbb:degeneracy=off")]
    assert json.loads(out) == [*here, judge_identity(ChecksumJudge(5))]


def test_identity_of_unregistered_judges():
    ident = judge_identity(ChecksumJudge(3))
    assert ident == {"name": "checksum-test-judge", "version": None, "settings": {"modulus": 3},
                     "class": "kvgeom.testing.ChecksumJudge", "registered": False}
    assert judge_identity(ChecksumJudge(3)) == ident != judge_identity(ChecksumJudge(5))

    class Odd:
        def __init__(self):
            self.helper, self.threshold, self._cache = object(), math.nan, {}

        def judge(self, prompts, completions, *, nll=None):  # noqa: ANN001
            return []

    odd = judge_identity(Odd())
    assert odd["settings"] == {"helper": "<builtins.object>", "threshold": "nan"}  # no address, NaN spelled
    assert odd["name"] == "Odd" and odd["registered"] is False and "0x" not in json.dumps(odd)


def test_identity_of_a_registered_dataclass_and_a_bad_identity(scratch_names):
    @register_judge("toy-dc")
    @dataclass(frozen=True)
    class ToyDC:
        cutoff: float = 0.5
        name = "toy-dc"
        version = 2

        def judge(self, prompts, completions, *, nll=None):  # noqa: ANN001
            return []

    assert judge_identity(ToyDC()) == {"name": "toy-dc", "version": "2", "settings": {"cutoff": 0.5}}

    class Bad(ToyDC):
        def identity(self):
            return ["not", "a", "dict"]

    with pytest.raises(TypeError, match="identity\\(\\) must return a dict"):
        judge_identity(Bad())
