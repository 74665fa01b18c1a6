"""Serving settings for a mitigation: vLLM, llama.cpp and Hugging Face ``QuantizedCache`` configurations."""

from __future__ import annotations

from typing import Any

from kvgeom.quant.formats import KVFormat
from kvgeom.quant.plan import normalise_channels
from kvgeom.quant.scheme import DEFAULT_D_HEAD, DEFAULT_N_KV_HEADS, Scheme

from .candidates import Assignment, Candidate, assignment_bits, canonical_scheme
from .search import SearchResult

# ------------------------------------------------------------------------------------------ export


def _as_assignment(obj: Any, n_layers: int | None) -> tuple[Assignment, tuple]:
    from kvgeom.quant.plan import QuantPlan

    if isinstance(obj, Candidate):
        return obj.assignment, obj.protect_channels
    if isinstance(obj, SearchResult):
        return obj.assignment, ()
    if obj is None or isinstance(obj, str | Scheme):
        if n_layers is None:
            raise ValueError("a single scheme needs n_layers")
        return tuple([canonical_scheme(obj)] * n_layers), ()
    if isinstance(obj, QuantPlan):
        if n_layers is None:
            raise ValueError("a QuantPlan needs n_layers")
        s = canonical_scheme(obj.scheme)
        return tuple(s if obj.quantizes(i) else None for i in range(n_layers)), normalise_channels(obj.protect_channels)
    a = tuple(canonical_scheme(s) for s in obj)
    if n_layers is not None and len(a) != n_layers:
        raise ValueError(f"assignment has {len(a)} entries but the model has {n_layers} layers")
    return a, ()


def _vllm_dtype(base: KVFormat) -> tuple[str | None, bool]:
    dtype = base.vllm()
    return (None, False) if dtype is None else (dtype.kv_cache_dtype, dtype.calculate_kv_scales)


def _vllm(a: Assignment, channels: tuple, model: str) -> dict[str, Any]:
    notes = ["vLLM has one kv_cache_dtype for every quantized layer, shared by K and V; "
             "--kv-cache-dtype-skip-layers (recent vLLM, CacheConfig.kv_cache_dtype_skip_layers) keeps listed "
             "layers at the model's dtype. Older releases have no per-layer skip."]
    quant = sorted({s for s in a if s is not None})
    skip = [str(i) for i, s in enumerate(a) if s is None]
    out: dict[str, Any] = {"expressible": False, "exact": False, "kv_cache_dtype": None,
                           "kv_cache_dtype_skip_layers": [], "calculate_kv_scales": False, "python": None,
                           "cli": None, "notes": notes}
    if not quant:
        out.update(expressible=True, exact=True, kv_cache_dtype="auto",
                   python=f'LLM(model="{model}", kv_cache_dtype="auto")',
                   cli=f"vllm serve {model} --kv-cache-dtype auto")
        notes.append("every layer in full precision: no KV-cache quantization")
        return out
    if len(quant) > 1:
        notes.append(f"not expressible: the assignment uses {len(quant)} quantized schemes ({', '.join(quant)}) "
                     "on different layers")
        return out
    sch = Scheme.parse(quant[0])
    (kd, kdyn), (vd, vdyn) = _vllm_dtype(sch.k), _vllm_dtype(sch.v)
    if kd is None or vd is None or kd != vd or kdyn != vdyn:
        notes.append(f"not expressible: vLLM's quantized KV dtypes that kvgeom simulates are fp8_e4m3, fp8_e5m2 "
                     f"and {{int8,fp8,int4}}_per_token_head (one dtype for K and V); {quant[0]} is not one of them. "
                     "nvfp4 and turboquant_* are not simulated by kvgeom")
        return out
    if channels:
        notes.append("not expressible: vLLM cannot keep individual key channels in full precision")
        return out
    if kd == "auto":
        notes.append(f"{quant[0]} is a cast only: 'auto' keeps the model's dtype")
    out.update(expressible=True, exact=True, kv_cache_dtype=kd, kv_cache_dtype_skip_layers=skip,
               calculate_kv_scales=kdyn)
    args = [f'kv_cache_dtype="{kd}"']
    cli = [f"vllm serve {model}", f"--kv-cache-dtype {kd}"]
    if skip:
        args.append(f"kv_cache_dtype_skip_layers={skip!r}")
        cli.append("--kv-cache-dtype-skip-layers " + " ".join(skip))
    if kdyn:
        args.append("calculate_kv_scales=True")
        cli.append("--calculate-kv-scales")
        notes.append("@amax ↔ calculate_kv_scales: kvgeom models vLLM's scales amax/200 (K) and amax/100 (V) "
                     "measured on the first prefill")
    elif kd.startswith("fp8"):
        notes.append("without calculate_kv_scales or a calibrated checkpoint, vLLM's fp8 scales are 1.0, as in "
                     "kvgeom's fp8 schemes without @amax; a checkpoint with calibrated k/v scales behaves "
                     "differently")
    out["python"] = f'LLM(model="{model}", ' + ", ".join(args) + ")"
    out["cli"] = " ".join(cli)
    return out


