"""How well the prefill signals predict the flips that generation gives.

Input: one row per (prompt, configuration) with the signals of :func:`kvgeom.predict.flip_signals`, a boolean
``flipped`` (refused at full precision, not refused under the plan: generated and judged), ``prompt_id``,
``source`` (the stage that decoded it) and ``config`` (the plan label).

* **Per-signal AUROC** (Mann-Whitney, equal to scikit-learn's ``roc_auc_score``) of ``SIGN[s] * signal``
  against ``flipped``, with a
  percentile bootstrap CI that resamples *prompts* (all rows of a drawn prompt go in together: rows of one
  prompt are not independent; :func:`kvgeom.stats.bootstrap_ci`). A resample with one class only is dropped.
* **Combined model**: a scikit-learn logistic regression (median imputation, standardised features, ``C=1``)
  of ``flipped`` on the features, fitted on calibration folds and scored on held-out folds (``GroupKFold`` by
  prompt: a row is scored by a model that never saw its prompt); the out-of-fold probabilities get the same
  AUROC and CI.
* **Per configuration**: the measured flip rate and the predicted one (mean out-of-fold probability) of each
  configuration, and their Spearman correlation (scipy) with a bootstrap CI over configurations.
* **Supports screening** only when the combined AUROC's CI lies above ``min_auroc`` (0.7).

Proved by ``tests/predict/test_validate.py`` (a signal equal to the label gets AUROC 1 with a CI at 1; a random
signal's CI covers 0.5; out-of-fold scoring never sees the scored prompt; a constant signal is undefined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from kvgeom.stats import bootstrap_ci

__all__ = ["FEATURES", "SIGN", "out_of_fold", "roc_points", "signal_auroc", "validate_flip_prediction"]

#: +1: a larger value predicts a flip; -1: a smaller value does (the refusal margins).
SIGN = {"margin_full": -1.0, "margin_plan": -1.0, "margin_drop": 1.0, "kl_post": 1.0, "kl_first": 1.0,
        "top1_changed": 1.0, "dir_err": 1.0, "sub_err": 1.0, "rho_geo": 1.0, "rel_err": 1.0}

#: Features of the combined model (the top-1 indicator is left out: it is a coarsened margin).
FEATURES = ("margin_full", "margin_plan", "margin_drop", "kl_post", "kl_first", "dir_err", "sub_err", "rho_geo",
            "rel_err")


def _groups(frame: pd.DataFrame) -> tuple[np.ndarray, list[np.ndarray]]:
    codes, uniq = pd.factorize(frame["prompt_id"])
    return codes, [np.flatnonzero(codes == g) for g in range(len(uniq))]


def signal_auroc(frame: pd.DataFrame, score: np.ndarray, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """AUROC of ``score`` (larger = flip) against ``frame["flipped"]`` with a prompt-cluster bootstrap CI.

    A resample of prompts weights each row by how often its prompt was drawn; the weighted Mann-Whitney
    statistic ``w_pos · C · w_neg / (Σw_pos Σw_neg)`` (``C`` = 1 where a flipped row scores above an unflipped
    one, 1/2 on ties) equals the AUROC of the resampled rows with repeats."""
    y = frame["flipped"].to_numpy(bool)
    score = np.asarray(score, dtype=float)
    codes, rows_of = _groups(frame)
    ok = np.isfinite(score)
    pos, neg = np.flatnonzero(y & ok), np.flatnonzero(~y & ok)
    sp, sn = score[pos][:, None], score[neg][None, :]
    cmp = (sp > sn) + 0.5 * (sp == sn)
    cp, cn = codes[pos], codes[neg]

    def stat(idx: np.ndarray) -> float:
        w = np.bincount(idx, minlength=len(rows_of)).astype(float)
        wp, wn = w[cp], w[cn]
        den = wp.sum() * wn.sum()
        return float(wp @ cmp @ wn / den) if den > 0 else math.nan

    ci = bootstrap_ci(stat, len(rows_of), n_resamples=n_resamples, seed=seed)
    est = ci.estimate
    return {"auroc": None if math.isnan(est) else est, "low": None if math.isnan(ci.low) else ci.low,
            "high": None if math.isnan(ci.high) else ci.high, "n_valid": ci.n_valid, "n_resamples": n_resamples,
            "defined": not math.isnan(est) and ci.n_valid > 0}


def out_of_fold(frame: pd.DataFrame, features: Sequence[str] = FEATURES, *, n_splits: int = 5,
                seed: int = 0) -> np.ndarray:
    """Out-of-fold flip probabilities of the combined logistic regression (folds by prompt, module doc). A fold
    whose training rows hold one class only predicts that class's training rate."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cols = [f for f in features if f in frame and frame[f].notna().any()]
    if not cols:
        raise ValueError(f"out_of_fold: none of the features {list(features)} has a value; compute the signals "
                         "first (kvgeom.predict.flip_signals)")
    x = frame[cols].to_numpy(float)
    x = np.where(np.isfinite(x), x, np.nan)
    y = frame["flipped"].to_numpy(bool)
    codes, rows_of = _groups(frame)
    k = max(2, min(n_splits, len(rows_of)))
    out = np.full(len(frame), np.nan)
    # GroupKFold is deterministic given the group order; shuffle the group labels with the seed
    perm = np.random.default_rng(seed).permutation(len(rows_of))
    for train, test in GroupKFold(n_splits=k).split(x, y, perm[codes]):
        if y[train].all() or not y[train].any():
            out[test] = float(y[train].mean())
            continue
        model = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                              LogisticRegression(C=1.0, max_iter=1000))
        model.fit(x[train], y[train])
        out[test] = model.predict_proba(x[test])[:, 1]
    return out


