"""Losses: small callables `loss(denoiser, batch) -> [N]`, unreduced per example (STYLE 3).

The noise level is drawn outside (a schedule) and arrives in the batch, so weighting
and sampling density are ablated independently. THEORY §3 and §10.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import as_sigma
from .precond import LOG_2PI, Denoiser, Scalings, tril_factor


@dataclass
class NoisyBatch:
    """One training batch. x0: [N, ...]; sigma broadcastable to x0 (scalar, [N, 1, ...] or per element).

    source_cov: [N, d, d], a known covariance of x0's source (T3/T12) already included in x_noisy.
    score: [N, ...], the exact score ∇ log p(x_noisy; σ) where an oracle knows it (§10).
    """
    x0: torch.Tensor
    x_noisy: torch.Tensor
    sigma: torch.Tensor
    source_cov: torch.Tensor | None = None
    score: torch.Tensor | None = None


def _sum_elements(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).sum(1)


# ---- the formulas, on tensors (the test oracles call these directly) -------------------------

def f_target(x0: torch.Tensor, x_noisy: torch.Tensor, sc: Scalings) -> torch.Tensor:
    """F* = (x0 − c_skip·x̃)/c_out (T6, T12)."""
    return (x0 - sc.c_skip * x_noisy) / sc.c_out


def nll_direct(mu, sigma_phi, x0, sigma) -> torch.Tensor:
    """THEORY T7, per element: ½[log σ_φ² + (σ² + (μ − x0)²)/σ_φ² + log 2π]. The oracle for T9."""
    var = sigma_phi.square()
    return 0.5 * (var.log() + (sigma.square() + (mu - x0).square()) / var + LOG_2PI)


def nll_stable(F, G, F_star, sc: Scalings) -> torch.Tensor:
    """THEORY T9, per element: ½[G + e^(−G)(1 + k(‖F − F*‖² − 1)) + log(2π·c_var²)]. G=None means G ≡ 0."""
    G = torch.zeros_like(F) if G is None else G
    const = LOG_2PI + 2 * torch.log(sc.c_var)
    return 0.5 * (G + torch.exp(-G) * (1 + sc.k * ((F - F_star).square() - 1)) + const)


def log_q(x, F, G, x_noisy, sc: Scalings) -> torch.Tensor:
    """THEORY T10, per element: log q(x | x̃) = −½[G + e^(−G)·k·(F − (x − c_skip·x̃)/c_out)² + log 2πc_var²]."""
    G = torch.zeros_like(F) if G is None else G
    r = F - (x - sc.c_skip * x_noisy) / sc.c_out
    return -0.5 * (G + torch.exp(-G) * sc.k * r.square() + LOG_2PI + 2 * torch.log(sc.c_var))


def nll_full(F, G, F_star, sc: Scalings, source_cov=None) -> torch.Tensor:
    """THEORY T12, per example, for points [N, d] with σ one value per example.

    2L = −log det(SSᵀ) + (1 − k)·tr(SSᵀ) + tr(SSᵀ·Σ_src)/c_var² + k·‖Sᵀ(F − F*)‖² + d·log(2π·c_var²).
    G: [N, d(d+1)/2] raw factor outputs (see `tril_factor`).
    """
    N, d = F.shape
    k, c_var = (torch.broadcast_to(t, (N, d)) for t in (sc.k, sc.c_var))
    if not torch.equal(c_var, c_var[:, :1].expand(N, d)):
        raise ValueError("nll_full (T12) needs one σ per example (noise σ²I); got a σ that differs within an example")
    k, c_var = k[:, 0], c_var[:, 0]
    S = tril_factor(G, d)
    logdet = G[:, :d].sum(1)                              # −log det(SSᵀ) = Σ g_i
    tr = S.square().sum((1, 2))                           # tr(SSᵀ) = ‖S‖²_F
    Se = (S.transpose(1, 2) @ (F - F_star)[:, :, None]).squeeze(-1)
    two_l = logdet + (1 - k) * tr + k * Se.square().sum(1) + d * (LOG_2PI + 2 * torch.log(c_var))
    if source_cov is not None:
        two_l = two_l + ((source_cov @ S) * S).sum((1, 2)) / c_var.square()  # tr(SᵀΣ_src S)
    return 0.5 * two_l


# ---- the callables ---------------------------------------------------------------------------

class ConfidenceNLL:
    """Confidence-aware NLL, diagonal σ_φ (T9), summed over element dimensions.

    With a denoiser without a confidence head (G ≡ 0) this *is* the EDM loss, k·‖F − F*‖²/2
    plus a constant (T11): the baseline is this special case, not a second code path.
    """

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        if denoiser.head == "full":
            raise ValueError("ConfidenceNLL is the diagonal loss (T9); a head='full' denoiser needs FullCovarianceNLL")
        if batch.source_cov is not None:
            raise ValueError("ConfidenceNLL ignores source_cov; fold a diagonal source into sigma (T3) "
                             "or use FullCovarianceNLL (T12)")
        p = denoiser.predict(batch.x_noisy, batch.sigma)
        return _sum_elements(nll_stable(p.F, p.G, f_target(batch.x0, batch.x_noisy, p.scalings), p.scalings))


class FullCovarianceNLL:
    """Confidence-aware NLL with a full precision factor (T12) and an optional known Σ_src per example."""

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        if denoiser.head != "full":
            raise ValueError(f"FullCovarianceNLL needs a denoiser with head='full'; got head={denoiser.head!r}")
        p = denoiser.predict(batch.x_noisy, batch.sigma)
        F_star = f_target(batch.x0, batch.x_noisy, p.scalings)
        return nll_full(p.F, p.G, F_star, p.scalings, batch.source_cov)


class EDMLoss:
    """Textbook EDM: λ(σ)·‖D(x̃; σ) − x0‖², λ = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out² (EDM eq. 2, Table 1)."""

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        p = denoiser.predict(batch.x_noisy, batch.sigma)
        return _sum_elements((p.mu - batch.x0).square() / p.scalings.c_out.square())


class ScoreMatchingLoss:
    """Exact score matching against a known score with weight σ² (§10): σ²·‖s_θ − s*‖², s_θ by Tweedie (T13).

    Equals ‖D − E[x0 | x̃]‖²/σ²: regression onto the exact posterior mean.
    """

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        if batch.score is None:
            raise ValueError("ScoreMatchingLoss needs batch.score, the exact score at x_noisy")
        mu = denoiser(batch.x_noisy, batch.sigma)
        s2 = as_sigma(batch.sigma, mu).square()  # [N] σ -> [N, 1, ...], as the denoiser reads it
        return _sum_elements((mu - batch.x_noisy - s2 * batch.score).square() / s2)


LOSSES = {
    "nll": ConfidenceNLL,
    "nll-full": FullCovarianceNLL,
    "edm": EDMLoss,
    "score-matching": ScoreMatchingLoss,
}


