"""``kvgeom validate MODEL.gguf --engine llama.cpp``: the subcommand's options and its terminal summary.

:func:`add_parser` adds the subcommand to ``kvgeom``'s parser (``kvgeom.cli.build_parser``);
:func:`validation_summary` is the text it prints. Everything it does is :func:`kvgeom.validate.validate_engine`.
Proved by ``tests/validate/test_validate_errors.py`` (bad input: one error line, exit 2, before any work) and
``tests/validate/test_validate_llamacpp.py`` (the command end to end on a tiny GGUF).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from kvgeom.judges import add_judge_argument
from kvgeom.quant.query import QUERY_MODES

from .run import CEILING, Validation, validate_engine
from .types import DEFAULT_FORMATS

__all__ = ["add_parser", "validation_summary"]


def _rate(rec: dict, prefix: str) -> str:
    rate = rec.get(f"{prefix}rate")
    if rate is None or rate != rate:
        return "undefined"
    low, high, k, n = (rec[f"{prefix}{x}"] for x in ("low", "high", "k", "n"))
    return f"{rate:.2f} [{low:.2f}, {high:.2f}] ({k}/{n})"


def validation_summary(v: Validation) -> str:
    """The terminal summary: one line per comparison (refusal and flip rates of both sides, verdict agreement,
    identical tokens, first divergence), then what was compared."""
    info = v.info
    head = (f"kvgeom validate: {info['model']['name']} through {info['engine']} "
            f"(llama-cpp-python {info['engine_info'].get('llama_cpp_python', '?')}), {info['prompts']['n']} prompts "
            f"of {info['prompts']['name']}, {info['max_new_tokens']} new tokens, judge {info['judge']['name']}")
    cols = f"  {'format':<12}{'kvgeom scheme':<24}{'refusal kvgeom':<27}{'refusal llama.cpp':<27}" \
           f"{'flip kvgeom':<27}{'flip llama.cpp':<27}{'verdict agreement':<29}{'same tokens':<27}first diff"
    lines = [head, cols]
    for rec in v.summary.to_dict(orient="records"):
        is_ceiling = rec["comparison"] == CEILING
        fd = rec.get("first_divergence_median")
        lines.append(
            f"  {rec['comparison'] if is_ceiling else rec['format']:<12}{rec['kvgeom_scheme']:<24}"
            f"{_rate(rec, 'kvgeom_refusal_'):<27}{_rate(rec, 'engine_refusal_'):<27}"
            f"{'-' if is_ceiling else _rate(rec, 'kvgeom_flip_'):<27}"
            f"{'-' if is_ceiling else _rate(rec, 'engine_flip_'):<27}"
            f"{_rate(rec, 'agree_') + (' *' if not rec['target_met'] else ''):<29}{_rate(rec, 'identical_'):<27}"
            f"{'-' if fd is None or fd != fd else f'{fd:.0f}'}")
    lines.append(f"  {CEILING}: kvgeom's fp32 model (no cache quantization) against llama.cpp's f16 cache, the "
                 "ceiling of agreement; flips: against each side's own full-precision run; * below the "
                 f"{info['target']:.0%} agreement target; first diff: median first differing token (prompts that "
                 "differ)")
    eq = v.summary["prompt_tokens_equal"].min() if "prompt_tokens_equal" in v.summary else float("nan")
    lines.append(f"  prompt tokens equal on both sides: {eq:.0%} of prompts; chat template of the GGUF used by "
                 f"kvgeom: {'yes' if info['chat_template_equal'] else 'NO'}; rotation "
                 f"{'llama.cpp default (on for quantized types, d_head % 64 == 0)' if info['rotation'] else 'off'}; "
                 f"kvgeom query quantization: {info.get('query') or 'none (Q exact)'}")
    t = info["timings"]
    lines.append("  time: " + ", ".join(f"{k[:-2]} {val:.0f}s" for k, val in t.items()))
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    v = validate_engine(args.model, engine=args.engine, formats=args.formats, prompts=args.prompts, n=args.n,
                        judge=args.judge, max_new_tokens=args.max_new_tokens, rotation=not args.no_rotation,
                        threads=args.threads, batch_size=args.batch_size, device=args.device, out=args.out,
                        query=None if args.query_quant == "none" else args.query_quant,
                        engine_from=args.engine_from, progress=say, bars=True)
    print(validation_summary(v))
    if args.out:
        print(f"wrote {args.out}/validate.json, summary.csv, rows.csv")
    return 0


def add_parser(sub: Any) -> None:
    """Add ``validate`` to the ``kvgeom`` subcommands."""
    p = sub.add_parser("validate", help="check kvgeom's simulation against a real engine's quantized KV cache "
                       "(llama.cpp): per-prompt verdict agreement per format")
    p.add_argument("model", help="a .gguf file (or a registered name): what llama.cpp runs and kvgeom loads")
    p.add_argument("--engine", default="llama.cpp", help="the real engine (llama.cpp; needs the extra "
                   "kvgeom[llamacpp])")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help="llama.cpp cache types, comma-separated; "
                   "K/V pairs as K_TYPE/V_TYPE (default: %(default)s)")
    p.add_argument("--prompts", default="calibration", help="prompts: bundled name or path (default: calibration, "
                   "the audit's 20 harmful calibration prompts)")
    p.add_argument("--n", type=int, default=None, help="use only the first N prompts")
    add_judge_argument(p)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per completion (default 32, "
                   "as the audit)")
    p.add_argument("--no-rotation", action="store_true", help="llama.cpp with LLAMA_ATTN_ROT_DISABLE=1, kvgeom "
                   "without +rot (default: llama.cpp's own rotation rule on both sides)")
    p.add_argument("--query-quant", default="none", choices=("none", *QUERY_MODES),
                   help="kvgeom also quantizes Q before Q·K as llama.cpp's CPU flash attention does (to q8_0 for "
                   "every quantized K type; 'engine': its x86 AVX2 rounding, 'q8_0': the reference rounding), for "
                   "formats whose K is a llama.cpp type (default: none, Q exact)")
    p.add_argument("--engine-from", default=None, metavar="DIR", help="reuse llama.cpp's side of an earlier run's "
                   "--out DIR (same model, prompts, formats, --max-new-tokens, rotation): for a second run that "
                   "changes only kvgeom's side, e.g. --query-quant")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the CPU count, at most 8)")
    p.add_argument("--batch-size", type=int, default=64, help="kvgeom generation batch size (default 64)")
    p.add_argument("--device", default="cpu", help="kvgeom's device (default cpu)")
    p.add_argument("--out", default=None, help="directory for validate.json, summary.csv and rows.csv")
    p.set_defaults(func=_run)
