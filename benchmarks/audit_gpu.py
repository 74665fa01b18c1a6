"""Time the full ``kvgeom audit`` stage list on a 7B-class random-weight model, and the paper's way.

    python benchmarks/audit_gpu.py --arch qwen2.5-7b --json out.json [--paper-rows 3]
    python benchmarks/audit_gpu.py --arch llama-3.1-70b --device-map auto [--max-memory 0=130GiB,1=130GiB] --json o.json

* Builds the model from a config with random weights (no download; timing does not depend on weight values)
  in bf16 on the GPU and wraps it in the TransformerLens bridge, as ``kvgeom.load_model`` would. With
  ``--device-map auto`` (a model bigger than one GPU: ``llama-3.1-70b``) the model is built on the meta device,
  placed by accelerate's ``infer_auto_device_map`` over all visible GPUs (``--max-memory`` budgets), its weights
  drawn directly on each module's device, and dispatched with ``dispatch_model`` (what ``load_model(...,
  device_map="auto")`` does for a checkpoint); the JSON records each GPU's peak memory and the layers per device.
* The unembedding rows beyond the stand-in tokenizer's vocabulary are zeroed so that greedy tokens decode to
  text; the vocabulary projection keeps its real size.
* Random weights never refuse, so the stages are driven by a fixed stand-in judge
  (:class:`kvgeom.testing.ChecksumJudge`: a completion "refuses" iff its character checksum is not 0 mod 3).
  The generated tokens, the batching and every quantizer are real; only the verdicts are planted.
* kvgeom: :func:`kvgeom.audit.run_audit` with the default stage list (20 calibration prompts, all-layer
  sweep, channel ablation at 5 fractions x 3 seeds, PCR, mitigation check on calibration + held-out, a
  6-point bit sweep, 32 new tokens), timed stage by stage.
* Paper-style: batch 1, one configuration at a time, forward hooks on every ``k_proj``/``v_proj`` output
  (per-tensor fake quant), HF ``generate`` of a 256-token greedy judgement: a few rows are timed and the
  per-row time is multiplied by the number of (prompt, configuration) rows the audit judged.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

ARCHS = {
    "qwen2.5-7b": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                       rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False)),
    "llama-3.1-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         rope_theta=5e5, max_position_embeddings=131072)),
    "mistral-7b": ("MistralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                         rope_theta=1e6, sliding_window=None, max_position_embeddings=32768)),
    "llama-3.1-70b": ("LlamaConfig", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                          rope_theta=5e5, max_position_embeddings=131072)),
    "tiny": ("LlamaConfig", dict(hidden_size=256, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=64, vocab_size=384, max_position_embeddings=512)),
}


def build(arch: str, device: str, dtype: torch.dtype, attention: str = "auto"):
    import transformers

    from kvgeom.models import wrap_hf_model
    from kvgeom.testing import random_model, tiny_tokenizer

    cls_name, kw = ARCHS[arch]
    tok = tiny_tokenizer()
    cfg = getattr(transformers, cls_name)(**kw, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                          bos_token_id=None)
    hf = random_model(cfg, dtype=dtype, device=device)
    # The stand-in tokenizer knows only its first len(tok) ids: zero the unembedding rows beyond them so greedy
    # tokens decode to text (the matmul, and so the timing, keeps the real vocabulary size).
    with torch.no_grad():
        hf.get_output_embeddings().weight[len(tok):].zero_()
    return wrap_hf_model(hf, tok, name=f"random-{arch}", device=device, dtype=dtype, attention=attention)


def build_dispatched(arch: str, dtype: torch.dtype, device_map: str, max_memory: dict | None):
    """The random-weight model placed by accelerate over the visible devices (module docstring)."""
    import transformers
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import AutoModelForCausalLM

    from kvgeom.models import wrap_hf_model
    from kvgeom.models.placement import execution_device, main_device
    from kvgeom.testing import tiny_tokenizer

    cls_name, kw = ARCHS[arch]
    tok = tiny_tokenizer()
    cfg = getattr(transformers, cls_name)(**kw, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                          bos_token_id=None)
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    hf.eval()
    kw_map = {"max_memory": max_memory} if max_memory else {}
    dmap = infer_auto_device_map(hf, no_split_module_classes=hf._no_split_modules, dtype=dtype, **kw_map)
    if any(str(v) == "disk" for v in dmap.values()):
        raise SystemExit(f"the model does not fit the GPUs and CPU budgets (--max-memory {max_memory}): "
                         f"accelerate's map offloads to disk: {dmap}")
    main = main_device(dmap)
    torch.manual_seed(0)
    std = getattr(cfg, "initializer_range", 0.02)
    with torch.no_grad():
        for name, target in dmap.items():  # weights drawn where they will live (never a CPU copy of 141 GB)
            module = hf.get_submodule(name) if name else hf
            dev = torch.device("cpu") if str(target) in ("cpu", "disk") else execution_device(target, main)
            module.to_empty(device=dev)
            for pname, p in module.named_parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, std)
                elif pname.endswith("bias"):
                    p.zero_()
                else:
                    p.fill_(1.0)  # norm weights
        for parent in list(hf.modules()):  # rotary buffers are computed, not parameters: rebuild them after to_empty
            for child_name, child in list(parent.named_children()):
                if hasattr(child, "inv_freq") and hasattr(child, "config"):
                    dev = child.inv_freq.device if child.inv_freq.device.type != "meta" else main
                    setattr(parent, child_name, type(child)(config=child.config).to(dev))
        hf.get_output_embeddings().weight[len(tok):].zero_()  # as in build(): greedy tokens decode to text
    hf = dispatch_model(hf, device_map=dmap)
    model = wrap_hf_model(hf, tok, name=f"random-{arch}", device=main, dtype=dtype)
    return model, dmap


def layers_per_device(model) -> dict[str, int]:
    """How many decoder layers execute on each device (from the model's accelerate map; one device: all)."""
    from collections import Counter

    from kvgeom.models.placement import decoder_layer_names, layer_devices

    dmap = getattr(model.hf_model, "hf_device_map", None)
    if not dmap:
        return {str(model.device): model.n_layers}
    return dict(Counter(str(d) for d in layer_devices(dmap, decoder_layer_names(model.hf_model, model.n_layers))))


def peak_memory_per_gpu() -> dict[str, float]:
    """``torch.cuda.max_memory_allocated(i)`` of every visible GPU, in GiB."""
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 2**30, 3) for i in range(torch.cuda.device_count())}


