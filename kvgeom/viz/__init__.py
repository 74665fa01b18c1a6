"""Presentation primitives below the audit: plotly figures (:mod:`~kvgeom.viz.figures`), HTML building blocks
(:mod:`~kvgeom.viz.markup`) and the label card (:mod:`~kvgeom.viz.card`).

Audit stages draw their report sections with these (each stage declares its section in its own file, see
:mod:`kvgeom.audit.stage`); :mod:`kvgeom.report` assembles the page. Nothing here imports the audit.
"""
