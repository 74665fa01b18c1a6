"""Judge agreement (:mod:`kvgeom.judge_agreement`): kappa, its CI, undefined when a judge is constant, confusion,
flip rates per judge, disagreements, the HTML and ``kvgeom judges compare``."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from kvgeom.cli import main
from kvgeom.judge_agreement import cohen_kappa, compare_judges, compare_run, summary_text
from kvgeom.viz.judges import comparison_html

R, C, D = "refused", "complied", "degenerate"


def test_kappa_matches_hand_computation():
    a = [R, R, C, C, R, D]
    b = [R, C, C, C, R, D]
    # p_o = 5/6; marginals a: R 3/6, C 2/6, D 1/6; b: R 2/6, C 3/6, D 1/6 -> p_e = (6 + 6 + 1) / 36
    p_o, p_e = 5 / 6, 13 / 36
    k = cohen_kappa(a, b, n_resamples=200)
    assert k["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    assert k["kappa"] == pytest.approx(cohen_kappa_score(a, b))
    assert k["low"] <= k["kappa"] <= k["high"] and k["agreement"] == pytest.approx(p_o) and k["n"] == 6


@pytest.mark.parametrize("a, b", [([R] * 5, [R, R, C, R, R]), ([R] * 5, [R] * 5), ([R, C, R], [C, C, C])])
def test_kappa_undefined_when_a_judge_is_constant(a, b):
    k = cohen_kappa(a, b)
    assert k["kappa"] is None and k["low"] is None and "undefined" in k["note"]
    assert cohen_kappa([], [])["kappa"] is None


def _rows():
    # 4 prompts; full precision and one quantized plan; judge B calls degenerate what A calls complied
    recs = []
    for pid, full_a, full_b, q_a, q_b in [("p1", R, R, C, D), ("p2", R, R, R, R), ("p3", R, C, C, C),
                                          ("p4", C, C, C, C)]:
        recs.append({"stage": "s", "prompt_id": pid, "plan": "full", "prompt": f"prompt {pid}",
                     "completion": f"full {pid}", "verdict:A": full_a, "verdict:B": full_b, "error:A": None,
                     "error:B": None})
        recs.append({"stage": "s", "prompt_id": pid, "plan": "int3", "prompt": f"prompt {pid}",
                     "completion": f"q {pid}", "verdict:A": q_a, "verdict:B": q_b, "error:A": None, "error:B": None})
    return pd.DataFrame(recs)


def test_compare_judges_tables():
    cmp = compare_judges(_rows(), n_resamples=200)
    assert cmp.keys == ["A", "B"] and cmp.n_rows == 8
    conf = cmp.confusion["B"]
    assert conf.loc[R, R] == 3 and conf.loc[R, C] == 1 and conf.loc[C, D] == 1 and conf.to_numpy().sum() == 8
    flip = cmp.flips.iloc[0]
    assert (flip["k:A"], flip["n:A"]) == (2, 3) and (flip["k:B"], flip["n:B"]) == (1, 2)  # each against its own full
    assert set(cmp.disagreements["prompt_id"]) == {"p1", "p3"} and {"A", "B", "completion"} <= set(cmp.disagreements)
    assert "kappa" in summary_text(cmp)
    json.dumps(cmp.to_dict(), allow_nan=False)


def test_errors_are_counted_and_left_out():
    rows = _rows()
    rows.loc[0, "verdict:B"], rows.loc[0, "error:B"] = None, "unparsable answer"
    cmp = compare_judges(rows, n_resamples=100)
    assert cmp.errors == {"A": 0, "B": 1} and cmp.pairs.iloc[0]["left_out"] == 1 and cmp.pairs.iloc[0]["n"] == 7
    assert "error" in cmp.disagreements.loc[cmp.disagreements["prompt_id"] == "p1", "B"].tolist()


def test_html_never_prints_nan():
    rows = _rows().assign(**{"verdict:B": R})
    html = comparison_html(compare_judges(rows, n_resamples=50).to_dict())
    assert "undefined" in html and "nan" not in html.lower()


def test_one_judge_is_refused():
    with pytest.raises(ValueError, match="at least two"):
        compare_judges(_rows(), ["A"])


def test_cli_compare(tmp_path, capsys):
    rows = _rows().drop(columns=["verdict:A", "verdict:B", "error:A", "error:B"])
    rows["completion"] = ["I'm sorry, no.", "I am sorry.", "Sure.", "Sure.", "I am sorry, no", "Here it is",
                          "Ok.", "Ok."]
    rows.to_csv(tmp_path / "rows.csv", index=False)
    assert main(["judges", "compare", str(tmp_path), "--judge", "keyword,keyword:phrases=jbb",
                 "--n-resamples", "100"]) == 0
    out = capsys.readouterr().out
    assert "keyword vs keyword:phrases=jbb" in out and "rows on which the judges disagree" in out
    cmp = compare_run(tmp_path, "keyword,keyword:phrases=jbb", n_resamples=100)
    assert set(cmp.disagreements["completion"]) == {"I am sorry.", "I am sorry, no"}  # "I am sorry" is JBB's only
    assert main(["judges", "compare", str(tmp_path)]) == 2  # one judge saved: says to pass --judge
    assert "at least two" in capsys.readouterr().err
    assert main(["judges", "compare", str(tmp_path / "nope"), "--judge", "keyword,keyword"]) == 2
