"""Likelihood bounds (THEORY §5 T17/T22, VDM). Issue 8 adds the PF-ODE likelihood and the discrete bound.

`continuous_elbo(denoiser, x, schedule)`: VDM's continuous-time variational bound on −log p(x), per example,
split into its three terms, for any VE-space denoiser D(x̃, σ̃) (T2) and any schedule with `lam(t)`
(λ decreasing in t; `schedules.LearnedSchedule`, or a `process.Process`):
- diffusion: ½·E_t[−λ'(t)·‖ε − ε̂(x̃_t; σ̃_t)‖²], t ~ U(0, 1), λ' by autograd; equal to ½∫‖ε − ε̂‖² dλ over
  [λ(1), λ(0)], so only the endpoints matter (VDM++ §2);
- prior: KL(q(z_1 | x) ‖ N(0, I)) of the VP latent at λ_1 = λ(1): ½Σ(σ₁² + α₁²x² − 1 − log σ₁²);
- reconstruction: −E log p(x | z_0) for the Gaussian decoder N(x; z_0/α_0, σ̃_0²): ½·d·(1 + log 2πσ̃_0²)
  (continuous data; the discretised decoder of T27 is issue 8's).
"""
from __future__ import annotations

import math

import torch


def continuous_elbo(denoiser, x: torch.Tensor, schedule, *, generator=None, antithetic: bool = True) -> dict:
    """Per-example terms in nats ([N] each), their sum `total` and `bits_per_dim` (total / (d·ln 2))."""
    n, d = x.shape[0], x[0].numel()
    u = torch.rand(1 if antithetic else n, generator=generator, dtype=torch.float64)
    t = ((torch.arange(n, dtype=torch.float64) / n + u) % 1.0) if antithetic else u     # stratified t
    t = t.to(x.dtype).clamp(1e-6, 1 - 1e-6).requires_grad_(True)
    with torch.enable_grad():
        lam = schedule.lam(t)
        dlam = torch.autograd.grad(lam.sum(), t)[0]                                    # λ'(t) < 0
    lam, dlam = lam.detach().to(x.dtype), dlam.detach().to(x.dtype)
    sig = torch.exp(-lam / 2)                                                           # σ̃ (T2)
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    col = sig.view(-1, *([1] * (x.ndim - 1)))
    x_noisy = x + col * eps
    with torch.no_grad():
        eps_hat = (x_noisy - denoiser(x_noisy, sig)) / col
    diffusion = 0.5 * (-dlam) * (eps - eps_hat).flatten(1).square().sum(1)
    ends = schedule.lam(torch.tensor([0.0, 1.0], dtype=torch.float64)).detach().double()
    lam0, lam1 = float(ends[0]), float(ends[1])
    a2, s2 = torch.sigmoid(torch.tensor(lam1)).item(), torch.sigmoid(torch.tensor(-lam1)).item()
    prior = 0.5 * (s2 + a2 * x.flatten(1).double().square() - 1 - math.log(s2)).sum(1).to(x.dtype)
    recon = torch.full((n,), 0.5 * d * (1 + math.log(2 * math.pi) - lam0), dtype=x.dtype)
    total = diffusion + prior + recon
    return {"diffusion": diffusion, "prior": prior, "reconstruction": recon, "total": total,
            "bits_per_dim": total / (d * math.log(2))}
