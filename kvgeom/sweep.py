"""Deprecated: moved to :mod:`kvgeom.bitwidth` (renamed apart from :mod:`kvgeom.noise.sweep`; this path is removed
in kvgeom 0.3)."""

from kvgeom.deprecation import moved_module

__getattr__ = moved_module(__name__, "kvgeom.bitwidth")
