"""Evaluation against an exact ground truth (THEORY §10): fixed reference sets, held-out noisy points and
initial noise, shared by every model measured; every number is computed from the exact mixture."""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch

from .calibration import calibration_by_sigma
from .checks import check_choice, check_positive
from .data.toy import GaussianMixture
from .io import derive_seed, generator
from .mixture_metrics import (calibration, kernel_sum, median_nll, mmd, outlier_rate,
                              outlier_threshold, sample_nll,
                      score_error, score_error_by_sigma)
from .samplers import heun_nfe, sample_heun
from .schedules import edm_sigmas
from .scores import PhiScoreDenoiser, tweedie_score

INITS = ("exact", "gaussian")
BY_SIGMA_DECADES = 0.5    # width of the log-σ bins of the per-bin Var[x0 | x̃] readout
BY_SIGMA_MIN_POINTS = 100  # a bin with fewer measured held-out points is left out of it


@dataclass(frozen=True)
class SamplerConfig:
    """EDM Heun sampling (T15) from σ_max: `init` exact draws x ~ p(x; σ_max) from the mixture (as the
    seed's reference does), `gaussian` draws N(0, σ_max²I) (what a model of unknown data must do)."""
    steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float = 5.0
    rho: float = 7.0
    churn: float = 0.0
    init: str = "exact"

    def validate(self):
        check_positive("steps", self.steps, integer=True)
        check_positive("churn", self.churn, allow_zero=True)
        check_choice("init", self.init, INITS)
        edm_sigmas(self.steps, self.sigma_min, self.sigma_max, self.rho)
        return self

    @property
    def nfe(self) -> int:
        return heun_nfe(self.steps)


