"""The audit report: plotly figures and one self-contained HTML page, from the audit dict (= audit.json).

Audit dict schema (``schema_version`` 1). Every value is JSON-friendly (NaN → ``null``; use :func:`to_jsonable`).
Rates are shares in [0, 1]. A ``RateCI`` is ``{"k", "n", "rate", "low", "high"}`` (Wilson, :class:`kvgeom.stats.
RateCI.to_dict`); a ``BootCI`` is ``{"estimate", "low", "high", "n_valid", "n_resamples"}`` (:class:`kvgeom.stats.
BootstrapCI.to_dict`). Any stage may be absent, ``null`` or ``{"status": "skipped"|"failed", "reason": str}``: the
report then shows "not run" for it::

    {
      "schema_version": 1,
      "model":    {"name": str, "n_layers": int, "n_kv_heads": int, "d_head": int, ...},
      "scheme":   str,                                  # the user's target scheme, canonical (str(Scheme))
      "versions": {"kvgeom": str, "torch": str, "transformers": str, "python": str, ...},
      "seed":     int,
      "settings": {...},                                # free-form: CLI options, prompt sets, sweep scheme
      "stages": {
        "baseline": {"calibration": RateCI, "held_out": RateCI,      # full-precision refusal, harmful prompts
                     "over_refusal": RateCI,                          # borderline/harmless prompts refused
                     "perplexity": {"ppl": float, "ppl_target": float, "ppl_ratio": float}},
        "layer_sweep": {"scheme": str, "mode": str,
                        "layers": [{"layer", "flip", "low", "high", "k", "n"}, ...],   # one row per layer
                        "all_layer": {"flip", "low", "high", "k", "n"}},
        "sensitivity": {"metric": str, "layers": [{"layer", "value", "low"?, "high"?}, ...]},
        "outliers": {"top_frac": float,
                     "heatmap": {"z": [[float]] (layer x channel), "layers": [int], "n_kv_heads": int,
                                 "d_head": int, "outliers": [[layer, channel], ...]},     # taxonomy.outlier_heatmap
                     "channels": [{"layer", "head", "dim", "magnitude", "rank"}, ...]},  # outliers only (optional)
        "channel_ablation": {"layer": int,
                             "rows": [{"subset": "outlier"|"non-outlier"|"random", "fraction": float,
                                       "seed": int|null, "flip", "low", "high", "n"}, ...],
                             "summary": [taxonomy.ablation_summary rows]},                 # optional
        "pcr": {"layer": int, "scheme_per_tensor": str, "scheme_per_channel": str,
                "flip_per_tensor": RateCI, "flip_per_channel": RateCI, **BootCI},         # estimate = PCR
        "label": Diagnosis.to_dict(),        # label, description, critical_layer, candidates, pcr, pcr_low,
                                             # pcr_high, all_layer_flip, worst_layer_flip, layer_flips, trace
                                             # [{rule, condition, inputs, threshold, fired, label, decisive}],
                                             # thresholds, notes
        "mitigation": {"target_scheme": str, "target": float (search target share, 0.95),
                       "uniform_bits": float,                                  # bits/element of the target scheme
                       "reference": {"calibration": {"full": RateCI, "uniform": RateCI}, "held_out": {...}},
                       "candidates": [Candidate.to_dict() + {"results": {"calibration": {"refusal": RateCI,
                                      "recovery": BootCI}, "held_out": {...}}}, ...],
                       "search": SearchResult.to_dict() | null},
        "export": export_settings(...) + {"source": str},      # which candidate/search result it exports
        "bit_sweep": {"rows": [{"family", "scheme", "bits", "refusal", "low", "high", "ppl_ratio"}, ...]},
        "agreement": {"calibration": {"n", "label", "pcr", "pcr_low", "pcr_high", "critical_layer"},
                      "held_out": {...}, "agree": bool}
      },
      "timings": {"<stage>": seconds, ...}
    }

Since kvgeom 0.2 the audit.json also holds ``"judge"`` (:func:`kvgeom.judges.judge_identity` of the judge
that decided every verdict). Each stage's schema fragment is its ``Stage.schema``
(:func:`kvgeom.audit.schema.audit_schema` assembles them).

Entry points: :func:`render_html` (write report.html), :func:`report_html` (the HTML text; the page is the
registered stages' sections, :mod:`kvgeom.audit.page`), the figure functions of :mod:`kvgeom.viz.figures`, and
:func:`label_card_html`.
"""

from __future__ import annotations

from kvgeom.audit.page import render_html, report_html
from kvgeom.audit.stage import stage_names
from kvgeom.io import to_jsonable
from kvgeom.viz.card import label_card_html
from kvgeom.viz.figures import (
    ablation_figure,
    bit_sweep_figure,
    layer_flip_figure,
    mitigation_figure,
    outlier_heatmap_figure,
    sensitivity_figure,
)
from kvgeom.viz.markup import stage_ran

SCHEMA_VERSION = 1

#: Stage keys of ``audit["stages"]``, in pipeline order (every registered stage when kvgeom was imported; a stage
#: registered later is in :func:`kvgeom.audit.stage_names`).
STAGES = stage_names(default_only=False)

__all__ = [
    "SCHEMA_VERSION",
    "STAGES",
    "ablation_figure",
    "bit_sweep_figure",
    "label_card_html",
    "layer_flip_figure",
    "mitigation_figure",
    "outlier_heatmap_figure",
    "render_html",
    "report_html",
    "sensitivity_figure",
    "stage_ran",
    "to_jsonable",
]
