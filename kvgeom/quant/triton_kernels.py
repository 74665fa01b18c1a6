"""Moved: the Triton kernels are the package :mod:`kvgeom.quant.triton` (dispatch: its ``dispatch`` module)."""

from kvgeom.deprecation import moved_module

__getattr__ = moved_module(__name__, "kvgeom.quant.triton")
