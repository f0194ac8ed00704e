"""Scores from a denoiser (THEORY §4): Tweedie T13, the σ_φ variant T14, the ODE derivative T15."""
from __future__ import annotations

import torch

from .checks import as_sigma


def tweedie_score(mu: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """T13: s(x̃; σ) = (μ − x̃)/σ²."""
    return (mu - x) / as_sigma(sigma, x).square()


def phi_score(pred) -> torch.Tensor:
    """T14: s = (μ − x̃)/σ_φ² per element; with a full head s = Σ_φ⁻¹(μ − x̃)."""
    if pred.head == "full":
        return (pred.precision() @ (pred.mu - pred.x)[..., None]).squeeze(-1)
    return (pred.mu - pred.x) / pred.sigma_phi.square()


def ode_derivative(x: torch.Tensor, mu: torch.Tensor, sigma) -> torch.Tensor:
    """T15: dx/dσ = (x − μ(x; σ))/σ."""
    return (x - mu) / as_sigma(sigma, x)


def denoiser_from_score(score: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """Inverse of T13: D = x̃ + σ²·s."""
    return x + as_sigma(sigma, x).square() * score


class PhiScoreDenoiser(torch.nn.Module):
    """Wraps a confidence denoiser so that samplers use the T14 score: D' = x̃ + σ²·s_φ."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x, sigma):
        return denoiser_from_score(phi_score(self.denoiser.predict(x, sigma)), x, sigma)


SCORE_MODES = ("tweedie", "phi")


def with_score_mode(denoiser, score_mode: str):
    if score_mode == "tweedie":
        return denoiser
    if score_mode == "phi":
        if getattr(denoiser, "head", "none") == "none":
            raise ValueError("score_mode='phi' needs a denoiser with a confidence head (head='diag' or 'full')")
        return PhiScoreDenoiser(denoiser)
    raise ValueError(f"score_mode={score_mode!r} is not allowed; choose one of {list(SCORE_MODES)}")
