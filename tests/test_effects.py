"""Paired mitigation effects and the undefined-ratio rule (kvgeom.effects)."""

from __future__ import annotations

import numpy as np
import pytest

from kvgeom.effects import aggregate_recovery, paired_flips, ratio_is_defined


def test_planted_recovery_is_significant_and_bounded():
    full = np.ones(30, bool)
    uniform = np.zeros(30, bool)
    uniform[:10] = True  # 20/30 refusals lost
    mitigated = np.ones(30, bool)
    mitigated[:2] = False  # 2 lost, both of them ones the uniform scheme kept
    pf = paired_flips(full, uniform, mitigated)
    assert pf.flip_uniform.k == 20 and pf.flip_mitigated.k == 2
    assert pf.recovered == 20 and pf.broken == 2
    assert pf.mcnemar_p < 0.001
    assert pf.reduction.estimate == pytest.approx(18 / 30)
    assert pf.share_recovered is not None and pf.share_recovered.estimate == pytest.approx(1 - 2 / 20)
    assert 0.0 <= pf.share_recovered.low <= pf.share_recovered.high <= 1.0


def test_planted_zero_denominator_is_undefined_with_its_reason():
    full = np.array([True] * 8 + [False] * 4)
    uniform = full.copy()  # the uniform scheme flips nothing
    pf = paired_flips(full, uniform, full)
    assert pf.share_recovered is None and "nothing lost" in pf.share_reason
    assert pf.to_dict()["share_recovered"] is None
    ok, why = aggregate_recovery(8 / 12, 8 / 12)
    assert not ok and "within noise" in why


def test_aggregate_recovery_rule_and_cancelling_flips():
    assert aggregate_recovery(0.6, 0.3) == (True, "")
    ok, why = aggregate_recovery(0.55, 0.50, flips=4, reverse_flips=3)
    assert not ok and "cancel" in why
    with pytest.raises(ValueError, match="min_gap"):
        aggregate_recovery(0.5, 0.2, min_gap=2)


def test_no_refused_prompt():
    pf = paired_flips([False, False], [False, False], [True, False])
    assert pf.n_refused == 0 and pf.share_recovered is None and "no prompt was refused" in pf.share_reason


def test_ratio_is_defined():
    assert ratio_is_defined(0.05) and not ratio_is_defined(0.0) and not ratio_is_defined(None)
    assert not ratio_is_defined(float("nan"))
    assert ratio_is_defined(-0.5, -0.1) and not ratio_is_defined(-0.1, 0.2)
    with pytest.raises(ValueError, match="same length|one length"):
        paired_flips([True], [True, False], [True])
