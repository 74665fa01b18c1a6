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
    except (ModelLoadError, ModelNotInstalledError, ValueError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"kvgeom: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
