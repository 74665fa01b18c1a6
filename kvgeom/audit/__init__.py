"""The main job: diagnose a model × KV scheme, prescribe a fix, verify it — stage by stage, resumable.

Stages are declared values (:class:`Stage`, :mod:`kvgeom.audit.stage`), one file each under
``kvgeom/audit/stages/``, registered in :data:`STAGE_REGISTRY`; each result is a JSON-friendly dict of the
:mod:`kvgeom.report` schema:

1. ``baseline`` — full-precision refusal on calibration and held-out harmful prompts, over-refusal on borderline
   prompts, perplexity at full precision and under the target scheme.
2. ``layer_sweep`` — one layer quantized at a time (default ``int3-tensor-sym``, mode ``forward``: the paper's
   mechanistic setting) plus all layers, in one batched run of (layer × prompt) rows; conditional flip rate per
   layer with Wilson CI.
3. ``sensitivity`` — per-layer geometric sensitivity of the target scheme (``rho_geo`` with CI).
4. ``outliers`` — key channels ranked by max |K| over the calibration prompts; top 5% = outliers.
5. ``channel_ablation`` — at the critical layer: quantize only the top-f channels by magnitude ("outlier"), only
   the non-outliers, or f random channels (several seeds); causal ratio.
6. ``pcr`` — PCR = 1 - flip(per-channel) / flip(per-tensor) at the critical layer, bootstrap CI.
7. ``label`` — :func:`kvgeom.taxonomy.classify` with its decision trace.
8. ``mitigation`` — :func:`kvgeom.mitigation.prescribe` candidates verified on the target scheme: recovery with
   CI on calibration and held-out prompts separately, bits per element.
9. ``export`` — serving settings for the best verified candidate.
10. ``bit_sweep`` — the target family over bit-widths (refusal and perplexity), through :mod:`kvgeom.bitwidth`.
11. ``agreement`` (opt-in, ``kvgeom audit --agreement``) — label and PCR from the held-out prompts against those
    from the calibration prompts.

:func:`run_audit` runs them in order, handing each the :class:`AuditInputs` (built once from the config) and
exactly the earlier results it declares, saving each stage's result atomically under ``out/stages/`` as it
completes; with ``resume=True`` finished stages are loaded instead of recomputed (refused when the settings or
the judge differ). Generation is greedy, so a resumed run gives the same ``audit.json`` as an uninterrupted one.
A new stage is one file (``docs/extending.md``). :func:`load` reads a saved run back as the same
:class:`AuditResult`, which shows itself in Jupyter (a table of the key numbers and the layer-sweep figure).
"""

from . import stages as _stages  # noqa: F401  (registers the built-in stages)
from .checks import check_model, check_out_space, estimate_out_bytes
from .config import AuditConfig, AuditError, assignment_plan, check_config, family_of, per_channel_twin, split_prompts
from .frames import stage_frame
from .inputs import AuditInputs
from .legacy import LEGACY_STAGES, run_stage
from .run import AuditResult, load, run_audit
from .schema import audit_schema
from .stage import (
    STAGE_REGISTRY,
    Section,
    Stage,
    StageResults,
    default_stages,
    get_stage,
    register_stage,
    stage_names,
    unregister_stage,
)

#: The default stages in pipeline order, as registered when kvgeom was imported (:func:`default_stages` is live).
STAGE_ORDER = default_stages()

#: Deprecated: name -> ``stage_NAME(model, cfg, ctx)`` (use :func:`run_stage` or :data:`STAGE_REGISTRY`).
STAGES = LEGACY_STAGES

stage_agreement = LEGACY_STAGES["agreement"]
stage_baseline = LEGACY_STAGES["baseline"]
stage_bit_sweep = LEGACY_STAGES["bit_sweep"]
stage_channel_ablation = LEGACY_STAGES["channel_ablation"]
stage_export = LEGACY_STAGES["export"]
stage_label = LEGACY_STAGES["label"]
stage_layer_sweep = LEGACY_STAGES["layer_sweep"]
stage_mitigation = LEGACY_STAGES["mitigation"]
stage_outliers = LEGACY_STAGES["outliers"]
stage_pcr = LEGACY_STAGES["pcr"]
stage_sensitivity = LEGACY_STAGES["sensitivity"]

__all__ = [
    "STAGES", "STAGE_ORDER", "STAGE_REGISTRY", "AuditConfig", "AuditError", "AuditInputs", "AuditResult", "Section",
    "Stage", "StageResults", "assignment_plan", "audit_schema", "check_config", "check_model", "check_out_space",
    "default_stages", "estimate_out_bytes", "family_of", "get_stage", "load", "per_channel_twin", "register_stage",
    "run_audit", "run_stage", "split_prompts", "stage_agreement", "stage_baseline", "stage_bit_sweep",
    "stage_channel_ablation", "stage_export", "stage_frame", "stage_label", "stage_layer_sweep", "stage_mitigation",
    "stage_names", "stage_outliers", "stage_pcr", "stage_sensitivity", "unregister_stage",
]
