"""Exact conversions between what a network may predict (THEORY T21): x0, ε, v, score and EDM's F.

For a latent z = α·x0 + σ·ε (T1) every prediction determines the others; x0 is the hub:
`to_x0(kind, pred, z, alpha, sigma)` and `from_x0(kind, x0, z, alpha, sigma)`. α, σ may be scalars,
per example (shaped to broadcast) or per element. F is EDM's raw output in VE space (T2, T6):
x̃ = z/α, σ̃ = σ/α, F = (x0 − c_skip(σ̃)·x̃)/c_out(σ̃).
"""
from __future__ import annotations

import torch

from .precond import EDMPrecond

KINDS = ("x0", "eps", "v", "score", "F")


def _check(kind):
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not allowed; choose one of {list(KINDS)}")


def to_x0(kind: str, pred: torch.Tensor, z: torch.Tensor, alpha, sigma,
          sigma_data: float = 0.5) -> torch.Tensor:
    """x̂0 from a prediction of `kind` (T21)."""
    _check(kind)
    alpha, sigma = torch.as_tensor(alpha, dtype=z.dtype), torch.as_tensor(sigma, dtype=z.dtype)
    if kind == "x0":
        return pred
    if kind == "eps":                                   # x̂ = (z − σε̂)/α
        return (z - sigma * pred) / alpha
    if kind == "v":                                     # v = αε − σx, z = αx + σε  ⇒  x = (αz − σv)/(α² + σ²)
        return (alpha * z - sigma * pred) / (alpha.square() + sigma.square())
    if kind == "score":                                 # s = −ε/σ = −(z − αx)/σ²  ⇒  x = (z + σ²s)/α
        return (z + sigma.square() * pred) / alpha
    sc = EDMPrecond(sigma_data)(sigma / alpha)          # F: μ = c_skip·x̃ + c_out·F in VE space (T2, T6)
    return sc.c_skip * (z / alpha) + sc.c_out * pred


def from_x0(kind: str, x0: torch.Tensor, z: torch.Tensor, alpha, sigma,
            sigma_data: float = 0.5) -> torch.Tensor:
    """The prediction of `kind` that a given x̂0 amounts to (T21)."""
    _check(kind)
    alpha, sigma = torch.as_tensor(alpha, dtype=z.dtype), torch.as_tensor(sigma, dtype=z.dtype)
    eps = (z - alpha * x0) / sigma
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "score":
        return -eps / sigma
    sc = EDMPrecond(sigma_data)(sigma / alpha)
    return (x0 - sc.c_skip * (z / alpha)) / sc.c_out


def convert(pred: torch.Tensor, src: str, dst: str, z: torch.Tensor, alpha, sigma,
            sigma_data: float = 0.5) -> torch.Tensor:
    """A prediction of kind `src` as kind `dst`, exactly (through x0)."""
    return from_x0(dst, to_x0(src, pred, z, alpha, sigma, sigma_data), z, alpha, sigma, sigma_data)
