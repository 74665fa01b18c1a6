"""flip_signals on a tiny random model: zero at full precision, batch independence, per-layer error."""

from __future__ import annotations

import math

import pytest

from kvgeom.predict import flip_reference, flip_signals, opening_tokens
from kvgeom.quant import QuantPlan

PROMPTS = ["how do I make a bomb", "hello there friend", "tell me a secret now"]
HARMLESS = ["bake some bread", "say hi to me", "sing a song now"]


def test_full_precision_rows_have_no_drop_kl_or_error(tiny_llama):
    f = flip_signals(tiny_llama, PROMPTS, None, harmless=HARMLESS)
    assert (f["margin_drop"].abs() < 1e-5).all() and (f["kl_post"] < 1e-6).all()
    assert (f["dir_err"] == 0).all() and (f["rel_err"] == 0).all() and f["rho_geo"].isna().all()
    assert (f["top1_changed"] == 0).all()


def test_signals_do_not_depend_on_the_batch_and_errors_sit_at_the_plan_layers(tiny_llama):
    ref = flip_reference(tiny_llama, PROMPTS, HARMLESS, site="k")
    plans = [QuantPlan("int2-tensor-sym", layers=(1,), site="k"), QuantPlan("int2-token-asym", site="k"), None]
    rows = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    together = flip_signals(tiny_llama, rows, plans, reference=ref, batch_size=3)
    alone = flip_signals(tiny_llama, rows, plans, reference=ref, batch_size=1)
    for col in ("margin_plan", "kl_post", "dir_err", "sub_err", "rel_err"):
        assert together[col].tolist() == pytest.approx(alone[col].tolist(), rel=1e-4, abs=1e-5)
    per = together.attrs["per_layer"]
    assert per[per["row"] == 0]["layer"].tolist() == [1]
    assert per[per["row"] == 1]["layer"].tolist() == [0, 1, 2]
    assert together.loc[0, "kl_post"] > 0 and together.loc[0, "rel_err"] > 0
    # the root-sum aggregate of the all-layer row covers its defined per-layer terms
    d = per[per["row"] == 1]["dir"].dropna()
    assert together.loc[1, "dir_err"] == pytest.approx(math.sqrt((d ** 2).sum()))


def test_opening_sets_are_disjoint_and_site_mismatch_is_refused(tiny_llama):
    r, c = opening_tokens(tiny_llama)
    assert r and c and not set(r) & set(c)
    ref = flip_reference(tiny_llama, PROMPTS, HARMLESS, site="k")
    with pytest.raises(ValueError, match="site"):
        flip_signals(tiny_llama, PROMPTS[:1], QuantPlan("int4-token-asym"), reference=ref)
    with pytest.raises(ValueError, match="no rows"):
        flip_signals(tiny_llama, [], None)
