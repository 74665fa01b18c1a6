"""Noise vectors: orthonormal bases, projections, random subspaces and the noise kinds of :mod:`kvgeom.noise`."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

NOISE_KINDS = ("none", "quant", "isotropic", "subspace", "random", "quant_in", "quant_out")


# ---- linear algebra ---------------------------------------------------------------------------------
def orthonormal(basis: Float[Tensor, "d k"]) -> Float[Tensor, "d k"]:
    """Orthonormal columns spanning ``basis`` (reduced QR)."""
    q, _ = torch.linalg.qr(basis.to(torch.float64))
    return q


def project(x: Float[Tensor, "... d"], basis: Float[Tensor, "d k"]) -> Float[Tensor, "... d"]:
    """``P_S x = B (Bᵀ x)`` along the last axis (``B`` orthonormal)."""
    b = basis.to(device=x.device, dtype=x.dtype)
    return (x @ b) @ b.T


def random_subspace(d: int, k: int, generator: torch.Generator) -> Float[Tensor, "d k"]:
    """A uniformly random rank-``k`` subspace of ``R^d``: ``qr(G)``, ``G ~ N(0, 1)^{d×k}`` (float64)."""
    g = torch.randn(d, k, generator=generator, dtype=torch.float64)
    return orthonormal(g)


def _match_norm(n: Tensor, ref_norm: Tensor) -> Tensor:
    nn_ = n.norm(dim=-1, keepdim=True)
    return torch.where(nn_ > 0, n * (ref_norm / nn_.clamp_min(1e-30)), torch.zeros_like(n))


def make_noise(
    kind: str,
    e: Float[Tensor, "... d"],
    *,
    basis: Float[Tensor, "d k"] | None = None,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "... d"]:
    """The noise ``n`` of ``kind`` (see the module table) for error vectors ``e`` (last axis = feature).

    ``isotropic``/``subspace``/``random`` draw Gaussian noise from ``generator`` and rescale each vector
    to ``||e||``; ``random`` needs ``basis`` = a random subspace (see :func:`random_subspace`).
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid: {', '.join(NOISE_KINDS)}")
    e64 = e.to(torch.float64)
    if kind == "none":
        return torch.zeros_like(e)
    if kind == "quant":
        return e.clone()
    if kind in ("subspace", "random", "quant_in", "quant_out") and basis is None:
        raise ValueError(f"noise kind {kind!r} needs a subspace basis [d, k]")
    if kind == "quant_in":
        return project(e64, basis).to(e.dtype)
    if kind == "quant_out":
        return (e64 - project(e64, basis)).to(e.dtype)
    g = torch.randn(e.shape, generator=generator, dtype=torch.float64)
    if kind in ("subspace", "random"):
        g = project(g, basis)
    return _match_norm(g, e64.norm(dim=-1, keepdim=True)).to(e.dtype)
