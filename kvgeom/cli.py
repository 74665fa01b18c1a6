"""Command-line interface: thin views over kvgeom's public functions.

``kvgeom info [MODEL]``: facts of a model (layers, heads, KV heads, d_head, chat template, cache path).
``kvgeom models``: registered models, installed or not, hash verified or not.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kvgeom.registry import DEFAULT_MODEL

__all__ = ["main", "model_info"]


def model_info(name_or_path: str = DEFAULT_MODEL, *, device: str = "cpu") -> dict:
    """Load a model and return its facts (what ``kvgeom info`` prints)."""
    from kvgeom.models import load_model
    from kvgeom.registry import cache_dir

    model = load_model(name_or_path, device=device)
    info = model.describe()
    info["cache_dir"] = str(cache_dir())
    return info


def _cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model, device=args.device)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model        {info['name']}")
    print(f"architecture {info['architecture']} ({info['model_type']})")
    print(f"layers       {info['n_layers']}")
    print(f"heads        {info['n_heads']}")
    print(f"KV heads     {info['n_kv_heads']}")
    print(f"d_head       {info['d_head']}")
    print(f"d_model      {info['d_model']}")
    print(f"rotary       {'yes' if info['rotary'] else 'no'}")
    print(f"chat template {'yes' if info['chat_template'] else 'NO (pass chat_template=...)'}")
    print(f"K/V sites    {', '.join(info['sites'])}")
    print(f"device/dtype {info['device']} / {info['dtype']}")
    if "gguf" in info:
        print(f"gguf         {info['gguf']}")
    print(f"loaded from  {info['source']}")
    print(f"cache dir    {info['cache_dir']}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from kvgeom.registry import list_models

    table = list_models()
    if args.json:
        print(table.to_json(orient="records", indent=2))
        return 0
    for row in table.to_dict("records"):
        print(f"{row['name']}: {row['description']} [{row['license']}]")
        print(f"  parts installed: {'yes' if row['parts_installed'] else 'no'}; "
              f"assembled: {'yes' if row['assembled'] else 'no'}; "
              f"hash verified: {'yes' if row['verified'] else 'no'}")
        print(f"  path: {row['path']}")
        if row["problem"]:
            print(f"  problem: {row['problem']}")
    return 0


def run_sweep(
    model: str = DEFAULT_MODEL,
    *,
    families: list[str],
    cache_families: list[str] = (),
    bits: list[int] = (8, 6, 5, 4, 3, 2),
    harmful: str = "harmful",
    limit: int | None = None,
    max_new_tokens: int = 32,
    ppl_tokens: int | None = 4096,
    site: str = "k",
    batch_size: int = 64,
    out: str | None = None,
    device: str = "cpu",
) -> dict:
    """Load a model, run :func:`kvgeom.sweep.bit_sweep`, and write ``summary.csv``, ``rows.csv``,
    ``sweep.json`` and ``sweep.html`` to ``out`` (what ``kvgeom sweep`` does)."""
    import platform
    import time
    from pathlib import Path

    import torch
    import transformers

    import kvgeom
    from kvgeom.models import load_model
    from kvgeom.prompts import load_prompts
    from kvgeom.sweep import bit_sweep, expand_family, plot_bit_sweep

    fams = list(families) + list(cache_families)
    if not fams:
        raise ValueError("no families given: pass --family 'int{b}-token-asym' (and/or --cache-family q4_0)")
    for fam in fams:
        expand_family(fam, bits)  # validates before any work
    prompts = load_prompts(harmful, limit=limit)
    t0 = time.perf_counter()
    m = load_model(model, device=device)
    load_s = time.perf_counter() - t0
    modes = {f: {"mode": "cache", "site": "rot_k"} for f in cache_families}
    summary, rows = bit_sweep(m, fams, bits, prompts=prompts, site=site, modes=modes,
                              max_new_tokens=max_new_tokens, ppl_tokens=ppl_tokens, batch_size=batch_size,
                              progress=True)
    result = {
        "model": m.describe(), "prompts": {"name": prompts.name, "source": prompts.source, "n": len(prompts)},
        "families": list(families), "cache_families": list(cache_families), "bits": list(bits),
        "site_forward": site, "max_new_tokens": max_new_tokens, "ppl_tokens": ppl_tokens,
        "onset_bits": summary.attrs["onset_bits"], "timings": {"load_s": load_s, **summary.attrs["timings"]},
        "versions": {"kvgeom": kvgeom.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads()},
        "summary": json.loads(summary.to_json(orient="records")),
    }
    if out:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        summary.to_csv(d / "summary.csv", index=False)
        rows.to_csv(d / "rows.csv", index=False)
        (d / "sweep.json").write_text(json.dumps(result, indent=2))
        plot_bit_sweep(summary).write_html(d / "sweep.html", include_plotlyjs=True)
    result["summary_frame"] = summary
    return result


def _cmd_sweep(args: argparse.Namespace) -> int:
    bits = [int(b) for b in args.bits.split(",")]
    res = run_sweep(args.model, families=args.family or [], cache_families=args.cache_family or [], bits=bits,
                    harmful=args.harmful, limit=args.limit, max_new_tokens=args.max_new_tokens,
                    ppl_tokens=args.ppl_tokens, site=args.site, batch_size=args.batch_size, out=args.out,
                    device=args.device)
    s = res["summary_frame"]
    cols = ["scheme", "bits_per_element", "refusal_rate", "refusal_low", "refusal_high", "flip_rate", "flip_low",
            "flip_high", "flip_to_degenerate_rate", "ppl_ratio", "class"]
    print(s[[c for c in cols if c in s]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"onset bits: {res['onset_bits']}; timings: { {k: round(v, 1) for k, v in res['timings'].items()} }")
    if args.out:
        print(f"wrote {args.out}/summary.csv, rows.csv, sweep.json, sweep.html")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kvgeom import __version__

    parser = argparse.ArgumentParser(prog="kvgeom", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kvgeom {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="facts of a model (default: the registered default model)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registered name, .gguf, HF dir or hub name")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("sweep", help="bit-width sweep: refusal, flips, perplexity vs bits")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--family", action="append", help="scheme family, e.g. 'int{b}-token-asym' or 'q8_0' "
                   "(forward mode: the paper's per-call fake quant); repeatable")
    p.add_argument("--cache-family", action="append", help="family run in cache mode (serving semantics); repeatable")
    p.add_argument("--bits", default="8,6,5,4,3,2", help="comma-separated bit-widths (default 8,6,5,4,3,2)")
    p.add_argument("--harmful", default="harmful", help="bundled set name or path (default: harmful)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ppl-tokens", type=int, default=4096, help="tokens of the bundled prose for perplexity")
    p.add_argument("--site", default="k", choices=["k", "rot_k"], help="key site in forward mode (default k: pre-RoPE)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="directory for summary.csv, rows.csv, sweep.json, sweep.html")
    p.set_defaults(func=_cmd_sweep)
    p = sub.add_parser("models", help="registered models and their install state")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from kvgeom.models import ModelLoadError
    from kvgeom.registry import ModelNotInstalledError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ModelLoadError, ModelNotInstalledError, ValueError, KeyError, FileNotFoundError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"kvgeom: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
