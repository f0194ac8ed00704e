"""Samplers: pure functions over the denoiser contract `D(x, σ) -> μ` (STYLE 1).

`sample_x(denoiser, x, sigmas, *, generator=None, callback=None)`; `x` starts at σ = sigmas[0]
and the grid ends with 0. Stochastic knobs are keyword arguments; `_churn` is the one place
that adds noise.
"""
from __future__ import annotations

import math

import torch

from .checks import check_positive
from .schedules import edm_sigmas  # noqa: F401 (the sampling grid lives in schedules.py)


def _check_grid(sigmas) -> list:
    s = [float(v) for v in sigmas]
    if len(s) < 2 or s[-1] != 0 or not all(math.isfinite(v) and v > 0 for v in s[:-1]) \
            or any(a <= b for a, b in zip(s, s[1:])):
        raise ValueError("sigmas must be a strictly decreasing grid of finite σ > 0 ending in a single 0 "
                         f"(e.g. edm_sigmas()); got {s[:3]}…{s[-2:]}")
    return s


def _churn(x, sigma, steps, churn, s_tmin, s_tmax, s_noise, generator):
    """EDM Algorithm 2 lines 4–6: raise σ to σ̂ = σ(1 + γ) and add the matching fresh noise."""
    gamma = min(churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * eps, sigma_hat


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                s_noise: float = 1.0, second_order: bool = True, generator=None, callback=None):
    """EDM Algorithm 2 (Karras et al. 2022): Heun's 2nd-order method on the PF-ODE dx/dσ = (x − D)/σ (T15),
    with optional stochastic churn. `second_order=False` gives Euler. NFE = 2·steps − 1 (Heun).

    callback(i, x, sigma, denoised) is called after every step with the new x.
    """
    check_positive("churn", churn, allow_zero=True)
    check_positive("s_tmin", s_tmin, allow_zero=True)
    if not (isinstance(s_tmax, (int, float)) and not isinstance(s_tmax, bool) and s_tmax >= s_tmin):
        raise ValueError(f"s_tmax={s_tmax!r} must be a number >= s_tmin={s_tmin!r} (math.inf: no upper gate)")
    check_positive("s_noise", s_noise, allow_zero=True)
    sigmas = _check_grid(sigmas)
    steps = len(sigmas) - 1
    for i in range(steps):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        x, s_hat = _churn(x, s_cur, steps, churn, s_tmin, s_tmax, s_noise, generator)
        denoised = denoiser(x, s_hat)
        d = (x - denoised) / s_hat
        x_next = x + (s_next - s_hat) * d
        if second_order and s_next > 0:
            d_next = (x_next - denoiser(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * (d + d_next) / 2
        x = x_next
        if callback is not None:
            callback(i, x, s_next, denoised)
    return x


def heun_nfe(steps: int, second_order: bool = True) -> int:
    return 2 * steps - 1 if second_order else steps

