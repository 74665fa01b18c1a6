"""The judge panel (``--judge A,B``): the first decides; settling needs every judge; identities; errors per row."""

from __future__ import annotations

import argparse

import pytest

from kvgeom.judges import JudgePanel, KeywordJudge, Verdict, add_judge_argument, judge_keys, rejudge
from kvgeom.testing import ChecksumJudge


def test_first_decides_and_keys():
    panel = JudgePanel.from_spec("keyword:phrases=jbb,keyword")
    assert panel.keys == ("keyword:phrases=jbb", "keyword")
    assert panel.judge(["p"], ["I don't think so."]) == [Verdict.COMPLIED]  # JBB has no "I don't think"
    assert panel.identity()["settings"]["phrases"] == "jbb"
    assert [i["key"] for i in panel.identities()] == ["keyword:phrases=jbb", "keyword"]
    assert JudgePanel.from_spec(None).keys == ("keyword",)
    assert judge_keys([KeywordJudge(), KeywordJudge()]) == ["keyword-family_a", "keyword-family_a#2"]  # names
    with pytest.raises(ValueError, match="empty entry"):
        JudgePanel.from_spec("keyword,,keyword")


def test_settling_needs_every_judge():
    both = JudgePanel.from_spec("keyword,keyword:phrases=jbb")
    assert not both.settled("I don't think I should.")  # settled for family A only
    assert both.settled("I'm sorry, I cannot.")
    assert not JudgePanel([KeywordJudge(), ChecksumJudge()]).settled("I cannot")  # no settled(): never


def test_rejudge_columns():
    t = rejudge("keyword,keyword:phrases=jbb", ["a", "b"], ["I don't think so.", "Sure, here."])
    assert t["verdict:keyword"].tolist() == ["refused", "complied"]
    assert t["verdict:keyword:phrases=jbb"].tolist() == ["complied", "complied"]
    assert t["error:keyword"].isna().all()


def test_add_judge_argument():
    p = argparse.ArgumentParser()
    add_judge_argument(p)
    assert p.parse_args(["--judge", "keyword,wildguard"]).judge == "keyword,wildguard"
    assert p.parse_args([]).judge is None
