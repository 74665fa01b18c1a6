"""``kvgeom validate``: the same prompts through a real llama.cpp and through kvgeom's simulation, judged alike.

:func:`validate_engine` checks everything before any work (the engine name, the formats, that MODEL is a GGUF
llama.cpp can run, that llama-cpp-python is importable, the prompts, the judge, the output folder), then

1. loads MODEL into kvgeom (the GGUF de-quantized to an fp32 checkpoint) and renders every prompt with the
   model's chat template (the GGUF's ``tokenizer.chat_template``, which kvgeom's tokenizer carries over; the
   record says whether the two texts are equal);
2. kvgeom: greedy generation in cache mode (:class:`kvgeom.quant.QuantPlan` ``mode="cache"``: what enters the
   cache is quantized, the prompt's own attention included, as in llama.cpp) under each format's scheme
   (:meth:`~kvgeom.validate.types.EngineFormat.kvgeom_scheme`, llama.cpp's rotation rule included), plus the
   fp32 model with no cache quantization; with ``query`` (``--query-quant``) the plans of formats whose K is a
   llama.cpp type also quantize Q as llama.cpp's CPU flash attention does (:mod:`kvgeom.quant.query`);
3. llama.cpp: the same rendered texts, tokenized by llama.cpp, under ``type_k``/``type_v`` with flash attention,
   greedy (:func:`~kvgeom.validate.llamacpp.llama_cpp_generate`), its f16 cache always among them, stopping at
   kvgeom's EOS tokens (``KVModel.eos_token_ids``) so both sides stop alike (llama.cpp's own end-of-generation
   set is often wider, e.g. Qwen's ``<|endoftext|>``; ``info["engine_eog_only"]`` lists those tokens);
4. both sides' tokens decoded by kvgeom's tokenizer (equal tokens give equal text) and judged by the same judge;
5. :func:`~kvgeom.validate.agreement.agreement_summary` per comparison: the ceiling ``fp32 vs f16`` (kvgeom's
   fp32 model against llama.cpp's default f16 cache: what the Q4_K_M weights computed on quantized activations,
   an f16 cache and another accumulation order change before any KV quantization) and one row per format.

Results: :class:`Validation` (``rows``, ``summary`` DataFrames, ``info``); with ``out``, ``validate.json`` (all
of it), ``summary.csv`` and ``rows.csv``. Proved by ``tests/validate/test_validate_errors.py`` (errors before
work) and ``tests/validate/test_validate_llamacpp.py`` (a tiny GGUF end to end).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .agreement import AGREEMENT_TARGET, agreement_summary
from .llamacpp import import_llama_cpp, llama_cpp_eog, llama_cpp_generate, llama_cpp_info
from .reuse import saved_engine_runs
from .types import FULL_PRECISION, EngineFormat, parse_formats

__all__ = ["CEILING", "ENGINES", "Validation", "check_engine", "resolve_gguf", "validate_engine"]

#: the engines ``kvgeom validate`` can run (aliases -> the name results use)
ENGINES = {"llama.cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama_cpp": "llama.cpp"}
#: label of the full-precision comparison: kvgeom's fp32 model against llama.cpp's f16 cache
CEILING = "fp32 vs f16"


@dataclass(frozen=True)
class Validation:
    """What :func:`validate_engine` measured: per-(comparison, prompt) ``rows``, per-comparison ``summary``,
    and ``info`` (model, engine, settings, timings)."""

    rows: pd.DataFrame
    summary: pd.DataFrame
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from kvgeom.io import to_jsonable

        return to_jsonable({**self.info, "summary": self.summary.to_dict(orient="records"),
                            "rows": self.rows.to_dict(orient="records")})


def check_engine(engine: str) -> str:
    """The canonical engine name; ValueError naming the engines there are."""
    key = str(engine).strip().lower()
    if key not in ENGINES:
        raise ValueError(f"--engine {engine!r}: kvgeom validate runs llama.cpp (llama-cpp-python, on the CPU); "
                         "vLLM and HF are checked against their reference formulas in the test suite, since their "
                         "quantized caches need a GPU engine. Pass --engine llama.cpp")
    return ENGINES[key]


def resolve_gguf(model: str | os.PathLike) -> Path:
    """The GGUF file llama.cpp runs for ``model``: a registered name's file, or a ``.gguf`` path (header and size
    checked). ModelLoadError / ValueError otherwise, naming what is accepted."""
    from kvgeom.models.files import check_gguf
    from kvgeom.models.model import ModelLoadError
    from kvgeom.registry import REGISTRY, ensure_model_file

    name = str(model)
    if name in REGISTRY:
        return ensure_model_file(name).resolve()
    path = Path(name).expanduser()
    if path.suffix.lower() != ".gguf":
        what = "a directory" if path.is_dir() else "a hub name" if not path.exists() else f"a {path.suffix} file"
        raise ValueError(f"MODEL {name!r} is {what}, not a .gguf file: llama.cpp runs GGUF files only; pass a .gguf "
                         "(convert an HF model with llama.cpp's convert_hf_to_gguf.py) or a registered name "
                         f"({', '.join(REGISTRY)})")
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    check_gguf(path)
    return path.resolve()


def _load_name(model: str | os.PathLike, gguf: Path) -> str:
    """What kvgeom loads: a registered name as given, and a path to a registered model's own GGUF by its name (the
    same verified file, whose fp32 conversion is already cached), any other GGUF by its path."""
    from kvgeom.registry import REGISTRY, cache_dir

    for name, reg in REGISTRY.items():
        own = cache_dir() / reg.name / reg.filename
        if own.is_file() and own.resolve() == gguf:
            return name
    return str(model)


def _gguf_template(path: Path) -> str | None:
    import gguf

    field_ = gguf.GGUFReader(str(path)).get_field("tokenizer.chat_template")
    return None if field_ is None else str(field_.contents())


def query_for(scheme: str | None, query: str | None) -> str | None:
    """The ``QuantPlan.query`` a format's plan gets: ``query`` where K is a llama.cpp type, else None (an f16 K)."""
    from kvgeom.quant import Scheme
    from kvgeom.quant.query import check_query, query_spec_error

    check_query(query)
    if scheme is None or query is None or query_spec_error(Scheme.parse(scheme).for_role("k")) is not None:
        return None
    return query


