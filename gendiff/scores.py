"""Scores from a denoiser (THEORY §4): Tweedie T13, the σ_φ variant T14, the ODE derivative T15."""
from __future__ import annotations

import math

import torch

from .checks import as_sigma
from .heads import Prediction


def tweedie_score(mu: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """T13: s(x̃; σ) = (μ − x̃)/σ²."""
    return (mu - x) / as_sigma(sigma, x).square()


def phi_score(pred: Prediction) -> torch.Tensor:
    """T14: s = (μ − x̃)/σ_φ² per element; with a full head s = Σ_φ⁻¹(μ − x̃)."""
    return pred.phi_score()


def ode_derivative(x: torch.Tensor, mu: torch.Tensor, sigma) -> torch.Tensor:
    """T15: dx/dσ = (x − μ(x; σ))/σ."""
    return (x - mu) / as_sigma(sigma, x)


def denoiser_from_score(score: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """Inverse of T13: D = x̃ + σ²·s."""
    return x + as_sigma(sigma, x).square() * score


class PhiScoreDenoiser(torch.nn.Module):
    """Samplers see the T14 score through D' = x̃ + σ²·s_φ (σ < `below`) and Tweedie's T13 elsewhere.

    below = ∞ is T14 everywhere; a finite `below` is the hybrid: T14 only at small σ, where a
    source-mode μ (E[m_k | x̃]) makes T13 wrong and Σ_φ ≈ σ²I + Σ_src makes T14 right.
    """

    def __init__(self, denoiser, below: float = math.inf):
        super().__init__()
        if isinstance(below, bool) or not (isinstance(below, (int, float)) and below > 0):
            raise ValueError(f"hybrid threshold below={below!r} must be a number > 0 (inf: T14 everywhere)")
        self.denoiser, self.below = denoiser, float(below)

    def predict(self, x, sigma) -> Prediction:
        p = self.denoiser.predict(x, sigma)
        s = as_sigma(sigma, x)
        score = p.phi_score()
        if math.isfinite(self.below):
            score = torch.where(s < self.below, score, tweedie_score(p.mu, x, s))
        return p.with_mean(denoiser_from_score(score, x, s))

    def forward(self, x, sigma):
        return self.predict(x, sigma).mu


SCORE_MODES = ("tweedie", "phi", "hybrid")
# where T13 and T14 errors of the exact source optimum cross (benchmarks/hybrid_threshold.py)
HYBRID_SIGMA = 0.035


def with_score_mode(denoiser, score_mode: str, threshold: float = HYBRID_SIGMA):
    """tweedie: T13 (the default); phi: T14 at every σ; hybrid: T14 below σ = `threshold`, T13 above.
    A head-less denoiser is allowed: its T14 uses σ_φ = c_var (the σ-only ablation of T14)."""
    if score_mode == "tweedie":
        return denoiser
    if score_mode in ("phi", "hybrid"):
        return PhiScoreDenoiser(denoiser, math.inf if score_mode == "phi" else threshold)
    raise ValueError(f"score_mode={score_mode!r} is not allowed; choose one of {list(SCORE_MODES)}")


class CountCalls(torch.nn.Module):
    """A denoiser that counts its evaluations (NFE): every `forward(x, σ, **kw)` and `predict(x, σ, **kw)`
    adds one to `.calls` (set it to 0 to restart) and is passed on unchanged. `.head`, `.net` and `.precond`
    are the wrapped denoiser's (an AttributeError where it has none).

    Wrap the denoiser whose evaluations cost a network call: `CountCalls(D)` handed to a sampler counts its
    NFE, inside `with_score_mode` too (T14 evaluates through predict); wrapped *inside* a guidance wrapper,
    one classifier-free step counts 2 (conditional and null-class evaluations)."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser, self.calls = denoiser, 0

    def forward(self, x, sigma, **kw):
        self.calls += 1
        return self.denoiser(x, sigma, **kw)

    def predict(self, x, sigma, **kw):
        self.calls += 1
        return self.denoiser.predict(x, sigma, **kw)

    @property
    def head(self):
        return self.denoiser.head

    @property
    def net(self):
        return self.denoiser.net

    @property
    def precond(self):
        return self.denoiser.precond
