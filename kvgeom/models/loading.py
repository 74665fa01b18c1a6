"""Loading: registered names, local GGUF files and HF directories, hub names; placement and the bridge.

Checked before any work (:mod:`kvgeom.models.files`): a local GGUF's header and size (a truncated file is named
a partial download, ``tests/models/test_model_files.py``), and an existing path that is no model is named as
such, with what MODEL may be.

Hub names go through the one hub check, :func:`kvgeom.hub.hub_problem` (offline switches parsed as
``huggingface_hub`` does; a quick HEAD request), so an offline machine gets one clear :class:`ModelLoadError`
in seconds (``tests/models/test_models.py::test_hub_name_offline_is_one_clear_error``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kvgeom.hub import hub_problem
from kvgeom.registry import DEFAULT_MODEL, REGISTRY, cache_dir, ensure_model_file
from kvgeom.sites import SITES

from .attention import resolve_attention, use_attention
from .fast_path import use_fast_components
from .files import ACCEPTED_MODELS, check_gguf, not_a_model
from .model import KVModel, ModelFacts, ModelLoadError

#: Version of the on-disk conversion cache layout; bump to invalidate old conversions.
_CONVERSION_VERSION = 1


# ---- loading -----------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    return dev


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


@contextmanager
def _quiet():
    """Silence transformers' warnings and progress bars for the duration (restored after)."""
    from transformers.utils import logging as hf_logging

    prev = logging.getLogger("transformers").level
    bars = hf_logging.is_progress_bar_enabled()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.getLogger("transformers").setLevel(prev)
            if bars:
                hf_logging.enable_progress_bar()


def _converted_dir(gguf: Path, sha256: str | None) -> Path:
    key = (sha256 or f"{gguf.stat().st_size}-{gguf.stat().st_mtime_ns}")[:16]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}-v{_CONVERSION_VERSION}"


