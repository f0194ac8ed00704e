"""Toy metrics against closed forms (THEORY §10)."""
import math

import pytest
import torch

from gendiff.data.toy import GaussianMixture, tree
from gendiff.mixture_metrics import (calibration, kernel_sum, mmd, outlier_rate, outlier_threshold,
                                    sample_nll, score_error)

F64 = torch.float64


def gaussian(s=0.3):
    return GaussianMixture([1.0], [[0.1, -0.2]], [[[s * s, 0.0], [0.0, s * s]]])


def test_sample_nll_of_ground_truth_is_the_entropy():
    """E[−log p(x)] over x ~ p is the entropy: d/2·log(2πe·s²) for N(m, s²I)."""
    s, n = 0.3, 200_000
    g = gaussian(s)
    x, _ = g.sample(n, generator=torch.Generator().manual_seed(0), dtype=F64)
    entropy = math.log(2 * math.pi * math.e * s * s)  # d = 2
    assert sample_nll(x, g) == pytest.approx(entropy, abs=4 * math.sqrt(1.0 / n))  # Var[−log p] = d/2 = 1


def test_outlier_rate_of_ground_truth_is_one_percent():
    gt = tree("A")
    thr = outlier_threshold(gt, n=1 << 15, seed=1)
    x, _ = gt.sample(1 << 15, generator=torch.Generator().manual_seed(2), dtype=F64)
    rate = outlier_rate(x, gt, thr)
    assert abs(rate - 0.01) < 4 * math.sqrt(0.01 * 0.99 / (1 << 15)) * math.sqrt(2)
    far = torch.full((10, 2), 5.0, dtype=F64)
    assert outlier_rate(far, gt, thr) == 1.0
    broken = torch.tensor([[math.nan, 0.0], [math.inf, 0.0]], dtype=F64)   # diverged samples are outliers
    assert outlier_rate(broken, gt, thr) == 1.0


def test_mmd_matches_brute_force_unbiased_estimator():
    """Unbiased MMD² with RBF bandwidths h_j = 0.32·2^(−j/2), j < 9, written out pair by pair."""
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(150, 2, generator=g, dtype=F64) * 0.2,
            torch.randn(170, 2, generator=g, dtype=F64) * 0.25)
    hs = [0.32 * 2 ** (-j / 2) for j in range(9)]

    def k(a, b):
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (2 * h * h)) for h in hs)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    brute = ((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
             - 2 * kxy.mean())
    assert mmd(x, y) == pytest.approx(float(brute), rel=1e-9, abs=1e-12)
    # row blocks smaller than the set (the last one partial): the symmetric self-sum pairs each block with the
    # columns from its own start on and doubles the off-diagonal part (breakage tried: pairing each block with
    # the columns after its end, i.e. dropping the diagonal blocks' off-diagonal pairs, fails here)
    for chunk in (37, 64):
        assert kernel_sum(x, chunk=chunk) == pytest.approx(float(kxx.sum() - kxx.diag().sum()), rel=1e-12)
        assert kernel_sum(x, y, chunk=chunk) == pytest.approx(float(kxy.sum()), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        mmd(x[:1], y)


def test_mmd_null_and_alternative():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2000, 2, generator=g, dtype=F64) * 0.3,
            torch.randn(2000, 2, generator=g, dtype=F64) * 0.3)
    null = mmd(a, b)
    assert abs(null) < 2e-3
    assert mmd(a + 0.1, b) > 20 * abs(null) + 1e-3
    assert mmd(a * 0.7, b) > 5 * abs(null)                # lost spread (collapse) is caught too


def test_score_error_is_sigma2_weighted_mse():
    s = torch.tensor([0.1, 2.0], dtype=F64)
    exact = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    model = exact + torch.tensor([[1.0, 0.0], [0.0, 0.5]], dtype=F64)
    assert score_error(exact, exact, s) == 0
    assert score_error(model, exact, s) == pytest.approx((0.01 * 1.0 + 4.0 * 0.25) / 2)


def test_calibration_total_excess_binned_and_ratio():
    """metrics.calibration on synthetic covariances whose answers are known in closed form."""
    g = torch.Generator().manual_seed(0)
    n, eye = 4000, torch.eye(2, dtype=F64)
    sigma = torch.rand(n, generator=g, dtype=F64).mul(8).sub(6).exp()          # σ over ~3.5 decades
    floor = sigma.square()[:, None, None] * eye
    excess = torch.diag_embed(torch.rand(n, 2, generator=g, dtype=F64) * 1e-3)
    exact = floor + excess
    perfect = calibration(exact, exact, sigma, exact)
    assert perfect["spearman"] == pytest.approx(1) and perfect["median_rel_error"] == 0
    assert perfect["spearman_excess"] == pytest.approx(1) and perfect["median_rel_error_excess"] == 0
    assert perfect["p90_rel_error_excess"] == 0
    assert perfect["ratio"] == pytest.approx(1) and all(v == pytest.approx(1) for v in
                                                        perfect["ratio_by_sigma"].values() if v is not None)
    # bins are a quarter decade wide and named
    for name in perfect["spearman_excess_by_bin"]:
        lo, hi = (float(v) for v in name.strip("[)").split(","))
        assert math.log10(hi / lo) == pytest.approx(0.25, abs=1e-2)
    # a model that learned the floor but not the excess: the pooled total ranks fine (σ² spans decades),
    # the within-bin excess Spearman exposes it
    blind = calibration(floor + torch.diag_embed(torch.rand(n, 2, generator=g, dtype=F64) * 1e-3),
                        exact, sigma, exact)
    assert blind["spearman"] > 0.95
    assert abs(blind["spearman_excess"]) < 0.2
    # twice the excess: relative error exactly 1; twice the whole variance: ratio exactly 1/2
    double = calibration(floor + 2 * excess, exact, sigma, exact)
    assert double["median_rel_error_excess"] == pytest.approx(1.0)
    assert double["p90_rel_error_excess"] == pytest.approx(1.0)
    assert calibration(2 * exact, exact, sigma, exact)["ratio"] == pytest.approx(0.5)
    # full covariances: off-diagonal errors count in the Frobenius error
    rot = torch.tensor([[0.0, 1e-3], [1e-3, 0.0]], dtype=F64)
    off = calibration(exact + rot, exact, sigma, exact)
    rel = torch.linalg.matrix_norm(rot.expand(n, 2, 2)) / torch.linalg.matrix_norm(excess)
    assert off["median_rel_error_excess"] == pytest.approx(float(rel.median()))