def sample(denoiser, cfg: SamplerConfig, x_init: torch.Tensor, churn_generator=None, trace: int = 0):
    """Heun sampling from x_init at σ_max; returns samples, seconds and a [steps + 1, trace, d] trajectory."""
    sigmas = edm_sigmas(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    traj = [x_init[:trace].clone()]
    t0 = time.perf_counter()
    out = sample_heun(denoiser, x_init, sigmas, churn=cfg.churn, generator=churn_generator,
                      callback=(lambda i, x, s, d: traj.append(x[:trace].clone())) if trace else None)
    return out, time.perf_counter() - t0, torch.stack(traj)


class Evaluator:
    """Reference samples, held-out noisy points (x0, its component, σ from the training density, x̃ = x0 + σε)
    and the sampler's initial points, each from its own seeded generator: changing `samples` leaves the
    held-out points unchanged."""

    def __init__(self, gt: GaussianMixture, *, seed: int, samples: int, eval_points: int, sigma_density,
                 sampler: SamplerConfig):
        self.gt, self.seed, self.samples, self.sampler = gt, seed, samples, sampler.validate()
        if sampler.init == "exact":
            self.x_init, _ = gt.sample(samples, sampler.sigma_max, generator=generator(seed, "x_init"))
        else:
            self.x_init = sampler.sigma_max * torch.randn(samples, gt.dim,
                                                          generator=generator(seed, "x_init"))
        self.ref = self.reference_points(gt, seed, samples)
        self.threshold = outlier_threshold(gt, seed=derive_seed(seed, "outlier-threshold"))
        g = generator(seed, "held-out")
        self.x0, self.x0_cov, self.x0_k = gt.sample(eval_points, generator=g, dtype=torch.float64,
                                                    return_index=True)
        self.sigma = sigma_density.sample(eval_points, g).double()
        self.x_noisy = self.x0 + self.sigma[:, None] * torch.randn(self.x0.shape, generator=g,
                                                                   dtype=torch.float64)
        self.exact_score = gt.score(self.x_noisy, self.sigma)
        self._optimum = {}  # mode -> exact Σ_φ* of the held-out points (shared by runs)

    @staticmethod
    def reference_points(gt: GaussianMixture, seed: int, samples: int) -> torch.Tensor:
        """The reference samples of an Evaluator with this seed and size (float64), without making one."""
        return gt.sample(samples, generator=generator(seed, "reference"), dtype=torch.float64)[0]

    @functools.cached_property
    def ref_self(self) -> float:
        """The reference set's MMD self-sum, made when first needed (a process that only draws figures does
        not pay for it)."""
        return kernel_sum(self.ref)

    def churn_generator(self):
        return generator(self.seed, "churn")

    def sample(self, denoiser, trace: int = 0):
        return sample(denoiser, self.sampler, self.x_init, self.churn_generator(), trace)

    def sample_metrics(self, samples: torch.Tensor) -> dict:
        """Sample NLL and MMD² over the finite samples; diverged (non-finite) ones are counted apart
        and as outliers, so one blown-up trajectory does not turn every number into NaN."""
        finite = torch.isfinite(samples).all(1)
        ok = samples[finite]
        return {
            "sample_nll": sample_nll(ok, self.gt) if len(ok) else float("nan"),
            "median_nll": median_nll(ok, self.gt) if len(ok) else float("nan"),
            "outlier_rate": outlier_rate(samples, self.gt, self.threshold),
            "mmd": mmd(ok, self.ref, self.ref_self) if len(ok) > 1 else float("nan"),
            "nonfinite": float((~finite).double().mean()),
        }

    def _held_out(self, fn, chunk: int = 4096):
        """fn(x̃, σ[:, None]) over the held-out points in chunks, in the models' float32."""
        with torch.no_grad():
            return [fn(xc, sc[:, None]) for xc, sc in zip(self.x_noisy.float().split(chunk),
                                                           self.sigma.float().split(chunk))]

    def score_errors(self, denoiser) -> dict:
        """σ²-weighted score error of the denoiser's Tweedie score (T13) over the held-out points, overall and
        per σ range. A wrapper (T14, guidance) is measured through the score it gives the sampler."""
        mu = torch.cat(self._held_out(denoiser))
        s = tweedie_score(mu.double(), self.x_noisy, self.sigma)
        return {"score_error": score_error(s, self.exact_score, self.sigma),
                "score_error_by_sigma": score_error_by_sigma(s, self.exact_score, self.sigma)}

    def optimum(self, mode: str) -> torch.Tensor:
        """The exact Σ_φ* of a training mode at the held-out points (GaussianMixture.denoiser)."""
        if mode not in self._optimum:
            self._optimum[mode] = self.gt.denoiser(mode).predict(self.x_noisy, self.sigma).covariance()
        return self._optimum[mode]

    def target(self, mu: torch.Tensor, mode: str) -> torch.Tensor:
        """The second moment the loss of `mode` fits at each held-out point: σ²I (+ Σ_k) + (μ − x0)(μ − x0)ᵀ,
        x0 = m_k in source mode (T8, T12)."""
        x0 = self.gt.means64[self.x0_k] if mode == "source" else self.x0
        e = mu.double() - x0
        t = (self.sigma.square()[:, None, None] * torch.eye(self.gt.dim, dtype=torch.float64)
             + e[:, :, None] * e[:, None])
        return t if mode == "point" else t + self.x0_cov

    def calibration(self, model, mode: str) -> dict:
        """Learned Σ_φ (any object with `predict`; σ_φ = c_var without a head) against the exact optimum of
        the mode it was trained in, and its calibration ratio (metrics.calibration). Point mode also gives
        `by_sigma`: the per-element Var[x0 | x̃] = diag Σ_φ − σ² (T8; a full Σ_φ gives its marginals) against
        the error of μ at the held-out x0 (calibration.calibration_by_sigma), in log-σ bins BY_SIGMA_DECADES
        wide; the points with an even index fit the best constant per bin, the others are measured. (Source
        mode fits σ²I + Σ_k + (μ − m_k)(μ − m_k)ᵀ (T12), whose excess is not the error of μ against x0.)"""
        def predict(x, s):
            p = model.predict(x, s)
            return p, p.excess_variance(s)     # without subtracting σ² where the head allows (T37)
        preds, excess = zip(*self._held_out(predict))
        learned = torch.cat([p.covariance() for p in preds]).double()
        mu = torch.cat([p.mu for p in preds])
        out = calibration(learned, self.optimum(mode), self.sigma, self.target(mu, mode))
        if mode != "point":
            return out
        logs = self.sigma.log10() / BY_SIGMA_DECADES
        edges = [10 ** (k * BY_SIGMA_DECADES)
                 for k in range(math.floor(float(logs.min())), math.floor(float(logs.max())) + 2)]
        out["by_sigma"] = calibration_by_sigma(mu.double(), torch.cat(excess).double(), self.x0, self.sigma,
                                               edges, fit=torch.arange(len(mu)) % 2 == 0,
                                               min_examples=BY_SIGMA_MIN_POINTS,
                                               seed=derive_seed(self.seed, "calibration-by-sigma"))
        return out

    def reference(self) -> dict:
        """Rows measured the same way as the models': a second ground-truth set (sample metrics only), the
        exact posterior mean sampled with the same sampler (its score error is its floor: float error), and
        the exact source-mode optimum (T12) read through T13 and through T14 (score errors only)."""
        other, _ = self.gt.sample(self.samples, generator=generator(self.seed, "second-reference"),
                                  dtype=torch.float64)
        exact = self.gt.denoiser("point")
        x, _, _ = sample(exact, self.sampler, self.x_init.double(), self.churn_generator())
        return {
            "ground-truth": {**self.sample_metrics(other), "nfe": 0},
            "exact-denoiser": {**self.sample_metrics(x), **self.score_errors(exact),
                               "calibration": self.calibration(exact, "point"), "nfe": self.sampler.nfe},
            "source-optimum-T13": self.score_errors(self.gt.denoiser("source")),
            "source-optimum-T14": self.score_errors(PhiScoreDenoiser(self.gt.denoiser("source"))),
        }
