"""kvgeom.quant.fake: how ``fake_quant`` hands a call to the fused kernels (a stand-in kernel module, no Triton)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvgeom.quant import fake as fake_mod
from kvgeom.quant import fake_quant


@pytest.fixture
def kernel_calls(monkeypatch):
    """Replace the Triton kernel module by one that records the mask it gets and returns eager's result."""
    calls: list[torch.Tensor | None] = []

    def fused(x, spec, role, mask=None):
        calls.append(mask)
        return fake_quant(x, spec, role=role, mask=mask, backend="eager")

    monkeypatch.setattr(fake_mod, "_dispatch", lambda: SimpleNamespace(OPT_IN=(), fused_fake_quant=fused))
    return calls


def test_no_mask_reaches_the_kernels_as_none(kernel_calls):
    """Without a mask the kernels get None (their no-mask path: no mask loads, no KIVI permutation), not an
    all-true mask; a given mask is passed through unchanged."""
    x = torch.randn(2, 9, 2, 32)
    for scheme in ("int4-token-asym", "kivi2-g8-r16"):
        fake_quant(x, scheme, backend="triton")
        assert kernel_calls[-1] is None
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1, :3] = False
        fake_quant(x, scheme, mask=mask, backend="triton")
        assert kernel_calls[-1] is mask


def test_bad_mask_is_refused_before_the_kernels(kernel_calls):
    x = torch.randn(2, 9, 2, 32)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        fake_quant(x, "int4-token-asym", mask=torch.ones(2, 9), backend="triton")
    assert kernel_calls == []
