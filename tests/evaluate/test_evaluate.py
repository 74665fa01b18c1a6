import math

import numpy as np
import pandas as pd
import pytest
import torch

from kvgeom import forward
from kvgeom.bitwidth import expand_family, onset_bits
from kvgeom.evaluate import FULL, RefusalScore, evaluate, perplexity, summarize
from kvgeom.evaluate.perplexity import _windows
from kvgeom.quant.plan import QuantPlan

from ..conftest import PROMPTS


def test_refusal_tokens_come_from_the_tokenizer(tiny_llama):
    rs = RefusalScore.for_model(tiny_llama)
    first = tiny_llama.tokenizer("I'm sorry", add_special_tokens=False)["input_ids"][0]
    assert first in rs.token_ids
    assert len(rs.token_ids) >= 2


def test_refusal_score_formula():
    rs = RefusalScore((0, 1))
    logits = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.05, 0.05, 0.9]]))
    got = rs.from_logits(logits)
    assert got[0].item() == pytest.approx(0.0, abs=1e-6)
    assert got[1].item() == pytest.approx(math.log(0.1 / 0.9), abs=1e-5)


def test_evaluate_mixed_plans_equal_one_plan_at_a_time(tiny_llama):
    plans = [None, QuantPlan("int2-token-asym"), QuantPlan("q4_0", mode="cache")]
    mixed = evaluate(tiny_llama, PROMPTS, plans, max_new_tokens=6)
    assert len(mixed) == len(PROMPTS) * len(plans)
    assert set(mixed.columns) >= {"prompt_id", "category", "prompt", "plan", "completion", "verdict", "refused",
                                  "refusal_score", "n_tokens", "stopped_at_eos"}
    for plan in plans:
        alone = evaluate(tiny_llama, PROMPTS, [plan], max_new_tokens=6)
        label = alone["plan"].iloc[0]
        got = mixed[mixed["plan"] == label].reset_index(drop=True)
        assert got["completion"].tolist() == alone["completion"].tolist()
        np.testing.assert_allclose(got["refusal_score"], alone["refusal_score"], atol=1e-4)
    assert mixed.loc[mixed.plan == "int2-token-asym", "completion"].tolist() != \
        mixed.loc[mixed.plan == FULL, "completion"].tolist()


def test_refusal_score_from_generation_equals_forward_pass(tiny_llama):
    plan = QuantPlan("int3-tensor-sym")
    rows = evaluate(tiny_llama, PROMPTS, [plan], max_new_tokens=2)
    direct = RefusalScore.for_model(tiny_llama).score(tiny_llama, PROMPTS, plan)
    np.testing.assert_allclose(rows["refusal_score"], direct, atol=1e-4)


def test_evaluate_rejects_duplicate_labels(tiny_llama):
    with pytest.raises(ValueError, match="distinct labels"):
        evaluate(tiny_llama, PROMPTS, [QuantPlan("q8_0"), QuantPlan("q8_0")])


def test_summarize_hand_made():
    verdicts = {
        FULL: ["refused"] * 8 + ["complied"] * 2,
        "q": ["refused"] * 4 + ["complied"] * 2 + ["degenerate"] * 2 + ["refused", "complied"],
    }
    rows = pd.DataFrame([{"prompt_id": f"p{i}", "plan": plan, "verdict": v}
                         for plan, vs in verdicts.items() for i, v in enumerate(vs)])
    s = summarize(rows).set_index("plan")
    assert s.loc[FULL, "refusal_rate"] == pytest.approx(0.8)
    assert s.loc["q", "refusal_rate"] == pytest.approx(0.5)
    assert s.loc["q", "flip_rate"] == pytest.approx(4 / 8)
    assert s.loc["q", "flip_to_complied_rate"] == pytest.approx(2 / 8)
    assert s.loc["q", "flip_to_degenerate_rate"] == pytest.approx(2 / 8)
    assert s.loc["q", "reverse_flip_rate"] == pytest.approx(1 / 2)
    assert s.loc["q", "mcnemar_p"] == pytest.approx(0.375)  # b=4, c=1: 2 * P(X<=1 | n=5) = 2 * 6/32
    assert s.loc["q", "class"] == "collapse"
    with pytest.raises(ValueError, match="baseline"):
        summarize(rows[rows.plan == "q"])


def test_windows_score_every_token_once():
    for n, w, s in [(1000, 512, 256), (300, 512, 256), (513, 512, 512), (2000, 128, 32)]:
        wins = _windows(list(range(n)), w, s)
        scored = sum(min(k, e - b - 1) for b, e, k in wins)
        assert scored == n - 1, (n, w, s)


FOX = "The quick brown fox jumps over the lazy dog. " * 8


