"""Small numeric helpers shared by the quantizers."""

from __future__ import annotations

import torch
from torch import Tensor


def div(a: Tensor | float, b: Tensor | float) -> Tensor:
    """IEEE fp32 ``a / b`` for a scalar on either side.

    ``tensor / scalar`` on CUDA and ``scalar / tensor`` everywhere are computed by torch as a product with a
    reciprocal (two roundings); dividing two same-shaped tensors is a true division, as in C.
    """
    if not isinstance(a, Tensor):
        assert isinstance(b, Tensor)
        return torch.full_like(b, a) / b
    if not isinstance(b, Tensor):
        return a / torch.full_like(a, b)
    return a / b
