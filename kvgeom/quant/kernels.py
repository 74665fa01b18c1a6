"""The optional Triton kernels: :func:`triton_package` imports :mod:`kvgeom.quant.triton` on first use, or
gives None when Triton is not installed (the formats and ``fake_quant`` then run eager).

Proved by ``tests/quant/test_quant_fake.py`` (dispatch to a stand-in) and ``tests/quant/test_triton_kernels.py``.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

__all__ = ["triton_package"]


@cache
def triton_package() -> ModuleType | None:
    """:mod:`kvgeom.quant.triton`, or None without Triton (imported once)."""
    try:
        import kvgeom.quant.triton as package
    except ImportError:
        return None
    return package
