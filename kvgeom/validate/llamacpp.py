"""Greedy generation through a real llama.cpp (llama-cpp-python), with a real quantized KV cache.

:func:`import_llama_cpp` imports the optional extra or raises :class:`EngineNotInstalledError` naming the extra
and the portable build flags (:data:`PORTABLE_CMAKE_ARGS`). :func:`llama_cpp_generate` loads the GGUF once per
cache format, with ``type_k``/``type_v`` set, flash attention on (llama.cpp refuses a quantized V cache
without it) and llama.cpp's own Hadamard rotation (on by default for quantized types when d_head is a multiple
of 64; ``rotation=False`` sets ``LLAMA_ATTN_ROT_DISABLE=1`` while the context is built, which is when
``src/llama-kv-cache.cpp`` reads it). Each prompt's text is tokenized by llama.cpp (``special=True``, no BOS
added: the chat template writes its own), evaluated in one batch, then decoded greedily (argmax of the last
position's logits, first index on ties, as ``torch.argmax``) until a stop token (not returned; llama.cpp's
end-of-generation set ``llama_vocab_is_eog`` unless ``stop_tokens`` is given) or ``max_new_tokens`` tokens, the way
kvgeom's generation counts them. :func:`llama_cpp_logits` gives the logits of every position of token sequences
(teacher forcing, one pass each) under the same settings.

Proved by ``tests/validate/test_validate_llamacpp.py`` (a tiny GGUF end to end; skipped when llama_cpp is not
importable) and ``tests/validate/test_validate_errors.py`` (the missing-extra message).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from .types import EngineFormat

__all__ = ["PORTABLE_CMAKE_ARGS", "EngineNotInstalledError", "EngineRun", "import_llama_cpp", "llama_cpp_eog",
           "llama_cpp_generate", "llama_cpp_info", "llama_cpp_logits"]

#: a portable CPU build of llama-cpp-python: no -march=native, explicit AVX2/FMA/F16C, AVX-512 and AMX off
#: (a native build crashed on machines with AMX units); the option names are ggml/CMakeLists.txt's
PORTABLE_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
                       "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF")
ROT_DISABLE_ENV = "LLAMA_ATTN_ROT_DISABLE"


class EngineNotInstalledError(ValueError):
    """The engine's Python package is missing; the message names the extra and how to build it."""


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module, or :class:`EngineNotInstalledError` with the install command."""
    try:
        import llama_cpp
    except (ImportError, OSError, FileNotFoundError) as err:  # OSError: a package without its shared library
        raise EngineNotInstalledError(
            f"--engine llama.cpp needs llama-cpp-python, which is not importable here ({type(err).__name__}: "
            f"{err}); install the optional extra, a source build of a few minutes: "
            f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install -e ".[llamacpp]" '
            "(those flags give a portable CPU build; see docs/cli.md, kvgeom validate)") from None
    return llama_cpp


def llama_cpp_info() -> dict[str, str]:
    """llama-cpp-python's version and llama.cpp's system line (SIMD features), for the record."""
    lc = import_llama_cpp()
    info = {"llama_cpp_python": getattr(lc, "__version__", "?")}
    try:
        info["system_info"] = lc.llama_print_system_info().decode("utf-8", "replace").strip()
    except Exception:  # an older binding without it: the version alone
        pass
    return info


def llama_cpp_eog(gguf: str | os.PathLike) -> set[int]:
    """The tokens llama.cpp ends generation at for ``gguf`` (``llama_vocab_is_eog``; the vocabulary alone is read)."""
    lc = import_llama_cpp()
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        vocab = lc.llama_model_get_vocab(llm.model)
        return {i for i in range(llm.n_vocab()) if lc.llama_vocab_is_eog(vocab, i)}
    finally:
        llm.close()


@dataclass(frozen=True)
class EngineRun:
    """One prompt's greedy run: the prompt's llama.cpp tokens, the generated tokens (EOS excluded), whether it
    stopped at an end-of-generation token."""

    prompt_tokens: tuple[int, ...]
    tokens: tuple[int, ...]
    stopped_at_eos: bool
    extra: dict = field(default_factory=dict, compare=False)


@contextmanager
def _rotation_env(rotation: bool) -> Iterator[None]:
    saved = os.environ.get(ROT_DISABLE_ENV)
    if rotation:
        os.environ.pop(ROT_DISABLE_ENV, None)
    else:
        os.environ[ROT_DISABLE_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ROT_DISABLE_ENV, None)
        else:
            os.environ[ROT_DISABLE_ENV] = saved


def _ggml_type(lc: Any, name: str) -> int:
    return int(getattr(lc, f"GGML_TYPE_{name.upper()}"))


def _greedy(lc: Any, llm: Any, ids: list[int], max_new_tokens: int,
            stop_tokens: frozenset[int] | None) -> tuple[list[int], bool]:
    import numpy as np

    vocab = lc.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()

    def stops(tok: int) -> bool:
        return tok in stop_tokens if stop_tokens is not None else bool(lc.llama_vocab_is_eog(vocab, tok))

    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for step in range(max_new_tokens):
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        tok = int(np.argmax(logits))
        if stops(tok):
            return out, True
        out.append(tok)
        if step + 1 < max_new_tokens:
            llm.eval([tok])
    return out, False


def llama_cpp_generate(
    gguf: str | os.PathLike,
    texts: Sequence[str],
    fmt: EngineFormat,
    *,
    max_new_tokens: int = 32,
    rotation: bool = True,
    threads: int | None = None,
    stop_tokens: Iterable[int] | None = None,
    progress: bool | str = False,
) -> list[EngineRun]:
    """Greedy-generate each chat-formatted ``texts`` entry with llama.cpp under cache format ``fmt``; a row stops at
    one of ``stop_tokens`` (None: llama.cpp's end-of-generation tokens, ``llama_vocab_is_eog``)."""
    lc = import_llama_cpp()
    from llama_cpp import Llama

    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    stop = None if stop_tokens is None else frozenset(int(t) for t in stop_tokens)
    # a token covers at least one byte of text (special tokens more), so this context holds every prompt
    longest = max((len(t.encode("utf-8")) for t in texts), default=1)
    n_ctx = -(-(longest + max_new_tokens + 8) // 256) * 256
    with _rotation_env(rotation):
        llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                    n_threads_batch=threads, n_gpu_layers=0, flash_attn=True, type_k=_ggml_type(lc, fmt.type_k),
                    type_v=_ggml_type(lc, fmt.type_v), verbose=False)
    try:
        runs = []
        bar = tqdm(texts, desc=progress if isinstance(progress, str) else f"llama.cpp {fmt}", disable=not progress,
                   leave=False)
        for text in bar:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            toks, eos = _greedy(lc, llm, ids, max_new_tokens, stop)
            runs.append(EngineRun(tuple(ids), tuple(toks), eos))
        return runs
    finally:
        llm.close()


def llama_cpp_logits(gguf: str | os.PathLike, seqs: Sequence[Sequence[int]], fmt: EngineFormat, *,
                     rotation: bool = True, threads: int | None = None) -> list[Any]:
    """The logits ``[len(seq), n_vocab]`` (numpy fp32) llama.cpp gives every position of each token sequence, fed in
    one pass (``logits_all``) under cache format ``fmt`` with the settings of :func:`llama_cpp_generate`."""
    import numpy as np

    lc = import_llama_cpp()
    from llama_cpp import Llama

    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    longest = max((len(s) for s in seqs), default=1)
    n_ctx = -(-(longest + 8) // 256) * 256
    with _rotation_env(rotation):
        llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=max(512, n_ctx), n_ubatch=max(512, n_ctx),
                    n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, flash_attn=True, logits_all=True,
                    type_k=_ggml_type(lc, fmt.type_k), type_v=_ggml_type(lc, fmt.type_v), verbose=False)
    try:
        out = []
        for ids in seqs:
            llm.reset()
            llm.eval(list(ids))
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        return out
    finally:
        llm.close()
