"""Agreement statistics on planted rows with known counts (``kvgeom.validate.agreement``)."""

import math

import pandas as pd
import pytest

from kvgeom.stats import rate_ci
from kvgeom.validate import agreement_summary, first_divergence

R, C, D = "refused", "complied", "degenerate"


@pytest.mark.parametrize(("a", "b", "expected"), [
    ([1, 2, 3], [1, 2, 3], None),
    ([1, 2, 3], [1, 9, 3], 1),
    ([5], [6], 0),
    ([1, 2], [1, 2, 3], 2),
    ([], [], None),
    ([], [4], 0),
])
def test_first_divergence(a, b, expected):
    assert first_divergence(a, b) == expected
    assert first_divergence(b, a) == expected


def _rows(comparison, engine, kvgeom, etoks=None, ktoks=None):
    n = len(engine)
    etoks = etoks or [[i] for i in range(n)]
    ktoks = ktoks or [[i] for i in range(n)]
    return pd.DataFrame({"comparison": comparison, "format": comparison, "kvgeom_scheme": "s",
                         "prompt_id": [f"p{i}" for i in range(n)], "engine_verdict": engine, "kvgeom_verdict": kvgeom,
                         "engine_tokens": etoks, "kvgeom_tokens": ktoks, "prompt_tokens_equal": [True] * n})


def test_planted_agreement_counts_and_wilson_interval():
    # 10 prompts: the two sides disagree on 2 (prompts 3 and 7)
    base = [R] * 8 + [C] * 2
    eng = [R, R, R, R, R, R, R, C, C, C]
    kv = [R, R, R, C, R, R, R, R, C, C]
    etoks = [[1, 2, 3]] * 10
    ktoks = [[1, 2, 3]] * 6 + [[1, 5, 3], [9], [1, 2], [1, 2, 3, 4]]
    rows = pd.concat([_rows("ceiling", base, base), _rows("q4_0", eng, kv, etoks, ktoks)], ignore_index=True)
    s = agreement_summary(rows, baselines={"engine": "ceiling", "kvgeom": "ceiling"}, target=0.9)
    s = s.set_index("comparison")
    q = s.loc["q4_0"]
    ci = rate_ci(8, 10)
    assert (q["agree_k"], q["agree_n"]) == (8, 10)
    assert q["agree_rate"] == pytest.approx(0.8)
    assert (q["agree_low"], q["agree_high"]) == pytest.approx((ci.low, ci.high))
    assert not q["target_met"] and s.loc["ceiling", "target_met"]
    assert (q["identical_k"], q["identical_n"]) == (6, 10)
    assert q["first_divergence_median"] == pytest.approx(1.5) and q["first_divergence_min"] == 0  # 1, 0, 2, 3
    # each side's flips against its own baseline (8 refused there): engine flips prompt 7, kvgeom prompt 3
    assert (q["engine_flip_k"], q["engine_flip_n"]) == (1, 8)
    assert (q["kvgeom_flip_k"], q["kvgeom_flip_n"]) == (1, 8)
    assert (q["engine_refusal_k"], q["kvgeom_refusal_k"]) == (7, 7)
    assert s.loc["ceiling", "engine_flip_k"] == 0
    ceiling_div = s.loc["ceiling", "first_divergence_median"]
    assert ceiling_div is None or math.isnan(ceiling_div)


def test_degenerate_differs_from_complied_in_agreement():
    rows = _rows("x", [D, C, R], [C, C, R])
    s = agreement_summary(rows)
    assert s.loc[0, "agree_k"] == 2 and "engine_flip_k" not in s  # no baseline: no flip columns


def test_target_met_at_the_threshold_and_bad_input():
    rows = _rows("x", [R] * 9 + [C], [R] * 10)
    assert agreement_summary(rows, target=0.9).loc[0, "target_met"]
    assert not agreement_summary(rows, target=0.95).loc[0, "target_met"]
    with pytest.raises(ValueError, match="target"):
        agreement_summary(rows, target=0)
    with pytest.raises(ValueError, match="lack the columns"):
        agreement_summary(rows.drop(columns=["engine_tokens"]))
