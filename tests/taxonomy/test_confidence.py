"""Label confidence (kvgeom.taxonomy.confidence): planted evidence with a known answer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kvgeom.taxonomy import CRUSHES, DILUTION, UNDETERMINED, TaxonomyThresholds, classify
from kvgeom.taxonomy.confidence import (
    UNMEASURED,
    FlipEvidence,
    critical_layer_probabilities,
    label_confidence,
    tied_with_worst,
)
from kvgeom.taxonomy.measures import pcr


def _evidence(n: int, layer_k: dict[int, int], n_layers: int = 6, all_k: int | None = None,
              per_channel: dict[int, int] | None = None, seed: int = 0) -> FlipEvidence:
    rng = np.random.default_rng(seed)
    f = np.zeros((n, n_layers), bool)
    for layer, k in layer_k.items():
        f[rng.choice(n, k, replace=False), layer] = True
    a = np.zeros(n, bool)
    a[rng.choice(n, all_k if all_k is not None else max(layer_k.values()), replace=False)] = True
    pc = {}
    for layer, k in (per_channel or {}).items():
        pc[layer] = np.zeros(n, bool)
        hits = np.flatnonzero(f[:, layer])
        pc[layer][hits[:k]] = True
    return FlipEvidence(tuple(range(n_layers)), f, a, pc)


def test_planted_known_label_has_probability_near_one():
    ev = _evidence(60, {3: 40}, all_k=40, per_channel={3: 0})
    conf = label_confidence(ev)
    assert conf.point_label == CRUSHES and conf.label == CRUSHES
    assert conf.p_label[CRUSHES] >= 0.99
    assert conf.p_critical[3] >= 0.99
    assert conf.tied_with_worst == (3,)
    assert conf.settle is None and conf.stated


def test_planted_tie_is_undetermined_and_names_the_competitors():
    # PCR = 1 - 6/20 = 0.70: on the mixed / crushes threshold, so resamples split between them
    ev = _evidence(40, {2: 20}, all_k=20, per_channel={2: 6})
    conf = label_confidence(ev)
    assert conf.label == UNDETERMINED and not conf.stated
    names = {k for k, _ in conf.competing()}
    assert {"mixed", CRUSHES} <= names
    assert "undetermined at 40 refused prompts" in conf.sentence()
    assert conf.settle is None  # on the threshold more prompts drawn like these do not settle it
    assert conf.projection and all(p["p"] < 0.8 for p in conf.projection)


def test_projection_settles_a_close_but_clear_case():
    # two layers flip: dilution; at n = 12 resamples often leave one layer below candidate_at
    ev = _evidence(12, {1: 2, 4: 2}, all_k=2, per_channel={1: 0, 4: 0})
    conf = label_confidence(ev)
    assert conf.point_label == DILUTION
    assert conf.p_point < 0.8 and conf.label == UNDETERMINED
    assert conf.settle is not None and conf.settle["label"] == DILUTION and conf.settle["more"] > 0
    assert f"about {conf.settle['more']} more" in conf.sentence()


@pytest.mark.parametrize("seed", range(12))
def test_point_label_equals_classify(seed):
    rng = np.random.default_rng(seed)
    n, n_layers = int(rng.integers(5, 30)), int(rng.integers(2, 8))
    ks = {la: int(rng.integers(0, n + 1)) for la in range(n_layers)}
    ev = _evidence(n, ks, n_layers, all_k=int(rng.integers(0, n + 1)),
                   per_channel={la: int(rng.integers(0, ks[la] + 1)) for la in range(n_layers)}, seed=seed)
    flips = ev.layer_flips.mean(0)
    crit = int(np.argmax(flips))
    p = pcr(float(ev.per_channel[crit].mean()), float(flips[crit]))
    diag = classify(pd.DataFrame({"layer": range(n_layers), "flip": flips}), float(ev.all_layer.mean()), p)
    conf = label_confidence(ev, n_resamples=200)
    assert conf.point_label == diag.label
    assert conf.point_critical_layer == diag.critical_layer


def test_unmeasured_critical_layer_is_reported_not_assigned():
    # layers 1 and 2 tie; PCR measured only at layer 1 and low there (outlier-as-safety), so resamples whose
    # critical layer is 2 cannot be labelled
    ev = _evidence(20, {1: 8, 2: 8}, n_layers=4, all_k=8, per_channel={1: 8})
    conf = label_confidence(ev)
    assert UNMEASURED in conf.p_label
    assert 0.2 < conf.p_label[UNMEASURED] < 0.8


def test_critical_layer_probabilities_match_label_confidence():
    ev = _evidence(15, {0: 3, 2: 3, 5: 2}, all_k=3, per_channel={0: 0, 2: 0, 5: 0})
    assert critical_layer_probabilities(ev, seed=3) == label_confidence(ev, seed=3).p_critical
    assert set(tied_with_worst(ev, 0)) >= {0, 2, 5}


def test_from_verdicts_and_errors():
    base = pd.Series(["refused", "refused", "complied"], index=["a", "b", "c"])
    lay = {0: pd.Series(["complied", "refused", "refused"], index=["a", "b", "c"])}
    ev = FlipEvidence.from_verdicts(base, lay, lay[0])
    assert ev.n == 2 and ev.layer_flips[:, 0].tolist() == [True, False] and ev.prompt_ids == ("a", "b")
    with pytest.raises(ValueError, match="no verdict for refused prompts"):
        FlipEvidence.from_verdicts(base, {0: lay[0].drop("b")}, lay[0])
    with pytest.raises(ValueError, match="no prompt was refused"):
        FlipEvidence.from_verdicts(base.replace("refused", "complied"), lay, lay[0])
    with pytest.raises(ValueError, match="confidence"):
        label_confidence(ev, confidence=0.4)
    with pytest.raises(ValueError, match="per_channel has layers"):
        FlipEvidence((0,), np.zeros((2, 1), bool), np.zeros(2, bool), {3: np.zeros(2, bool)})


def test_thresholds_reach_the_rules():
    ev = _evidence(30, {1: 20}, n_layers=3, all_k=20, per_channel={1: 0})
    strict = TaxonomyThresholds(pcr_high=1.0, pcr_low=0.99)  # PCR = 1 is now "mixed"
    assert label_confidence(ev, strict).point_label == "mixed"
