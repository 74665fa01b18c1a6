"""Run a kvgeom CLI command with every bridge forward timed: stage, rows, new positions, cached positions, seconds.

    python benchmarks/forward_timings.py --json forwards.json -- audit --out DIR

Wraps each registered audit stage's ``run`` (to know the stage) and hooks the loaded model's bridge (pre/post forward
hooks: the time between them is one forward call). The log is written even when the command fails. Summarised in
docs/benchmarks.md §16 (``docs/bench/cpu_default_audit_s18.json``, ``s18_before.bridge_forwards``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="where the per-forward log goes")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the kvgeom command after --")
    args = ap.parse_args()
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command

    import kvgeom.audit  # noqa: F401  (registers the stages)
    import kvgeom.audit.run as audit_run
    import kvgeom.audit.stage as stage_mod
    import kvgeom.models
    import kvgeom.models.loading as loading
    from kvgeom.cli import main as cli_main

    log: list[dict] = []
    current: dict[str, str | None] = {"stage": None}
    for name, stage in list(stage_mod.STAGE_REGISTRY.items()):
        def run(inputs, results, _orig=stage.run, _name=name):  # noqa: ANN001, ANN202
            current["stage"] = _name
            try:
                return _orig(inputs, results)
            finally:
                current["stage"] = None

        object.__setattr__(stage, "run", run)  # Stage is frozen: a benchmark-only rebinding
    real_load = loading.load_model

    def load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        model = real_load(*a, **k)
        start: list = []

        def pre(_mod, fargs, kwargs):  # noqa: ANN001, ANN202
            ids = fargs[0] if fargs else kwargs.get("input")
            pkv = kwargs.get("past_key_values")
            past = pkv.get_seq_length() if pkv is not None and hasattr(pkv, "get_seq_length") else 0
            start[:] = [time.perf_counter(), tuple(ids.shape), int(past), kwargs.get("logits_to_keep")]

        def post(_mod, _args, _kwargs, _out):  # noqa: ANN001, ANN202
            t0, shape, past, keep = start
            log.append({"stage": current["stage"], "rows": shape[0], "new": shape[1], "past": past, "keep": keep,
                        "s": time.perf_counter() - t0})

        model.bridge.register_forward_pre_hook(pre, with_kwargs=True)
        model.bridge.register_forward_hook(post, with_kwargs=True)
        return model

    loading.load_model = kvgeom.models.load_model = load
    if hasattr(audit_run, "load_model"):
        audit_run.load_model = load
    try:
        code = cli_main(argv)
    finally:
        with open(args.json, "w") as fh:
            json.dump(log, fh)
    sys.exit(code)


if __name__ == "__main__":
    main()