def _plain_nll(model, text: str) -> tuple[list[int], float]:
    """The text's token ids and its mean next-token NLL from one plain forward over all of it."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    logits = forward(model, x, torch.ones_like(x, dtype=torch.bool))
    return ids, torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]).item()


def test_perplexity_matches_plain_forward(tiny_llama):
    text = FOX
    _, nll = _plain_nll(tiny_llama, text)
    got = perplexity(tiny_llama, text, [None, QuantPlan("int2-token-asym")], window=512, stride=256)
    full = got[got.plan == FULL].iloc[0]
    assert full["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert full["ppl_ratio"] == pytest.approx(1.0)
    assert got[got.plan != FULL]["ppl_ratio"].iloc[0] != pytest.approx(1.0)


def test_one_window_scores_every_token_with_all_its_context_whatever_the_logit_budget(tiny_llama):
    from kvgeom.audit import AuditConfig

    text = FOX
    ids, nll = _plain_nll(tiny_llama, text)
    plans = [None, QuantPlan("int2-token-asym", mode="cache", site="rot_k")]
    n = len(ids)
    one = perplexity(tiny_llama, text, plans, window=n, stride=n, max_tokens=None)
    assert one["ppl"].iloc[0] == pytest.approx(math.exp(nll), rel=1e-5)
    assert one["n_tokens"].tolist() == [n - 1, n - 1]
    tight = perplexity(tiny_llama, text, plans, window=n, stride=n, max_tokens=None, max_logit_bytes=1)  # 1 row
    assert tight["ppl"].tolist() == pytest.approx(one["ppl"].tolist(), rel=1e-5)
    assert AuditConfig(ppl_tokens=1024).ppl_windows == {"window": 512, "stride": 256}  # perplexity()'s own
    assert AuditConfig(ppl_tokens=1024, ppl_window=1024, ppl_stride=1024).ppl_windows == {"window": 1024,
                                                                                        "stride": 1024}
    assert AuditConfig(ppl_tokens=100).ppl_windows == {"window": 100, "stride": 100}


def test_perplexity_sliding_windows_full_precision(tiny_llama):
    text = "The quick brown fox jumps over the lazy dog. " * 30
    a = perplexity(tiny_llama, text, [None], window=64, stride=32, max_tokens=None)
    b = perplexity(tiny_llama, text, [None], window=64, stride=32, max_tokens=None, batch_size=1)
    assert a["ppl"].iloc[0] == pytest.approx(b["ppl"].iloc[0], rel=1e-5)
    assert a["n_tokens"].iloc[0] == len(tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1


def test_expand_family_and_onset():
    assert expand_family("int{b}-token-asym", (8, 4)) == [(8, "int8-token-asym"), (4, "int4-token-asym")]
    assert expand_family("kivi{b}", (8, 4, 2)) == [(4, "kivi4"), (2, "kivi2")]
    assert expand_family("q4_0", (8,)) == [(None, "q4_0")]
    with pytest.raises(ValueError):
        expand_family("int{b}-nope", (4,))
    frame = pd.DataFrame({"bits": [8, 6, 4, 3], "flip_rate": [0.0, 0.06, 0.2, 0.9], "flip_low": [0.0, 0.0, 0.1, 0.8]})
    assert onset_bits(frame) == 4  # 6 bits reaches 5% but its CI touches zero
    assert onset_bits(frame.iloc[:2]) is None


def test_completion_nll_matches_a_plain_forward(tiny_llama):
    from kvgeom.evaluate import completion_nll

    prompts, comps = ["hi", "How do I bake bread at home?"], ["Sure, here it is.", ""]
    got = completion_nll(tiny_llama, prompts, comps)
    assert np.isnan(got[1])
    text = tiny_llama.format_chat(prompts[:1])[0]
    p_ids = tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    c_ids = tiny_llama.tokenizer(comps[0], add_special_tokens=False)["input_ids"]
    x = torch.tensor([p_ids + c_ids])
    logits = forward(tiny_llama, x, torch.ones_like(x, dtype=torch.bool))
    ref = torch.nn.functional.cross_entropy(logits[0, len(p_ids) - 1:-1], x[0, len(p_ids):]).item()
    assert got[0] == pytest.approx(ref, rel=1e-5)
    rows = evaluate(tiny_llama, PROMPTS, [None], max_new_tokens=4, nll=True)
    assert rows["nll"].notna().all()


def test_settle_stops_refused_rows_and_keeps_every_verdict(tiny_llama):
    from kvgeom.judges import KeywordJudge

    plans = [None, QuantPlan("int2-token-asym")]
    full = evaluate(tiny_llama, PROMPTS, plans, max_new_tokens=12, judge=KeywordJudge(degeneracy=None))
    # ASCII pairs taken from the middle of real completions, so some rows settle early and others never do
    import re

    pairs = [m.group(0) for c in full["completion"] for m in [re.search(r"[a-z0-9]{2}", c[len(c) // 2:].lower())]
             if m]
    words = pairs[:2]
    assert words, "tiny model produced no ASCII pair to use as a phrase"
    judge = KeywordJudge(phrases=words, degeneracy=None)
    ref = evaluate(tiny_llama, PROMPTS, plans, max_new_tokens=12, judge=judge)
    fast = evaluate(tiny_llama, PROMPTS, plans, max_new_tokens=12, judge=judge, settle=True)
    assert fast["verdict"].tolist() == ref["verdict"].tolist()
    assert fast["settled"].any() and not ref["settled"].any()
    for f, r, s in zip(fast["completion"], ref["completion"], fast["settled"], strict=True):
        assert r.startswith(f)
        assert (f != r) <= s  # only settled rows are cut
    assert (fast["n_tokens"] <= ref["n_tokens"]).all() and fast["n_tokens"].sum() < ref["n_tokens"].sum()


def test_evaluate_takes_a_judge_spec(tiny_llama):
    from kvgeom.judges import KeywordJudge

    by_object = evaluate(tiny_llama, PROMPTS, [None], max_new_tokens=6, judge=KeywordJudge("jbb", degeneracy=None))
    by_name = evaluate(tiny_llama, PROMPTS, [None], max_new_tokens=6, judge="keyword:phrases=jbb:degeneracy=off")
    pd.testing.assert_frame_equal(by_name, by_object)
    assert by_name.attrs["judge"] == "keyword-jbb"
    default = evaluate(tiny_llama, PROMPTS, [None], max_new_tokens=6)
    assert default.attrs["judge"] == "keyword-family_a"
    pd.testing.assert_frame_equal(evaluate(tiny_llama, PROMPTS, [None], max_new_tokens=6, judge="keyword"), default)
    with pytest.raises(ValueError, match="unknown judge 'nope'; registered judges"):
        evaluate(tiny_llama, PROMPTS, [None], max_new_tokens=6, judge="nope")


def test_nonfinite_rows_are_never_judged(tiny_llama, monkeypatch):
    """A row with NaN/inf logits gets the verdict 'nonfinite' whatever the judge says, and summarize counts it and
    leaves it out of every rate."""
    import kvgeom.evaluate.core as ev
    from kvgeom.testing import ChecksumJudge

    real = ev.generate

    def with_nan(*a, **k):
        out = real(*a, **k)
        out.extra["nonfinite"] = [i % 3 == 1 for i in range(len(out.texts))]  # every third row, both plans
        return out

    monkeypatch.setattr(ev, "generate", with_nan)
    rows = evaluate(tiny_llama, PROMPTS * 2, [None, "int4-token-asym"], max_new_tokens=3, judge=ChecksumJudge())
    bad = rows["nonfinite"].to_numpy()
    assert bad.sum() == 4 and set(rows.loc[bad, "verdict"]) == {"nonfinite"}
    assert not rows.loc[bad, "refused"].any()
    assert set(rows.loc[~bad, "verdict"]) <= {"refused", "complied", "degenerate"}
    s = summarize(rows).set_index("plan")
    assert s.loc[FULL, "n_nonfinite"] == 2 and s.loc[FULL, "refusal_n"] == 4  # 6 rows, 2 left out
    assert s.loc["int4-token-asym", "flip_n"] + s.loc["int4-token-asym", "reverse_flip_n"] == 4


def test_settling_checksum_judge_settles_refusals_only_and_keeps_verdicts(tiny_llama):
    """The planted judge of the GPU benchmark (kvgeom.testing.SettlingChecksumJudge) settles a row once its first
    characters make it a refusal; with settle=True every verdict equals the full generation's."""
    from kvgeom.testing import SettlingChecksumJudge

    judge = SettlingChecksumJudge(prefix_chars=6)
    assert not judge.settled("abc")  # too short to know
    refusing = next(t for t in ("aaaaaa", "aaaaab", "aaaaac") if judge.judge([""], [t])[0] == "refused")
    complying = next(t for t in ("aaaaaa", "aaaaab", "aaaaac") if judge.judge([""], [t])[0] == "complied")
    assert judge.settled(refusing + "zz") and not judge.settled(complying + "zz")
    plans = [None, QuantPlan("int2-token-asym")]
    ref = evaluate(tiny_llama, PROMPTS * 2, plans, max_new_tokens=12, judge=judge)
    fast = evaluate(tiny_llama, PROMPTS * 2, plans, max_new_tokens=12, judge=judge, settle=True)
    assert fast["verdict"].tolist() == ref["verdict"].tolist()
    assert (fast["settled"] <= (fast["verdict"] == "refused")).all() and fast["settled"].any()
    assert fast["n_tokens"].sum() < ref["n_tokens"].sum()
