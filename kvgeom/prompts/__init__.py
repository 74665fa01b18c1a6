"""Prompt sets: the bundled harmful / harmless / borderline sets, local files and public benchmarks.

Every loader returns a :class:`PromptSet`, an immutable value holding a DataFrame with at least the
columns ``id``, ``prompt`` and ``category`` (``category`` may be NA). Other columns of the source
(e.g. XSTest's ``label``, the bundled ``split``) are kept.

Sources understood by :func:`load_prompts`:

* bundled names -- ``harmful`` (170 requests over 10 harm categories), ``harmless`` (170 prompts
  matched row by row to ``harmful``), ``borderline`` (80 safe prompts that look unsafe),
  ``calibration`` (the 20 ``harmful`` rows with ``split == "calibration"``: the first two of each
  category) and ``heldout`` (the other 150). See ``data/README.md``.
* a local file -- ``.csv``, ``.jsonl``, ``.json`` or ``.txt`` (one prompt per line). The prompt column
  is detected among :data:`PROMPT_COLUMNS` and the category column among :data:`CATEGORY_COLUMNS`,
  candidate by candidate: exact name first, then case-insensitive, before trying the next candidate
  (so JailbreakBench's ``Goal`` wins over its short ``Behavior`` label, while HarmBench, which has
  only ``Behavior``, still works). When a ``FunctionalCategory`` column exists (HarmBench), only the
  rows with ``FunctionalCategory == "standard"`` are kept: the ``contextual`` and ``copyright``
  behaviours need a context string or a reference text that a bare prompt does not carry.
* public benchmark names -- ``advbench``, ``harmbench``, ``jailbreakbench``, ``xstest``: fetched
  from the Hugging Face hub with the optional ``datasets`` library when it is installed, the hub is
  not switched off and a quick HEAD request (3 s timeout) reaches it: the one hub check,
  :func:`kvgeom.hub.hub_problem` with ``datasets=True`` (``HF_DATASETS_OFFLINE``, else ``HF_HUB_OFFLINE`` /
  ``TRANSFORMERS_OFFLINE``, parsed as ``huggingface_hub`` and ``datasets`` parse them). Otherwise a
  :class:`PromptLoadError` asks for a local copy at once, instead of letting ``datasets`` retry against an
  unreachable hub.

Modules: :mod:`~kvgeom.prompts.sets` (the :class:`PromptSet` value), :mod:`~kvgeom.prompts.sources` (the
bundled and public sets, :func:`load_text`), :mod:`~kvgeom.prompts.tables` (reading files, finding the prompt
and category columns), :mod:`~kvgeom.prompts.load` (:func:`load_prompts`). Proved by ``tests/test_prompts.py``.
"""


from kvgeom.prompts.load import load_prompts
from kvgeom.prompts.sets import PromptLoadError, PromptSet
from kvgeom.prompts.sources import BUNDLED_SETS, PUBLIC_SETS, bundled_data_dir, load_text
from kvgeom.prompts.tables import CATEGORY_COLUMNS, PROMPT_COLUMNS, SUFFIXES

__all__ = [
    "BUNDLED_SETS",
    "CATEGORY_COLUMNS",
    "PROMPT_COLUMNS",
    "PUBLIC_SETS",
    "SUFFIXES",
    "PromptLoadError",
    "PromptSet",
    "bundled_data_dir",
    "load_prompts",
    "load_text",
]
