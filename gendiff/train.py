"""Training loop for the toy (THEORY §10): Adam, inverse-sqrt lr decay, EMA, safetensors snapshots.

Noise levels come from a density object (schedules.py, `ln σ ~ N(P_mean, P_std²)` by default), batches
from the exact mixture in one of three modes, the loss is any callable `loss(denoiser, batch) -> [N]`.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import check_choice, check_positive
from .data.toy import EXACT_MODES, GaussianMixture
from .io import generator, save_state
from .losses import NoisyBatch
from .schedules import LogNormalSigma, inverse_sqrt_lr

MODES = EXACT_MODES  # point | source | point-cov, each with its exact optimum (GaussianMixture.denoiser)


@dataclass
class ToyTrainConfig:
    iterations: int = 4096
    batch: int = 4096
    lr: float = 1e-2
    lr_ref_iter: int = 512          # lr·1/√max(i/lr_ref_iter, 1)
    betas: tuple = (0.9, 0.99)
    p_mean: float = -2.4            # ln σ ~ N(p_mean, p_std²)
    p_std: float = 1.5
    sigma_data: float = 0.5
    ema: float = 0.99
    snapshot_every: int = 256
    width: int = 64
    hidden_layers: int = 4

    def validate(self):
        for name in ("iterations", "batch", "lr_ref_iter", "snapshot_every", "width", "hidden_layers"):
            check_positive(name, getattr(self, name), integer=True)
        for name in ("lr", "p_std", "sigma_data"):
            check_positive(name, getattr(self, name))
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema={self.ema} must be in [0, 1)")
        return self


class BatchSource:
    """Draws noisy batches from the exact mixture.

    point:     x0 ~ p, x̃ = x0 + σε (T7/T9).
    source:    x0 = m_k with k ~ φ, Σ_src = Σ_k, x̃ = m_k + Σ_k^½ε₁ + σε₂ (T3/T12).
    point-cov: x0 ~ p as in point mode, plus Σ_src = Σ_k of the sample's component: the seed's
               training.py (`new_method`), whose trace term then counts Σ_k a second time.
    need_score adds the exact ∇ log p(x̃; σ) for score matching (§10).
    """

    def __init__(self, mixture: GaussianMixture, mode: str, need_score: bool = False):
        check_choice("mode", mode, MODES)
        self.mixture, self.mode, self.need_score = mixture, mode, need_score
        self.means = mixture.means64.float()
        self.covs = mixture.covs64.float()
        self.chol = torch.linalg.cholesky(mixture.covs64).float()

    def draw(self, n: int, sigma: torch.Tensor, generator=None) -> NoisyBatch:
        k = self.mixture.sample_components(n, generator)
        e1 = torch.randn(n, self.mixture.dim, generator=generator)
        e2 = torch.randn(n, self.mixture.dim, generator=generator)
        sample = self.means[k] + (self.chol[k] @ e1[:, :, None]).squeeze(-1)
        x_noisy = sample + sigma[:, None] * e2
        x0 = self.means[k] if self.mode == "source" else sample
        batch = NoisyBatch(x0, x_noisy, sigma, source_cov=None if self.mode == "point" else self.covs[k])
        if self.need_score:
            batch.score = self.mixture.score(x_noisy, sigma)
        return batch


@dataclass
class TrainResult:
    ema: torch.nn.Module
    snapshots: dict = field(default_factory=dict)   # iteration -> EMA state_dict
    losses: list = field(default_factory=list)      # per-iteration mean loss
    loss_vars: list = field(default_factory=list)   # per-iteration variance of the per-example loss (T17/T20)
    lrs: list = field(default_factory=list)         # per-iteration learning rate, as the optimiser used it
    seconds: float = 0.0

    @property
    def it_per_s(self) -> float:
        return len(self.losses) / self.seconds if self.seconds else float("nan")


def train(denoiser: torch.nn.Module, loss_fn, source: BatchSource, cfg: ToyTrainConfig, *, seed: int = 0,
          snapshot_dir: str | None = None, keep_snapshots=(), progress: bool = True,
          desc: str = "train", sigma_density=None) -> TrainResult:
    """Train `denoiser` in place; returns its EMA and the EMA snapshots at `keep_snapshots` iterations.

    Same seed ⇒ identical weights: initialisation uses torch.manual_seed(seed) (set by the caller
    when it builds the model) and data a dedicated generator seeded from `seed`.
    sigma_density: any object with `sample(n, generator) -> σ [n]`; default `LogNormalSigma(p_mean, p_std)`.
    One with `update(σ, ‖ε̂ − ε‖²)` (AdaptiveSchedule, T20) is refitted after every step from `loss_fn.last`;
    one with `parameters()` (LearnedDensity, T22) is trained jointly: the denoiser on the loss' mean, the
    density's parameters on its second moment (the estimator's variance when the mean is shape-free), by
    a second Adam with the same learning-rate schedule.
    """
    cfg.validate()
    density = LogNormalSigma(cfg.p_mean, cfg.p_std) if sigma_density is None else sigma_density
    gen = generator(seed, "train-data")
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    opt = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    eta = list(density.parameters()) if hasattr(density, "parameters") else []
    opts = [opt] + ([torch.optim.Adam(eta, lr=cfg.lr, betas=tuple(cfg.betas))] if eta else [])
    result = TrainResult(ema=ema)
    if snapshot_dir is not None:
        os.makedirs(snapshot_dir, exist_ok=True)
    bar = _progress(cfg.iterations, desc, progress)
    start = time.perf_counter()
    for i in range(cfg.iterations):
        for group in (g for o in opts for g in o.param_groups):
            group["lr"] = inverse_sqrt_lr(cfg.lr, i, cfg.lr_ref_iter)
        result.lrs.append(opt.param_groups[0]["lr"])
        sigma = density.sample(cfg.batch, gen)
        batch = source.draw(cfg.batch, sigma, gen)
        per_example = loss_fn(denoiser, batch)
        loss = per_example.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at iteration {i}; lower the learning rate (--lr)")
        if hasattr(density, "update") and getattr(loss_fn, "last", None) is not None:
            density.update(*loss_fn.last)  # an adaptive p(λ) learns from the per-λ loss (T20)
        for o in opts:
            o.zero_grad(set_to_none=True)
        backward(per_example, list(denoiser.parameters()), eta)
        for o in opts:
            o.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), denoiser.parameters()):
                p_ema.lerp_(p, 1 - cfg.ema)
        result.losses.append(loss.item())
        result.loss_vars.append(per_example.detach().var().item() if per_example.numel() > 1 else 0.0)
        done = i + 1
        if done % cfg.snapshot_every == 0 or done in keep_snapshots:
            state = {k: v.detach().clone() for k, v in ema.state_dict().items()}
            if done in keep_snapshots:
                result.snapshots[done] = state
            if snapshot_dir is not None and done % cfg.snapshot_every == 0:
                save_state(state, os.path.join(snapshot_dir, f"ema-{done:06d}.safetensors"))
        bar.update(1)
        if done % 64 == 0:
            bar.set_postfix(loss=f"{np.mean(result.losses[-64:]):.4f}")
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


def backward(per_example: torch.Tensor, params: list, eta: list = ()) -> None:
    """Gradients of one step: `params` (the denoiser) get ∇ mean(L); `eta` (a learned density's parameters,
    T22) get ∇ mean(L²), the estimator's second moment, whose shape-gradient is the variance's."""
    if eta:
        for p, g in zip(eta, torch.autograd.grad(per_example.square().mean(), eta, retain_graph=True)):
            p.grad = g
    per_example.mean().backward(inputs=params)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, mininterval=0.5)
