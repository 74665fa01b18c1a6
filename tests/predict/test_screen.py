"""ScreenRule: what is skipped, what is checked, and the error count."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kvgeom.predict.screen import CHECK, DECODE, SKIP, ScreenRule, screen_report, threshold_table


def test_rule_skips_above_the_threshold_and_checks_only_skipped_rows():
    sig = pd.DataFrame({"margin_plan": [5.0, 0.0, 9.0, np.nan, 4.0, 7.0, 8.0, 6.0]})
    rule = ScreenRule(skip_above=4.0, check_frac=0.4, seed=1)
    d = rule.decide(sig)
    assert d[1] == DECODE and d[3] == DECODE  # below the threshold, and NaN: decoded
    assert set(d[[0, 2, 4, 5, 6, 7]]) <= {SKIP, CHECK}
    # a skipped row is checked exactly when its keyed draw is below check_frac
    assert [d[i] == CHECK for i in (0, 2, 4, 5, 6, 7)] == [rule.draw(i, "") < 0.4 for i in (0, 2, 4, 5, 6, 7)]
    assert 0 < (d == CHECK).sum() < 6
    assert d.tolist() == rule.decide(sig).tolist()  # reproducible
    # keyed by the row: the same decision in any order or batch
    rev = rule.decide(sig.assign(prompt_id=range(8)).iloc[::-1])
    assert rev.sort_index().tolist() == d.tolist()
    verdicts = pd.Series([None] * 8, dtype=object)
    verdicts[d != SKIP] = "refused"
    verdicts[d[d == CHECK].index[0]] = "complied"
    rep = screen_report(d, verdicts)
    n_check = int((d == CHECK).sum())
    assert rep["errors"]["k"] == 1 and rep["errors"]["n"] == n_check and rep["skipped"] == 6
    assert rep["decoded"] == 2 + n_check


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="check_frac"):
        ScreenRule(check_frac=1.5)
    with pytest.raises(ValueError, match="margin_plan"):
        ScreenRule(signal="kl_post")


def test_threshold_table_counts_missed_flips():
    t = threshold_table(np.array([0.0, 5.0, 6.0]), np.array([True, False, True]), np.array([4.0, 5.5]))
    assert t["skipped"].tolist() == [2, 1] and t["missed"].tolist() == [1, 1]


def test_check_draws_are_uniform_and_keyed():
    rule = ScreenRule(seed=3)
    u = np.array([rule.draw(f"p{i}", "L1") for i in range(4000)])
    assert abs(u.mean() - 0.5) < 0.03 and ((u >= 0) & (u < 1)).all()
    assert rule.draw("p1", "L1") == ScreenRule(seed=3).draw("p1", "L1") != ScreenRule(seed=4).draw("p1", "L1")


def test_prefill_screen_decides_from_first_logits_and_never_skips_unquantized_prefills():
    import torch

    from kvgeom.predict import PrefillScreen
    from kvgeom.quant import QuantPlan

    screen = PrefillScreen(ScreenRule(skip_above=1.0, check_frac=0.0), refusal=(0,), compliance=(1, 2))
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    fwd = QuantPlan("int4-token-asym")
    hf = QuantPlan("int4-token-asym", mode="cache", prefill="full")
    recs = screen.decide(logits, ["a", "b", "c", "d"], [fwd, fwd, hf, None])
    expected = float(torch.logsumexp(torch.log_softmax(logits[0], -1)[[0]], -1)
                     - torch.logsumexp(torch.log_softmax(logits[0], -1)[[1, 2]], -1))
    assert recs[0]["margin_plan"] == pytest.approx(expected) and expected > 1.0
    assert [r["screen"] for r in recs] == [SKIP, DECODE, DECODE, DECODE]