def _convert_gguf(gguf: Path, sha256: str | None) -> Path:
    """De-quantize a GGUF once into an fp32 HF checkpoint (+ tokenizer) in the cache; return its dir.

    Loading a GGUF through ``transformers`` de-quantizes every tensor (~35 s for the default model on
    2 CPU cores) and converts the tokenizer (~15 s); the converted checkpoint reloads in well under a
    second. The directory is written under a temporary name and renamed when complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _converted_dir(gguf, sha256)
    if (out / "kvgeom-conversion.json").is_file():
        return out
    if sha256 is None:  # a user's file (a registered one is hash-verified): header and size before any work
        check_gguf(gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        with _quiet():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            hf = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        # The weights are plain fp32 now; drop the GGUF quantization marker so they save as such.
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.hf_quantizer = None
        hf.is_quantized = False
        hf.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "kvgeom-conversion.json").write_text(
            json.dumps({"source": str(gguf), "sha256": sha256, "dtype": "float32"})
        )
        if out.exists():  # a concurrent conversion finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _load_hf(path_or_name: str, dtype: torch.dtype, *, local: bool, placement: dict | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"local_files_only": True} if local else {}
    with _quiet():
        tok = AutoTokenizer.from_pretrained(path_or_name, **kw)
        hf = AutoModelForCausalLM.from_pretrained(path_or_name, dtype=dtype, **kw, **(placement or {}))
    return hf, tok


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    attention: str = "auto",
) -> KVModel:
    """Load a model and wrap it for K/V analysis.

    Args:
        name_or_path: registered name (default ``qwen2.5-coder-0.5b-instruct``), local ``.gguf`` file,
            local HF model directory, or hub name.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: ``None`` means float32 on CPU and bfloat16 on GPU.
        chat_template: a Jinja chat template overriding the tokenizer's (needed for base models).
        system_prompt: optional system message put before every user prompt (``None``: the
            template's own default, e.g. Qwen's "You are Qwen, created by Alibaba Cloud...").
        device_map, max_memory: models larger than one GPU: HF/accelerate placement (``device_map="auto"``,
            optionally with ``max_memory={0: "20GiB", "cpu": "200GiB"}``); ``device`` is then ignored and
            inputs go to the device of the embedding layer.
        attention: ``"auto"`` (fused ``scaled_dot_product_attention`` on CUDA, the bridge's eager attention on
            the CPU), ``"sdpa"`` or ``"eager"``: :mod:`kvgeom.models.attention`.
    """
    resolve_attention(attention, "cpu")  # a bad name fails before anything is loaded
    placement = None
    if device_map is not None:
        placement = {"device_map": device_map, **({"max_memory": max_memory} if max_memory else {})}
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    name = str(name_or_path)
    info: dict[str, Any] = {}
    if name in REGISTRY:
        gguf = ensure_model_file(name)
        src = _convert_gguf(gguf, REGISTRY[name].sha256)
        info["gguf"] = str(gguf)
        hf, tok = _load_hf(str(src), dt, local=True, placement=placement)
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {path} does not exist" if not path.exists() else not_a_model(name))
            src = _convert_gguf(path.resolve(), None)
            info["gguf"] = str(path.resolve())
            hf, tok = _load_hf(str(src), dt, local=True, placement=placement)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} is a directory but has no config.json: not a HF model directory; "
                                     f"accepted as MODEL: {ACCEPTED_MODELS}")
            src = path.resolve()
            hf, tok = _load_hf(str(src), dt, local=True, placement=placement)
        elif path.exists():
            raise ModelLoadError(not_a_model(name))
        elif name.startswith((".", "/", "~")) or os.sep in name and path.suffix:
            raise ModelLoadError(f"{name!r} does not exist; accepted as MODEL: {ACCEPTED_MODELS}")
        else:
            src = name
            problem = hub_problem()  # switched off or unreachable: only the local HF cache can serve it
            try:
                hf, tok = _load_hf(name, dt, local=problem is not None, placement=placement)
            except (OSError, ValueError) as err:
                why = problem or "no such repository, or it is gated"
                raise ModelLoadError(
                    f"could not load {name!r}: it is not a registered model ({', '.join(REGISTRY)}), "
                    f"not a local .gguf file or model directory, and the Hugging Face hub could not "
                    f"provide it ({why}; not in the local HF cache either). Pass a local path, or a "
                    "registered name."
                ) from err
    return wrap_hf_model(hf, tok, name=name, source=str(src), device=dev, dtype=dt,
                         chat_template=chat_template, system_prompt=system_prompt, info=info)


def _bridge_tokenizer(tok: Any, source: str) -> tuple[str, Any]:
    """A directory holding the tokenizer, and a fresh copy of it loaded from there.

    TransformerLens reloads the tokenizer by its ``name_or_path`` (and mutates the object it is given),
    so the bridge gets its own copy whose ``name_or_path`` is a directory that really holds it.
    """
    from transformers import AutoTokenizer

    if Path(source).is_dir() and any(Path(source).glob("tokenizer*")):
        d = source
    else:
        d = tempfile.mkdtemp(prefix="kvgeom-tok-")
        tok.save_pretrained(d)
    with _quiet():
        return d, AutoTokenizer.from_pretrained(d, local_files_only=True)


@contextmanager
def _hidden_device_map(hf: Any, hide: bool) -> Iterator[None]:
    """Hide a GPU + CPU/disk ``hf_device_map`` from the bridge while it boots, then put it back.

    TransformerLens 4.3 rejects such maps "not because they're known to be broken but because CPU/disk offload
    has only been verified on CPU-only hardware" (its docstring); its components materialize offloaded weights
    per call through accelerate's hooks, which stay attached. kvgeom's GPU test checks that a GPU + CPU split
    gives the single-device model's greedy tokens, with and without quantization plans.
    """
    if not hide:
        yield
        return
    saved = hf.hf_device_map
    del hf.hf_device_map
    try:
        yield
    finally:
        hf.hf_device_map = saved


def wrap_hf_model(
    hf: Any,
    tokenizer: Any,
    *,
    name: str = "custom",
    source: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    info: dict | None = None,
    attention: str = "auto",
) -> KVModel:
    """Wrap an already-built HF causal LM (e.g. a tiny random model) in a TransformerBridge.

    ``attention``: as in :func:`load_model` (:func:`kvgeom.models.attention.use_attention`)."""
    from transformer_lens.model_bridge import TransformerBridge

    resolve_attention(attention, "cpu")  # a bad name fails before the bridge is built
    dt = dtype or next(hf.parameters()).dtype
    dmap = getattr(hf, "hf_device_map", None) or {}
    targets = {str(v) for v in dmap.values()}
    mixed = bool(targets & {"cpu", "disk"}) and bool(targets - {"cpu", "disk"})
    if dmap and len(targets) > 1:
        # dispatched by accelerate across devices: inputs go where the embedding lives; nothing is moved
        dev = hf.get_input_embeddings().weight.device
        if dev.type == "meta":  # embedding offloaded: accelerate brings it to the execution device
            dev = resolve_device("auto")
        hf = hf.eval()
    else:
        dev = resolve_device(device)
        hf = hf.to(device=dev, dtype=dt).eval()
    facts = ModelFacts.from_config(hf.config)
    tok_dir, bridge_tok = _bridge_tokenizer(tokenizer, source or "")
    with _quiet(), _hidden_device_map(hf, mixed):
        try:
            bridge = TransformerBridge.boot_transformers(
                tok_dir, hf_model=hf, tokenizer=bridge_tok, device=dev if (mixed or not dmap) else None)
        except Exception as err:  # the adapter factory raises assorted types for unknown architectures
            raise ModelLoadError(
                f"TransformerLens cannot bridge architecture {facts.architecture} (model_type "
                f"{facts.model_type!r}): {type(err).__name__}: {err}. See docs/architectures.md."
            ) from err
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    model = KVModel(bridge=bridge, tokenizer=tokenizer, facts=facts, name=name, source=source or name,
                    device=dev, dtype=dt, chat_template=chat_template, system_prompt=system_prompt,
                    info=dict(info or {}))
    model.sites_available = _probe_sites(model)
    model.info["attention"] = use_attention(model, attention)
    model.info["fast_components"] = use_fast_components(model)
    return model


def _probe_sites(model: KVModel) -> tuple[str, ...]:
    """Which kvgeom sites the bridge really fires for this architecture (a 2-token forward).

    TransformerLens 4.3 registers ``hook_rot_k`` on fused-QKV attention (Phi-3) but never calls it;
    kvgeom refuses hooks on a site that would silently never run.
    """
    fired: set[str] = set()
    names = {pattern.format(layer=0): site for site, pattern in SITES.items()}

    def mark(x: torch.Tensor, hook: Any = None, *, _site: str) -> torch.Tensor:
        fired.add(_site)
        return x

    ids = torch.full((1, 2), model.pad_token_id, dtype=torch.long, device=model.device)
    hooks = [(n, lambda x, hook=None, _s=s: mark(x, hook, _site=_s)) for n, s in names.items()
             if n in model.bridge.hook_dict]
    with torch.inference_mode(), model.bridge.hooks(fwd_hooks=hooks, reset_hooks_end=True):
        model.bridge(ids, return_type="logits")
    return tuple(s for s in SITES if s in fired)
