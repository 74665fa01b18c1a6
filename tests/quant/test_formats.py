"""The KV-format registry (:mod:`kvgeom.quant.formats`): every registered format round-trips its name, counts
its bits, declares its grammar; eager fake-quant and the streaming cache give the results of the code before
the registry (golden hashes); bit sweeps; registry errors; no type dispatch left in the consumers."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from kvgeom.quant import FORMATS, Scheme, StreamQuantizer, expand_family, fake_quant, valid_forms
from kvgeom.quant.formats import (
    FormatError,
    FrozenOnPrefill,
    KVFormat,
    PerPosition,
    register_format,
    unregister_format,
)
from kvgeom.quant.formats.kivi import KIVICache

#: canonical names, at least one per registered format
SAMPLES = {
    "cast": ["none", "fp16", "bf16"],
    "int": ["int2-tensor-sym", "int4-token-asym", "int8-head-sym", "int3-channel-asym", "int4-group64-asym"],
    "ggml": ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q4_0+rot", "iq4_nl+rot"],
    "fp8": ["fp8_e4m3", "fp8_e5m2", "fp8_e4m3@amax", "fp8_e5m2@amax"],
    "kivi": ["kivi2-g32-r128", "kivi4-g8-r16"],
    "vllm_per_token_head": ["int8_per_token_head", "fp8_per_token_head", "int4_per_token_head"],
    "hf_quanto": ["quanto2-g64-r128", "quanto4-g32-r16"],
}
ALL = [t for texts in SAMPLES.values() for t in texts]

#: VALID_FORMS as the parser printed it before the registry (now built from it), plus the engine formats of #16
OLD_VALID_FORMS = """valid KV-cache quantization schemes:
  none | fp16 | bf16                               cast round trip (none = identity)
  int{b}-{tensor|token|head|channel|group{G}}-{sym|asym}
                                                   uniform, b in 2..8, e.g. int4-group64-asym
  q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | iq4_nl[+rot]  llama.cpp cache types, e.g. q4_0+rot
  fp8_e4m3 | fp8_e5m2[@amax]                       vLLM fp8 cache, e.g. fp8_e4m3@amax
  kivi{b}[-g{G}][-r{R}]                            KIVI, b in {2,4}, defaults G=32 R=128 (R multiple of G)
  int8_per_token_head | fp8_per_token_head | int4_per_token_head
                                                   vLLM per-(token, head) scales; int4 Hadamard-rotated
  quanto{b}[-g{G}][-r{R}]                          HF QuantizedCache (quanto), b in {2,4}, defaults G=64 R=128
  K:<scheme>,V:<scheme>                            separate key/value schemes, e.g. K:kivi2,V:q8_0"""


def test_built_in_formats_in_order():
    assert list(FORMATS)[:5] == ["cast", "int", "ggml", "fp8", "kivi"]
    assert set(SAMPLES) <= set(FORMATS)
    assert valid_forms() == OLD_VALID_FORMS


@pytest.mark.parametrize("text", ALL)
def test_every_format_round_trips_and_counts_bits(text):
    spec = Scheme.parse(text).k
    assert isinstance(spec, KVFormat) and FORMATS[spec.format_name] is type(spec)
    assert text in SAMPLES[spec.format_name]
    assert str(spec) == text and Scheme.parse(str(spec)).k == spec
    assert Scheme.parse(spec) == Scheme(spec, spec)
    for shape in ((64, 2, None), (128, 8, 512)):
        bits = spec.bits_per_element(*shape)
        assert math.isfinite(bits) and 0 < bits <= 16
    assert spec.grammar in valid_forms() and spec.summary in valid_forms()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_registered_format_declares_itself(name):
    cls = FORMATS[name]
    assert cls.format_name == name
    assert isinstance(cls.pattern, re.Pattern) and cls.grammar and cls.summary


def golden_outputs() -> dict[str, list[str]]:
    """fake_quant (with and without mask) and a streamed cache (prefill, decode, row selection) per scheme, role
    and dtype, as hashes of the fp32 bits (the input is numpy's PCG64: the same on every machine)."""
    def h(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]

    rng = np.random.default_rng(14)
    x = torch.from_numpy((rng.standard_t(3, size=(3, 40, 2, 64)) * 2).astype(np.float32))
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, :7] = False
    mask[2, 30:] = False
    schemes = sorted({k.rsplit(" ", 2)[0] for k in json.loads(GOLDEN.read_text())})
    out = {}
    for s in schemes:
        for role in "kv":
            for dt in (torch.float32, torch.bfloat16):
                xx = x.to(dt)
                q = StreamQuantizer(s, role)
                outs = [q.append(xx[:, :20], mask[:, :20])]
                for p in range(20, 40, 3):
                    outs.append(q.append(xx[:, p:p + 3], mask[:, p:p + 3]))
                q.select(torch.tensor([2, 0]))
                outs.append(q.append(xx[[2, 0], :2], mask[[2, 0], :2]))
                out[f"{s} {role} {str(dt)[6:]}"] = [
                    h(fake_quant(xx, s, role=role, mask=mask, backend="eager")),
                    h(fake_quant(xx, s, role=role, backend="eager")),
                    hashlib.sha256("".join(h(o) for o in outs).encode()).hexdigest()[:16]]
    return out