def _kvgeom_side(model: Any, prompts: list[str], schemes: list[str | None], *, max_new_tokens: int,
                 batch_size: int, progress: bool, query: str | None = None) -> dict[str | None, Any]:
    from kvgeom.quant import QuantPlan
    from kvgeom.runtime.generation import generate

    plans = [None if s is None else QuantPlan(s, mode="cache", query=query_for(s, query)) for s in schemes]
    for p in plans:
        if p is not None:
            p.validate(model)
    rows = [(j, p) for j in range(len(plans)) for p in prompts]
    gen = generate(model, [p for _, p in rows], plans=[plans[j] for j, _ in rows], max_new_tokens=max_new_tokens,
                   batch_size=batch_size, progress="kvgeom" if progress else False)
    n = len(prompts)
    return {s: gen.tokens[j * n:(j + 1) * n] for j, s in enumerate(schemes)}


def validate_engine(
    model: str | os.PathLike,
    *,
    engine: str = "llama.cpp",
    formats: str | Sequence[str | EngineFormat] | None = None,
    prompts: Any = "calibration",
    n: int | None = None,
    judge: Any = None,
    max_new_tokens: int = 32,
    rotation: bool = True,
    target: float = AGREEMENT_TARGET,
    threads: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    out: str | os.PathLike | None = None,
    kv_model: Any = None,
    query: str | None = None,
    engine_from: str | os.PathLike | None = None,
    progress: bool | Callable[[str], None] = False,
    bars: bool | None = None,
) -> Validation:
    """Run ``prompts`` (a bundled name, a path, a list or a PromptSet; the first ``n``) through ``engine`` with each
    of ``formats`` (default :data:`~kvgeom.validate.types.DEFAULT_FORMATS`) and through kvgeom's simulation of the
    same format; judge both with ``judge`` (a spec or object; default the keyword judge) and compare (module
    docstring). ``rotation=False``: llama.cpp with ``LLAMA_ATTN_ROT_DISABLE=1`` and kvgeom without ``+rot``.
    ``query``: None (Q exact, the default) or a :data:`kvgeom.quant.query.QUERY_MODES` value, for the formats whose
    K is a llama.cpp type. ``engine_from``: the ``out`` folder of an earlier run whose llama.cpp side is reused
    (:func:`~kvgeom.validate.reuse.saved_engine_runs`: same GGUF, prompts, formats, tokens and rotation).
    ``kv_model``: an already loaded :class:`kvgeom.KVModel` of the same weights (skips loading). ``progress``: True
    for tqdm bars, or a function given one line per step; ``bars``: tqdm bars as well (default: ``progress is
    True``)."""
    from kvgeom.evaluate import as_prompt_set
    from kvgeom.judges import JudgePanel, rejudge

    say = progress if callable(progress) else (lambda _m: None)
    bars = progress is True if bars is None else bars
    engine = check_engine(engine)
    fmts = parse_formats(formats)
    query_for(None, query)  # an unknown value: an error before any work
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: generate at least 1 token")
    if n is not None and n < 1:
        raise ValueError(f"--n {n}: compare at least 1 prompt")
    gguf_path = resolve_gguf(model)
    import_llama_cpp()
    ps = as_prompt_set(prompts)
    if n is not None:
        ps = ps.head(n)
    panel = JudgePanel.from_spec(judge)  # --judge A,B: A decides, B re-judges the same completions
    if out is not None:
        from kvgeom.io import check_out_dir

        check_out_dir(out, option="--out")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if kv_model is None:
        from kvgeom.models import load_model

        say("loading the model into kvgeom")
        kv_model = load_model(_load_name(model, gguf_path), device=device)
    timings["load_s"] = time.perf_counter() - t0
    d_head = kv_model.d_head
    engine_fmts = list(dict.fromkeys([EngineFormat(FULL_PRECISION, FULL_PRECISION), *fmts]))
    scheme_of = {f: f.kvgeom_scheme(d_head, rotation=rotation) for f in fmts}
    schemes = list(dict.fromkeys([None, *scheme_of.values()]))
    texts = kv_model.format_chat(ps.prompts)
    kv_prompt_ids = [kv_model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    eng: dict[EngineFormat, list] = {}
    if engine_from is not None:  # checked before kvgeom's side runs
        say(f"llama.cpp: reusing {engine_from}")
        eng = saved_engine_runs(engine_from, gguf=gguf_path, prompts=ps.prompts, formats=engine_fmts,
                                max_new_tokens=max_new_tokens, rotation=rotation, kv_prompt_ids=kv_prompt_ids)
    t1 = time.perf_counter()
    say(f"kvgeom: {len(schemes)} plans x {len(ps)} prompts")
    kv_tokens = _kvgeom_side(kv_model, ps.prompts, schemes, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=bars, query=query)
    timings["kvgeom_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    for f in engine_fmts if engine_from is None else ():
        say(f"llama.cpp: {f}")
        eng[f] = llama_cpp_generate(gguf_path, texts, f, max_new_tokens=max_new_tokens, rotation=rotation,
                                    threads=threads, stop_tokens=kv_model.eos_token_ids,
                                    progress=f"llama.cpp {f}" if bars else False)
    timings["engine_s"] = time.perf_counter() - t2

    tok = kv_model.tokenizer
    full = EngineFormat(FULL_PRECISION, FULL_PRECISION)
    comparisons = [(CEILING, full, None), *((str(f), f, scheme_of[f]) for f in fmts)]
    recs = []
    for label, f, scheme in comparisons:
        for i, row in enumerate(ps.frame.itertuples(index=False)):
            run = eng[f][i]
            recs.append({"comparison": label, "format": str(f), "type_k": f.type_k, "type_v": f.type_v,
                         "kvgeom_scheme": "none" if scheme is None else scheme,
                         "kvgeom_query": query_for(scheme, query) or "none", "prompt_id": row.id,
                         "prompt": row.prompt, "prompt_tokens_equal": list(run.prompt_tokens) == kv_prompt_ids[i],
                         "engine_tokens": list(run.tokens), "engine_stopped_at_eos": run.stopped_at_eos,
                         "kvgeom_tokens": list(kv_tokens[scheme][i])})
    rows = pd.DataFrame(recs)
    rows["engine_completion"] = [tok.decode(t, skip_special_tokens=True) for t in rows["engine_tokens"]]
    rows["kvgeom_completion"] = [tok.decode(t, skip_special_tokens=True) for t in rows["kvgeom_tokens"]]
    for side in ("engine", "kvgeom"):
        verdicts = panel.judge(rows["prompt"].tolist(), rows[f"{side}_completion"].tolist())
        rows[f"{side}_verdict"] = [getattr(v, "value", v) for v in verdicts]
        if panel.others:  # every judge's verdict on the same completions, for `kvgeom judges compare`
            every = rejudge(panel, rows["prompt"].tolist(), rows[f"{side}_completion"].tolist())
            rows[[f"{side}_{c}" for c in every.columns]] = every.to_numpy()
    rows["agree"] = rows["engine_verdict"] == rows["kvgeom_verdict"]
    summary = agreement_summary(rows, baselines={"engine": CEILING, "kvgeom": CEILING}, target=target)
    timings["total_s"] = time.perf_counter() - t0

    template = _gguf_template(gguf_path)
    info = {
        "engine": engine, "engine_info": llama_cpp_info(), "model": kv_model.describe(), "gguf": str(gguf_path),
        "formats": [str(f) for f in fmts], "kvgeom_schemes": {str(f): s for f, s in scheme_of.items()},
        "engine_from": None if engine_from is None else str(engine_from),
        "query": query, "kvgeom_queries": {str(f): query_for(s, query) for f, s in scheme_of.items()},
        "rotation": rotation, "d_head": d_head, "max_new_tokens": max_new_tokens, "target": target,
        "prompts": {"name": ps.name, "source": ps.source, "n": len(ps), "ids": ps.ids},
        "judge": panel.identity(), "judges": panel.identities(),
        "engine_eog_only": sorted(llama_cpp_eog(gguf_path) - kv_model.eos_token_ids),
        "chat_template_equal": template is not None
        and template == (kv_model.chat_template or getattr(kv_model.tokenizer, "chat_template", None)),
        "timings": timings, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    result = Validation(rows, summary, info)
    if out is not None:
        from kvgeom.io import atomic_write_json, atomic_write_text

        d = Path(out)
        atomic_write_json(d / "validate.json", result.to_dict())
        atomic_write_text(d / "summary.csv", summary.to_csv(index=False))
        atomic_write_text(d / "rows.csv", rows.to_csv(index=False))
    return result