def _llama_type(base: KVFormat) -> str | None:
    cache_type = base.llama_cpp()
    return None if cache_type is None else cache_type.cache_type


def _llama(a: Assignment, channels: tuple, d_head: int, model: str) -> dict[str, Any]:
    notes = ["llama.cpp's --cache-type-k/-ctk and --cache-type-v/-ctv are global: one type for all layers, "
             "chosen independently for K and V (f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1); it cannot "
             "keep single layers or channels in f16"]
    out: dict[str, Any] = {"expressible": False, "exact": False, "cache_type_k": None, "cache_type_v": None, "env": {},
                           "cli": None, "notes": notes}
    distinct = sorted({s or "none" for s in a})
    if len(distinct) > 1:
        notes.append(f"not expressible: the assignment differs across layers ({', '.join(distinct)}); the "
                     "uniform alternatives are the unmitigated scheme or f16 everywhere")
        return out
    if channels:
        notes.append("not expressible: protected channels")
        return out
    sch = Scheme.parse(distinct[0])
    kt, vt = _llama_type(sch.k), _llama_type(sch.v)
    if kt is None or vt is None:
        notes.append(f"not expressible: {distinct[0]} is not a llama.cpp cache type")
        return out
    types = {"k": sch.k.llama_cpp(), "v": sch.v.llama_cpp()}
    rot = {r: t.rotated for r, t in types.items() if t is not None and t.rotated is not None}
    if len(set(rot.values())) > 1:
        notes.append("not expressible: llama.cpp rotates every quantized cache (K and V) or none "
                     "(LLAMA_ATTN_ROT_DISABLE), not one of them")
        return out
    env: dict[str, str] = {}
    if rot and not any(rot.values()):
        env["LLAMA_ATTN_ROT_DISABLE"] = "1"
        notes.append("recent llama.cpp (PR #21038, 2026) Hadamard-rotates quantized K/V by default when head_dim "
                     "is a multiple of 64; LLAMA_ATTN_ROT_DISABLE=1 gives the unrotated types measured here "
                     "(older builds never rotate)")
    elif rot:
        notes.append("+rot needs a llama.cpp build with PR #21038 (rotation is then on by default for quantized "
                     "caches)" + ("" if d_head % 64 == 0 else f"; d_head {d_head} is not a multiple of 64, so "
                                  "llama.cpp will not rotate"))
    if vt not in ("f16", "bf16", "f32"):
        notes.append("a quantized V cache needs flash attention in llama.cpp (-fa on)")
    out.update(expressible=True, exact=True, cache_type_k=kt, cache_type_v=vt, env=env)
    prefix = " ".join(f"{k}={v}" for k, v in env.items())
    fa = " -fa on" if vt not in ("f16", "bf16", "f32") else ""
    cmd = f"llama-server -m {model} --cache-type-k {kt} --cache-type-v {vt}{fa}"
    out["cli"] = (prefix + " " if prefix else "") + cmd
    return out


def _hf_config(sch: Scheme) -> tuple[dict[str, Any] | None, list[str]]:
    if sch.k != sch.v:
        return None, [f"not expressible: HF's QuantizedCache quantizes K and V alike; {sch} differs"]
    cache = sch.k.hf()
    return cache.config, list(cache.notes)


