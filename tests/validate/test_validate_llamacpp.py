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

from kvgeom.validate import llama_cpp_generate  # noqa: E402

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
