"""Property tests of the scheme grammar (issue #17): every valid string of every registered format's grammar
round-trips (``Scheme.parse(str(s)) == s``), in any case and with surrounding spaces, alone or as a K/V pair; every
string a format's pattern admits either parses or is refused with the grammar in the message; a mutated string is
refused with the grammar, or parses to a scheme that round-trips: it never raises anything else."""

from hypothesis import given
from hypothesis import strategies as st

from kvgeom.quant import Scheme
from kvgeom.quant.formats import FORMATS
from kvgeom.quant.scheme import GGML_TYPES, valid_forms

GRANULARITY = st.sampled_from(["tensor", "token", "head", "channel"]) | st.sampled_from([8, 16, 32, 64, 128]).map(
    "group{}".format)

#: valid strings of each built-in format, from its grammar (``valid_forms()``) and its rules
VALID = {
    "cast": st.sampled_from(["none", "fp16", "bf16"]),
    "int": st.builds("int{}-{}-{}".format, st.integers(2, 8), GRANULARITY, st.sampled_from(["sym", "asym"])),
    "ggml": st.builds("{}{}".format, st.sampled_from(GGML_TYPES), st.sampled_from(["", "+rot"])),
    "fp8": st.builds("fp8_{}{}".format, st.sampled_from(["e4m3", "e5m2"]), st.sampled_from(["", "@amax"])),
    "kivi": st.builds(lambda b, g, k, show_g, show_r: f"kivi{b}" + (f"-g{g}" if show_g else "")
                      + (f"-r{(g if show_g else 32) * k}" if show_r else ""),
                      st.sampled_from([2, 4]), st.sampled_from([16, 32, 64]), st.integers(1, 8), st.booleans(),
                      st.booleans()),
    "vllm_per_token_head": st.sampled_from(["int8_per_token_head", "fp8_per_token_head", "int4_per_token_head"]),
    "hf_quanto": st.builds(lambda b, g, r, show_g, show_r: f"quanto{b}" + (f"-g{g}" if show_g else "")
                           + (f"-r{r}" if show_r else ""),
                           st.sampled_from([2, 4]), st.integers(1, 256), st.integers(1, 512), st.booleans(),
                           st.booleans()),
}
BASE = st.one_of(*VALID.values())
SCHEME = BASE | st.builds("K:{},V:{}".format, BASE, BASE)


def test_every_registered_format_has_a_strategy():
    assert set(VALID) == set(FORMATS), "add the new format's valid strings to VALID"


@given(SCHEME)
def test_valid_strings_round_trip(text):
    s = Scheme.parse(text)
    assert Scheme.parse(str(s)) == s and str(Scheme.parse(str(s))) == str(s)
    assert Scheme.parse(f"  {text.upper()} ") == s


@given(st.sampled_from(list(FORMATS.values())).flatmap(lambda f: st.from_regex(f.pattern, fullmatch=True)))
def test_any_string_of_a_pattern_parses_or_is_refused_with_the_grammar(text):
    try:
        s = Scheme.parse(text)
    except ValueError as err:
        assert valid_forms() in str(err) and repr(text) in str(err)
        return
    assert Scheme.parse(str(s)) == s


_CHARS = st.sampled_from(list("abcdefgikmnoqrstuvwxyz0123456789_-+@:, ") + ["K:", "V:", "int", "-g", "-r", "group"])


@st.composite
def mutated(draw):
    text = draw(SCHEME)
    i = draw(st.integers(0, len(text)))
    op = draw(st.sampled_from(["insert", "delete", "replace", "swap"]))
    c = draw(_CHARS)
    if op == "insert":
        return text[:i] + c + text[i:]
    if op == "delete":
        return text[:i] + text[i + 1:]
    if op == "replace":
        return text[:i] + c + text[i + 1:]
    j = draw(st.integers(0, len(text)))
    chars = list(text)
    if i < len(chars) and j < len(chars):
        chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


@given(mutated())
def test_mutated_strings_are_refused_with_the_grammar_or_round_trip(text):
    try:
        s = Scheme.parse(text)
    except ValueError as err:
        assert valid_forms() in str(err)
        return
    assert Scheme.parse(str(s)) == s


@given(SCHEME, st.sampled_from(list("!#%&*=?~") + ["-", "-x", "+", "@", ":"]))
def test_a_valid_string_with_junk_appended_is_refused_with_the_grammar(text, junk):
    try:
        Scheme.parse(text + junk)
    except ValueError as err:
        assert valid_forms() in str(err)
    else:
        raise AssertionError(f"{text + junk!r} was accepted")
