"""The engine catalogues: every listed format parses and applies to the model it is listed for, commands are the
engines' own settings, fixes are what each engine can run (within the budget, cheapest first, the fork marked),
and the default engine follows the model's files."""

from __future__ import annotations

import pytest

from kvgeom.engines import ENGINES, ModelShape, default_engines, get_engine, resolve_engines
from kvgeom.quant import Scheme

SHAPES = [ModelShape(24, 2, 64), ModelShape(4, 2, 128, gguf=True), ModelShape(4, 8, 96), ModelShape(3, 1, 48)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_format_applies_to_its_model(shape):
    for eng in ENGINES.values():
        for f in eng.formats(shape):
            Scheme.parse(f.scheme).check_shape(n_kv_heads=shape.n_kv_heads, d_head=shape.d_head)
            assert f.bits(shape) < 16 or f.scheme == "fp16"
            assert eng.command(f, "MODEL")


def test_catalogue_contents_and_settings():
    s = ModelShape(24, 2, 64)
    llama = {f.name: f for f in get_engine("llama.cpp").formats(s)}
    assert llama["q4_0"].scheme == "q4_0+rot" and llama["q4_0"].setting == "-ctk q4_0 -ctv q4_0 -fa on"
    assert llama["q8_0/q4_0"].scheme == "K:q8_0+rot,V:q4_0+rot"
    assert llama["f16/q4_0"].scheme == "K:fp16,V:q4_0+rot"
    assert get_engine("llama.cpp").formats(ModelShape(4, 2, 96))[0].scheme == "q8_0"  # 96 % 64: no rotation
    assert get_engine("llama.cpp").formats(ModelShape(4, 2, 48)) == []  # blocks of 32 do not tile 48
    vllm = {f.name: f for f in get_engine("vllm").formats(s)}
    assert {"fp8_e4m3", "fp8_e5m2", "int8_per_token_head", "fp8_per_token_head", "int4_per_token_head"} <= set(vllm)
    assert vllm["fp8_e4m3 + calculate_kv_scales"].scheme == "fp8_e4m3@amax"
    assert "int4_per_token_head" not in {f.name for f in get_engine("vllm").formats(ModelShape(4, 2, 96))}
    assert {u.name for u in get_engine("vllm").unsimulated()} >= {"nvfp4", "turboquant_k8v4"}
    hf = get_engine("hf").formats(s)
    assert [f.scheme for f in hf] == ["quanto4-g64-r128", "quanto2-g64-r128"] and {f.prefill for f in hf} == {"full"}
    assert get_engine("hf").formats(ModelShape(4, 2, 96))[0].scheme == "quanto4-g32-r128"


def test_fix_candidates():
    s = ModelShape(24, 2, 64)
    order = [5, 23, 0, 7, 3]
    f = {x.name: x for x in get_engine("vllm").formats(s)}["int4_per_token_head"]
    c = get_engine("vllm").fix_candidates(f, s, layer_order=order, budget_bits=8.5, max_candidates=3, model="M")
    assert [x.name for x in c] == ["skip layers 5", "skip layers 5 23", "skip layers 0 5 23"]
    assert c[1].assignment[5] is None and c[1].assignment[0] == "int4_per_token_head"
    assert c[1].setting.endswith("--kv-cache-dtype int4_per_token_head --kv-cache-dtype-skip-layers 5 23")
    q4 = {x.name: x for x in get_engine("llama.cpp").formats(s)}["q4_0"]
    c = get_engine("llama.cpp").fix_candidates(q4, s, layer_order=order, budget_bits=6.5, max_candidates=4, model="M")
    mainline = [x for x in c if not x.needs]
    assert [x.name for x in mainline] == ["-ctk q4_0 -ctv q8_0", "-ctk q8_0 -ctv q4_0"]  # 6.5 bits each, cheapest
    assert all(Scheme.parse(x.assignment[0]).bits_per_element_for(d_head=64, n_kv_heads=2) <= 6.5 for x in mainline)
    fork = [x for x in c if x.needs]
    assert fork and all("ik_llama.cpp" in x.needs and "-ctk-first q8_0," in x.setting for x in fork)
    assert fork[0].assignment[0] == "q8_0+rot" and fork[0].assignment[1] == "q4_0+rot"
    hq = get_engine("hf").formats(s)[1]
    c = get_engine("hf").fix_candidates(hq, s, layer_order=order, budget_bits=8.5, max_candidates=2, model="M")
    assert "QuantoQuantizedLayer(nbits=2" in c[0].setting and "keep = {5}" in c[0].setting


def test_default_engine_follows_the_model_files():
    assert default_engines(ModelShape(2, 1, 64, gguf=True)) == ("llama.cpp",)
    assert default_engines(ModelShape(2, 1, 64)) == ("vllm", "hf")
    assert resolve_engines("auto", ModelShape(2, 1, 64, gguf=True)) == ("llama.cpp",)
    assert resolve_engines("all") == tuple(ENGINES) and resolve_engines("none") == ()
    assert resolve_engines("hf, vllm") == ("hf", "vllm")
    with pytest.raises(ValueError, match="unknown engine sglang"):
        resolve_engines("sglang")


def test_model_shape_of_a_loaded_model():
    from ..conftest import get_tiny

    m = get_tiny("llama")
    assert ModelShape.of(m) == ModelShape(m.n_layers, m.n_kv_heads, m.d_head, gguf=False)
