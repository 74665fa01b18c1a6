import hashlib
import json

import pytest

from kvgeom import registry
from kvgeom.registry import ModelNotInstalledError, ModelPart, RegisteredModel, ensure_model_file


def _fake_model(tmp_path, chunks, sha=None):
    files = []
    for i, data in enumerate(chunks):
        f = tmp_path / f"part{i}.bin"
        f.write_bytes(data)
        files.append(f)
    blob = b"".join(chunks)
    model = RegisteredModel(
        name="fake", description="fake", license="MIT", filename="fake.gguf", size=len(blob),
        sha256=sha or hashlib.sha256(blob).hexdigest(), version="1.0",
        parts=tuple(ModelPart(f"fake-part{i}", f"fake_part{i}", "x") for i in range(len(chunks))),
    )
    return model, files


@pytest.fixture
def parts_on_disk(monkeypatch):
    def install(files):
        lookup = {f"fake-part{i}": f for i, f in enumerate(files)}
        monkeypatch.setattr(registry, "_part_path", lambda model, part: lookup[part.distribution])
    return install


def test_assembles_verifies_and_stamps(tmp_path, parts_on_disk):
    model, files = _fake_model(tmp_path, [b"abc" * 100, b"def" * 50, b"g"])
    parts_on_disk(files)
    path = ensure_model_file(model, root=tmp_path / "cache")
    assert path.read_bytes() == b"abc" * 100 + b"def" * 50 + b"g"
    stamp = json.loads(path.with_name(path.name + ".verified.json").read_text())
    assert stamp["sha256"] == model.sha256
    # second call: stamp valid, parts not needed any more
    parts_on_disk([])
    assert ensure_model_file(model, root=tmp_path / "cache") == path


def test_hash_mismatch_leaves_nothing(tmp_path, parts_on_disk):
    model, files = _fake_model(tmp_path, [b"abc", b"def"], sha="0" * 64)
    parts_on_disk(files)
    with pytest.raises(ModelNotInstalledError, match="SHA-256"):
        ensure_model_file(model, root=tmp_path / "cache")
    leftovers = list((tmp_path / "cache").rglob("*"))
    assert [p for p in leftovers if p.is_file()] == []


def test_tampered_file_is_reverified(tmp_path, parts_on_disk):
    model, files = _fake_model(tmp_path, [b"abc", b"def"])
    parts_on_disk(files)
    path = ensure_model_file(model, root=tmp_path / "cache")
    path.write_bytes(b"XXXXXX")  # same size, new mtime, wrong bytes
    path2 = ensure_model_file(model, root=tmp_path / "cache")
    assert path2.read_bytes() == b"abcdef"


def test_missing_part_names_what_to_install(tmp_path):
    model, _ = _fake_model(tmp_path, [b"abc"])
    with pytest.raises(ModelNotInstalledError, match=r"fake-part0 is not installed.*pip install"):
        ensure_model_file(model, root=tmp_path / "cache")


def test_unknown_name_lists_registered():
    with pytest.raises(KeyError, match="qwen2.5-coder-0.5b-instruct"):
        ensure_model_file("no-such-model")


def test_list_models_reports_default():
    table = registry.list_models()
    assert list(table["name"]) == ["qwen2.5-coder-0.5b-instruct"]
    assert {"parts_installed", "assembled", "verified", "path"} <= set(table.columns)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_model_and_stamp_get_the_umask_mode(tmp_path, parts_on_disk, umask):
    import os
    import stat

    model, files = _fake_model(tmp_path, [b"abc", b"def"])
    parts_on_disk(files)
    old = os.umask(umask)
    try:
        path = ensure_model_file(model, root=tmp_path / f"cache{umask:o}")
    finally:
        os.umask(old)
    stamp = path.with_name(path.name + ".verified.json")
    for f in (path, stamp):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
