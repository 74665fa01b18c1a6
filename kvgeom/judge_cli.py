"""``kvgeom judges ...``: the judge commands (a subcommand group of :mod:`kvgeom.cli`).

``kvgeom judges compare RUN_DIR [--judge A,B] [--json] [--show N]``: :func:`kvgeom.judge_agreement.compare_run` on
an audit's or a sweep's saved completions, printed by :func:`kvgeom.judge_agreement.summary_text`.
``kvgeom judges list``: the registered judges. Bad input: ``kvgeom: error: ...``, exit code 2 (``kvgeom.cli.main``).
Proved by ``tests/test_judge_agreement.py::test_cli_compare``.
"""

from __future__ import annotations

import argparse
import json

from kvgeom.judges import add_judge_argument

__all__ = ["add_judges_parser"]


def _cmd_compare(args: argparse.Namespace) -> int:
    from kvgeom.judge_agreement import compare_run, summary_text

    cmp = compare_run(args.run_dir, args.judge, n_resamples=args.n_resamples)
    if args.json:
        print(json.dumps(cmp.to_dict(max_disagreements=args.show), indent=2))
    else:
        print(summary_text(cmp, max_rows=args.show))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from kvgeom.judges import JUDGES

    for name, factory in sorted(JUDGES.items()):
        doc = (getattr(factory, "__doc__", "") or "").strip().splitlines()
        print(f"{name:<20} {doc[0] if doc else ''}")
    return 0


def add_judges_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``judges`` command group (``compare``, ``list``) to a subparsers object."""
    p = sub.add_parser("judges", help="judges: compare several on a run's saved completions, list them")
    jsub = p.add_subparsers(dest="judges_command", required=True)
    c = jsub.add_parser("compare", help="Cohen's kappa, confusion matrix, flip rates and disagreements of judges "
                        "on the completions saved in RUN_DIR (an audit's or a sweep's --out)")
    c.add_argument("run_dir")
    add_judge_argument(c)
    c.set_defaults(judge=None)
    c.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples of kappa's CI (default 1000)")
    c.add_argument("--show", type=int, default=10, help="disagreeing rows to print (default 10)")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=_cmd_compare)
    li = jsub.add_parser("list", help="registered judges")
    li.set_defaults(func=_cmd_list)
    return p
