"""Scheme parsing, canonical printing, round trips, errors and bits per element."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvgeom.quant import CastSpec, FP8Spec, GGMLSpec, IntSpec, KIVISpec, Scheme

CANONICAL = [
    "none",
    "fp16",
    "bf16",
    "int2-tensor-sym",
    "int4-token-asym",
    "int8-head-sym",
    "int3-channel-asym",
    "int4-group64-asym",
    "q8_0",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "iq4_nl",
    "q4_0+rot",
    "iq4_nl+rot",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp8_e4m3@amax",
    "kivi2-g32-r128",
    "kivi4-g8-r16",
    "K:kivi2-g32-r128,V:q8_0",
    "K:int4-channel-asym,V:int4-token-asym",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_forms_round_trip(text):
    s = Scheme.parse(text)
    assert str(s) == text
    assert Scheme.parse(str(s)) == s


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kivi2", KIVISpec(2, 32, 128)),
        ("kivi4-g64", KIVISpec(4, 64, 128)),
        ("kivi2-r64", KIVISpec(2, 32, 64)),
        ("  Q4_0+ROT ", GGMLSpec("q4_0", True)),
        ("int4-group128-sym", IntSpec(4, "group", True, 128)),
        ("int8-token-asym", IntSpec(8, "token", False, None)),
        ("fp8_e5m2@amax", FP8Spec("e5m2", True)),
        ("bf16", CastSpec("bf16")),
    ],
)
def test_parse_values(text, expected):
    s = Scheme.parse(text)
    assert s.k == expected and s.v == expected
    assert not s.is_pair


def test_pair_roles_and_printing():
    s = Scheme.parse("K:kivi2, V:q8_0")
    assert s.for_role("k") == KIVISpec(2) and s.for_role("v") == GGMLSpec("q8_0")
    assert str(s) == "K:kivi2-g32-r128,V:q8_0"
    assert Scheme.parse("v:q8_0,k:kivi2") == s
    same = Scheme.parse("K:q4_0,V:q4_0")
    assert same == Scheme.parse("q4_0") and str(same) == "q4_0"
    with pytest.raises(ValueError, match="'k' or 'v'"):
        s.for_role("q")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("int9-token-sym", "2..8"),
        ("int1-token-sym", "2..8"),
        ("int4-group0-asym", "group size"),
        ("int4-block-sym", "matches none"),
        ("int4-token", "matches none"),
        ("q6_0", "matches none"),
        ("q4_k", "matches none"),
        ("kivi3", "2 or 4"),
        ("kivi2-g32-r48", "multiple of G=32"),
        ("kivi2-g32-r16", "multiple of G=32"),
        ("int4-token-sym+rot", "+rot applies only"),
        ("fp16@amax", "@amax applies only"),
        ("K:q4_0", "both K"),
        ("K:q4_0,K:q8_0", "given twice"),
        ("Q:q4_0,V:q8_0", "'K:' or 'V:'"),
        ("K:q4_0,V:int9-token-sym", "2..8"),
        ("", "matches none"),
    ],
)
def test_invalid_strings_list_valid_forms(text, reason):
    with pytest.raises(ValueError) as err:
        Scheme.parse(text)
    msg = str(err.value)
    assert reason in msg
    assert repr(text) in msg
    for form in (
        "int{b}-{tensor|token|head|channel|group{G}}-{sym|asym}",
        "q4_0+rot",
        "fp8_e4m3@amax",
        "kivi{b}[-g{G}][-r{R}]",
        "K:<scheme>,V:<scheme>",
        "none | fp16 | bf16",
    ):
        assert form in msg


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("q4_0", 4.5),
        ("q8_0", 8.5),
        ("q4_1", 5.0),
        ("q5_0", 5.5),
        ("q5_1", 6.0),
        ("iq4_nl", 4.5),
        ("q4_0+rot", 4.5),
        ("int4-group64-asym", 4.5),
        ("int4-group64-sym", 4.25),
        ("fp8_e4m3", 8.0),
        ("fp8_e5m2@amax", 8.0),
        ("fp16", 16.0),
        ("bf16", 16.0),
        ("none", 16.0),
        ("kivi2", 3.0),
        ("kivi4-g64", 4.5),
        ("K:q4_0,V:q8_0", 6.5),
        ("int4-tensor-asym", 4.0),
        ("int4-channel-sym", 4.0),
    ],
)
def test_bits_per_element_property(text, bits):
    assert Scheme.parse(text).bits_per_element == pytest.approx(bits)


def test_bits_per_element_shape_dependent():
    token = Scheme.parse("int4-token-asym")
    assert token.bits_per_element == pytest.approx(4 + 32 / 128)  # default 2 heads x 64 dims
    assert token.bits_per_element_for(d_head=128, n_kv_heads=8) == pytest.approx(4 + 32 / 1024)
    head = Scheme.parse("int8-head-sym")
    assert head.bits_per_element_for(d_head=128, n_kv_heads=8) == pytest.approx(8 + 16 / 128)
    chan = Scheme.parse("int2-channel-asym")
    assert chan.bits_per_element_for(d_head=64, n_kv_heads=2, seq_len=512) == pytest.approx(2 + 32 / 512)
    tensor = Scheme.parse("int2-tensor-sym")
    assert tensor.bits_per_element_for(d_head=64, n_kv_heads=2, seq_len=4) == pytest.approx(2 + 16 / 512)


_base = st.one_of(
    st.sampled_from(["none", "fp16", "bf16"]),
    st.builds(
        lambda b, g, s, gs: f"int{b}-{'group' + str(gs) if g == 'group' else g}-{s}",
        st.integers(2, 8),
        st.sampled_from(["tensor", "token", "head", "channel", "group"]),
        st.sampled_from(["sym", "asym"]),
        st.integers(1, 512),
    ),
    st.builds(
        lambda t, r: t + ("+rot" if r else ""),
        st.sampled_from(["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]),
        st.booleans(),
    ),
    st.builds(lambda f, a: f"fp8_{f}" + ("@amax" if a else ""), st.sampled_from(["e4m3", "e5m2"]), st.booleans()),
    st.builds(
        lambda b, g, k: f"kivi{b}-g{g}-r{g * k}",
        st.sampled_from([2, 4]),
        st.integers(1, 64),
        st.integers(1, 8),
    ),
)


@given(_base, _base)
def test_round_trip_property(k, v):
    for text in (k, f"K:{k},V:{v}"):
        s = Scheme.parse(text)
        assert Scheme.parse(str(s)) == s
        assert str(Scheme.parse(str(s))) == str(s)
