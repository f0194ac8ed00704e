"""Metrics against an exact ground truth (THEORY §10): every number computed from the mixture."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import spearmanr

from .data.toy import GaussianMixture

# RBF bandwidths h_j = h_0·2^(−j/2): halving h² squares the kernel, so one exp serves all of them.
MMD_H0, MMD_BANDWIDTHS = 0.32, 9


def sample_nll(samples: torch.Tensor, gt: GaussianMixture) -> float:
    """Mean −log p_GT(sample) at σ = 0 (precision; lower is better), float64."""
    return float(-gt.logp(samples.double(), 0.0).mean())


def median_nll(samples: torch.Tensor, gt: GaussianMixture) -> float:
    """Median −log p_GT(sample): the typical precision, unmoved by the few far-off samples that can
    dominate the mean (one sample far from the tree costs ~‖x‖²/σ_min² nats)."""
    return float(-gt.logp(samples.double(), 0.0).median())


def outlier_threshold(gt: GaussianMixture, n: int = 1 << 16, q: float = 0.01, seed: int = 12345) -> float:
    """The q-quantile of log p_GT over ground-truth samples."""
    ref, _ = gt.sample(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return float(torch.quantile(gt.logp(ref, 0.0), q))


def outlier_rate(samples: torch.Tensor, gt: GaussianMixture, threshold: float) -> float:
    """Fraction of samples whose log p_GT falls below `threshold` (see `outlier_threshold`);
    non-finite samples count as outliers."""
    return float((~(gt.logp(samples.double(), 0.0) >= threshold)).double().mean())


def kernel_sum(a: torch.Tensor, b: torch.Tensor, same: bool, chunk: int = 2048) -> float:
    """Σ_{i≠j if same} Σ_bandwidths exp(−‖a_i − b_j‖²/(2h²))."""
    total = 0.0
    for i in range(0, len(a), chunk):
        d2 = torch.cdist(a[i:i + chunk], b).square_()
        k = d2.mul_(-0.5 / MMD_H0**2).exp_()
        for _ in range(MMD_BANDWIDTHS):
            total += float(k.sum(dtype=torch.float64))
            k = k.square_()
        if same:
            total -= MMD_BANDWIDTHS * min(chunk, len(a) - i)  # k(x, x) = 1 on the diagonal
    return total


def mmd(x: torch.Tensor, y: torch.Tensor, y_self: float | None = None) -> float:
    """Unbiased kernel MMD² between samples x and y, summed over RBF bandwidths 0.32·2^(−j/2), j < 9.

    y_self: a cached `kernel_sum(y, y, True)` (the reference set is the same for every run).
    """
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 samples per set; got {n} and {m}")
    kyy = kernel_sum(y, y, True) if y_self is None else y_self
    return (kernel_sum(x, x, True) / (n * (n - 1)) + kyy / (m * (m - 1))
            - 2 * kernel_sum(x, y, False) / (n * m))


def score_error(model_score: torch.Tensor, exact_score: torch.Tensor, sigma: torch.Tensor) -> float:
    """σ²-weighted mean squared score error: mean_i σ_i²·‖s_θ − s*‖², the weight of §10's score matching."""
    return float(_weighted_sq_error(model_score, exact_score, sigma).mean())


SIGMA_BINS = (0.0, 0.01, 0.1, 1.0, math.inf)


def score_error_by_sigma(model_score: torch.Tensor, exact_score: torch.Tensor, sigma: torch.Tensor,
                         edges=SIGMA_BINS) -> dict:
    """`score_error` per σ range "[lo, hi)": the training-density average hides where an error sits."""
    err, s = _weighted_sq_error(model_score, exact_score, sigma), sigma.double().view(-1)
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (s >= lo) & (s < hi)
        out[f"[{lo:g}, {hi:g})"] = float(err[m].mean()) if m.any() else None
    return out


def _weighted_sq_error(model_score, exact_score, sigma):
    return sigma.double().square().view(-1) * (model_score - exact_score).double().square().sum(1)


def _agreement(a: torch.Tensor, b: torch.Tensor, rel: torch.Tensor) -> tuple:
    return float(spearmanr(a.numpy(), b.numpy()).statistic), float(np.median(rel.numpy()))


def calibration(learned: torch.Tensor, exact: torch.Tensor, floor: torch.Tensor) -> dict:
    """Agreement of a learned variance with its exact optimum (T8 / T12).

    The optimum is `floor` (the known noise, σ² or σ²I) plus an excess (Var[x0 | x̃], or
    E[Σ_src | x̃] + Cov[m | x̃] in source mode). Over σ spanning decades the floor alone ranks the
    totals almost perfectly, so the *excess* (learned − floor vs exact − floor) is what shows whether
    the network learned the uncertainty; both are reported.
    Per-element variances [N, d]: Spearman over all elements, median relative error.
    Covariances [N, d, d]: Spearman of the traces, median relative Frobenius error.
    """
    learned, exact, floor = learned.double(), exact.double(), floor.double()
    out = {}
    for tag, lv, ev in (("", learned, exact), ("_excess", learned - floor, exact - floor)):
        if lv.ndim == 3:
            a = torch.diagonal(lv, dim1=-2, dim2=-1).sum(-1)
            b = torch.diagonal(ev, dim1=-2, dim2=-1).sum(-1)
            rel = torch.linalg.matrix_norm(lv - ev) / torch.linalg.matrix_norm(ev)
        else:
            a, b = lv.flatten(), ev.flatten()
            rel = (a - b).abs() / b.abs()
        out[f"spearman{tag}"], out[f"median_rel_error{tag}"] = _agreement(a, b, rel)
    return out