def test_score_error_by_sigma_bins_partition_the_average():
    g = torch.Generator().manual_seed(1)
    sigma = torch.rand(1000, generator=g, dtype=F64).mul(9).sub(6).exp()
    exact = torch.randn(1000, 2, generator=g, dtype=F64)
    model = exact + torch.randn(1000, 2, generator=g, dtype=F64) * 0.1
    from gendiff.mixture_metrics import SIGMA_BINS, score_error_by_sigma
    bins = score_error_by_sigma(model, exact, sigma)
    counts = [int(((sigma >= lo) & (sigma < hi)).sum()) for lo, hi in zip(SIGMA_BINS[:-1], SIGMA_BINS[1:])]
    weighted = sum(c * v for c, v in zip(counts, bins.values()) if c)
    assert weighted / len(sigma) == pytest.approx(score_error(model, exact, sigma), rel=1e-12)
    assert score_error_by_sigma(model[:2], exact[:2], torch.tensor([0.5, 0.6], dtype=F64))["[1, inf)"] is None


def test_median_nll_of_a_gaussian():
    """−log N(x; m, s²I) = log(2πs²) + r²/(2s²) with r² ~ s²·χ²₂, whose median is 2 ln 2."""
    from gendiff.mixture_metrics import median_nll
    s = 0.3
    g = gaussian(s)
    x, _ = g.sample(100_000, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert median_nll(x, g) == pytest.approx(math.log(2 * math.pi * s * s) + math.log(2), abs=0.02)
    far = torch.cat([x[:99], torch.full((1, 2), 50.0, dtype=F64)])       # one far sample moves the mean only
    assert median_nll(far, g) == pytest.approx(median_nll(x[:100], g), abs=0.1)
    assert sample_nll(far, g) > sample_nll(x[:100], g) + 100


def test_partial_spearman_removes_what_sigma_alone_explains():
    """Within a σ bin the excess variance still rises with σ; a model that knows only σ ranks it (plain
    Spearman > 0) but scores exactly 0 once σ's rank-linear part is removed; a model that knows the excess
    itself keeps a positive partial correlation."""
    from gendiff.mixture_metrics import partial_spearman
    g = torch.Generator().manual_seed(3)
    s = torch.rand(2000, generator=g, dtype=F64) * 0.5 + 1.0            # one narrow σ bin
    extra = torch.rand(2000, generator=g, dtype=F64)
    exact = s**2 * (1 + extra)                                          # rises with σ and with something else
    sigma_only = 0.8 * s**2                                             # a monotone function of σ
    from scipy.stats import spearmanr
    assert spearmanr(sigma_only.numpy(), exact.numpy()).statistic > 0.3
    assert partial_spearman(sigma_only, exact, s) == 0.0
    assert partial_spearman(exact, exact, s) == pytest.approx(1.0)
    assert partial_spearman(s**2 * (1 + extra + 0.1 * torch.rand(2000, generator=g, dtype=F64)),
                            exact, s) > 0.9


def test_lognormal_density_cdf_and_pdf_agree_with_T18():
    """LogNormalSigma: λ = −2 ln σ ~ N(−2 P_mean, (2 P_std)²); pdf integrates to 1 and is −d cdf/dλ."""
    from gendiff.schedules import LogNormalSigma
    d = LogNormalSigma(-1.2, 1.2)
    lam = torch.linspace(-30, 35, 20001, dtype=F64)
    p = d.pdf(lam)
    assert float(torch.trapezoid(p, lam)) == pytest.approx(1.0, abs=1e-6)
    # P(σ ≤ e^(−λ/2)) = P(Λ ≥ λ): its derivative in λ is −p(λ)
    cdf = d.cdf_sigma(torch.exp(-lam / 2))
    dcdf = torch.gradient(cdf, spacing=(lam,))[0]
    torch.testing.assert_close(-dcdf[100:-100], p[100:-100], rtol=1e-4, atol=1e-7)
    assert float(lam[p.argmax()]) == pytest.approx(2.4, abs=0.01)     # T18: EDM training λ ~ N(2.4, 2.4²)
