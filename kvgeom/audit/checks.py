"""What the audit checks once the model is loaded, before any stage: :func:`check_model`.

Every scheme the audit will apply (the target ``--scheme``, the layer sweep's scheme and PCR's per-channel twin
of it, the bit sweep's points, the search levels) must apply to the model's heads (``+rot`` needs d_head a
multiple of 64, a KIVI group size must divide d_head, llama.cpp blocks of 32 must tile it:
:meth:`kvgeom.quant.Scheme.check_shape`) and its site must be one the bridge fires; every prompt the audit
generates from must fit in the model's context with ``--max-new-tokens``, and in the device's free memory at one
prompt per batch (:mod:`kvgeom.runtime.memory`); ``--out`` must have room for the run's files
(:func:`estimate_out_bytes`, :func:`check_out_space`). Each failure is one :class:`AuditError` naming the option,
the value, the limit and the fix. The checks before the model
loads (settings, numbers, prompt files, ``--out``) are :func:`kvgeom.audit.check_config` and
:func:`kvgeom.io.check_out_dir`. Proved by ``tests/audit/test_checks.py``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from kvgeom.io import format_bytes, free_bytes
from kvgeom.prompts import PromptSet
from kvgeom.quant import Scheme, expand_family
from kvgeom.runtime.limits import PromptTooLongError, fit_prompts, preview

from .config import AuditConfig, AuditError, family_of, option_name, per_channel_twin

if TYPE_CHECKING:
    from kvgeom.models import KVModel

    from .inputs import AuditInputs

__all__ = ["audit_schemes", "check_model", "check_out_space", "check_prompts", "check_schemes", "estimate_out_bytes"]


def audit_schemes(cfg: AuditConfig) -> list[tuple[str, str]]:
    """``(option, scheme)`` for every scheme the audit applies, the target first, each scheme once."""
    every = [(option_name("scheme"), cfg.scheme), (option_name("sweep_scheme"), cfg.sweep_scheme),
             (f"{option_name('sweep_scheme')} (PCR's per-channel twin)", per_channel_twin(cfg.sweep_scheme))]
    every += [(f"{option_name('bits')} (the bit sweep of {cfg.scheme})", s)
              for _b, s in expand_family(family_of(cfg.scheme), cfg.bits)]
    every += [(option_name("search_levels"), s) for s in cfg.search_levels]
    out: dict[str, tuple[str, str]] = {}
    for option, scheme in every:
        out.setdefault(str(Scheme.parse(scheme)), (option, scheme))
    return list(out.values())


def check_schemes(cfg: AuditConfig, model: KVModel) -> None:
    """Every scheme of :func:`audit_schemes` applies to ``model`` (heads, layers, site), else :class:`AuditError`."""
    for option, scheme in audit_schemes(cfg):
        given = f"{option} {scheme!r}" if option.startswith("--") else f"{option}={scheme!r}"
        try:
            Scheme.parse(scheme).check_shape(n_kv_heads=model.n_kv_heads, d_head=model.d_head)
        except ValueError as err:
            raise AuditError(f"{given} does not apply to {model.name} (d_head {model.d_head}, {model.n_kv_heads} "
                             f"KV heads): {err}") from None
        try:
            cfg.plan(scheme).validate(model)
        except ValueError as err:
            raise AuditError(f"{given}: {err}") from None


def _too_long(source: str, ids: list[str], prompts: list[str], err: PromptTooLongError, new: int) -> AuditError:
    pid = ids[prompts.index(err.prompt)] if err.prompt in prompts else "?"
    more = f" ({err.n_long} of its prompts do not fit; this is the longest)" if err.n_long > 1 else ""
    need = f"{err.n_tokens:,} tokens chat-formatted" + (f", + --max-new-tokens {new}" if new else "")
    if err.reason == "memory":
        return AuditError(
            f"{source}: prompt {pid} ({preview(err.prompt or '')}) is {need}{more}: even alone in a batch it needs "
            f"about {format_bytes(err.need or 0)} for its KV cache and activations, but the device has "
            f"{format_bytes(err.free or 0)} free (the memory limit is {err.limit:,} tokens); the audit never "
            "truncates a prompt: shorten or drop it" + (", lower --max-new-tokens" if new else "")
            + ", or free memory (or use a device with more: --device)")
    return AuditError(
        f"{source}: prompt {pid} ({preview(err.prompt or '')}) is {need}{more}, but the model has a context of "
        f"{err.limit:,} tokens (max_position_embeddings); the audit never truncates a prompt: shorten or drop it"
        + (", or lower --max-new-tokens" if new else ""))


def check_prompts(inputs: AuditInputs) -> None:
    """Every prompt the audit feeds the model fits in its context: generated ones with ``--max-new-tokens``, the
    harmless ones the geometry reads without generating; else :class:`AuditError` with the fix."""
    cfg, model = inputs.cfg, inputs.model
    new = cfg.max_new_tokens
    sets: list[tuple[str, PromptSet | list[str], int]] = [
        (f"--harmful {cfg.harmful!r}", inputs.calibration, new), (f"--harmful {cfg.harmful!r}", inputs.held_out, new),
        (f"{option_name('borderline')}={cfg.borderline!r}", inputs.borderline, new)]
    if cfg.until_stable:
        from .adaptive import calibration_pool

        sets.append(("the --until-stable pool", calibration_pool(cfg, inputs.calibration, inputs.held_out), new))
    sets.append((f"--harmless {cfg.harmless!r}", inputs.harmless_pairs(), 0))
    for source, ps, n_new in sets:
        prompts = ps if isinstance(ps, list) else ps.prompts
        ids = [f"#{i}" for i in range(len(ps))] if isinstance(ps, list) else ps.ids
        try:
            fit_prompts(model, prompts, max_new_tokens=n_new)
        except PromptTooLongError as err:
            if err.prompt is None and err.reason == "memory":
                raise AuditError(f"--max-new-tokens {new}: {err}") from None
            if err.prompt is None:  # --max-new-tokens alone fills the context
                raise AuditError(f"--max-new-tokens {new}: must be below the model's context of {err.limit:,} "
                                 "tokens, with room for the prompts; pass --max-new-tokens 32 (the default)"
                                 ) from None
            raise _too_long(source, ids, prompts, err, n_new) from None


def check_model(inputs: AuditInputs) -> None:
    """The checks that need the loaded model, run right after loading and before any stage: the schemes apply
    to it (:func:`check_schemes`) and the prompts fit in its context (:func:`check_prompts`)."""
    check_schemes(inputs.cfg, inputs.model)
    check_prompts(inputs)


#: measured on the default model's audit (``/tmp/audit_idle`` of 2026-12-02: 6.1 MB in all, 3,072 K channels, 24
#: layers, 80 prompts): bytes of the stage files per K channel (the outlier magnitudes), per prompt and plan, fixed
_PER_CHANNEL, _PER_PROMPT_PLAN, _FIXED = 175, 40, 20_000


def estimate_out_bytes(cfg: AuditConfig, model: KVModel) -> int:
    """An upper estimate of the bytes an audit writes under ``--out``: the stage files ``S`` (outlier magnitudes
    per K channel, verdicts per prompt and plan, a fixed part), ``audit.json`` (about ``S``) and ``report.html``
    (plotly's JavaScript plus its figures, about ``0.4 S``); a stage is written next to its old copy before the
    rename, hence a margin."""
    from plotly.offline import get_plotlyjs

    channels = model.n_layers * model.n_kv_heads * model.d_head
    n_calib = max(cfg.n_calib, cfg.max_calib) if cfg.until_stable else cfg.n_calib
    prompts = n_calib + cfg.n_heldout + cfg.n_borderline
    stages = _PER_CHANNEL * channels + _PER_PROMPT_PLAN * prompts * (model.n_layers + 10) + _FIXED
    return int(len(get_plotlyjs()) + 2.4 * stages)


def check_out_space(out: str | os.PathLike, cfg: AuditConfig, model: KVModel) -> None:
    """Refuse, with :class:`AuditError`, an ``--out`` whose file system has less free space than
    :func:`estimate_out_bytes`, naming both and the fix; nothing is refused when the free space cannot be told."""
    need, free = estimate_out_bytes(cfg, model), free_bytes(out)
    if free is not None and free < need:
        raise AuditError(f"--out {str(out)!r}: {format_bytes(free)} free there, but this audit writes about "
                         f"{format_bytes(need)} (stage files, audit.json, report.html); free some space or pass "
                         "another --out")
