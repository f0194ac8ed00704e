"""A generated sample's own uncertainty, read off the confidence head along its sampling trajectory (the
BayesDiff test: Kou et al., "BayesDiff: Estimating pixel-wise uncertainty in diffusion via Bayesian
inference", who score an image by the summed pixel-wise variance of its final x0 and filter out the most
uncertain; here the head gives Var[x0 | x̃] at every step for free, T8).

`ExcessVarianceScore` is a denoiser wrapper (STYLE 2, 6): samplers see μ as from the wrapped denoiser, one
evaluation per call (the same NFE), and it keeps per example the excess variance of each step.
`keep_most_certain` splits a set of scores into the kept (lowest) and the dropped (highest).
"""
from __future__ import annotations

import math

import torch

from .checks import as_sigma, check_positive

SCORE_SIGMAS = (0.05, 2.0)   # the σ range of the score: the calibration bins' range (issue 18)


class ExcessVarianceScore(torch.nn.Module):
    """Score each example of a sampling batch by its own uncertainty, at no extra network evaluation.

    Every call D(x̃, σ) evaluates `denoiser.predict` once and returns μ. For σ in [sigma_min, sigma_max]
    it records, per example, the mean over elements of the excess variance
        Var[x0 | x̃] = σ_φ² − σ²                               (T8; the optimum σ_φ² = σ² + E[(μ − x0)²])
    clamped at 0 (T6's head can put σ_φ below σ, where T8 allows no such value; T37's never does).
    `scores()` is, per example, the mean of these over the sampler's steps in the range: [N].

    One value per σ: an evaluation at a σ already recorded replaces the earlier one. Heun (EDM Algorithm 2)
    evaluates σ_{i+1} first at the Euler-predicted point and then, as step i + 1, at the trajectory point
    itself, so each step counts once, at the point whose μ the sampler's callback reports as `denoised`;
    DDPM and the one-evaluation samplers see each σ once anyway. (With churn, σ̂_i ≠ σ_i and the corrector
    evaluations count as well.) σ must be one value per call (a scalar, or equal across the batch).

    Why the mean of σ_φ² − σ² in a σ range: BayesDiff sums the final image's pixel-wise variance; the head
    gives the posterior variance of x0 directly, at every step. Above σ ≈ 2 it is close to the prior
    variance c_out² ≈ σ_d² for every sample, and below σ ≈ 0.05 close to σ² for any smooth density (Tweedie
    to second order), so the default range [0.05, 2] (SCORE_SIGMAS) is where samples differ; the mean
    rather than the sum makes scores of different image sizes comparable (the ranking is the same).
    """

    def __init__(self, denoiser, sigma_min: float = SCORE_SIGMAS[0], sigma_max: float = SCORE_SIGMAS[1]):
        super().__init__()
        check_positive("sigma_min", sigma_min)
        check_positive("sigma_max", sigma_max)
        if not sigma_min <= sigma_max:
            raise ValueError(f"sigma_min={sigma_min!r} must be <= sigma_max={sigma_max!r}")
        self.denoiser, self.sigma_min, self.sigma_max = denoiser, float(sigma_min), float(sigma_max)
        self.steps: dict = {}      # σ → [N] mean excess variance over elements (float32)

    def predict(self, x, sigma, **kw):
        p = self.denoiser.predict(x, sigma, **kw)
        s = as_sigma(sigma, x)
        level = float(s.flatten()[0])
        if s.numel() > 1 and not bool((s == level).all()):
            raise ValueError("ExcessVarianceScore needs one σ per call (the samplers' σ grid); got a σ that "
                             "differs across the batch or within an example")
        if self.sigma_min <= level <= self.sigma_max:
            excess = p.excess_variance(s).float().clamp_min(0)   # T8: Var[x0 | x̃] ≥ 0
            self.steps[level] = excess.flatten(1).mean(1)
        return p

    def forward(self, x, sigma, **kw):
        return self.predict(x, sigma, **kw).mu

    def scores(self) -> torch.Tensor:
        """[N]: each example's mean over the recorded steps. No step in the range is a ValueError."""
        if not self.steps:
            raise ValueError(f"no sampler step had σ in [{self.sigma_min:g}, {self.sigma_max:g}]: widen the "
                             "σ range of the score or take more sampler steps")
        return torch.stack(list(self.steps.values())).mean(0)

    @property
    def sigmas(self) -> list:
        """The σ of the recorded steps, in the order first seen."""
        return list(self.steps)


def keep_most_certain(scores: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, dropped) indices of `scores` [N]: drop the round(N·fraction) highest scores (the most
    uncertain), keep the other N − round(N·fraction), the lowest; ties go by index (a stable sort). Both
    sets in ascending index order. 0 < fraction < 1, and both sets non-empty."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction!r} must be a number in (0, 1): the share of samples dropped")
    scores = torch.as_tensor(scores)
    if scores.ndim != 1 or not torch.isfinite(scores).all():
        raise ValueError(f"scores must be finite, one per sample [N]; got shape {tuple(scores.shape)}")
    n = len(scores)
    drop = int(math.floor(n * fraction + 0.5))
    if not 0 < drop < n:
        raise ValueError(f"fraction={fraction!r} of {n} samples drops {drop}; need at least one dropped and "
                         "one kept (more samples or another fraction)")
    order = torch.argsort(scores, stable=True)
    return order[:n - drop].sort().values, order[n - drop:].sort().values
