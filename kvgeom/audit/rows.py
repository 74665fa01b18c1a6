"""Deprecated: moved to :mod:`kvgeom.judges.rows` (the judged rows of a run sit with the judges, below the audit and
:mod:`kvgeom.judge_agreement`, which reads them); removed in kvgeom 0.3."""

from kvgeom.deprecation import moved

__getattr__ = moved(__name__, {name: "kvgeom.judges.rows" for name in ("judge_rows", "load_rows", "rows_path",
                                                                        "save_rows")})
