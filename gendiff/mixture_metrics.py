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


def kernel_sum(a: torch.Tensor, b: torch.Tensor | None = None, chunk: int = 256) -> float:
    """Σ_{i≠j if b is None} Σ_bandwidths exp(−‖a_i − b_j‖²/(2h²)), in blocks of `chunk` rows: at one thread
    (the main job's workers) 256 rows of 16,384 float64 distances take 2.6 s per 16,384² sum here, against
    3.6 s for 512 and 5.3 s for 2048 (`benchmarks/mmd_chunks.py --threads 1`); the block size changes only
    the order of the float64 partial sums.
    b = None (the self-sum, b = a): the kernel is symmetric, so each row block is paired with itself and the
    columns after it only, and the off-diagonal part counts twice: half the pairs, ≈ 2× faster
    (`benchmarks/mmd_chunks.py` times both forms)."""
    same, b = b is None, a if b is None else b
    total = 0.0
    for i in range(0, len(a), chunk):
        rows = a[i:i + chunk]
        k = torch.cdist(rows, b[i:] if same else b).square_().mul_(-0.5 / MMD_H0**2).exp_()
        for j in range(MMD_BANDWIDTHS):
            total += (2 * float(k.sum(dtype=torch.float64)) - float(k[:, :len(rows)].sum(dtype=torch.float64))
                      if same else float(k.sum(dtype=torch.float64)))
            if j + 1 < MMD_BANDWIDTHS:
                k.square_()
        if same:
            total -= MMD_BANDWIDTHS * len(rows)  # k(x, x) = 1 on the diagonal
    return total


def mmd(x: torch.Tensor, y: torch.Tensor, y_self: float | None = None) -> float:
    """Unbiased kernel MMD² between samples x and y, summed over RBF bandwidths 0.32·2^(−j/2), j < 9.

    y_self: a cached `kernel_sum(y)` (the reference set is the same for every run).
    """
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 samples per set; got {n} and {m}")
    kyy = kernel_sum(y) if y_self is None else y_self
    return kernel_sum(x) / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kernel_sum(x, y) / (n * m)


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


def _bin_label(lo: float, hi: float) -> str:
    return f"[{lo:.3g}, {hi:.3g})"


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def partial_spearman(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> float:
    """Rank correlation of a and b with c's (rank-linear) part removed:
    (ρ_ab − ρ_ac·ρ_bc)/√((1 − ρ_ac²)(1 − ρ_bc²)). If a is a monotone function of c (a model that knows
    only σ), nothing of a is left: 0 by definition."""
    r = spearmanr(np.stack([a.numpy(), b.numpy(), c.numpy()], 1)).statistic
    r_ab, r_ac, r_bc = r[0, 1], r[0, 2], r[1, 2]
    den = (1 - r_ac**2) * (1 - r_bc**2)
    return 0.0 if not den > 1e-12 else float((r_ab - r_ac * r_bc) / math.sqrt(den))


CAL_BIN_DECADES = 0.25   # width of the log-σ bins in which the excess variance is ranked
CAL_MIN_POINTS = 200     # a bin with fewer held-out points is left out of the average


def calibration(learned: torch.Tensor, exact: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor,
                bin_decades: float = CAL_BIN_DECADES, min_points: int = CAL_MIN_POINTS) -> dict:
    """How well a learned Σ_φ matches the exact optimum of its own loss (T8 / T12), and whether it is
    calibrated.

    learned, exact: Σ_φ and Σ_φ* as [N, d, d] (diagonal heads: `torch.diag_embed` of σ_φ²); sigma: [N];
    target: [N, d, d], the second moment the loss fits at each held-out point, σ²I
    (+ Σ_src) + (μ − x0)(μ − x0)ᵀ.

    - `spearman`, `median_rel_error`, `p90_rel_error`: the totals (diagonal entries ranked; relative
      Frobenius error per point). Over σ spanning decades σ² alone ranks these almost perfectly.
    - `*_excess`: the part above the known noise, Σ_φ − σ²I against Σ_φ* − σ²I (Var[x0 | x̃] in point
      mode). `spearman_excess` is the mean of rank correlations *within* log-σ bins `bin_decades` wide
      (named in `spearman_excess_by_bin`, bins with ≥ `min_points` points). Inside a bin σ still varies
      and still ranks the excess (the no-head model scores ≈ 0.5 on the tree), so `partial_spearman_excess`
      also removes σ's rank-linear part within each bin (`partial_spearman`): σ alone scores exactly 0.
    - `ratio`: E[tr(Σ_φ⁻¹·target)]/d, overall and per σ range (`ratio_by_sigma`): 1 when calibrated
      (T8: the optimum is σ_φ² = E[σ² + (μ − x0)²]); above 1 the model is over-confident.
    """
    learned, exact, target, s = learned.double(), exact.double(), target.double(), sigma.double().view(-1)
    N, d, _ = learned.shape
    floor = s.square()[:, None, None] * torch.eye(d, dtype=torch.float64)
    out = {}
    for tag, lv, ev in (("", learned, exact), ("_excess", learned - floor, exact - floor)):
        rel = torch.linalg.matrix_norm(lv - ev) / torch.linalg.matrix_norm(ev)
        out[f"median_rel_error{tag}"] = float(rel.median())
        out[f"p90_rel_error{tag}"] = float(torch.quantile(rel, 0.9))
    diag = lambda m: torch.diagonal(m, dim1=-2, dim2=-1)  # noqa: E731
    out["spearman"] = _spearman(diag(learned).flatten(), diag(exact).flatten())
    logs = s.log10()
    lo = math.floor(float(logs.min()) / bin_decades) * bin_decades
    by_bin, partial = {}, {}
    while lo <= float(logs.max()):
        m = (logs >= lo) & (logs < lo + bin_decades)
        if int(m.sum()) >= min_points:
            a, b = diag(learned[m] - floor[m]).flatten(), diag(exact[m] - floor[m]).flatten()
            name = _bin_label(10 ** lo, 10 ** (lo + bin_decades))
            by_bin[name] = _spearman(a, b)
            partial[name] = partial_spearman(a, b, s[m].repeat_interleave(d))
        lo += bin_decades
    for key, vals in (("spearman_excess", by_bin), ("partial_spearman_excess", partial)):
        out[key] = float(np.mean(list(vals.values()))) if vals else None
        out[f"{key}_by_bin"] = vals
    ratio = torch.linalg.solve(learned, target).diagonal(dim1=-2, dim2=-1).sum(-1) / d   # tr(Σ_φ⁻¹ T)/d
    out["ratio"] = float(ratio.mean())
    out["ratio_by_sigma"] = {f"[{lo:g}, {hi:g})": (float(ratio[(s >= lo) & (s < hi)].mean())
                                                  if bool(((s >= lo) & (s < hi)).any()) else None)
                             for lo, hi in zip(SIGMA_BINS[:-1], SIGMA_BINS[1:])}
    return out