def roc_points(y: np.ndarray, score: np.ndarray) -> dict:
    """``{"fpr": [...], "tpr": [...]}`` of the ROC curve (finite scores only), for the report."""
    from sklearn.metrics import roc_curve

    ok = np.isfinite(score)
    if not (y[ok].any() and not y[ok].all()):
        return {"fpr": [], "tpr": []}
    fpr, tpr, _ = roc_curve(y[ok], score[ok])
    return {"fpr": [round(float(v), 4) for v in fpr], "tpr": [round(float(v), 4) for v in tpr]}


def _spearman(pred: np.ndarray, meas: np.ndarray, n_resamples: int, seed: int) -> dict:
    from scipy.stats import rankdata, spearmanr

    def rho(i: np.ndarray) -> float:
        a, b = pred[i], meas[i]
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return math.nan
        return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])  # Spearman's rho (ties: average ranks)

    if len(pred) < 3:
        return {"rho": None, "low": None, "high": None, "p": None, "n_configs": len(pred),
                "note": "undefined: fewer than 3 configurations"}
    ci = bootstrap_ci(rho, len(pred), n_resamples=n_resamples, seed=seed)
    if math.isnan(ci.estimate):
        return {"rho": None, "low": None, "high": None, "p": None, "n_configs": len(pred),
                "note": "undefined: predicted or measured flip rates are constant"}
    p = float(spearmanr(pred, meas).pvalue)
    return {"rho": ci.estimate, "low": None if math.isnan(ci.low) else ci.low,
            "high": None if math.isnan(ci.high) else ci.high, "p": p, "n_configs": len(pred), "note": ""}


def validate_flip_prediction(frame: pd.DataFrame, *, signals: Sequence[str] = tuple(SIGN),
                             features: Sequence[str] = FEATURES, n_splits: int = 5, n_resamples: int = 1000,
                             seed: int = 0, min_auroc: float = 0.7) -> dict:
    """Everything of the module doc, as a JSON-friendly dict; ``frame`` gains no columns (a copy is scored)."""
    need = {"flipped", "prompt_id", "source", "config"}
    if not need <= set(frame.columns):
        raise ValueError(f"validate_flip_prediction: rows need the columns {sorted(need)}; missing "
                         f"{sorted(need - set(frame.columns))}")
    f = frame.reset_index(drop=True)
    y = f["flipped"].to_numpy(bool)
    out: dict = {"n_rows": len(f), "n_flips": int(y.sum()), "n_prompts": int(f["prompt_id"].nunique()),
                 "sources": {str(k): int(v) for k, v in f["source"].value_counts().sort_index().items()},
                 "min_auroc": min_auroc, "n_resamples": n_resamples, "signals": [], "roc": {}}
    for s in signals:
        if s not in f:
            continue
        score = SIGN.get(s, 1.0) * f[s].to_numpy(float)
        out["signals"].append({"signal": s, "sign": SIGN.get(s, 1.0),
                               **signal_auroc(f, score, n_resamples=n_resamples, seed=seed)})
        out["roc"][s] = roc_points(y, score)
    prob = out_of_fold(f, features, n_splits=n_splits, seed=seed) if 0 < y.sum() < len(y) else np.full(len(f), y.mean())
    comb = signal_auroc(f, prob, n_resamples=n_resamples, seed=seed)
    out["combined"] = {**comb, "features": [c for c in features if c in f], "n_splits": n_splits,
                       "model": "LogisticRegression(C=1) on median-imputed, standardised features; GroupKFold by "
                                "prompt (out-of-fold scores)"}
    out["roc"]["combined"] = roc_points(y, prob)
    f = f.assign(p_flip=prob)
    per = (f.groupby(["source", "config"], sort=False)
           .agg(n=("flipped", "size"), measured=("flipped", "mean"), predicted=("p_flip", "mean")).reset_index())
    out["per_config"] = per.to_dict(orient="records")
    out["spearman"] = _spearman(per["predicted"].to_numpy(float), per["measured"].to_numpy(float), n_resamples, seed)
    out["spearman_by_source"] = {
        str(src): _spearman(g["predicted"].to_numpy(float), g["measured"].to_numpy(float), n_resamples, seed)
        for src, g in per.groupby("source", sort=False)}
    low = comb["low"]
    out["supports_screen"] = bool(comb["defined"] and low is not None and low > min_auroc)
    out["p_flip"] = [None if not np.isfinite(v) else round(float(v), 6) for v in prob]
    return out
