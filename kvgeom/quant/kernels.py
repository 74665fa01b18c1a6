"""The optional Triton kernels: :func:`triton_package` imports :mod:`kvgeom.quant.triton` on first use, or
gives None when Triton is not installed (the formats and ``fake_quant`` then run eager).

Proved by ``tests/quant/test_quant_fake.py`` (dispatch to a stand-in) and ``tests/quant/test_triton_kernels.py``.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

__all__ = ["fused_auto", "triton_package"]


@cache
def triton_package() -> ModuleType | None:
    """:mod:`kvgeom.quant.triton`, or None without Triton (imported once)."""
    try:
        import kvgeom.quant.triton as package
    except ImportError:
        return None
    return package


def fused_auto(x, spec, role: str, mask=None):  # noqa: ANN001 (spec: a KVFormat; this module sits below them)
    """What ``backend="auto"`` runs: the spec's fused kernel on a CUDA tensor where one covers it and has run on a
    GPU (not in ``OPT_IN``), else None (the caller takes the eager path). The same bits as eager."""
    package = triton_package()
    if package is None or not x.is_cuda or isinstance(spec, package.dispatch.OPT_IN):  # the dispatch's own list,
        return None                                                                  # read at each call
    return package.dispatch.fused_fake_quant(x, spec, role, mask)
