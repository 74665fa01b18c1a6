"""``kvgeom validate``'s bad input: one ``kvgeom: error:`` line, exit code 2, before any work
(``kvgeom.validate.run``, ``kvgeom.validate.llamacpp``)."""

import argparse
import sys

import pytest

from kvgeom.cli import main
from kvgeom.testing import write_tiny_gguf
from kvgeom.validate import PORTABLE_CMAKE_ARGS, EngineNotInstalledError, import_llama_cpp


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model or starting the engine is work: fail the test if either happens."""
    import kvgeom.models
    import kvgeom.validate.run as run

    def boom(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(kvgeom.models, "load_model", boom)
    monkeypatch.setattr(run, "llama_cpp_generate", boom)


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvgeom: error: "), err
    return err[0]


def test_an_unknown_engine(capsys, no_work, tiny_gguf):
    msg = _error(capsys, ["validate", str(tiny_gguf), "--engine", "vllm"])
    assert "--engine 'vllm'" in msg and "--engine llama.cpp" in msg


def test_a_model_that_is_not_a_gguf(capsys, no_work, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    msg = _error(capsys, ["validate", str(tmp_path)])
    assert "not a .gguf file" in msg and "convert_hf_to_gguf.py" in msg
    msg = _error(capsys, ["validate", "Qwen/Qwen2.5-0.5B-Instruct"])
    assert "not a .gguf file" in msg
    msg = _error(capsys, ["validate", str(tmp_path / "missing.gguf")])
    assert "does not exist" in msg
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a gguf")
    assert "is not a GGUF file" in _error(capsys, ["validate", str(bad)])


def test_a_format_without_a_llama_cpp_type(capsys, no_work, tiny_gguf):
    msg = _error(capsys, ["validate", str(tiny_gguf), "--formats", "q8_0,int4-token-asym"])
    assert "'int4-token-asym' is not a llama.cpp cache type" in msg


@pytest.mark.parametrize(("opt", "value", "match"), [("--n", "0", "--n 0"), ("--max-new-tokens", "0", "at least 1"),
                                                      ("--judge", "nosuchjudge", "nosuchjudge")])
def test_bad_numbers_and_judges(capsys, no_work, tiny_gguf, opt, value, match, monkeypatch):
    monkeypatch.setattr("kvgeom.validate.run.import_llama_cpp", lambda: None)  # reach the later checks here too
    assert match in _error(capsys, ["validate", str(tiny_gguf), opt, value])


def test_missing_extra_names_the_extra_and_the_build_flags(capsys, no_work, tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(EngineNotInstalledError) as err:
        import_llama_cpp()
    for part in ('pip install -e ".[llamacpp]"', PORTABLE_CMAKE_ARGS, "-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF"):
        assert part in str(err.value)
    msg = _error(capsys, ["validate", str(tiny_gguf)])
    assert "llama-cpp-python" in msg and "CMAKE_ARGS=" in msg


def test_an_unknown_query_quantization(capsys, no_work, tiny_gguf):
    from kvgeom.validate import validate_engine

    with pytest.raises(ValueError, match="not a query conversion kvgeom simulates"):
        validate_engine(tiny_gguf, query="q4_0")
    with pytest.raises((SystemExit, argparse.ArgumentError), match="invalid choice: 'q4_0'|2"):
        main(["validate", str(tiny_gguf), "--query-quant", "q4_0"])  # argparse's choices, as every option
