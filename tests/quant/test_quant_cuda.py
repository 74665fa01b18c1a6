"""CUDA gives bit-identical results to the CPU path (runs on the device machine; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from kvgeom.quant import StreamQuantizer, fake_quant

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SCHEMES = (
    "fp16 bf16 int2-tensor-sym int4-token-asym int3-head-sym int8-channel-asym int4-group32-asym q8_0 "
    "q4_0 q4_1 q5_0 q5_1 iq4_nl q4_0+rot iq4_nl+rot fp8_e4m3 fp8_e5m2 fp8_e4m3@amax kivi2-g8-r16 kivi4"
).split()


@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("name", SCHEMES)
def test_cuda_matches_cpu_bit_for_bit(name, role):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, 2, 128, generator=g) / torch.rand(3, 300, 2, 128, generator=g).clamp_min(0.05)
    mask = torch.ones(3, 300, dtype=torch.bool)
    mask[1, :40] = False
    cpu = fake_quant(x, name, role=role, mask=mask)
    gpu = fake_quant(x.cuda(), name, role=role, mask=mask.cuda()).cpu()
    assert torch.equal(cpu, gpu)


@pytest.mark.parametrize("name", ["kivi2-g8-r16", "int4-channel-asym", "fp8_e5m2@amax", "q4_0+rot"])
def test_cuda_streaming_matches_cpu(name):
    x = torch.randn(2, 60, 2, 64, generator=torch.Generator().manual_seed(1))
    a, b = StreamQuantizer(name, "k"), StreamQuantizer(name, "k")
    a.append(x[:, :20])
    b.append(x[:, :20].cuda())
    for t in range(20, 60):
        ca, cb = a.append(x[:, t : t + 1]), b.append(x[:, t : t + 1].cuda())
    assert torch.equal(ca, cb.cpu())
    assert torch.equal(a.full_precision_mask(), b.full_precision_mask().cpu())
