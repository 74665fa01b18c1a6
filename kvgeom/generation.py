"""Deprecated: moved to :mod:`kvgeom.runtime.generation`; removed in kvgeom 0.3."""

from kvgeom.deprecation import moved_module

__getattr__ = moved_module(__name__, "kvgeom.runtime.generation")
