"""Property tests of kvgeom.stats (issue #17): Wilson intervals lie in [0, 1], hold the point estimate and move up
with k; rate and flip statistics stay in [0, 1] with k <= n; McNemar's p is in [0, 1] and symmetric; a percentile
bootstrap interval of a mean holds its estimate."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kvgeom.judges import Verdict
from kvgeom.stats import bootstrap_ci, flip_stats, mcnemar_exact, rate_ci, wilson_interval

CONF = st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99])


@given(st.integers(0, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))), CONF)
def test_wilson_inside_unit_interval_and_holds_the_estimate(kn, conf):
    k, n = kn
    low, high = wilson_interval(k, n, confidence=conf)
    assert 0.0 <= low <= high <= 1.0
    if n:
        assert low <= k / n <= high


@given(st.integers(1, 500), CONF)
def test_wilson_is_monotone_in_k(n, conf):
    lows, highs = wilson_interval(np.arange(n + 1), np.full(n + 1, n), confidence=conf)
    assert np.all(np.diff(lows) >= -1e-12) and np.all(np.diff(highs) >= -1e-12)


@given(st.integers(0, 200).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_rate_ci_is_a_share(kn):
    r = rate_ci(*kn)
    assert 0.0 <= r.low <= r.high <= 1.0 and r.k <= r.n
    assert (r.n == 0 and np.isnan(r.rate)) or 0.0 <= r.rate <= 1.0


VERDICT = st.sampled_from(list(Verdict))


@given(st.lists(st.tuples(VERDICT, VERDICT), max_size=60))
def test_flip_statistics_are_shares_and_add_up(pairs):
    fs = flip_stats([b for b, _ in pairs], [q for _, q in pairs])
    assert fs.n + fs.nonfinite == len(pairs)
    for r in (fs.baseline_refusal, fs.quantized_refusal, fs.flip, fs.flip_to_complied, fs.flip_to_degenerate,
              fs.reverse_flip):
        assert 0.0 <= r.low <= r.high <= 1.0 and 0 <= r.k <= r.n
    assert fs.flip.k == fs.flip_to_complied.k + fs.flip_to_degenerate.k
    assert 0.0 <= fs.mcnemar_p <= 1.0


@given(st.integers(0, 300), st.integers(0, 300))
def test_mcnemar_is_a_symmetric_probability(b, c):
    p = mcnemar_exact(b, c)
    assert 0.0 <= p <= 1.0 and p == mcnemar_exact(c, b)


@given(st.lists(st.integers(0, 1), min_size=5, max_size=80), st.integers(0, 1000))
def test_bootstrap_interval_of_a_mean_holds_its_estimate(data, seed):
    x = np.array(data, dtype=float)
    ci = bootstrap_ci(lambda idx: float(x[idx].mean()), len(x), n_resamples=200, seed=seed)
    assert ci.n_valid == 200 and 0.0 <= ci.low <= ci.estimate <= ci.high <= 1.0
