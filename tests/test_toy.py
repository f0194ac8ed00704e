"""The exact 2-D toys (THEORY §10) against analytic oracles: autograd of log p, Tweedie's formulas,
normalisation on a grid, moments, a brute-force scipy mixture, and the autoguidance paper's construction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from gendiff.data import toy
from gendiff.data.toy import Checkerboard, GaussianMixture, eight_gaussians, swiss_roll, tree, two_moons

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tree_ab():
    return tree("AB")


def _points(g: GaussianMixture, n: int, sigma: float, seed: int):
    """Points where the density matters (noisy samples) plus a few uniform ones in the view."""
    gen = torch.Generator().manual_seed(seed)
    x, _ = g.sample(n, sigma=sigma, generator=gen, dtype=F64)
    u = (torch.rand(max(n // 4, 1), 2, generator=gen, dtype=F64) - 0.5) * 3.2
    return torch.cat([x, u])


def _autograd_score(g, x, sigma):
    x = x.clone().requires_grad_()
    (s,) = torch.autograd.grad(g.logp(x, sigma).sum(), x)
    return s


# ---- the autoguidance paper's tree -----------------------------------------------------------------

ORIGIN, SCALE = np.array([0.0030, 0.0325]), np.array([1.3136, 1.3844])


@pytest.mark.parametrize("classes,count", [("A", 1016), ("B", 1016), ("AB", 2032)])
def test_tree_is_the_autoguidance_construction(classes, count):
    """Structure of the paper's tree (§10): 127 branches per class, each 8 equal-weight components
    evenly spaced on a segment (t = 0.07 … 0.93), with the segment as a principal axis; class A's trunk leaves
    the origin at 45°, B's at 225° (before the anisotropic scale), with length 0.292 jittered by
    N(0, 0.2²)."""
    g = tree(classes)
    assert g.K == count == 8 * (2**7 - 1) * len(classes) and g.dim == 2
    m = g.means64.numpy().reshape(-1, 8, 2) / SCALE                 # unscaled branch coordinates
    w = g.weights64.numpy().reshape(-1, 8)
    np.testing.assert_allclose(w, w[:, :1].repeat(8, 1), rtol=1e-12)   # equal weights within a branch
    steps = np.diff(m, axis=1)                                       # evenly spaced, collinear
    np.testing.assert_allclose(steps, steps[:, :1].repeat(7, 1), atol=1e-12)
    u = steps[:, 0] / np.linalg.norm(steps[:, 0], axis=1, keepdims=True)
    cov = g.covs64.numpy().reshape(-1, 8, 2, 2)[:, 0] / np.outer(SCALE, SCALE)
    cu = np.einsum("bij,bj->bi", cov, u)                             # the branch direction is an eigenvector
    np.testing.assert_allclose(cu[:, 0] * u[:, 1] - cu[:, 1] * u[:, 0], 0, atol=1e-12)
    for k, cls in enumerate(classes):
        trunk = m[127 * k]
        length = np.linalg.norm(trunk[-1] - trunk[0]) / 0.86
        start = trunk[0] - (trunk[1] - trunk[0]) / (0.86 / 7) * 0.07
        np.testing.assert_allclose(start, ORIGIN, atol=1e-12)
        angle = np.degrees(np.arctan2(*(trunk[1] - trunk[0])[::-1])) % 360
        assert angle == pytest.approx(45 if cls == "A" else 225, abs=1e-9)
        assert 0.292 * 0.4 < length < 0.292 * 1.6


def test_tree_deterministic_classes_and_spd():
    a1 = tree("A")
    toy._tree_components.cache_clear()                      # rebuild from scratch, not from the cache
    a2, b, ab = tree("A"), tree("B"), tree("AB")
    for name in ("weights64", "means64", "covs64"):
        assert torch.equal(getattr(a1, name), getattr(a2, name))
    # A and B are disjoint; AB is their union (means in order A then B), weights ∝ the classes' raw weights
    ma, mb = {tuple(r) for r in a1.means64.tolist()}, {tuple(r) for r in b.means64.tolist()}
    assert len(ma) == 1016 and len(mb) == 1016 and not (ma & mb)
    assert torch.equal(ab.means64, torch.cat([a1.means64, b.means64]))
    assert torch.equal(ab.covs64, torch.cat([a1.covs64, b.covs64]))
    wa, wb = ab.weights64[:1016], ab.weights64[1016:]
    torch.testing.assert_close(wa / wa.sum(), a1.weights64, rtol=1e-12, atol=0)
    torch.testing.assert_close(wb / wb.sum(), b.weights64, rtol=1e-12, atol=0)
    for g in (a1, b, ab):
        assert (g.weights64 > 0).all()
        assert g.weights64.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert torch.equal(g.covs64, g.covs64.transpose(1, 2))
        assert torch.linalg.eigvalsh(g.covs64).min().item() > 0


def test_tree_support_in_view(tree_ab):
    x, cov = tree_ab.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (100_000, 2) and cov.shape == (100_000, 2, 2) and torch.isfinite(x).all()
    inside = (x.abs() <= 1.6).all(1).float().mean().item()
    assert inside >= 0.99
    # both classes are populated: A grows towards +45°, B towards −135°
    assert (x.sum(1) > 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


# ---- score, posterior ----------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.3])
def test_score_is_gradient_of_logp_scalar_sigma(tree_a, sigma):
    x = _points(tree_a, 256, sigma, seed=1)
    lp, sc = tree_a.logp_and_score(x, sigma)
    torch.testing.assert_close(sc, _autograd_score(tree_a, x, sigma), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(tree_a.score(x, sigma), sc, rtol=0, atol=0)
    torch.testing.assert_close(tree_a.logp(x, sigma), lp, rtol=0, atol=0)
    assert torch.isfinite(lp).all() and torch.isfinite(sc).all()


def test_score_is_gradient_of_logp_per_point_sigma(tree_a):
    gen = torch.Generator().manual_seed(2)
    x = _points(tree_a, 256, 0.1, seed=3)
    sigma = torch.rand(len(x), generator=gen, dtype=F64) * 0.5
    sigma[:8] = 0.0                                                   # σ = 0 is allowed for logp/score
    lp, sc = tree_a.logp_and_score(x, sigma)
    torch.testing.assert_close(sc, _autograd_score(tree_a, x, sigma), rtol=1e-7, atol=1e-7)
    # row by row with a scalar σ: the per-point path and the scalar path agree
    lp_rows = torch.cat([tree_a.logp(x[i:i + 1], sigma[i].item()) for i in range(0, len(x), 37)])
    torch.testing.assert_close(lp[::37], lp_rows, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sigma", [0.0, 0.02, 0.1, 0.5])
def test_scalar_and_per_point_paths_agree(tree_a, sigma):
    x = _points(tree_a, 600, sigma, seed=4)
    lp_s, sc_s = tree_a.logp_and_score(x, sigma)
    lp_p, sc_p = tree_a.logp_and_score(x, torch.full((len(x),), sigma, dtype=F64))
    torch.testing.assert_close(lp_s, lp_p, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(sc_s, sc_p, rtol=1e-9, atol=1e-8)
    # chunking does not change anything
    small = GaussianMixture(tree_a.weights64.numpy(), tree_a.means64.numpy(), tree_a.covs64.numpy(),
                            chunk_size=7)
    torch.testing.assert_close(small.logp_and_score(x, sigma)[1], sc_s, rtol=1e-10, atol=1e-10)
    # float32 (either path) agrees with float64
    x32 = x.float()
    for s in (sigma, torch.full((len(x),), sigma)):
        lp32, sc32 = tree_a.logp_and_score(x32, s)
        assert lp32.dtype == torch.float32
        torch.testing.assert_close(lp32.double(), lp_s, rtol=1e-4, atol=2e-3)
        scale = sc_s.norm(dim=1, keepdim=True).clamp_min(1.0)
        assert ((sc32.double() - sc_s) / scale).abs().max().item() < 2e-3


@pytest.mark.parametrize("per_point", [False, True])
def test_posterior_mean_is_tweedie(tree_a, per_point):
    x = _points(tree_a, 300, 0.1, seed=5)
    sigma = (torch.rand(len(x), generator=torch.Generator().manual_seed(6), dtype=F64) * 0.4 + 0.01
             if per_point else torch.tensor(0.1, dtype=F64))
    post = tree_a.posterior(x, sigma)
    s2 = sigma.square().view(-1, 1) if per_point else sigma.square()
    torch.testing.assert_close(post.mean, x + s2 * tree_a.score(x, sigma), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.02, 0.1, 0.4])
def test_posterior_cov_is_second_order_tweedie(tree_a, sigma):
    """Cov[x0 | x̃] = σ²I + σ⁴·∇² log p(x̃; σ), Hessian by autograd."""
    x = _points(tree_a, 4, sigma, seed=7)[:5]
    post = tree_a.posterior(x, sigma)
    for i in range(len(x)):
        H = torch.autograd.functional.hessian(lambda p: tree_a.logp(p[None], sigma).sum(), x[i])
        ref = sigma**2 * torch.eye(2, dtype=F64) + sigma**4 * H
        torch.testing.assert_close(post.cov[i], ref, rtol=1e-7, atol=1e-9 * sigma**2)
        assert torch.linalg.eigvalsh(post.cov[i]).min() > 0
    # per-point σ goes through the same formula
    sig = torch.tensor([0.03, 0.1, 0.2, 0.35, 0.05], dtype=F64)
    pp = tree_a.posterior(x, sig)
    for i in range(len(x)):
        torch.testing.assert_close(pp.cov[i], tree_a.posterior(x[i:i + 1], sig[i].item()).cov[0],
                                   rtol=1e-10, atol=1e-14)


# ---- a hand-made mixture against scipy -------------------------------------------------------------

def _two_component():
    w = np.array([0.3, 0.7])
    m = np.array([[-0.4, 0.2], [0.5, -0.1]])
    c = np.array([[[0.09, 0.03], [0.03, 0.04]], [[0.02, -0.01], [-0.01, 0.05]]])
    return w, m, c


def test_small_mixture_against_scipy():
    w, m, c = _two_component()
    g = GaussianMixture(w * 5, m, c)                                         # weights get normalised
    x = torch.tensor([[-0.4, 0.2], [0.0, 0.0], [0.5, -0.1], [1.5, 1.0], [-2.0, 3.0]], dtype=F64)
    sigma = torch.tensor([0.0, 0.1, 0.3, 0.05, 1.0], dtype=F64)
    for i, xi in enumerate(x.numpy()):
        s = sigma[i].item()
        comp = np.array([np.log(w[k]) + multivariate_normal(m[k], c[k] + s**2 * np.eye(2)).logpdf(xi)
                         for k in range(2)])
        r = np.exp(comp - logsumexp(comp))
        assert g.logp(x[i:i + 1], s).item() == pytest.approx(logsumexp(comp), rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(g.responsibilities(x[i:i + 1], s)[0].numpy(), r, rtol=1e-10, atol=1e-14)
        # score: Σ_k r_k (Σ_k + σ²I)⁻¹(m_k − x)
        score = sum(r[k] * np.linalg.solve(c[k] + s**2 * np.eye(2), m[k] - xi) for k in range(2))
        np.testing.assert_allclose(g.score(x[i:i + 1], s)[0].numpy(), score, rtol=1e-10, atol=1e-12)
        if s == 0:
            continue
        # posterior of x0 (Gaussian conditioning per component, then the law of total variance)
        means = [xi + s**2 * np.linalg.solve(c[k] + s**2 * np.eye(2), m[k] - xi) for k in range(2)]
        covs = [s**2 * c[k] @ np.linalg.inv(c[k] + s**2 * np.eye(2)) for k in range(2)]
        mean = sum(r[k] * means[k] for k in range(2))
        cov = sum(r[k] * (covs[k] + np.outer(means[k] - mean, means[k] - mean)) for k in range(2))
        post = g.posterior(x[i:i + 1], s)
        np.testing.assert_allclose(post.mean[0].numpy(), mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(post.cov[0].numpy(), cov, rtol=1e-9, atol=1e-12)
        # source posterior: E[m_k | x̃] and E[Σ_k | x̃] + Cov[m_k | x̃]
        smean = r @ m
        scov = sum(r[k] * (c[k] + np.outer(m[k] - smean, m[k] - smean)) for k in range(2))
        sp = g.source_posterior(x[i:i + 1], s)
        np.testing.assert_allclose(sp.mean[0].numpy(), smean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sp.cov[0].numpy(), scov, rtol=1e-10, atol=1e-12)
    # batched with per-point σ = the rows above
    sp_all = g.source_posterior(x, sigma)
    for i in range(len(x)):
        torch.testing.assert_close(sp_all.mean[i], g.source_posterior(x[i:i + 1], sigma[i].item()).mean[0])
        torch.testing.assert_close(sp_all.cov[i], g.source_posterior(x[i:i + 1], sigma[i].item()).cov[0])


def test_responsibilities_and_source_posterior_on_tree(tree_a):
    x = _points(tree_a, 200, 0.1, seed=8)
    r = tree_a.responsibilities(x, 0.1)
    assert r.shape == (len(x), 1016) and (r >= 0).all()
    torch.testing.assert_close(r.sum(1), torch.ones(len(x), dtype=F64), rtol=0, atol=1e-12)
    sp = tree_a.source_posterior(x, 0.1)
    mean = r @ tree_a.means64
    dm = tree_a.means64[None] - mean[:, None]
    cov = torch.einsum("nk,kab->nab", r, tree_a.covs64) + torch.einsum("nk,nka,nkb->nab", r, dm, dm)
    torch.testing.assert_close(sp.mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sp.cov, cov, rtol=1e-9, atol=1e-12)


# ---- sampling and normalisation ---------------------------------------------------------------------

def _check_moments(x, mean, cov, n_se=5.0):
    n = len(x)
    d = x - x.mean(0)
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert ((x.mean(0) - mean).abs() < n_se * se_mean).all(), (x.mean(0), mean)
    prod = d[:, :, None] * d[:, None, :]
    emp = prod.mean(0)
    se_cov = prod.std(0) / math.sqrt(n)
    assert ((emp - cov).abs() < n_se * se_cov).all(), (emp, cov)


@pytest.mark.parametrize("classes", ["A", "AB"])
def test_sample_moments(classes):
    g = tree(classes)
    mean, cov = g.moments()
    x, _ = g.sample(200_000, generator=torch.Generator().manual_seed(9), dtype=F64)
    _check_moments(x, mean, cov)
    # noisy samples: Cov + σ²I, scalar and per point
    x, _ = g.sample(200_000, sigma=0.3, generator=torch.Generator().manual_seed(10), dtype=F64)
    _check_moments(x, mean, cov + 0.09 * torch.eye(2, dtype=F64))
    sig = torch.rand(200_000, generator=torch.Generator().manual_seed(11), dtype=F64) * 0.5
    x, _ = g.sample(200_000, sigma=sig, generator=torch.Generator().manual_seed(12), dtype=F64)
    _check_moments(x, mean, cov + sig.square().mean() * torch.eye(2, dtype=F64))


@pytest.mark.parametrize("sigma", [0.0, 0.2])
def test_sample_is_exact_per_component(sigma):
    """Each sample comes with its component's Σ_k; whitened by (Σ_k + σ²I)^(−½) about m_k it is N(0, I)
    (1M draws: a 1% error in a variance is ~7 standard errors)."""
    w, m, c = _two_component()
    g = GaussianMixture(w, m, c)
    n = 1_000_000
    x, cov = g.sample(n, sigma=sigma, generator=torch.Generator().manual_seed(13), dtype=F64)
    first = torch.isclose(cov, torch.as_tensor(c[0])).all((1, 2))
    assert (first | torch.isclose(cov, torch.as_tensor(c[1])).all((1, 2))).all()
    p = first.double().mean().item()
    assert abs(p - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    for k, sel in ((0, first), (1, ~first)):
        chol = torch.linalg.cholesky(torch.as_tensor(c[k]) + sigma**2 * torch.eye(2, dtype=F64))
        z = torch.linalg.solve_triangular(chol, (x[sel] - torch.as_tensor(m[k])).T, upper=False).T
        _check_moments(z, torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    # sampling is reproducible with a seeded generator
    x2, _ = g.sample(n, sigma=sigma, generator=torch.Generator().manual_seed(13), dtype=F64)
    assert torch.equal(x, x2)


def _grid(lo, hi, n):
    t = torch.linspace(lo, hi, n, dtype=F64)
    X, Y = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([X.flatten(), Y.flatten()], 1), (t[1] - t[0]).item()


def test_tree_logp_integrates_to_one(tree_a):
    x, h = _grid(-2.5, 2.5, 800)
    total = tree_a.logp(x, 0.05).exp().sum().item() * h * h
    assert total == pytest.approx(1.0, abs=1e-3)


def test_eight_gaussians_integrates_to_one_and_moments():
    g = eight_gaussians()
    assert g.K == 8
    x, h = _grid(-3.5, 3.5, 600)
    for sigma in (0.0, 0.2):
        assert g.logp(x, sigma).exp().sum().item() * h * h == pytest.approx(1.0, abs=1e-3)
    mean, cov = g.moments()
    torch.testing.assert_close(mean, torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(cov, (2.0**2 / 2 + 0.1**2) * torch.eye(2, dtype=F64), rtol=1e-12, atol=1e-12)


# ---- classic toys ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", [two_moons, swiss_roll, Checkerboard().sample,
                                     lambda n, generator: eight_gaussians().sample(
                                         n, generator=generator)[0]],
                         ids=["moons", "swissroll", "checkerboard", "8gaussians"])
def test_classic_samplers(sampler):
    x = sampler(1000, generator=torch.Generator().manual_seed(14))
    assert x.shape == (1000, 2) and torch.isfinite(x).all()
    y = sampler(1000, generator=torch.Generator().manual_seed(14))
    assert torch.equal(x, y)


def test_checkerboard_density():
    cb = Checkerboard()
    x = cb.sample(20_000, generator=torch.Generator().manual_seed(15))
    lp = cb.logp(x)
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp, torch.full_like(lp, -math.log(8.0)))
    # each of the 8 dark unit squares holds 1/8 of the samples
    ij = torch.floor(x + 2).long()
    counts = torch.bincount(ij[:, 1] * 4 + ij[:, 0], minlength=16).double()
    dark = torch.tensor([(i % 4 - i // 4) % 2 == 0 for i in range(16)])
    assert (counts[~dark] == 0).all()
    se = math.sqrt(len(x) * (1 / 8) * (7 / 8))
    assert ((counts[dark] - len(x) / 8).abs() < 5 * se).all()
    # off the board and on light squares: −inf
    off = torch.tensor([[2.5, 0.0], [-3.0, -3.0], [0.0, 2.01], [-2.2, 1.0]])
    light = torch.tensor([[col - 1.5, row - 1.5] for row in range(4) for col in range(4) if (col - row) % 2])
    assert len(light) == 8
    assert torch.isneginf(cb.logp(off)).all() and torch.isneginf(cb.logp(light)).all()
    # the density integrates to 1 (midpoint grid never touching a cell edge)
    t = (torch.arange(500, dtype=F64) + 0.5) / 100 - 2.5
    X, Y = torch.meshgrid(t, t, indexing="ij")
    total = cb.logp(torch.stack([X.flatten(), Y.flatten()], 1)).exp().sum().item() * 0.01**2
    assert total == pytest.approx(1.0, abs=1e-9)


# ---- bad input ------------------------------------------------------------------------------------

def test_bad_input(tree_a):
    x = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        tree_a.logp(x, -0.1)
    with pytest.raises(ValueError, match="sigma must be finite"):
        tree_a.score(x, float("nan"))
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        tree_a.posterior(x, 0.0)
    with pytest.raises(ValueError, match="one value per point"):
        tree_a.logp(x, torch.full((5,), 0.1))
    with pytest.raises(ValueError, match="one value per point"):
        tree_a.logp(x, torch.full((4, 1), 0.1))
    for bad in (torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 4, 2)):
        with pytest.raises(ValueError, match="x must have shape"):
            tree_a.logp(bad, 0.1)
    with pytest.raises(ValueError, match="classes='C' is not allowed"):
        tree("C")
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        tree_a.sample(10, sigma=-1.0)
    with pytest.raises(ValueError, match="n=0"):
        tree_a.sample(0)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([1.0, -1.0], [[0, 0], [1, 1]], [np.eye(2), np.eye(2)])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([1.0, 1.0], [[0, 0], [1, 1]], [np.eye(2)])
    for f in (two_moons, swiss_roll, Checkerboard().sample):
        with pytest.raises(ValueError, match="n="):
            f(-3)
