"""Model files checked before any work: a GGUF's header, tensor table and size; what a MODEL argument may be.

:func:`check_gguf` reads a GGUF's header (magic, version, metadata, tensor table) without loading a tensor and
compares where the last tensor's data ends with the file's size, so a partial download or an interrupted copy is
named as such (instead of a ``struct.error`` from deep inside ``transformers``); a file that does not start with
``GGUF`` is named as not a GGUF file. :func:`not_a_model` is the message for an existing path that is no model.
Proved by ``tests/models/test_model_files.py`` (a truncated GGUF, in its header and in its tensor data, built
with ``gguf.GGUFWriter``; a complete one passes; a text file given as a model).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .model import ModelLoadError

__all__ = ["ACCEPTED_MODELS", "GGUFLayout", "check_gguf", "not_a_model"]

#: what a MODEL argument may be (every "not a model" message lists it)
ACCEPTED_MODELS = ("a registered name (kvgeom models lists them), a .gguf file, a Hugging Face model directory "
                   "(holding config.json), or a hub name (online only)")

_REDOWNLOAD = ("download or copy it again, and compare its size (or SHA-256) with the source's before using it")

# GGUF value types (gguf.GGUFValueType): fixed sizes in bytes; 8 = string, 9 = array
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFLayout:
    """What a GGUF's header says: version, counts, where tensor data starts and where the last tensor ends."""

    path: str
    version: int
    n_tensors: int
    n_metadata: int
    data_start: int
    data_end: int
    file_size: int


class _Truncated(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise _Truncated(what)
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(what)
        start = self.take(n, what)
        return bytes(self.buf[start:start + n])

    def skip_value(self, vtype: int, what: str) -> int | None:
        """Skip one metadata value; returns it when it is a uint32 (``general.alignment``)."""
        if vtype == _UINT32:
            return self.u32(what)
        if vtype in _FIXED:
            self.take(_FIXED[vtype], what)
        elif vtype == _STRING:
            self.take(self.u64(what), what)
        elif vtype == _ARRAY:
            itype, count = self.u32(what), self.u64(what)
            if itype in _FIXED:
                self.take(_FIXED[itype] * count, what)
            else:
                for _ in range(count):
                    self.skip_value(itype, what)
        else:
            raise ValueError(f"unknown metadata value type {vtype} in {what}")
        return None


def _tensor_bytes(ggml_type: int, dims: list[int]) -> int | None:
    import gguf

    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None  # a type this gguf package does not know: its size cannot be checked here
    n = 1
    for d in dims:
        n *= d
    return n // block * size


def _layout(path: Path, buf: mmap.mmap | bytes) -> GGUFLayout:
    """The layout of the GGUF in ``buf`` (its magic already checked)."""
    r = _Reader(buf, 4)
    version = r.u32("the version")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (kvgeom reads versions 2 and 3, little-endian)")
    n_tensors, n_kv = r.u64("the tensor count"), r.u64("the metadata count")
    alignment = _DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = r.string(f"metadata entry {i + 1} of {n_kv}").decode("utf-8", "replace")
        value = r.skip_value(r.u32(f"metadata {key!r}"), f"metadata {key!r}")
        if key == "general.alignment" and value:
            alignment = value
    tensors = []
    for i in range(n_tensors):
        what = f"the tensor table (tensor {i + 1} of {n_tensors})"
        name = r.string(what)
        dims = [r.u64(what) for _ in range(r.u32(what))]
        tensors.append((name, r.u32(what), dims, r.u64(what)))
    data_start = -(-r.pos // alignment) * alignment
    end = data_start
    for _name, ggml_type, dims, offset in tensors:
        nbytes = _tensor_bytes(ggml_type, dims)
        end = max(end, data_start + offset + (nbytes or 0))
    return GGUFLayout(str(path), version, n_tensors, n_kv, data_start, end, len(buf))


def check_gguf(path: str | os.PathLike) -> GGUFLayout:
    """Check that ``path`` is a complete GGUF file: magic, version, header and tensor table readable, and the
    last tensor's data inside the file. Raises :class:`ModelLoadError` naming the file, what is wrong (not a
    GGUF; truncated, i.e. a partial download or an interrupted copy) and what to do. Reads the header only."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
        if 0 < size < 4 and b"GGUF".startswith(magic):
            raise ModelLoadError(f"{path} is truncated: the file ends ({size:,} bytes) inside its GGUF magic: a "
                                 f"partial download or an interrupted copy; {_REDOWNLOAD}")
        if magic != b"GGUF":
            raise ModelLoadError(
                f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'"
                + (" (it is empty)" if size == 0 else "")
                + f"; pass a .gguf model file. Accepted as MODEL: {ACCEPTED_MODELS}")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                layout = _layout(path, mm)
            except _Truncated as err:
                raise ModelLoadError(
                    f"{path} is truncated: the file ends ({size:,} bytes) inside its GGUF header, while reading "
                    f"{err.what}: a partial download or an interrupted copy; {_REDOWNLOAD}") from None
            except ValueError as err:
                raise ModelLoadError(f"{path} is not a GGUF file kvgeom can read: {err}; pass a GGUF of version 2 "
                                     "or 3 (what llama.cpp and transformers write today)") from None
    if layout.data_end > size:
        raise ModelLoadError(
            f"{path} is truncated: its header describes {layout.n_tensors} tensors whose data ends at byte "
            f"{layout.data_end:,}, but the file has {size:,} bytes ({layout.data_end - size:,} missing): a partial "
            f"download or an interrupted copy; {_REDOWNLOAD}")
    return layout


def not_a_model(path: str | os.PathLike) -> str:
    """The message for an existing ``path`` that is no model kvgeom can load (a file that is neither a .gguf nor a
    model directory)."""
    p = Path(path).expanduser()
    kind = "a directory without config.json" if p.is_dir() else f"a {p.suffix or 'suffix-less'} file"
    return f"{str(path)!r} exists but is not a model ({kind}); accepted as MODEL: {ACCEPTED_MODELS}"
