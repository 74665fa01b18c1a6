"""The main job: diagnose a model × KV scheme, prescribe a fix, verify it — stage by stage, resumable.

Stages (each a public function returning a JSON-friendly dict of the :mod:`kvgeom.report` schema):

1. :func:`stage_baseline` — full-precision refusal on calibration and held-out harmful prompts, over-refusal
   on borderline prompts, perplexity at full precision and under the target scheme.
2. :func:`stage_layer_sweep` — one layer quantized at a time (default ``int3-tensor-sym``, mode ``forward``:
   the paper's mechanistic setting) plus all layers, in one batched run of (layer × prompt) rows; conditional
   flip rate per layer with Wilson CI.
2b. :func:`stage_sensitivity` — per-layer geometric sensitivity of the target scheme (``rho_geo`` with CI).
3. :func:`stage_outliers` — key channels ranked by max |K| over the calibration prompts; top 5% = outliers.
4. :func:`stage_channel_ablation` — at the critical layer: quantize only the top-f channels by magnitude
   ("outlier"), only the non-outliers, or f random channels (several seeds); causal ratio.
5. :func:`stage_pcr` — PCR = 1 - flip(per-channel) / flip(per-tensor) at the critical layer, bootstrap CI.
6. :func:`stage_label` — :func:`kvgeom.taxonomy.classify` with its decision trace.
7. :func:`stage_mitigation` — :func:`kvgeom.mitigation.prescribe` candidates verified on the target scheme:
   recovery with CI on calibration and held-out prompts separately, bits per element.
8. :func:`stage_export` — serving settings for the best verified candidate.
9. :func:`stage_bit_sweep` — the target family over bit-widths (refusal and perplexity).
10. :func:`stage_agreement` (opt-in, ``kvgeom audit --agreement``) — label and PCR from the held-out prompts
    against those from the 20 calibration prompts.

:func:`run_audit` runs them in order, saving each stage's result atomically under ``out/stages/`` as it
completes; with ``resume=True`` finished stages are loaded instead of recomputed. Generation is greedy, so a
resumed run gives the same ``audit.json`` as an uninterrupted one.
"""

from .config import STAGE_ORDER, AuditConfig, AuditError, assignment_plan, check_config, family_of, per_channel_twin
from .frames import stage_frame
from .run import AuditResult, run_audit
from .stages import (
    STAGES,
    stage_agreement,
    stage_baseline,
    stage_bit_sweep,
    stage_channel_ablation,
    stage_export,
    stage_label,
    stage_layer_sweep,
    stage_mitigation,
    stage_outliers,
    stage_pcr,
    stage_sensitivity,
)

__all__ = [
    "STAGES", "STAGE_ORDER", "AuditConfig", "AuditError", "AuditResult", "assignment_plan", "check_config",
    "family_of", "per_channel_twin", "run_audit", "stage_agreement", "stage_baseline", "stage_bit_sweep",
    "stage_channel_ablation", "stage_export", "stage_frame", "stage_label", "stage_layer_sweep",
    "stage_mitigation", "stage_outliers", "stage_pcr", "stage_sensitivity",
]