def _hf(a: Assignment, channels: tuple, n_layers: int) -> dict[str, Any]:
    notes = ["HF transformers: generate(..., cache_implementation=\"quantized\", cache_config={...}) builds one "
             "QuantizedCache whose layers all share the config (transformers 4.x also accepted a "
             "QuantizedCacheConfig object); per-layer exceptions need a hand-built Cache(layers=[...]) passed as "
             "past_key_values (custom code, not a config). Like kvgeom's cache mode with prefill='full', "
             "each call attends to its own new tokens in full precision"]
    out: dict[str, Any] = {"expressible": False, "exact": False, "cache_implementation": None, "cache_config": None,
                           "python": None, "custom_code": None, "notes": notes}
    quant = sorted({s for s in a if s is not None})
    if not quant:
        out.update(expressible=True, exact=True, python="model.generate(**inputs)  # default DynamicCache")
        notes.append("every layer in full precision: no quantized cache")
        return out
    if channels:
        notes.append("not expressible: HF cannot keep individual key channels in full precision")
        return out
    if len(quant) > 1:
        notes.append(f"not expressible: the assignment uses {len(quant)} quantized schemes on different layers")
        return out
    cfg, extra = _hf_config(Scheme.parse(quant[0]))
    notes.extend(extra)
    if cfg is None:
        return out
    full = [i for i, s in enumerate(a) if s is None]
    out.update(cache_implementation="quantized", cache_config=cfg)
    if not full:
        out.update(expressible=True,
                   python=f'model.generate(**inputs, cache_implementation="quantized", cache_config={cfg!r})')
        return out
    notes.append(f"not expressible as a config: layers {full} must stay full precision; custom_code builds the "
                 "cache by hand (untested by kvgeom)")
    layer_cls = {"quanto": "QuantoQuantizedLayer", "hqq": "HQQQuantizedLayer", "fp8": "Fp8QuantizedLayer"}[
        cfg["backend"]]
    kwargs = ", ".join(f"{k}={v!r}" for k, v in cfg.items() if k != "backend")
    out["custom_code"] = (
        f"from transformers.cache_utils import Cache, DynamicLayer, {layer_cls}\n"
        f"keep = {set(full)!r}\n"
        f"cache = Cache(layers=[DynamicLayer() if i in keep else {layer_cls}({kwargs}) for i in range({n_layers})])\n"
        "model.generate(**inputs, past_key_values=cache)")
    return out


def export_settings(
    assignment: Any,
    n_layers: int | None = None,
    *,
    model: str = "MODEL",
    d_head: int = DEFAULT_D_HEAD,
    n_kv_heads: int = DEFAULT_N_KV_HEADS,
) -> dict[str, Any]:
    """Serving settings for an assignment, per stack, each with ``expressible`` and ``notes``.

    ``assignment``: per-layer schemes (``None`` = full precision), a :class:`Candidate`, a :class:`SearchResult`,
    a QuantPlan or a single scheme (these two need ``n_layers``). Returns ``{"assignment", "n_layers",
    "bits_per_element", "vllm", "llama_cpp", "hf"}`` (JSON-friendly):

    * ``vllm``: ``kv_cache_dtype`` (auto / fp8_e4m3 / fp8_e5m2), ``kv_cache_dtype_skip_layers`` (full-precision
      layers), ``calculate_kv_scales`` (``@amax``), ``python`` and ``cli`` lines;
    * ``llama_cpp``: ``cache_type_k`` / ``cache_type_v`` (global), ``env`` (rotation switch), ``cli``;
    * ``hf``: ``cache_implementation="quantized"`` and ``cache_config`` (backend, nbits, axis_key, axis_value,
      q_group_size, residual_length), ``python``, or ``custom_code`` for per-layer exceptions.
    """
    a, channels = _as_assignment(assignment, n_layers)
    n = len(a)
    return {"assignment": list(a), "n_layers": n,
            "protect_channels": {str(lay): [list(p) for p in pairs] for lay, pairs in channels},
            "bits_per_element": assignment_bits(a, protect_channels=channels, d_head=d_head, n_kv_heads=n_kv_heads),
            "vllm": _vllm(a, channels, model), "llama_cpp": _llama(a, channels, d_head, model),
            "hf": _hf(a, channels, n)}
