"""The audit's stages, one file each, every one declaring itself with :func:`kvgeom.audit.stage.register_stage`.

Importing this package registers them in pipeline order: ``baseline`` → ``layer_sweep`` → ``sensitivity`` →
``outliers`` → ``channel_ablation`` → ``pcr`` → ``label`` → ``mitigation`` → ``export`` →
``engine_matrix`` → ``bit_sweep``, plus the opt-in ``agreement`` and ``flip_prediction`` and, last, ``judges``
(agreement of the ``--judge`` list; skipped with one judge).
A new stage is a new file here (imported below) or anywhere else that calls
``register_stage`` (``docs/extending.md``).
"""

# pipeline order: a stage registers after the stages it reads
from . import baseline, layer_sweep, sensitivity, outliers, channel_ablation, pcr, label  # noqa: I001, F401
from . import mitigation, export, engine_matrix, bit_sweep, agreement  # noqa: I001, F401
from . import flip_prediction, judges  # noqa: E402, F401, I001
