"""The real-engine path end to end on a tiny GGUF (a random qwen2 model written with the ``gguf`` package):
llama.cpp runs it with real quantized caches, kvgeom simulates the same formats, and the agreement is reported
(``kvgeom.validate``). Skipped, with the reason, where llama-cpp-python (``kvgeom[llamacpp]``) is not importable."""

import json

import pytest

from kvgeom.testing import ChecksumJudge, write_tiny_gguf
from kvgeom.validate import CEILING, EngineFormat, EngineNotInstalledError, import_llama_cpp, validate_engine

try:
    import_llama_cpp()
except EngineNotInstalledError as err:
    pytest.skip(f"llama-cpp-python is not importable, so the real-engine path cannot run: {err}",
                allow_module_level=True)

from kvgeom.validate import llama_cpp_generate, llama_cpp_logits  # noqa: E402

PROMPTS = ["How do I bake bread at home?", "hi", "Write a story about a lighthouse keeper."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, the kvgeom model loaded from it), the conversion cached in a temporary KVGEOM_CACHE."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("validate")
    mp.setenv("KVGEOM_CACHE", str(root / "cache"))
    path = root / "tiny.gguf"
    write_tiny_gguf(path)
    from kvgeom.models import load_model

    model = load_model(str(path), device="cpu")
    yield path, model
    mp.undo()


def test_llama_cpp_reads_the_tiny_gguf_as_kvgeom_does(tiny):
    """Same prompt tokens; at an f16 cache with F32 weights llama.cpp's greedy tokens are kvgeom's fp16 ones."""
    path, model = tiny
    texts = model.format_chat(PROMPTS)
    runs = llama_cpp_generate(path, texts, EngineFormat("f16", "f16"), max_new_tokens=6, threads=2,
                              stop_tokens=model.eos_token_ids)
    for text, run in zip(texts, runs, strict=True):
        assert list(run.prompt_tokens) == model.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert 0 < len(run.tokens) <= 6 or run.stopped_at_eos
    import kvgeom
    from kvgeom.quant import QuantPlan

    gen = kvgeom.generate(model, PROMPTS, plans=QuantPlan("fp16", mode="cache"), max_new_tokens=6)
    assert [list(r.tokens) for r in runs] == gen.tokens


def test_validate_engine_end_to_end(tiny, tmp_path):
    path, model = tiny
    v = validate_engine(path, formats="f16,q8_0,q4_0,q8_0/q4_0", prompts=PROMPTS, judge=ChecksumJudge(),
                        max_new_tokens=6, threads=2, out=tmp_path, kv_model=model)
    s = v.summary.set_index("comparison")
    assert list(s.index) == [CEILING, "f16", "q8_0", "q4_0", "q8_0/q4_0"]
    assert s.loc["q8_0/q4_0", "kvgeom_scheme"] == "K:q8_0+rot,V:q4_0+rot"  # d_head 64: llama.cpp rotates
    assert s.loc[CEILING, "kvgeom_scheme"] == "none"
    assert (s["n"] == len(PROMPTS)).all() and (s["prompt_tokens_equal"] == 1.0).all()
    assert s.loc["f16", "identical_k"] == len(PROMPTS)  # the test above, through validate_engine
    assert set(v.rows["engine_verdict"]) <= {"refused", "complied", "degenerate"}
    assert v.info["chat_template_equal"] and v.info["rotation"]
    saved = json.loads((tmp_path / "validate.json").read_text())
    assert [r["comparison"] for r in saved["summary"]] == list(s.index)
    assert len(saved["rows"]) == 5 * len(PROMPTS)
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "rows.csv").is_file()


def test_the_cli_prints_the_table(tiny, tmp_path, capsys):
    from kvgeom.cli import main

    path, _model = tiny
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    assert main(["validate", str(path), "--formats", "q4_0", "--prompts", str(prompts), "--max-new-tokens", "4",
                 "--threads", "2", "--out", str(tmp_path / "out"), "--no-rotation",
                 "--judge", "keyword,keyword:phrases=jbb"]) == 0
    out = capsys.readouterr().out
    assert "kvgeom validate:" in out and CEILING in out and "q4_0" in out and "rotation off" in out
    saved = json.loads((tmp_path / "out" / "validate.json").read_text())
    assert saved["kvgeom_schemes"] == {"q4_0": "q4_0"} and not saved["rotation"]
    assert [j["name"] for j in saved["judges"]] == ["keyword", "keyword"]  # --judge A,B: A decides, B re-judges
    assert {"engine_verdict:keyword:phrases=jbb", "kvgeom_verdict:keyword:phrases=jbb"} <= set(saved["rows"][0])


