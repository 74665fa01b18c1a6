"""llama.cpp cache types <-> kvgeom schemes: one table, consistent with every format's ``llama_cpp()``
(``kvgeom.validate.types``)."""

import pytest

from kvgeom.quant import Scheme
from kvgeom.quant.formats import LlamaCppType
from kvgeom.quant.ggml import GGML_TYPES
from kvgeom.validate import DEFAULT_FORMATS, LLAMA_CPP_CACHE_TYPES, EngineFormat, parse_formats


def test_the_table_holds_llama_cpps_cache_types():
    # common/arg.cpp kv_cache_types at llama.cpp 0c1e57098
    assert set(LLAMA_CPP_CACHE_TYPES) == {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"}


@pytest.mark.parametrize("cache_type", [t for t in LLAMA_CPP_CACHE_TYPES if t != "f32"])
def test_the_table_agrees_with_each_formats_llama_cpp_name(cache_type):
    """The kvgeom scheme of a llama.cpp type names that type back (export_settings' direction)."""
    for rotated in (False, True) if cache_type in GGML_TYPES else (None,):
        text = LLAMA_CPP_CACHE_TYPES[cache_type] + ("+rot" if rotated else "")
        assert Scheme.parse(text).k.llama_cpp() == LlamaCppType(cache_type, rotated=rotated)


def test_f32_is_kvgeoms_identity():
    assert Scheme.parse(LLAMA_CPP_CACHE_TYPES["f32"]).k.is_identity


@pytest.mark.parametrize(("text", "d_head", "rotation", "scheme"), [
    ("q4_0", 64, True, "q4_0+rot"),
    ("q4_0", 128, True, "q4_0+rot"),
    ("q4_0", 96, True, "q4_0"),            # d_head not a multiple of 64: llama.cpp does not rotate
    ("q4_0", 64, False, "q4_0"),           # LLAMA_ATTN_ROT_DISABLE
    ("f16", 64, True, "fp16"),             # unquantized: never rotated
    ("f32", 64, True, "none"),
    ("bf16", 64, True, "bf16"),
    ("q8_0/q4_0", 64, True, "K:q8_0+rot,V:q4_0+rot"),
    ("q8_0/f16", 64, True, "K:q8_0+rot,V:fp16"),
    ("f16/q4_0", 64, False, "K:fp16,V:q4_0"),
    ("iq4_nl", 64, True, "iq4_nl+rot"),
])
def test_rotation_rule_and_pairs(text, d_head, rotation, scheme):
    assert EngineFormat.parse(text).kvgeom_scheme(d_head, rotation=rotation) == scheme


def test_parse_round_trip_and_defaults():
    for f in parse_formats(None):
        assert EngineFormat.parse(str(f)) == f
    assert [str(f) for f in parse_formats(None)] == list(DEFAULT_FORMATS)
    assert [str(f) for f in parse_formats("q4_0, Q8_0/Q4_0,q4_0/q4_0")] == ["q4_0", "q8_0/q4_0"]
    assert EngineFormat.parse("q8_0/q4_0").quantized_v and not EngineFormat.parse("q4_0/f16").quantized_v


@pytest.mark.parametrize(("text", "match"), [
    ("int4-token-asym", "no llama.cpp cache type stores"),
    ("q4_0+rot", "llama.cpp calls it 'q4_0'"),
    ("fp16", "llama.cpp calls it 'f16'"),
    ("q4_k", "not a llama.cpp cache type"),
    ("q8_0/q4_0/f16", "K/V pair"),
    ("q8_0,,q4_0", "empty entry"),
    ("q8_0/", "K/V pair"),
])
def test_a_format_llama_cpp_has_not_is_named(text, match):
    with pytest.raises(ValueError, match=match) as err:
        parse_formats(text)
    assert "f16, bf16, q8_0" in str(err.value) or "empty entry" in str(err.value)
