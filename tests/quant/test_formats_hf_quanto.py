"""HF's ``QuantizedCache(backend="quanto")``: the grouped affine math against a transcription of optimum-quanto
0.2.7 on HF's ``[batch, head, seq, d_head]`` layout, and the cache (prefill quantized for later calls, residual
window, requantize-all flush seen from the next call) against transformers' own ``QuantizedLayer.update``."""

from __future__ import annotations

import pytest
import torch

from kvgeom.quant import QuantPlan, Scheme, StreamQuantizer, fake_quant


def _quanto(t: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """optimum-quanto 0.2.7, axis 0: group(), MaxOptimizer.optimize, quantize_affine, QBitsDequantizer."""
    base = t.reshape([-1, group])
    rmin = torch.amin(base, dim=[1], keepdim=True)
    rmax = torch.amax(base, dim=[1], keepdim=True)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale, shift = (rmax - rmin) / (qmax - qmin), -rmin
    data = torch.clamp(torch.round((base + shift) / scale), min=0, max=2**bits - 1).to(torch.uint8)
    return (scale * data - shift).reshape(t.shape)


@pytest.mark.parametrize(("bits", "group"), [(2, 64), (4, 32), (4, 16)])
def test_affine_matches_quanto_on_hf_layout(bits, group):
    x = torch.randn(2, 9, 2, 64, generator=torch.Generator().manual_seed(bits + group)) * 2
    ref = _quanto(x.transpose(1, 2).contiguous(), bits, group).transpose(1, 2)  # HF: [b, h, s, d]
    assert torch.equal(fake_quant(x, f"quanto{bits}-g{group}"), ref)


class _Quanto:
    """transformers' QuantizedLayer with quanto's math (the real class needs optimum-quanto only for _quantize)."""

    def __new__(cls, bits, group, residual):
        from transformers.cache_utils import QuantizedLayer

        class Layer(QuantizedLayer):
            def _quantize(self, tensor, axis):
                return _quanto(tensor, bits, group)

            def _dequantize(self, q):
                return q

        return Layer(nbits=bits, q_group_size=group, residual_length=residual)


@pytest.mark.parametrize("residual", [1, 3, 128])
def test_cache_matches_transformers_quantized_layer(residual):
    g = torch.Generator().manual_seed(residual)
    layer = _Quanto(4, 32, residual)
    qk = StreamQuantizer(f"quanto4-g32-r{residual}", "k")
    chunks = [torch.randn(1, 2, 5, 64, generator=g)] + [torch.randn(1, 2, 1, 64, generator=g) for _ in range(7)]
    for x in chunks:  # HF layout [b, h, new, d]
        want, _ = layer.update(x, x)
        got = qk.append(x.transpose(1, 2)).clone()
        new = x.shape[2]
        got[:, -new:] = x.transpose(1, 2)  # prefill="full": each call attends its own new tokens unquantized
        assert torch.equal(got.transpose(1, 2), want)


def test_grammar_and_export():
    s = Scheme.parse("quanto2")
    assert str(s) == "quanto2-g64-r128" and Scheme.parse(str(s)) == s and s.bits_per_element == 2.5
    assert s.k.hf().config == {"backend": "quanto", "nbits": 2, "axis_key": 0, "axis_value": 0, "q_group_size": 64,
                               "residual_length": 128}
    with pytest.raises(ValueError, match="nbits 2 or 4"):
        Scheme.parse("quanto3")
    with pytest.raises(ValueError, match="must divide"):
        fake_quant(torch.randn(1, 2, 1, 48), "quanto4-g32")
    QuantPlan("quanto4", mode="cache", prefill="full")
