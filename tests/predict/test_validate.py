"""validate_flip_prediction on synthetic rows: perfect, random and constant signals; out-of-fold scoring."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from kvgeom.predict.validate import out_of_fold, signal_auroc, validate_flip_prediction


def _rows(n=240, n_prompts=24, seed=0):
    rng = np.random.default_rng(seed)
    f = pd.DataFrame({"prompt_id": [f"p{i % n_prompts}" for i in range(n)],
                      "config": [f"L{i // n_prompts}" for i in range(n)], "source": "layer_sweep"})
    f["flipped"] = rng.random(n) < 0.3
    f["margin_plan"] = np.where(f["flipped"], -1.0, 1.0) + rng.normal(0, 0.5, n).round(1)
    f["kl_post"] = rng.normal(size=n)
    return f


def test_auroc_matches_sklearn_and_a_perfect_signal_has_a_ci_at_one():
    f = _rows()
    s = -f["margin_plan"].to_numpy()
    r = signal_auroc(f, s, n_resamples=100)
    assert r["auroc"] == pytest.approx(roc_auc_score(f["flipped"], s))
    perfect = signal_auroc(f, f["flipped"].to_numpy(float), n_resamples=100)
    assert perfect["auroc"] == 1.0 and perfect["low"] == 1.0


def test_random_signal_covers_one_half_and_constant_is_flat():
    f = _rows()
    r = signal_auroc(f, f["kl_post"].to_numpy(), n_resamples=200)
    assert r["low"] < 0.5 < r["high"]
    assert signal_auroc(f, np.zeros(len(f)), n_resamples=100)["auroc"] == 0.5


def test_out_of_fold_scores_each_prompt_with_a_model_that_did_not_train_on_it(monkeypatch):
    f = _rows()
    seen = []
    import sklearn.model_selection as ms

    real = ms.GroupKFold.split

    def spy(self, x, y, groups):
        for train, test in real(self, x, y, groups):
            seen.append(set(f["prompt_id"].iloc[train]) & set(f["prompt_id"].iloc[test]))
            yield train, test

    monkeypatch.setattr(ms.GroupKFold, "split", spy)
    assert np.isfinite(out_of_fold(f, ("margin_plan",))).all()
    assert seen and all(not s for s in seen)
    res = validate_flip_prediction(f, n_resamples=100)
    assert res["combined"]["auroc"] > 0.8 and res["supports_screen"] == (res["combined"]["low"] > 0.7)
    assert {r["signal"] for r in res["signals"]} == {"margin_plan", "kl_post"}
    assert res["spearman"]["n_configs"] == 10 and len(res["p_flip"]) == len(f)
    with pytest.raises(ValueError, match="columns"):
        validate_flip_prediction(f.drop(columns=["source"]))
