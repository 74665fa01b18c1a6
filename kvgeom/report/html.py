"""Deprecated: the page moved to :mod:`kvgeom.audit.page` (it is assembled from the registered stages' sections;
this path is removed in kvgeom 0.3). ``kvgeom.report.render_html`` / ``report_html`` stay where they are."""

from kvgeom.deprecation import moved_module

__getattr__ = moved_module(__name__, "kvgeom.audit.page")
