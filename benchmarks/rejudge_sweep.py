"""Re-judge a saved sweep's completions (rows.csv) with the current judge plus the full-precision NLL of each
non-refused completion (the degeneracy rule's criterion (d)), without regenerating; recompute the summary.

    python benchmarks/rejudge_sweep.py results/sweep_default
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from kvgeom import load_model
from kvgeom.bitwidth import onset_bits
from kvgeom.evaluate import completion_nll, summarize
from kvgeom.judges import KeywordJudge, Verdict


def main(d: Path) -> None:
    rows = pd.read_csv(d / "rows.csv").fillna({"completion": ""})
    judge = KeywordJudge()
    refused = [judge.verdict(c) == Verdict.REFUSED for c in rows["completion"]]
    need = [i for i, r in enumerate(refused) if not r]
    model = load_model(device="cpu")
    nll = np.full(len(rows), np.nan)
    nll[need] = completion_nll(model, rows["prompt"].iloc[need].tolist(), rows["completion"].iloc[need].tolist())
    rows["nll"] = nll
    rows["verdict_before"] = rows["verdict"]
    rows["verdict"] = [v.value for v in judge.judge(rows["prompt"].tolist(), rows["completion"].tolist(),
                                                    nll=nll.tolist())]
    rows["refused"] = rows["verdict"] == Verdict.REFUSED.value
    rows.to_csv(d / "rows_rejudged.csv", index=False)
    old = pd.read_csv(d / "summary.csv")
    new = summarize(rows)
    keep = ["plan", "family", "bits", "scheme", "mode", "site", "bits_per_element", "ppl", "ppl_ratio"]
    out = old[keep].merge(new, on="plan", how="left")
    out.to_csv(d / "summary_rejudged.csv", index=False)
    onset = {f: onset_bits(out[out["family"] == f]) for f in out["family"].unique() if "{b}" in str(f)}
    changes = rows[rows["verdict"] != rows["verdict_before"]].groupby(["plan", "verdict_before", "verdict"]).size()
    print(changes.to_string())
    print(json.dumps({"onset_bits": onset, "full_nll_median": float(np.nanmedian(nll[(rows["plan"] == "full")]))}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
