"""Deprecated: moved to :mod:`kvgeom.viz.figures` (this path is removed in kvgeom 0.3)."""

from kvgeom.deprecation import moved_module

__getattr__ = moved_module(__name__, "kvgeom.viz.figures")
