"""The one check of whether the Hugging Face hub may be used and answers: model loading
(:func:`kvgeom.models.load_model`, hub names) and public prompt benchmarks (:func:`kvgeom.prompts.load_prompts`)
both ask :func:`hub_problem`, so an offline machine fails in seconds with one clear reason instead of letting
``transformers`` / ``datasets`` retry for minutes.

**Offline switches** are parsed exactly as ``huggingface_hub`` parses them (``huggingface_hub/constants.py``,
version 2.4: ``HF_HUB_OFFLINE = _is_true(os.environ.get("HF_HUB_OFFLINE") or
os.environ.get("TRANSFORMERS_OFFLINE"))`` with ``_is_true(v) = v.upper() in {"1", "ON", "YES", "TRUE"}``):

* the first *non-empty* one of ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` decides (so ``HF_HUB_OFFLINE=0``
  wins over ``TRANSFORMERS_OFFLINE=1``), and it means offline when, upper-cased, it is ``1``, ``ON``, ``YES`` or
  ``TRUE`` (no whitespace stripping; ``0``, ``false``, ``no``, ``off`` or anything else means online);
* for datasets (``datasets=True``), ``HF_DATASETS_OFFLINE``, when set at all, decides instead, with the same
  true values (``datasets/config.py``, version 5.2: ``HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE if _offline is
  None else _offline.upper() in ENV_VARS_TRUE_VALUES``).

The variables are read at each call (``huggingface_hub`` reads them once, at its import, so
``huggingface_hub.constants.HF_HUB_OFFLINE`` being true also counts as offline: the hub client would refuse
every request).

**Reachability**: a HEAD request to ``$HF_ENDPOINT`` (default ``https://huggingface.co``) with a short
timeout; ``urllib`` honours ``HTTPS_PROXY`` / ``NO_PROXY``, so a hub reachable only through a proxy counts as
reachable, and any HTTP answer (even an error status) means reachable.

Proved by ``tests/test_hub.py`` (the parsing table, precedence, datasets override, unreachable endpoint fails
fast) and used by ``tests/models/test_models.py::test_hub_name_offline_is_one_clear_error`` and
``tests/test_prompts.py::test_public_names_offline_fail_fast``.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from urllib.parse import urlparse

__all__ = ["DEFAULT_ENDPOINT", "TRUE_VALUES", "hub_problem", "hub_reachable", "offline", "offline_reason",
           "unreachable_reason"]

#: Values (upper-cased) that switch the hub off, as ``huggingface_hub.constants.ENV_VARS_TRUE_VALUES``.
TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})
DEFAULT_ENDPOINT = "https://huggingface.co"


def _is_true(value: str | None) -> bool:
    return value is not None and value.upper() in TRUE_VALUES


def offline_reason(*, datasets: bool = False) -> str | None:
    """Why the hub is switched off (``"HF_HUB_OFFLINE=1 is set"``), or ``None`` when it is not."""
    if datasets and (value := os.environ.get("HF_DATASETS_OFFLINE")) is not None:
        return f"HF_DATASETS_OFFLINE={value} is set" if _is_true(value) else None
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var)
        if value:  # the first non-empty one decides, as in huggingface_hub
            if _is_true(value):
                return f"{var}={value} is set"
            break
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    if getattr(constants, "HF_HUB_OFFLINE", False):
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when it was imported)"
    return None


def offline(*, datasets: bool = False) -> bool:
    """Whether the hub is switched off (see the module docstring for the exact semantics)."""
    return offline_reason(datasets=datasets) is not None


def unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why a HEAD request to the hub endpoint got no HTTP answer within ``timeout`` seconds, or ``None``."""
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, malformed endpoint
        reason = getattr(exc, "reason", exc)
        return f"{urlparse(endpoint).hostname or endpoint} is unreachable ({reason})"
    return None


def hub_problem(*, datasets: bool = False, timeout: float = 3.0) -> str | None:
    """Why the hub cannot be used now (switched off, or no answer), or ``None`` when it can."""
    return offline_reason(datasets=datasets) or unreachable_reason(timeout)


def hub_reachable(*, datasets: bool = False, timeout: float = 3.0) -> bool:
    """Whether the hub is switched on and answers: ``hub_problem(...) is None``."""
    return hub_problem(datasets=datasets, timeout=timeout) is None
