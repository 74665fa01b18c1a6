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
    assert set(d[[0, 2, 4, 5, 6, 7]]) <= {SKIP, CHECK} and (d == CHECK).sum() == 2
    assert d.tolist() == rule.decide(sig).tolist()  # reproducible
    verdicts = pd.Series([None] * 8, dtype=object)
    verdicts[d != SKIP] = "refused"
    verdicts[d[d == CHECK].index[0]] = "complied"
    rep = screen_report(d, verdicts)
    assert rep["errors"]["k"] == 1 and rep["errors"]["n"] == 2 and rep["skipped"] == 6 and rep["decoded"] == 4


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="check_frac"):
        ScreenRule(check_frac=1.5)
    with pytest.raises(ValueError, match="margin_plan"):
        ScreenRule(signal="kl_post")


def test_threshold_table_counts_missed_flips():
    t = threshold_table(np.array([0.0, 5.0, 6.0]), np.array([True, False, True]), np.array([4.0, 5.5]))
    assert t["skipped"].tolist() == [2, 1] and t["missed"].tolist() == [1, 1]