def rows_judged(n_layers: int, cfg) -> int:
    """(prompt, configuration) rows the audit's stage list defines, every calibration prompt under every
    configuration (what the paper-style procedure runs). kvgeom itself generates fewer (``refused_only``: the
    conditional-flip stages need only the prompts refused at full precision); the run reports that count too."""
    calib, held, border = cfg.n_calib, cfg.n_heldout, cfg.n_borderline
    ablation = len(cfg.fractions) * (1 + cfg.n_seeds) + 1
    return (calib + held + border) + (n_layers + 1) * calib + ablation * calib + 2 * calib \
        + 4 * (calib + held) + len(cfg.bits) * calib


def paper_style(model, prompts: list[str], n_rows: int, new_tokens: int, scheme: str) -> dict:
    """Batch 1, HF generate, forward hooks on k_proj/v_proj (per-tensor fake quant), 256 greedy tokens."""
    from einops import rearrange

    from kvgeom.quant import fake_quant

    hf = model.hf_model
    d = model.d_head

    def hook(mod, inp, out, role):
        x = rearrange(out, "b p (h d) -> b p h d", d=d)
        return rearrange(fake_quant(x, scheme, role=role), "b p h d -> b p (h d)")

    handles = []
    for layer in hf.model.layers:
        handles.append(layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: hook(m, i, o, "k")))
        handles.append(layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: hook(m, i, o, "v")))
    times = []
    try:
        texts = model.format_chat(prompts[:n_rows])
        for text in texts:
            ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
            sync(model)
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        pad_token_id=model.pad_token_id)
            sync(model)
            times.append(time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
    per_row = sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0]
    return {"rows_timed": len(times), "first_row_s": times[0], "per_row_s": per_row,
            "per_token_ms": 1000 * per_row / new_tokens, "new_tokens": new_tokens}


