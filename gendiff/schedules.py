"""Noise schedules: the sampling σ grid, the training σ density, and the learning-rate schedule.

THEORY T18 ("EDM training", "EDM sampling") and §10. STYLE 5: grids end with a trailing zero;
densities are objects with `sample(n, generator)` and a density, so the loss never draws σ itself.
"""
from __future__ import annotations

import math

import torch

from .checks import check_positive


def edm_sigmas(steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 5.0, rho: float = 7.0,
               dtype=torch.float64) -> torch.Tensor:
    """EDM eq. 5: σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, with a trailing 0: [steps + 1]."""
    check_positive("steps", steps, integer=True)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
    check_positive("rho", rho)
    i = torch.arange(steps, dtype=dtype) / max(steps - 1, 1)
    s = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


class LogNormalSigma:
    """EDM's training density: ln σ ~ N(P_mean, P_std²), i.e. λ = −2 ln σ ~ N(−2·P_mean, (2·P_std)²) (T18)."""

    def __init__(self, p_mean: float = -2.4, p_std: float = 1.5):
        if isinstance(p_mean, bool) or not (isinstance(p_mean, (int, float)) and math.isfinite(p_mean)):
            raise ValueError(f"p_mean={p_mean!r} must be a finite number")
        check_positive("p_std", p_std)
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sample(self, n: int, generator=None, dtype=torch.float32) -> torch.Tensor:
        """σ: [n]."""
        return (torch.randn(n, generator=generator, dtype=dtype) * self.p_std + self.p_mean).exp()

    def cdf(self, sigma) -> torch.Tensor:
        """P(σ' ≤ σ)."""
        z = (torch.as_tensor(sigma, dtype=torch.float64).log() - self.p_mean) / self.p_std
        return 0.5 * (1 + torch.erf(z / math.sqrt(2)))

    def pdf_lam(self, lam) -> torch.Tensor:
        """p(λ) for λ = −2 ln σ (T18 row "EDM training")."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        m, s = -2 * self.p_mean, 2 * self.p_std
        return torch.exp(-0.5 * ((lam - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    def __repr__(self):
        return f"LogNormalSigma(p_mean={self.p_mean}, p_std={self.p_std})"


def inverse_sqrt_lr(lr: float, i: int, ref: int) -> float:
    """The reference toy's learning rate at iteration i: lr / √max(i/ref, 1) (§10; EDM2's decay)."""
    return lr / math.sqrt(max(i / ref, 1))
