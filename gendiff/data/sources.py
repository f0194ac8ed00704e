"""Batch sources for `train.train`: objects with `draw(n, σ, generator) -> NoisyBatch`, and `state_dict` /
`load_state_dict` where they have state (checkpointed with the run).

ToyBatches: the exact 2-D mixture (THEORY §10) in point, source or point-cov mode (`MODES`).
DataSource: a fixed dataset in epoch order (images or points), checked before any training (`check_data`).
LatentSource: an encoded dataset, the VAE posterior (m, s) per image, in T36's three training modes.
"""
from __future__ import annotations

import torch

from ..checks import as_sigma, check_choice, check_positive
from ..losses import NoisyBatch
from .toy import EXACT_MODES, GaussianMixture

MODES = EXACT_MODES  # point | source | point-cov, each with its exact optimum (GaussianMixture.denoiser)


class ToyBatches:
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


class DataSource:
    """Draws noisy batches from a fixed dataset: x0 from `data` [M, ...] (images scaled to [−1, 1], or any
    points) in epoch order, x̃ = x0 + σε (T2, VE space; any process reads its latent from σ̃, T1).

    The order is a fresh permutation from the training generator at every epoch; the permutation and the
    position in it are this source's state (`state_dict`), checkpointed by `train`, so a resumed run sees
    the same examples. labels: [M] class indices < num_classes; with `label_dropout` p each drawn label
    becomes the null class ∅ = num_classes with probability p (classifier-free guidance training, T33).
    The data is checked here, before any training: empty, non-finite or ill-shaped data is a ValueError.
    latent_eps_shape: also draw ε ~ N(0, I) of this shape per example into `batch.latent_eps`, after
    everything else (a VAE's reparameterisation noise: nets/vae.ELBOLoss), so that the run's seed fixes it.
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int = 0,
                 label_dropout: float = 0.0, shape: tuple | None = None, name: str = "data", device=None,
                 latent_eps_shape: tuple | None = None):
        check_data(data, labels, num_classes, shape, name)
        self.latent_eps_shape = None if latent_eps_shape is None else tuple(latent_eps_shape)
        for i, v in enumerate(self.latent_eps_shape or ()):
            check_positive(f"latent_eps_shape[{i}]", v, integer=True)
        if isinstance(label_dropout, bool) or not isinstance(label_dropout, (int, float)) \
                or not 0 <= label_dropout < 1:
            raise ValueError(f"label_dropout={label_dropout!r} must be a number in [0, 1)")
        if label_dropout and labels is None:
            raise ValueError(f"label_dropout={label_dropout} needs labelled data; {name} has no labels")
        # random draws use the (CPU) training generator; batches live on `device` (the data's by default)
        self.device = torch.device(device) if device is not None else data.device
        self.data, self.num_classes, self.label_dropout = data.float().to(self.device), num_classes, \
            float(label_dropout)
        self.labels = None if labels is None else labels.long().to(self.device)
        self.perm, self.pos = torch.zeros(0, dtype=torch.long), 0

    def _indices(self, n: int, generator) -> torch.Tensor:
        parts = []
        while n > 0:
            if self.pos == len(self.perm):
                self.perm, self.pos = torch.randperm(len(self.data), generator=generator), 0
            take = min(n, len(self.perm) - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos, n = self.pos + take, n - take
        return torch.cat(parts)

    def _clean(self, idx: torch.Tensor, generator) -> tuple:
        """(x0, the point the diffusion noise σε is added to, extra NoisyBatch fields) for examples `idx`."""
        x0 = self.data[idx]
        return x0, x0, {}

    def draw(self, n: int, sigma: torch.Tensor, generator=None) -> NoisyBatch:
        dev = self.device
        idx = self._indices(n, generator).to(dev)
        sigma = torch.as_tensor(sigma).to(dev)
        x0, start, extra = self._clean(idx, generator)
        x_noisy = start + as_sigma(sigma, x0) * torch.randn(x0.shape, generator=generator).to(dev)
        labels = None
        if self.labels is not None:
            labels = self.labels[idx]
            if self.label_dropout:
                labels = torch.where(torch.rand(n, generator=generator).to(dev) < self.label_dropout,
                                     self.num_classes, labels)
        if self.latent_eps_shape is not None:
            extra["latent_eps"] = torch.randn((n, *self.latent_eps_shape), generator=generator).to(dev)
        return NoisyBatch(x0, x_noisy, sigma, labels=labels, **extra)

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": torch.tensor([self.pos])}

    def load_state_dict(self, state: dict):
        self.perm, self.pos = state["perm"].long(), int(state["pos"][0])


LATENT_MODES = ("mean", "sample", "source")   # THEORY T36 (a), (b), (c)


class LatentSource(DataSource):
    """Draws noisy batches from an encoded dataset (THEORY T36): per example the VAE's posterior mean m and
    std s (`mean`, `std`, [M, ...] each, s ≥ 0), in epoch order as DataSource (labels, dropout, state alike).

    mean   (a): x0 = m, x̃ = m + σε₂; s is ignored.
    sample (b): x0 = m + s·ε₁, ε₁ drawn afresh at every batch (LDM, EDM2), x̃ = x0 + σε₂; s otherwise ignored.
    source (c): x0 = m, x̃ = m + s·ε₁ + σ·ε₂ ~ N(m, s² + σ²) per element (T3), and `batch.source_sigma` = s:
                the denoiser's scalings come from √(σ² + s²) and the NLL's noise variance is σ² + s²
                (losses.ConfidenceNLL).
    Draw order per batch: indices, ε₁ (modes b and c), ε₂, label dropout.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, mode: str, labels: torch.Tensor | None = None,
                 num_classes: int = 0, label_dropout: float = 0.0, name: str = "latents", device=None):
        check_choice("mode", mode, LATENT_MODES)
        super().__init__(mean, labels, num_classes, label_dropout, name=name, device=device)
        if not torch.is_tensor(std) or std.shape != mean.shape:
            raise ValueError(f"{name}: std must be a tensor shaped like mean {tuple(mean.shape)}; got "
                             f"{tuple(std.shape) if torch.is_tensor(std) else type(std).__name__}")
        if not bool((torch.isfinite(std) & (std >= 0)).all()):
            raise ValueError(f"{name}: std must be finite and >= 0 everywhere (a posterior std)")
        self.mode, self.std = mode, std.float().to(self.device)

    def _clean(self, idx, generator):
        m = self.data[idx]
        if self.mode == "mean":
            return m, m, {}
        s = self.std[idx]
        e1 = torch.randn(m.shape, generator=generator).to(self.device)
        if self.mode == "sample":
            x0 = m + s * e1
            return x0, x0, {}
        return m, m + s * e1, {"source_sigma": s}