GOLDEN = Path(__file__).with_name("golden_formats.json")


def test_eager_and_stream_results_unchanged():
    """Hashes recorded with the code before the format registry (isinstance dispatch in fake.py/stream.py)."""
    want = json.loads(GOLDEN.read_text())
    got = golden_outputs()
    assert got.keys() == want.keys()
    bad = [k for k in want if got[k] != want[k]]
    assert not bad, f"results changed for {bad}"


@pytest.mark.parametrize(("text", "rule"), [
    ("int4-token-asym", PerPosition), ("q4_0", PerPosition), ("fp8_e4m3", PerPosition), ("none", PerPosition),
    ("int4-tensor-asym", FrozenOnPrefill), ("int4-channel-sym", FrozenOnPrefill), ("fp8_e5m2@amax", FrozenOnPrefill),
    ("kivi2", KIVICache),
])
def test_cache_rules(text, rule):
    spec = Scheme.parse(text).k
    assert type(spec.cache_rule("k")) is rule
    q = StreamQuantizer(text, "k")
    x = torch.randn(2, 5, 2, 64)
    out = q.append(x)
    exact = text in ("none", "kivi2")  # KIVI keeps fewer than R tokens in full precision
    assert bool(q.full_precision_mask().all()) == exact
    assert torch.equal(out, x) == exact


@pytest.mark.parametrize("text", ["int4-token-asym", "q4_0", "q8_0+rot", "fp8_e4m3", "int4-tensor-asym",
                                  "int3-channel-sym", "fp8_e5m2@amax", "none", "kivi2", "quanto4"])
def test_append_new_equals_append(text):
    """A stable rule's append_new gives the new positions append stores (prefill with padding, decode steps and a
    row drop); the others refuse it and say to use append()."""
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(3, 6, 2, 64, generator=g)] + [torch.randn(3, 1, 2, 64, generator=g) for _ in range(3)]
    mask0 = torch.tensor([[False, False, True, True, True, True]] * 2 + [[True] * 6])
    a, b = StreamQuantizer(text, "k"), StreamQuantizer(text, "k")
    if not b.stable:
        with pytest.raises(TypeError, match="use append"):
            b.append_new(chunks[0], mask0)
        return
    got, rows = [], torch.arange(3)
    for i, x in enumerate(chunks):
        if i == 2:  # row 1 finishes
            rows = torch.tensor([0, 2])
            a.select(torch.tensor([0, 2]))
            b.select(torch.tensor([0, 2]))
        x = x[rows]
        m = mask0[rows] if i == 0 else None
        full = a.append(x, m)
        new = b.append_new(x, m)
        assert torch.equal(new, full[:, -x.shape[1]:]), (text, i)
        got.append(new)
    assert b.n_positions == a.n_positions == 9
    with pytest.raises(RuntimeError, match="one of append"):
        a.append_new(chunks[1][:2])


