"""Property tests of the quantizers (issue #17), every registered format through ``fake_quant``:

* no NaN and no inf from zero, constant, subnormal or huge inputs, for keys and values. "Huge" means up to fp16's
  largest value (65504): the range of the fp16 K/V these formats replace, and of the fp16 scales that the llama.cpp
  and KIVI formats store (beyond it their scale overflows, as it does in llama.cpp; the ``int`` formats' fp32
  scales take much more, see ``test_int_formats_take_inputs_far_beyond_fp16``);
* an inf (or NaN) input is refused with a ValueError naming the site, never turned into a silent NaN: that is the
  decided behaviour (``kvgeom.quant.fake.check_input``), and generation flags rows whose logits are not finite
  (``tests/runtime/test_generation.py::test_nonfinite_logits_are_flagged_per_row``);
* idempotence, ``q(q(x)) == q(x)`` bit for bit, where the format guarantees it: the casts, plain fp8 (a cast with
  saturation), and the absmax-scaled formats (``int{b}-*-sym``, ``q8_0``, ``q4_0``, ``q5_0``), whose largest
  element maps to a code exactly, so the scale is the same the second time. Inputs are kept to normal floats
  (>= 1e-30): a scale in fp32's subnormal range loses the bits that make it exact. Not guaranteed, so not tested:
  min/max (``asym``, ``q4_1``, ``q5_1``, KIVI) and measured ranges (``@amax``), the rotation of ``+rot``, and
  ``iq4_nl``'s non-uniform codebook.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvgeom.quant import fake_quant
from kvgeom.quant.formats import FORMATS
from kvgeom.quant.scheme import GGML_TYPES

SCHEMES = ["none", "fp16", "bf16", "int4-tensor-sym", "int4-token-asym", "int2-channel-asym", "int8-head-sym",
           "int3-group32-asym", "int4-group64-sym", *GGML_TYPES, "q4_0+rot", "q8_0+rot", "fp8_e4m3", "fp8_e5m2",
           "fp8_e4m3@amax", "fp8_e5m2@amax", "kivi2", "kivi4-g32-r32", "kivi2-g64-r128",
           "int8_per_token_head", "fp8_per_token_head", "int4_per_token_head", "quanto4", "quanto2-g32-r16"]
IDEMPOTENT = ["none", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int4-tensor-sym", "int3-token-sym", "int8-head-sym",
              "int2-channel-sym", "int4-group32-sym", "q8_0", "q4_0", "q5_0"]
FP16_MAX = 65504.0
SHAPE = (2, 40, 2, 64)  # 40 positions: KIVI's prefill quantizes groups of 32 and keeps the rest in full precision


def test_every_registered_format_is_covered():
    from kvgeom.quant import Scheme

    assert {type(Scheme.parse(s).k).format_name for s in SCHEMES} == set(FORMATS)


@st.composite
def special_inputs(draw):
    kind = draw(st.sampled_from(["zero", "constant", "subnormal", "huge", "mixed"]))
    sign = torch.tensor(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=64, max_size=64)))
    if kind == "zero":
        return kind, torch.zeros(SHAPE)
    if kind == "constant":
        return kind, torch.full(SHAPE, draw(st.floats(-FP16_MAX, FP16_MAX)))
    if kind == "subnormal":
        return kind, torch.full(SHAPE, draw(st.floats(1e-45, 1e-38))) * sign
    if kind == "huge":
        return kind, torch.full(SHAPE, draw(st.floats(1e4, FP16_MAX))) * sign
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e3]))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * scale
    return kind, x.clamp(-FP16_MAX, FP16_MAX)


@pytest.mark.parametrize("scheme", SCHEMES)
@given(special_inputs())
def test_no_nan_or_inf_from_zero_constant_subnormal_or_huge_inputs(scheme, case):
    kind, x = case
    for role in ("k", "v"):
        y = fake_quant(x, scheme, role=role, backend="eager")
        assert y.shape == x.shape and bool(torch.isfinite(y).all()), (scheme, kind, role)


@pytest.mark.parametrize("scheme", SCHEMES)
@given(st.sampled_from([float("inf"), float("-inf"), float("nan")]), st.integers(0, 39))
def test_inf_or_nan_inputs_are_refused_never_a_silent_nan(scheme, bad, pos):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(pos))
    x[1, pos, 0, 5] = bad
    with pytest.raises(ValueError, match=r"non-finite K at site 'blocks.3.attn.hook_k'.*first at batch 1, pos"):
        fake_quant(x, scheme, role="k", site="blocks.3.attn.hook_k")


@pytest.mark.parametrize("scheme", IDEMPOTENT)
@given(st.integers(0, 2**16), st.sampled_from([1e-30, 1e-3, 1.0, 1e4]))
def test_idempotent_where_the_format_guarantees_it(scheme, seed, scale):
    x = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * scale).clamp(-FP16_MAX, FP16_MAX)
    for role in ("k", "v"):
        once = fake_quant(x, scheme, role=role, backend="eager")
        assert torch.equal(fake_quant(once, scheme, role=role, backend="eager"), once), (scheme, role)


@pytest.mark.parametrize("scheme", ["int4-tensor-sym", "int8-head-sym", "int4-group32-sym", "int4-token-asym"])
@given(st.floats(1e5, 1e36))
def test_int_formats_take_inputs_far_beyond_fp16(scheme, big):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * big
    assert bool(torch.isfinite(fake_quant(x, scheme, backend="eager")).all())
