"""The stage registry: a stage sees only what it declares; bad declarations are refused at registration;
the page, the tables and the schema come from the registered stages."""

import pytest

from kvgeom.audit import STAGE_REGISTRY, Section, Stage, StageResults, default_stages, register_stage, stage_names
from kvgeom.audit.stage import unregister_stage


def _noop(inputs, results):
    return {"ok": True}


def test_builtin_stages_in_pipeline_order():
    assert default_stages() == ("baseline", "layer_sweep", "sensitivity", "outliers", "channel_ablation", "pcr",
                                "label", "mitigation", "export", "engine_matrix", "bit_sweep", "judges")
    assert stage_names(default_only=False)[-2:] == ("agreement", "judges")  # judges last: it reads every row
    for s in STAGE_REGISTRY.values():  # every stage reads only earlier stages
        assert all(STAGE_REGISTRY[d].order < s.order for d in s.reads), s.name


def test_a_stage_sees_only_what_it_declares():
    label = STAGE_REGISTRY["label"]
    everything = {n: {"name": n} for n in STAGE_REGISTRY}
    seen = label.results_for(everything)
    assert isinstance(seen, StageResults)
    assert set(seen) == {"baseline", "layer_sweep", "pcr", "channel_ablation"}
    assert seen["pcr"] == {"name": "pcr"}
    with pytest.raises(KeyError, match="does not declare it"):
        seen["outliers"]
    # optional results may be absent; required ones may not
    assert "channel_ablation" not in label.results_for({"baseline": {}, "layer_sweep": {}, "pcr": {}})
    with pytest.raises(KeyError, match="needs the results of \\['pcr'\\]"):
        label.results_for({"baseline": {}, "layer_sweep": {}})


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_stage(Stage("baseline", order=999, run=_noop))
    with pytest.raises(ValueError, match="not a registered stage"):
        register_stage(Stage("toy_a", order=999, run=_noop, requires=("nope",)))
    with pytest.raises(ValueError, match="give it an order after 'label'"):
        register_stage(Stage("toy_b", order=65, run=_noop, requires=("label",)))
    with pytest.raises(ValueError, match="identifier"):
        Stage("bad name", order=1, run=_noop)
    with pytest.raises(ValueError, match="cannot read its own result"):
        Stage("selfish", order=1, run=_noop, requires=("selfish",))
    assert not {"toy_a", "toy_b"} & set(STAGE_REGISTRY)


def test_register_then_unregister_a_stage():
    toy = register_stage(Stage("toy_c", order=500, run=_noop, requires=("baseline",), default=False,
                               section=Section("toy-c", "Toy", "", lambda r, st: "<p>toy</p>")))
    try:
        assert STAGE_REGISTRY["toy_c"] is toy and "toy_c" not in default_stages()
        with pytest.raises(ValueError, match="is read by"):
            unregister_stage("baseline")
    finally:
        unregister_stage("toy_c")
    assert "toy_c" not in STAGE_REGISTRY


def test_page_sections_come_from_the_registry():
    from kvgeom.report import report_html

    toy = register_stage(Stage("toy_d", order=500, run=_noop, default=False,
                               section=Section("toy-d", "Toy section", "how", lambda r, st: f"<p>{r['x']}</p>")))
    try:
        page = report_html({"stages": {"toy_d": {"x": "drawn-from-the-toy-stage"}}})
        assert 'id="toy-d"' in page and "drawn-from-the-toy-stage" in page
        assert page.index('id="label"') < page.index('id="summary"') < page.index('id="layer-sweep"') \
            < page.index('id="toy-d"') < page.index('id="timings"')
    finally:
        unregister_stage(toy.name)
