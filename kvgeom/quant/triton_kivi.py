"""Moved: the KIVI kernels are :mod:`kvgeom.quant.triton.kivi`."""

from kvgeom.deprecation import moved_module

__getattr__ = moved_module(__name__, "kvgeom.quant.triton.kivi")
