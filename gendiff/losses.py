"""Losses: small callables `loss(denoiser, batch) -> [N]`, unreduced per example (STYLE 3).

The noise level is drawn outside (schedules.py) and arrives in the batch, so weighting and sampling
density are ablated independently. THEORY §3 and §10. The formulas themselves live with the heads
(heads.py) and are re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import as_sigma, one_per_example
from .heads import _sum_elements, f_target, log_q, nll_direct, nll_full, nll_stable, tril_factor  # noqa: F401
from .precond import Denoiser


@dataclass
class NoisyBatch:
    """One training batch. x0: [N, ...]; sigma: scalar, [N] or per element (checks.as_sigma).

    source_cov: [N, d, d], a known covariance of x0's source whose trace term enters the NLL (T12).
    score: [N, ...], the exact score ∇ log p(x_noisy; σ) where an oracle knows it (§10).
    """
    x0: torch.Tensor
    x_noisy: torch.Tensor
    sigma: torch.Tensor
    source_cov: torch.Tensor | None = None
    score: torch.Tensor | None = None


class ConfidenceNLL:
    """The confidence-aware Gaussian NLL of x0 under q(x0 | x̃) = N(μ, Σ_φ), read through the denoiser's
    head: T9 (diagonal), T12 (full, with the batch's Σ_src when given).

    With `NoHead` (G ≡ 0) it is EDM's F-space error times k(σ)/2 plus a constant (T11): the optimum per σ
    is EDM's, but the weighting across σ is k(σ) = σ_d²/(σ² + 2σ_d²), not EDM's uniform one (`EDMLoss`).
    """

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        p = denoiser.predict(batch.x_noisy, batch.sigma)
        return denoiser.head.nll(p, batch.x0, batch.source_cov)


class EDMLoss:
    """EDM's loss with EDM's weighting (EDM eq. 2, Table 1; the seed's baseline `ToyModel.loss(new=False)`):
    ½·λ(σ)·‖D(x̃; σ) − x0‖², λ = 1/c_out², which is ½‖F − F*‖², uniform in F-space at every σ."""

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        p = denoiser.predict(batch.x_noisy, batch.sigma)
        return 0.5 * _sum_elements((p.mu - batch.x0).square() / p.scalings.c_out.square())


class ScoreMatchingLoss:
    """Exact score matching against a known score with weight σ² (§10): σ²·‖s_θ − s*‖², s_θ by Tweedie (T13).

    Equals ‖D − E[x0 | x̃]‖²/σ²: regression onto the exact posterior mean.
    """

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        if batch.score is None:
            raise ValueError("ScoreMatchingLoss needs batch.score, the exact score at x_noisy")
        mu = denoiser(batch.x_noisy, batch.sigma)
        s2 = as_sigma(batch.sigma, mu).square()  # [N] σ -> [N, 1, ...], as the denoiser reads it
        return _sum_elements(s2 * ((mu - batch.x_noisy) / s2 - batch.score).square())


class WeightedLoss:
    """THEORY T17: ½·(w(λ)/p(λ))·‖ε̂ − ε‖², per example, for any weighting w (schedules.Weighting) and the
    density p(λ) the batch's σ was drawn from (schedules.NoiseSchedule), with the importance weight w/p
    explicit. In VE space (T2) ε̂ − ε = (x0 − D)/σ̃ whatever the process, so one formula serves VE, VP and
    flow matching at equal λ = −2 log σ̃. `losses.EDMLoss` is the case w = EDM weighting, p = EDM density.
    Needs one σ per example."""

    def __init__(self, weighting, density):
        self.weighting, self.density, self.last = weighting, density, None

    def importance(self, sigma: torch.Tensor) -> torch.Tensor:
        lam = -2 * sigma.double().log()
        return (self.weighting(lam) / self.density.pdf(lam)).to(sigma.dtype)

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        mu = denoiser(batch.x_noisy, batch.sigma)
        s_ex = one_per_example(as_sigma(batch.sigma, mu), mu.shape, "WeightedLoss (λ per example, T17)")
        eps_loss = _sum_elements((mu - batch.x0).square()) / s_ex.square()     # ‖ε̂ − ε‖² (T2)
        self.last = (s_ex.detach(), eps_loss.detach())   # for an adaptive density (T20): train.py feeds it back
        return 0.5 * self.importance(s_ex) * eps_loss


LOSSES = {
    "nll": ConfidenceNLL,
    "edm": EDMLoss,
    "score-matching": ScoreMatchingLoss,
}
