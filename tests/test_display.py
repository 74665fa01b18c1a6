"""Results show themselves in Jupyter (:mod:`kvgeom.display`): a compact table plus the key figure, plotly's
JavaScript inline once per process (no internet at run time); ``kvgeom.audit.load`` reads a saved run back."""

from __future__ import annotations

import json
import math

import pandas as pd

from kvgeom import display
from kvgeom.audit import AuditConfig, load, run_audit
from kvgeom.geometry.sensitivity import SensitivityProfile
from kvgeom.quant import Scheme
from kvgeom.stats import flip_stats
from kvgeom.testing import ChecksumJudge


def test_table_never_prints_nan():
    html = display.table_html([{"a": math.nan, "b": None, "c": 0.5, "d": "<x>"}])
    assert "nan" not in html and html.count("—") == 2 and "&lt;x&gt;" in html


def test_first_figure_carries_plotly_inline():
    import plotly.graph_objects as go

    display._STATE["plotlyjs_sent"] = False
    first, second = display.figure_html(go.Figure()), display.figure_html(go.Figure())
    assert len(first) > 1_000_000 > len(second) and '<script src="http' not in first + second


def test_scheme_and_flip_stats():
    h = Scheme.parse("int4-token-asym")._repr_html_()
    assert "int{b}-token-asym" in h and "4.25" in h
    h = flip_stats(["refused"] * 3 + ["complied"], ["complied", "refused", "degenerate", "complied"])._repr_html_()
    assert "flip to degenerate" in h and "McNemar" in h


def test_sensitivity_profile():
    f = pd.DataFrame({"layer": [0, 1], "rho_geo": [1.5, math.nan], "rho_geo_low": [1.2, math.nan],
                      "rho_geo_high": [1.8, math.nan], "rho_geo_defined": [True, False],
                      "rho_geo_note": ["", "zero error"]})
    h = SensitivityProfile("int4-token-asym", "rot_k", f)._repr_html_()
    assert "Sensitivity" in h and "<table" in h and "plotly" in h


def test_audit_result_and_load(tmp_path):
    from .conftest import get_tiny

    cfg = AuditConfig(model="tiny", n_calib=6, n_heldout=6, n_borderline=3, max_new_tokens=4, ppl_tokens=64)
    res = run_audit(cfg, tmp_path, model=get_tiny("llama"), judge=ChecksumJudge(),
                    stages=("baseline", "layer_sweep"))
    back = load(tmp_path)
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert back.audit == saved and back.out == tmp_path and type(back) is type(res)
    assert {k: v for k, v in back.audit.items() if k != "timings"} == \
        json.loads(json.dumps({k: v for k, v in res.audit.items() if k != "timings"}))
    assert len(back.rows) == len(res.rows) > 0
    html = back._repr_html_()
    assert "kvgeom audit" in html and "plotly" in html and back.summary()["model"] == "tiny"