# ---- bit sweeps -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "family"), [
    ("int4-token-asym", "int{b}-token-asym"), ("int3-group32-sym", "int{b}-group32-sym"),
    ("kivi2-g32-r32", "kivi{b}-g32-r32"), ("kivi4", "kivi{b}-g32-r128"), ("q4_0", "q4_0"),
    ("fp8_e4m3@amax", "fp8_e4m3@amax"), ("none", "none"),
    ("K:int4-token-asym,V:int4-channel-asym", "K:int4-token-asym,V:int4-channel-asym"),  # a pair: one point
])
def test_family(text, family):
    """What ``kvgeom.audit.config.family_of`` computed with a regex: ``Scheme.parse(s).family``."""
    s = Scheme.parse(text)
    assert s.family == family
    for b in s.bit_widths:
        t = s.at_bits(b)
        assert t is not None and str(t) == family.format(b=b) and t.family == family
        assert Scheme.parse(str(t)) == t
    assert s.at_bits(99) is None


def test_at_bits():
    assert Scheme.parse("int4-token-asym").at_bits(3) == Scheme.parse("int3-token-asym")
    assert Scheme.parse("int4-token-asym").bit_widths == (2, 3, 4, 5, 6, 7, 8)
    assert Scheme.parse("kivi2-g16-r32").at_bits(4) == Scheme.parse("kivi4-g16-r32")
    assert Scheme.parse("kivi2").at_bits(3) is None and Scheme.parse("kivi2").bit_widths == (2, 4)
    assert Scheme.parse("q4_0").at_bits(4) is None and Scheme.parse("q4_0").bit_widths == ()


def test_expand_family():
    """As ``kvgeom.sweep.expand_family`` did (text kept as written), widths the format does not admit skipped."""
    assert expand_family("int{b}-token-asym", (8, 4)) == [(8, "int8-token-asym"), (4, "int4-token-asym")]
    assert expand_family("kivi{b}", (8, 4, 2)) == [(4, "kivi4"), (2, "kivi2")]
    assert expand_family("q4_0", (8,)) == [(None, "q4_0")]
    assert expand_family("K:int{b}-token-asym,V:kivi{b}", (8, 4)) == [(4, "K:int4-token-asym,V:kivi4")]
    with pytest.raises(ValueError, match="matches none"):
        expand_family("int{b}-nope", (4,))
    with pytest.raises(ValueError, match="no valid bit-width"):
        expand_family("kivi{b}", (8, 6))
    with pytest.raises(ValueError, match="matches none"):
        expand_family("q9_9", (4,))


# ---- the registry -----------------------------------------------------------------------------------------
def test_register_refuses_duplicates_and_incomplete_formats():
    with pytest.raises(ValueError, match="already registered"):
        register_format(FORMATS["int"])

    @dataclass(frozen=True)
    class Nameless(KVFormat):
        pass

    with pytest.raises(TypeError, match="format_name"):
        register_format(Nameless)
    with pytest.raises(KeyError, match="no KV format named"):
        unregister_format("nope")


def test_format_errors_name_the_text_and_list_the_forms():
    with pytest.raises(ValueError) as err:
        Scheme.parse("K:q4_0,V:kivi3")
    msg = str(err.value)
    assert "'K:q4_0,V:kivi3'" in msg and "KIVI bits must be 2 or 4" in msg and OLD_VALID_FORMS in msg
    assert issubclass(FormatError, ValueError)


def test_consumers_do_not_dispatch_on_spec_types():
    """fake.py, stream.py, the Triton dispatch, the mitigation search and the export ask the spec, not its type."""
    root = Path(__file__).parents[2] / "kvgeom"
    names = ("CastSpec", "IntSpec", "GGMLSpec", "FP8Spec", "KIVISpec")
    for rel in ("quant/fake.py", "quant/stream.py", "quant/triton/dispatch.py", "mitigation/candidates.py",
                "mitigation/export.py"):
        text = (root / rel).read_text()
        assert not any(n in text for n in names), rel


def test_moved_names_still_import_with_a_warning():
    from kvgeom.deprecation import MOVED
    from kvgeom.quant.formats.ggml import ggml_kv

    with pytest.warns(DeprecationWarning, match="kvgeom.quant.formats.ggml"):
        from kvgeom.quant.fake import ggml_kv as old
    assert old is ggml_kv
    import kvgeom.quant.triton_kernels  # noqa: F401 -- the shims import without Triton; their names need it
    import kvgeom.quant.triton_kivi  # noqa: F401

    assert MOVED["kvgeom.quant.triton_kernels"] == {"*": "kvgeom.quant.triton"}
    assert MOVED["kvgeom.quant.triton_kivi"] == {"*": "kvgeom.quant.triton.kivi"}
