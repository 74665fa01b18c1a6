"""Model files checked before any work (issue #17): a truncated GGUF is named a partial download, a file that is no
GGUF or no model says so and what MODEL may be (``kvgeom.models.files``)."""

from pathlib import Path

import numpy as np
import pytest

from kvgeom.cli import main
from kvgeom.models import ModelLoadError, load_model
from kvgeom.models.files import check_gguf


def _tiny_gguf(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_token_list(["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.ones((8, 16), dtype=np.float32))
    w.add_tensor("output.weight", np.ones((8, 16), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    return _tiny_gguf(tmp_path / "tiny.gguf")


def _cut(src: Path, n: int) -> Path:
    dst = src.with_name(f"cut{n}.gguf")
    dst.write_bytes(src.read_bytes()[:n])
    return dst


def test_a_complete_gguf_passes(gguf_file):
    layout = check_gguf(gguf_file)
    assert layout.n_tensors == 2 and layout.version == 3
    assert layout.data_start < layout.data_end <= layout.file_size == gguf_file.stat().st_size


@pytest.mark.parametrize("keep, where", [
    (2, "inside its GGUF magic"),
    (10, "inside its GGUF header, while reading the tensor count"),
    (60, "inside its GGUF header, while reading metadata"),
    (300, "inside its GGUF header, while reading the tensor table"),
])
def test_a_gguf_cut_in_its_header_is_named_truncated(gguf_file, keep, where):
    cut = _cut(gguf_file, keep)
    with pytest.raises(ModelLoadError, match="truncated") as err:
        check_gguf(cut)
    msg = str(err.value)
    assert str(cut) in msg and where in msg and "partial download" in msg and "download or copy it again" in msg


@pytest.mark.parametrize("missing", [1, 500])
def test_a_gguf_cut_in_its_tensor_data_is_named_truncated(gguf_file, missing):
    size = gguf_file.stat().st_size
    cut = _cut(gguf_file, size - missing)
    with pytest.raises(ModelLoadError, match="truncated") as err:
        check_gguf(cut)
    msg = str(err.value)
    assert f"data ends at byte {size:,}" in msg and f"has {size - missing:,} bytes ({missing:,} missing)" in msg
    assert "partial download" in msg


def test_not_a_gguf_says_so(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello world")
    with pytest.raises(ModelLoadError, match=r"is not a GGUF file: it starts with b'hell'.*registered name"):
        check_gguf(fake)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="it is empty"):
        check_gguf(empty)


def test_load_model_checks_a_gguf_before_converting(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("KVGEOM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(_cut(gguf_file, gguf_file.stat().st_size - 500), device="cpu")
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing written


def test_cli_info_of_a_truncated_gguf_is_one_error_line(gguf_file, capsys):
    cut = _cut(gguf_file, gguf_file.stat().st_size - 500)
    assert main(["info", str(cut)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvgeom: error: ") and len(err.splitlines()) == 1
    assert str(cut) in err and "truncated" in err and "partial download" in err
    assert "struct.error" not in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["one.txt", "notes"])
def test_an_existing_file_that_is_no_model_says_so(tmp_path, monkeypatch, capsys, name):
    (tmp_path / name).write_text("not a model")
    monkeypatch.chdir(tmp_path)
    for given in (name, str(tmp_path / name)):
        with pytest.raises(ModelLoadError, match="exists but is not a model") as err:
            load_model(given, device="cpu")
        msg = str(err.value)
        assert "does not exist" not in msg
        assert all(s in msg for s in ("registered name", ".gguf file", "config.json", "hub name"))
    assert main(["info", name]) == 2
    assert "exists but is not a model" in capsys.readouterr().err


def test_a_directory_without_config_names_what_is_accepted(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json.*registered name"):
        load_model(str(tmp_path), device="cpu")