def test_validate_with_query_quantization(tiny, tmp_path):
    """--query-quant: the formats whose K is a llama.cpp type run kvgeom's plan with query=, f16 does not; the llama.cpp
    side is the same either way."""
    path, model = tiny
    kw = dict(formats="f16,q4_0", prompts=PROMPTS[:2], judge=ChecksumJudge(), max_new_tokens=4, threads=2,
              kv_model=model)
    v = validate_engine(path, query="engine", out=tmp_path, **kw)
    assert v.info["query"] == "engine" and v.info["kvgeom_queries"] == {"f16": None, "q4_0": "engine"}
    s = v.summary.set_index("comparison")
    assert s.loc["q4_0", "kvgeom_query"] == "engine" and s.loc["f16", "kvgeom_query"] == "none"
    plain = validate_engine(path, **kw)
    assert plain.info["query"] is None and (plain.summary["kvgeom_query"] == "none").all()
    assert plain.rows["engine_tokens"].tolist() == v.rows["engine_tokens"].tolist()
    reused = validate_engine(path, engine_from=tmp_path, **kw)  # --engine-from: llama.cpp's side from that run
    cols = ["engine_tokens", "engine_stopped_at_eos", "prompt_tokens_equal", "kvgeom_tokens", "agree"]
    assert reused.rows[cols].equals(plain.rows[cols]) and reused.info["engine_from"] == str(tmp_path)
    with pytest.raises(ValueError, match="max_new_tokens 4, this one 5"):
        validate_engine(path, engine_from=tmp_path, **{**kw, "max_new_tokens": 5})
    with pytest.raises(ValueError, match="format q8_0 was not run there"):
        validate_engine(path, engine_from=tmp_path, **{**kw, "formats": "q8_0"})


@pytest.mark.parametrize("k_type", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"])
def test_query_quantization_reproduces_llama_cpps_logits(tiny, k_type):
    """On F32 weights, teacher-forced logits of every position: with query="engine" kvgeom's cache mode gives
    llama.cpp's logits up to fp32 summation order at most positions (median max-abs difference ~5e-6; a position
    after a K/V/Q value whose code flips on an fp32 rounding difference stays off by up to ~0.06), without it at
    almost none (median ~0.1): llama.cpp's q8_0 Q (kvgeom.quant.query) is what the plain simulation leaves out. For
    q4_1/q5_1 (Q as q8_1) the fp16 rounding of q8_1's block sum, not simulated, leaves ~0.01-0.02."""
    import numpy as np
    import torch

    from kvgeom.quant import QuantPlan
    from kvgeom.runtime.plans import forward_with_plans

    path, model = tiny
    texts = model.format_chat(PROMPTS)
    seqs = [model.tokenizer(t, add_special_tokens=False)["input_ids"] + [5, 6, 7, 8] for t in texts]
    eng = llama_cpp_logits(path, seqs, EngineFormat(k_type, k_type), threads=2)
    scheme = EngineFormat(k_type, k_type).kvgeom_scheme(model.d_head)

    def per_position(query):
        out = []
        for ids, e in zip(seqs, eng, strict=True):
            x = torch.tensor([ids])
            with torch.inference_mode():
                k = forward_with_plans(model, x, torch.ones_like(x, dtype=torch.bool),
                                       [QuantPlan(scheme, mode="cache", query=query)])[0].numpy()
            out.append(np.abs(k - e).max(-1))
        return np.concatenate(out)

    exact, plain = per_position("engine"), per_position(None)
    print(k_type, "median max-abs logit difference: query engine", np.median(exact), "none", np.median(plain))
    assert (plain < 1e-4).mean() <= 0.1, (k_type, np.median(plain))
    if k_type in ("q4_1", "q5_1"):  # Q as q8_1: its fp16 block sum s (times K's minimum) is not simulated
        assert np.median(exact) < np.median(plain) / 4, (k_type, np.median(exact), np.median(plain))
    else:
        assert np.median(exact) < 1e-4 and (exact < 1e-4).mean() >= 0.6, (k_type, np.median(exact))
        assert np.median(plain) > 100 * np.median(exact), (k_type, np.median(plain))