def check_data(data, labels=None, num_classes: int = 0, shape: tuple | None = None, name: str = "data"):
    """Training data as a model can take it, or a ValueError naming what is wrong (before any training)."""
    if not torch.is_tensor(data) or data.ndim < 2:
        raise ValueError(f"{name} must be a tensor [N, ...] of examples; got "
                         f"{type(data).__name__ if not torch.is_tensor(data) else tuple(data.shape)}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty (0 examples); allowed: at least one example")
    if shape is not None and tuple(data.shape[1:]) != tuple(shape):
        raise ValueError(f"{name} has examples of shape {tuple(data.shape[1:])}; the model takes "
                         f"{tuple(shape)}")
    if not data.is_floating_point():
        raise ValueError(f"{name} has dtype {data.dtype}; allowed: floating point (images scaled to [-1, 1])")
    bad = ~torch.isfinite(data.flatten(1)).all(1)
    if bad.any():
        raise ValueError(f"{name} holds {int(bad.sum())} examples with NaN or Inf values (first: example "
                         f"{int(bad.nonzero()[0])}); allowed: finite values only")
    if labels is None:
        if num_classes:
            raise ValueError(f"num_classes={num_classes} but {name} has no labels")
        return
    if not torch.is_tensor(labels) or labels.shape != (len(data),) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor [{len(data)}] (one class per example); got "
                         f"{tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__}")
    check_positive("num_classes", num_classes, integer=True)
    out = (labels < 0) | (labels >= num_classes)
    if out.any():
        raise ValueError(f"labels hold {int(labels[out][0])}, out of range; allowed: 0 … {num_classes - 1} "
                         f"(num_classes={num_classes})")
