"""Report: figures from DataFrames, the self-contained HTML page, "not run" sections, headless Chromium rendering."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kvgeom.effects import paired_flips
from kvgeom.mitigation import export_settings, prescribe, recovery_ci, search_precision
from kvgeom.quant import Scheme
from kvgeom.report import (
    STAGES,
    ablation_figure,
    bit_sweep_figure,
    layer_flip_figure,
    mitigation_figure,
    outlier_heatmap_figure,
    render_html,
    report_html,
    to_jsonable,
)
from kvgeom.stats import rate_ci
from kvgeom.taxonomy import classify, outlier_channels, outlier_heatmap, pcr_with_ci

FIG_IDS = ("fig-layer-sweep", "fig-sensitivity", "fig-outliers", "fig-ablation", "fig-mitigation", "fig-bit-sweep")
N_LAYERS = 12
TARGET = "int4-token-asym"


def make_audit(seed: int = 0) -> dict:
    """A complete synthetic audit built with the real taxonomy / mitigation functions."""
    rng = np.random.default_rng(seed)
    n = 40
    flips = np.clip(rng.normal(0.02, 0.01, N_LAYERS), 0, 1)
    flips[7], flips[3] = 0.55, 0.12
    layers = []
    for i, f in enumerate(flips):
        r = rate_ci(int(round(f * n)), n)
        layers.append({"layer": i, "flip": r.rate, "low": r.low, "high": r.high, "k": r.k, "n": r.n})
    per_tensor = rng.random(n) < 0.5
    per_channel = per_tensor & (rng.random(n) < 0.9)
    ci = pcr_with_ci(per_channel, per_tensor, n_resamples=100)
    diag = classify(pd.DataFrame(layers), 0.6, ci)
    kmax = rng.gamma(2, 1, (N_LAYERS, 2, 16))
    kmax[7, 1, 3] = 80
    table = outlier_channels(kmax)
    cands = prescribe(diag, target_scheme=TARGET, n_layers=N_LAYERS, outliers=table, d_head=16)
    full = rng.random(n) < 0.9
    uni = full & (rng.random(n) < 0.4)
    mit_cands = []
    for c in cands:
        m = uni | (full & (rng.random(n) < 0.85))
        d = c.to_dict()
        d["results"] = {s: {"refusal": rate_ci(int(m.sum()), n).to_dict(),
                            "recovery": recovery_ci(full, uni, m, n_resamples=100).to_dict(),
                            "recovery_defined": True,
                            "flip": rate_ci(int((full & ~m).sum()), int(full.sum())).to_dict(),
                            "paired": paired_flips(full, uni, m, n_resamples=100).to_dict()}
                        for s in ("calibration", "held_out")}
        mit_cands.append(d)
    search = search_precision(lambda a: 0.9 if a[7] in (None, "int8-token-asym") else 0.4, N_LAYERS,
                              ["int2-token-asym", "int4-token-asym", "int8-token-asym"])
    sweep = []
    for fam, pattern, mid in (("int-token-asym", "int{}-token-asym", 3.5), ("int-tensor-sym", "int{}-tensor-sym", 5)):
        for b in (2, 3, 4, 6, 8):
            r = rate_ci(int(round(36 / (1 + math.exp(-(b - mid) * 2)))), n)
            sweep.append({"family": fam, "scheme": pattern.format(b), "bits": Scheme.parse(pattern.format(b))
                          .bits_per_element, "refusal": r.rate, "low": r.low, "high": r.high,
                          "ppl_ratio": 1 + 0.4 * math.exp(-b)})
    ablation = [{"subset": "random", "fraction": f, "seed": s, "flip": float(f * 0.5 + 0.01 * s)}
                for f in (0.01, 0.05, 0.25) for s in range(3)]
    ablation += [{"subset": "outlier", "fraction": 0.05, "seed": None, "flip": 0.5},
                 {"subset": "non-outlier", "fraction": 0.95, "seed": None, "flip": 0.05}]
    audit = {
        "schema_version": 1,
        "model": {"name": "synthetic <model>", "n_layers": N_LAYERS, "n_kv_heads": 2, "d_head": 16},
        "scheme": TARGET, "versions": {"kvgeom": "0.1.0", "python": "3.11"}, "seed": seed,
        "stages": {
            "baseline": {"calibration": rate_ci(18, 20).to_dict(), "held_out": rate_ci(70, 80).to_dict(),
                         "over_refusal": rate_ci(2, 40).to_dict(), "perplexity": {"ppl_ratio": 1.01}},
            "layer_sweep": {"scheme": "int3-tensor-sym", "mode": "forward", "layers": layers,
                            "all_layer": {"flip": 0.6, "low": 0.45, "high": 0.73, "k": 24, "n": 40}},
            "sensitivity": {"metric": "cosine drop", "layers": [{"layer": i, "value": float(v)}
                                                                for i, v in enumerate(flips)]},
            "outliers": {"top_frac": 0.05, "heatmap": outlier_heatmap(table)},
            "channel_ablation": {"layer": 7, "rows": ablation},
            "pcr": {"layer": 7, **ci.to_dict()},
            "label": diag.to_dict(),
            "mitigation": {"target_scheme": TARGET, "target": 0.95, "uniform_bits": Scheme.parse(TARGET)
                           .bits_per_element_for(d_head=16, n_kv_heads=2),
                           "reference": {"calibration": {"full": rate_ci(36, 40).to_dict(),
                                                         "uniform": rate_ci(16, 40).to_dict(),
                                                         "uniform_flip": rate_ci(20, 36).to_dict(),
                                                         "recovery_defined": True}},
                           "candidates": mit_cands, "search": search.to_dict()},
            "export": {**export_settings(cands[0], d_head=16), "source": cands[0].name},
            "bit_sweep": {"rows": sweep},
            "agreement": {"calibration": {"n": 20, "label": diag.label, "pcr": 0.1},
                          "held_out": {"n": 80, "label": diag.label, "pcr": 0.12}, "agree": True},
        },
        "timings": {"baseline": 12.0, "layer_sweep": 60.5},
    }
    return to_jsonable(audit)


@pytest.fixture(scope="module")
def audit() -> dict:
    return make_audit()


@pytest.fixture(scope="module")
def page(audit) -> str:
    return report_html(audit)


# ------------------------------------------------------------------------------------------ page


def test_audit_is_strict_json(audit):
    assert json.loads(json.dumps(audit, allow_nan=False)) == audit
    assert set(audit["stages"]) <= set(STAGES)


def test_page_has_label_card_first_and_every_figure(page, audit):
    label = audit["stages"]["label"]["label"]
    assert label == "outlier-as-safety"
    for fid in FIG_IDS:
        assert f'id="{fid}"' in page, fid
    assert page.index('id="label"') < min(page.index(f'id="{fid}"') for fid in FIG_IDS)
    assert f">{label}<" in page and "Decision trace" in page
    assert "→ label" in page  # the decisive rule is marked
    assert "not run" not in page
    assert "synthetic &lt;model&gt;" in page  # escaped
    export = page[page.index('id="export"'):page.index('id="bit-sweep"')]
    assert all(stack in export for stack in ("vLLM", "llama.cpp", "HF transformers", "not expressible"))


def test_page_is_self_contained_and_deterministic(page, audit):
    assert not re.search(r"<script[^>]+src\s*=\s*[\"']?https?:", page)
    assert not re.search(r"<script[^>]*\ssrc=", page) and "<link" not in page  # nothing fetched
    assert page.count("<script type=\"text/javascript\">") == 1  # plotly.js inlined once
    assert page.count("Plotly.newPlot(") == len(FIG_IDS)
    assert report_html(audit) == page


def test_missing_sections_say_not_run():
    audit = make_audit()
    only_label = {**audit, "stages": {"label": audit["stages"]["label"],
                                      "bit_sweep": {"status": "skipped", "reason": "--no-sweep"},
                                      "mitigation": None}}
    page = report_html(only_label)
    assert "outlier-as-safety" in page
    assert not any(f'id="{fid}"' in page for fid in FIG_IDS)
    assert page.count("not run") >= 8
    assert "not run: --no-sweep" in page
    empty = report_html({"model": "m", "scheme": "q4_0"})
    assert empty.count('class="not-run"') >= 9 and "Plotly.newPlot(" not in empty


def test_malformed_section_shows_error_not_crash():
    audit = make_audit()
    audit["stages"]["bit_sweep"] = {"rows": [{"bits": 4}]}
    with pytest.warns(UserWarning, match="bit-sweep"):
        page = report_html(audit)
    assert "could not draw this section" in page and "family" in page
    assert 'id="fig-layer-sweep"' in page


def test_render_html_writes_atomically(tmp_path, audit):
    out = render_html(audit, tmp_path / "deep" / "report.html")
    assert out == tmp_path / "deep" / "report.html"
    assert out.read_text(encoding="utf-8") == report_html(audit)
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]
    assert out.stat().st_mode & 0o044  # readable by others, not mkstemp's 0600
    with pytest.raises(TypeError):
        report_html([1, 2])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ figures


def test_layer_flip_figure_marks_critical_and_candidates(audit):
    st = audit["stages"]
    fig = layer_flip_figure(pd.DataFrame(st["layer_sweep"]["layers"]), critical_layer=7, candidates=[7, 3],
                            all_layer_flip=0.6)
    bar = fig.data[0]
    colors = list(bar.marker.color)
    assert colors[7] == "#c0392b" and colors[3] == "#e67e22" and colors[0] == "#7f8fa6"
    assert bar.error_y.array is not None and len(bar.error_y.array) == N_LAYERS
    assert min(bar.error_y.arrayminus) >= 0
    texts = [a.text for a in fig.layout.annotations]
    assert any("critical L7" in t for t in texts) and any("60%" in t for t in texts)


def test_bit_sweep_figure_has_band_and_second_axis(audit):
    fig = bit_sweep_figure(pd.DataFrame(audit["stages"]["bit_sweep"]["rows"]))
    names = [t.name for t in fig.data if t.name]
    assert "int-token-asym refusal" in names and "int-tensor-sym perplexity ratio" in names
    assert any(t.fill == "toself" for t in fig.data)
    assert any(t.yaxis == "y2" for t in fig.data)


def test_other_figures(audit):
    st = audit["stages"]
    hm = outlier_heatmap_figure(st["outliers"]["heatmap"])
    assert np.asarray(hm.data[0].z).shape == (N_LAYERS, 32)
    ab = ablation_figure(pd.DataFrame(st["channel_ablation"]["rows"]), layer=7)
    assert any("causal ratio" in a.text for a in ab.layout.annotations)
    rows = [{"name": "a", "bits_per_element": 5.0, "recovery": 0.9, "low": 0.8, "high": 1.0, "split": "cal"}]
    mf = mitigation_figure(rows, uniform_bits=4.25)
    assert mf.data[0].customdata[0] == 5.0


def test_figures_name_missing_columns():
    with pytest.raises(ValueError, match=r"missing columns \['flip'\]"):
        layer_flip_figure(pd.DataFrame({"layer": [0]}))
    with pytest.raises(ValueError, match="no rows"):
        bit_sweep_figure(pd.DataFrame(columns=["family", "bits", "refusal"]))
    with pytest.raises(ValueError, match="'z'"):
        outlier_heatmap_figure({"layers": [0], "d_head": 4})


def test_to_jsonable():
    out = to_jsonable({"a": np.float32(1.5), "b": math.nan, "c": (np.int64(2), math.inf), "d": np.array([1, 2]),
                       "e": pd.DataFrame({"x": [1.0, math.nan]}), 3: np.bool_(True)})
    assert out == {"a": 1.5, "b": None, "c": [2, None], "d": [1, 2], "e": [{"x": 1.0}, {"x": None}], "3": True}


# ------------------------------------------------------------------------------------------ chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--hide-scrollbars",
         "--virtual-time-budget=8000"]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian package 'chromium')")
def test_renders_in_headless_chromium(tmp_path, audit):
    path = render_html(audit, tmp_path / "report.html")
    with warnings.catch_warnings():
        dom = subprocess.run([CHROMIUM, *FLAGS, "--dump-dom", path.as_uri()], capture_output=True, text=True,
                             timeout=120, check=True).stdout
    # plotly.js ran: every figure div now holds its rendered SVG
    assert dom.count('class="main-svg"') >= len(FIG_IDS)
    for fid in FIG_IDS:
        assert re.search(rf'id="{fid}"[^>]*class="[^"]*js-plotly-plot', dom), fid
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--screenshot={shot}", "--window-size=1400,3000", path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.exists() and shot.stat().st_size > 50_000
    assert Path(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