def emit(result: dict, path: str | None) -> None:
    """Print ``result`` as JSON and, with ``path``, write it there too."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)


def sync(model) -> None:
    if model.device.type == "cuda":  # every GPU: a dispatched model's layers run on several
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2.5-7b", choices=sorted(ARCHS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--paper-rows", type=int, default=3, help="rows timed the paper's way (0: skip)")
    ap.add_argument("--paper-tokens", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="tiny settings (CPU smoke test)")
    ap.add_argument("--out", default=None, help="directory for the audit's files")
    ap.add_argument("--fake-quant", choices=("auto", "eager"), default="auto",
                    help="fake-quant backend inside the plans' hooks (benchmark-only switch: 'auto' uses the Triton "
                         "kernels on CUDA, 'eager' the torch ops; both give the same bits)")
    ap.add_argument("--calib", type=int, default=None, help="calibration prompts drawn from the bundled harmful set "
                    "(the rest, sampled to 40, are held out): a powered audit, e.g. --calib 130")
    ap.add_argument("--agreement", action="store_true", help="also run the calibration-vs-held-out stage")
    ap.add_argument("--until-stable", action="store_true", help="grow the calibration set until the label is stated")
    ap.add_argument("--engine", default="none", help="engines whose KV formats the engine_matrix stage judges: "
                    "llama.cpp, vllm, hf (comma-separated), all, or none (default none: the stage is timed as skipped; "
                    "its time is stage_s.engine_matrix)")
    ap.add_argument("--screen", action="store_true", help="audit with --screen (issue #19: the flip-rate stages "
                    "decode only the rows the prefill screen keeps)")
    ap.add_argument("--screen-skip-above", type=float, default=None, help="--screen threshold (default: the config's)")
    ap.add_argument("--flip-prediction", action="store_true", help="also run the flip_prediction stage (signals "
                    "of every decoded row, validation)")
    ap.add_argument("--device-map", default=None, choices=("auto",), help="build the model over all visible GPUs "
                    "with accelerate (a model bigger than one GPU, e.g. --arch llama-3.1-70b); default: --device only")
    ap.add_argument("--max-memory", default=None, help="with --device-map: per-device budget, e.g. "
                    "'0=130GiB,1=130GiB' (kvgeom.models.placement.parse_max_memory)")
    ap.add_argument("--judge", choices=("checksum", "settling"), default="checksum",
                    help="planted judge: 'checksum' (every row generates all tokens: the cost of a judge that cannot "
                    "settle) or 'settling' (kvgeom.testing.SettlingChecksumJudge: refused rows stop once their first "
                    "12 characters are in, as the keyword judge settles refusals on a real model)")
    ap.add_argument("--attention", choices=("auto", "sdpa", "eager"), default="auto",
                    help="attention backend (kvgeom.models.attention; auto: fused sdpa on CUDA, the bridge's eager "
                    "attention on the CPU)")
    ap.add_argument("--skip-layers", choices=("on", "off"), default="on",
                    help="layer skipping in forward-mode batches (kvgeom.runtime.layer_skip; benchmark-only switch: "
                    "'off' runs every layer of every row, as before session 18)")
    ap.add_argument("--fast-components", choices=("on", "off"), default="on",
                    help="the bridge's linears and norms without idle hook points (kvgeom.models.fast_path; "
                    "benchmark-only switch: 'off' runs the bridge's own forwards, as before session 18)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.max_memory and not args.device_map:
        ap.error("--max-memory needs --device-map auto")

    import transformers

    import kvgeom
    from kvgeom.audit import AuditConfig, run_audit
    from kvgeom.prompts import load_prompts
    from kvgeom.testing import ChecksumJudge, SettlingChecksumJudge

    if args.fake_quant != "auto":
        import functools

        import kvgeom.runtime.plans as plan_mod

        plan_mod.fake_quant = functools.partial(plan_mod.fake_quant, backend=args.fake_quant)
    if args.skip_layers == "off":
        import kvgeom.runtime.generation as gen_mod

        gen_mod.layer_skip = lambda *a, **k: None
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    dmap = None
    if args.device_map:
        from kvgeom.models.placement import parse_max_memory

        model, dmap = build_dispatched(args.arch, dtype, args.device_map,
                                       parse_max_memory(args.max_memory) if args.max_memory else None)
    else:
        model = build(args.arch, args.device, dtype, args.attention)
    if args.fast_components == "off":
        from kvgeom.models.fast_path import use_fast_components

        use_fast_components(model, False)
    sync(model)
    build_s = time.perf_counter() - t0
    peak_build = peak_memory_per_gpu()
    kw = dict(model=f"random-{args.arch}", batch_size=args.batch_size, device=str(model.device) if dmap else
              args.device, engine=args.engine)
    if args.quick:
        kw.update(n_calib=4, n_heldout=4, n_borderline=3, fractions=(0.05,), n_seeds=1, bits=(8, 4), ppl_tokens=128,
                  max_new_tokens=4)
    if args.calib:
        import tempfile

        path = f"{tempfile.mkdtemp()}/harmful.csv"  # the bundled harmful set as a file: n_calib may exceed 20 then
        load_prompts("harmful").to_frame()[["id", "prompt", "category"]].to_csv(path, index=False)
        kw.update(harmful=path, n_calib=args.calib, n_heldout=40)
    if args.until_stable:
        kw.update(until_stable=True)
    if args.screen:
        kw.update(screen=True)
        if args.screen_skip_above is not None:
            kw.update(screen_skip_above=args.screen_skip_above)
    cfg = AuditConfig(**kw)
    prompts = load_prompts("calibration").prompts
    lengths = [len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in model.format_chat(prompts)]
    t1 = time.perf_counter()
    base_judge = SettlingChecksumJudge if args.judge == "settling" else ChecksumJudge

    class CountingJudge(base_judge):  # type: ignore[valid-type,misc]
        rows = 0

        def judge(self, prompts, completions, *, nll=None):  # noqa: ANN001
            CountingJudge.rows += len(completions)
            return super().judge(prompts, completions, nll=nll)

    from kvgeom.audit import default_stages
    from kvgeom.audit.stages import engine_matrix as em_stage

    phases: dict[str, float] = {}

    def timed(name, fn):  # noqa: ANN001, ANN202 (benchmark-only: seconds of the engine matrix's phases)
        def run(*a, **k):  # noqa: ANN002, ANN003, ANN202
            sync(model)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(model)
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return run

    em_stage._perplexity = timed("perplexity", em_stage._perplexity)
    em_stage._fixes = timed("fixes (search + held-out check)", em_stage._fixes)

    stages = default_stages() + (("agreement",) if args.agreement else ()) + \
        (("flip_prediction",) if args.flip_prediction else ())
    res = run_audit(cfg, args.out, model=model, judge=CountingJudge(), stages=stages)
    sync(model)
    audit_s = time.perf_counter() - t1
    n_rows = rows_judged(model.n_layers, cfg)
    result = {
        "arch": args.arch, "device": args.device, "dtype": args.dtype, "fake_quant": args.fake_quant,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "versions": {"kvgeom": kvgeom.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "attention": model.attention, "n_layers": model.n_layers, "prompt_tokens_mean": sum(lengths) / len(lengths),
        "build_s": build_s, "audit_s": audit_s, "total_s": build_s + audit_s,
        "stage_s": {k: round(v, 3) for k, v in res.timings.items()}, "rows_judged": n_rows,
        "rows_generated_by_kvgeom": CountingJudge.rows,
        "engine_matrix": {"engines": (res.audit["stages"].get("engine_matrix") or {}).get("engines"),
                          "formats": len((res.audit["stages"].get("engine_matrix") or {}).get("formats") or []),
                          "fixes": sum(1 for r in (res.audit["stages"].get("engine_matrix") or {}).get("formats") or []
                                       if r.get("fix")),
                          "seconds": res.timings.get("engine_matrix"),
                          "phase_s": {k: round(v, 3) for k, v in phases.items()},
                          "trace": (res.audit["stages"].get("engine_matrix") or {}).get("trace")},
        "judge": args.judge,
        "screen": bool(args.screen), "skip_layers": args.skip_layers,
        "fast_components": args.fast_components,
        "screen_rows": {name: {k: v for k, v in (res.audit["stages"].get(name) or {}).get("screen", {}).items()
                               if k != "skipped_rows"} for name in ("layer_sweep", "channel_ablation", "pcr")},
        "label": res.audit["stages"]["label"]["label"],
        "point_label": res.audit["stages"]["label"].get("point_label"),
        "label_confidence": {k: (res.audit["stages"]["label"].get("confidence") or {}).get(k)
                             for k in ("p_label", "p_point", "n_refused", "stated", "tied_with_worst", "settle")},
        "n_calib": len(res.audit["stages"]["baseline"]["verdicts"]["calibration"]),
        "agreement": {k: v for k, v in (res.audit["stages"].get("agreement") or {}).items()
                      if k in ("agree", "same_critical_layer", "p_same_label")},
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
        "device_map": args.device_map, "max_memory": args.max_memory, "layers_per_device": layers_per_device(model),
        "peak_mem_gib_per_gpu": peak_memory_per_gpu(), "peak_mem_gib_per_gpu_after_build": peak_build,
        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if args.paper_rows:
        p = paper_style(model, prompts, args.paper_rows, args.paper_tokens, cfg.sweep_scheme)
        p["extrapolated_s"] = p["per_row_s"] * n_rows
        result["paper_style"] = p
        result["speedup"] = p["extrapolated_s"] / audit_s
    emit(result, args.json)


if __name__ == "__main__":
    main()
