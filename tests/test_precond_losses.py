"""EDM preconditioning, the confidence-aware losses and the scores, against analytic oracles.

THEORY §2 (T4–T6), §3 (T7–T12), §4 (T13–T15). Every expected value below comes from a formula
(the Gaussian density, a derivative, an optimum), never from a number copied from a run.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from gendiff.heads import f_target, log_q, nll_direct, nll_full, nll_stable, tril_factor
from gendiff.losses import LOSSES, ConfidenceNLL, EDMLoss, NoisyBatch, ScoreMatchingLoss, make_loss
from gendiff.precond import Denoiser, EDMPrecond, edm_scalings
from gendiff.scores import (
    PhiScoreDenoiser,
    denoiser_from_score,
    ode_derivative,
    phi_score,
    tweedie_score,
    with_score_mode,
)

SIGMA_D = 0.5
F64 = torch.float64
SIGMAS = torch.logspace(-4, 4, 17, dtype=F64)  # 1e-4 … 1e4, half a decade apart


# ---- tiny deterministic backbones ------------------------------------------------------------
# The Denoiser gives a backbone one c_noise per example, [N]; `_col` makes it broadcast over x.

def _col(c_noise, x_in):
    return c_noise.reshape(-1, *([1] * (x_in.ndim - 1)))


class DiagNet(nn.Module):
    """Elementwise, smooth, depends on both inputs; broadcasts over any σ shape. Returns (F, G)."""

    def forward(self, x_in, c_noise):
        c_noise = _col(c_noise, x_in)
        F = torch.sin(1.3 * x_in + 0.4) + 0.5 * c_noise
        G = 0.3 * torch.cos(x_in) - 0.2 * c_noise
        return F, torch.broadcast_to(G, F.shape)


class FOnly(nn.Module):
    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.shift = shift

    def forward(self, x_in, c_noise):
        return torch.tanh(x_in) + 0.1 * _col(c_noise, x_in) + self.shift


class FullNet(nn.Module):
    """Points [N, d]; G = [log-diagonal (d), strictly-lower entries (d(d−1)/2)]."""

    def __init__(self, d: int):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.W = torch.randn(d, d * (d + 1) // 2, generator=g, dtype=F64) * 0.4

    def forward(self, x_in, c_noise):
        c_noise = _col(c_noise, x_in)
        F = torch.sin(x_in) + 0.3 * c_noise
        c = torch.broadcast_to(c_noise, F.shape)[:, :1]               # one σ per example (T12)
        G = torch.tanh(x_in @ self.W.to(x_in.dtype)) - 0.1 * c
        return F, G


def random_batch(shape, sigma, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=dtype) * SIGMA_D
    eps = torch.randn(shape, generator=g, dtype=dtype)
    return x0, eps, x0 + torch.as_tensor(sigma, dtype=dtype) * eps


# ---- T4, T5, T6: scalings -----------------------------------------------------------------------

def test_scalings_identities_T4_T5():
    s = SIGMAS
    sc = edm_scalings(s, SIGMA_D)
    d2 = SIGMA_D**2
    torch.testing.assert_close(sc.c_skip, d2 / (s**2 + d2), rtol=1e-14, atol=0)
    torch.testing.assert_close(sc.c_out, s * SIGMA_D / torch.sqrt(s**2 + d2), rtol=1e-14, atol=0)
    torch.testing.assert_close(sc.c_in, 1 / torch.sqrt(s**2 + d2), rtol=1e-14, atol=0)
    torch.testing.assert_close(sc.c_noise, s.log() / 4, rtol=1e-14, atol=0)
    # T5: c_var² = σ² + c_out²;  k = c_out²/c_var² = σ_d²/(σ² + 2σ_d²)
    torch.testing.assert_close(sc.c_var**2, s**2 + sc.c_out**2, rtol=1e-13, atol=0)
    torch.testing.assert_close(sc.k, sc.c_out**2 / sc.c_var**2, rtol=1e-13, atol=0)
    torch.testing.assert_close(sc.k, d2 / (s**2 + 2 * d2), rtol=1e-13, atol=0)


def test_f_target_has_unit_variance_and_matches_T6():
    """With Var[x0] = σ_d², F* = (x0 − c_skip·x̃)/c_out has unit variance for every σ: this is
    what pins c_skip = σ_d²/(σ²+σ_d²) (seed 000's σ_d/(σ²+σ_d²) fails it)."""
    s = SIGMAS
    sc = edm_scalings(s, SIGMA_D)
    var_f = ((1 - sc.c_skip) ** 2 * SIGMA_D**2 + sc.c_skip**2 * s**2) / sc.c_out**2
    torch.testing.assert_close(var_f, torch.ones_like(s), rtol=1e-12, atol=0)
    typo_c_skip = SIGMA_D / (s**2 + SIGMA_D**2)
    var_typo = ((1 - typo_c_skip) ** 2 * SIGMA_D**2 + typo_c_skip**2 * s**2) / sc.c_out**2
    assert not torch.allclose(var_typo, torch.ones_like(s))

    # T6's closed form of F* and μ − x0 = c_out·(F − F*)
    sig = s.view(-1, 1)
    x0, eps, xn = random_batch((len(s), 3), sig)
    sc = edm_scalings(sig, SIGMA_D)
    F_star = f_target(x0, xn, sc)
    closed = (sig * x0 - SIGMA_D**2 * eps) / (SIGMA_D * torch.sqrt(sig**2 + SIGMA_D**2))
    torch.testing.assert_close(F_star, closed, rtol=1e-9, atol=1e-12)
    F = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    mu = sc.c_skip * xn + sc.c_out * F
    torch.testing.assert_close(mu - x0, sc.c_out * (F - F_star), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("kind", ["scalar", "float", "per-example", "per-example-col", "per-element"])
def test_denoiser_sigma_broadcasting(kind):
    """σ scalar, [N] (reshaped to [N, 1, 1, 1]) or per element: scalings broadcast and μ is shaped like x."""
    N, shape = 4, (4, 3, 2, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    per_ex = torch.tensor([0.1, 0.5, 2.0, 7.0], dtype=F64)
    sigma = {
        "scalar": torch.tensor(0.7, dtype=F64),
        "float": 0.7,
        "per-example": per_ex,
        "per-example-col": per_ex.view(N, 1, 1, 1),
        "per-element": torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.05,
    }[kind]
    den = Denoiser(DiagNet(), SIGMA_D, head="diag")
    p = den.predict(x, sigma)
    assert p.mu.shape == x.shape and p.sigma_phi.shape == x.shape
    s_full = torch.broadcast_to(
        per_ex.view(N, 1, 1, 1) if kind.startswith("per-example") else torch.as_tensor(sigma, dtype=F64),
        shape)
    ref = edm_scalings(s_full, SIGMA_D)
    for name in ref._fields:
        torch.testing.assert_close(torch.broadcast_to(getattr(p.scalings, name), shape), getattr(ref, name),
                                   rtol=1e-14, atol=0)
    if kind == "per-example":
        assert p.scalings.c_out.shape == (N, 1, 1, 1)
    # μ = c_skip·x̃ + c_out·F, F = net(c_in·x̃, c_noise): c_noise one per example, [N] (the per-example
    # σ, or the root mean square of a per-element σ)
    s_ex = s_full.flatten(1).square().mean(1).sqrt()
    F, G = DiagNet()(ref.c_in * x, s_ex.log() / 4)
    torch.testing.assert_close(p.mu, ref.c_skip * x + ref.c_out * F, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(p.sigma_phi, ref.c_var * torch.exp(G / 2), rtol=1e-13, atol=0)


# ---- T7 ⇔ T9 ⇔ T10 ---------------------------------------------------------------------------------

def test_T7_equals_T9_over_eight_decades():
    sig = SIGMAS.view(-1, 1)
    x0, _eps, xn = random_batch((len(SIGMAS), 64), sig, seed=1)
    g = torch.Generator().manual_seed(2)
    F = torch.randn(x0.shape, generator=g, dtype=F64) * 1.5
    G = torch.randn(x0.shape, generator=g, dtype=F64) * 2.0
    sc = edm_scalings(sig, SIGMA_D)
    mu = sc.c_skip * xn + sc.c_out * F                           # T6
    sigma_phi = sc.c_var * torch.exp(G / 2)
    direct = nll_direct(mu, sigma_phi, x0, sig)
    stable = nll_stable(F, G, f_target(x0, xn, sc), sc)
    assert torch.isfinite(direct).all() and torch.isfinite(stable).all()
    rel = ((direct - stable).abs() / direct.abs().clamp_min(1.0)).max().item()
    assert rel < 1e-9, rel


@pytest.mark.parametrize("sigma", [1e-6, 1e6])
def test_T9_finite_in_float32_at_extreme_sigma(sigma):
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(16, 2, generator=g) * SIGMA_D
    xn = x0 + sigma * torch.randn(16, 2, generator=g)
    F = torch.randn(16, 2, generator=g).requires_grad_()
    G = torch.randn(16, 2, generator=g).requires_grad_()
    sc = edm_scalings(torch.tensor(sigma, dtype=torch.float32), SIGMA_D)
    loss = nll_stable(F, G, f_target(x0, xn, sc), sc)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    gF, gG = torch.autograd.grad(loss.sum(), (F, G))
    assert torch.isfinite(gF).all() and torch.isfinite(gG).all()
    # and accurate: the float64 T7 oracle on the same inputs
    sc64 = edm_scalings(torch.tensor(sigma, dtype=F64), SIGMA_D)
    F_star64 = f_target(x0.double(), xn.double(), sc64)
    mu = sc64.c_skip * xn.double() + sc64.c_out * F.detach().double()
    ref = nll_direct(mu, sc64.c_var * torch.exp(G.detach().double() / 2), x0.double(),
                     sc64.c_var.new_tensor(sigma))
    torch.testing.assert_close(loss.detach().double(), ref, rtol=1e-4, atol=1e-4)
    # closed-form gradients of T9: ∂L/∂F = e^(−G)·k·(F − F*), ∂L/∂G = ½[1 − e^(−G)(1 + k((F − F*)² − 1))]
    e = F.detach().double() - F_star64
    Gd = G.detach().double()
    torch.testing.assert_close(gF.double(), torch.exp(-Gd) * sc64.k * e, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(gG.double(), 0.5 * (1 - torch.exp(-Gd) * (1 + sc64.k * (e**2 - 1))),
                               rtol=2e-3, atol=1e-5)


def test_log_q_is_the_gaussian_log_density_T10():
    shape = (8, 5)
    sigma = torch.rand(shape, generator=torch.Generator().manual_seed(5), dtype=F64) * 3 + 0.01
    _x0, _, xn = random_batch(shape, sigma, seed=6)
    g = torch.Generator().manual_seed(7)
    F, G = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    x = torch.randn(shape, generator=g, dtype=F64)
    sc = edm_scalings(sigma, SIGMA_D)
    mu = sc.c_skip * xn + sc.c_out * F
    ref = torch.distributions.Normal(mu, sc.c_var * torch.exp(G / 2)).log_prob(x)
    torch.testing.assert_close(log_q(x, F, G, xn, sc), ref, rtol=1e-12, atol=1e-12)
    ref0 = torch.distributions.Normal(mu, sc.c_var).log_prob(x)      # G = None: σ_φ = c_var
    torch.testing.assert_close(log_q(x, F, None, xn, sc), ref0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma,err", [(0.01, 0.3), (0.5, -1.2), (20.0, 0.0), (3.0, 40.0)])
def test_T7_optimum_is_T8(sigma, err):
    """argmin over σ_φ of T7 is σ_φ² = σ² + (μ − x0)², with zero gradient and positive curvature there;
    and ∂L/∂μ = (μ − x0)/σ_φ²."""
    x0 = torch.tensor(0.37, dtype=F64)
    mu0 = x0 + err
    s = torch.tensor(sigma, dtype=F64)
    opt_var = sigma**2 + err**2

    def L_of_logvar(v):
        return nll_direct(mu0, torch.exp(torch.as_tensor(v, dtype=F64) / 2), x0, s).item()

    res = minimize_scalar(L_of_logvar, bracket=(math.log(opt_var) - 3, math.log(opt_var) + 3),
                          options={"xtol": 1e-12})
    assert res.x == pytest.approx(math.log(opt_var), abs=1e-5)

    sp = torch.tensor(math.sqrt(opt_var), dtype=F64, requires_grad=True)
    mu = mu0.clone().requires_grad_()
    L = nll_direct(mu, sp, x0, s)
    g_sp, g_mu = torch.autograd.grad(L, (sp, mu), create_graph=True)
    assert abs(g_sp.item()) < 1e-12 * max(1.0, 1 / sp.item())
    (h,) = torch.autograd.grad(g_sp, sp)
    assert h.item() > 0
    assert h.item() == pytest.approx(2 / opt_var, rel=1e-10)   # ∂²L/∂σ_φ² at the optimum = 2/σ_φ²
    assert g_mu.item() == pytest.approx(err / opt_var, rel=1e-12, abs=1e-15)


# ---- T11: G ≡ 0 is EDM ---------------------------------------------------------------------------

def test_T11_zero_G_is_k_weighted_mse():
    sig = SIGMAS.view(-1, 1)
    x0, _, xn = random_batch((len(SIGMAS), 6), sig, seed=8)
    sc = edm_scalings(sig, SIGMA_D)
    F_star = f_target(x0, xn, sc)
    g = torch.Generator().manual_seed(9)
    F1, F2 = torch.randn(x0.shape, generator=g, dtype=F64), torch.randn(x0.shape, generator=g, dtype=F64)
    diff = nll_stable(F1, None, F_star, sc) - nll_stable(F2, None, F_star, sc)
    expected = sc.k / 2 * ((F1 - F_star) ** 2 - (F2 - F_star) ** 2)
    torch.testing.assert_close(diff, expected, rtol=1e-9, atol=1e-12)
    # and explicitly: the constant is ½[(1 − k) + log 2πc_var²], independent of F
    const = 0.5 * ((1 - sc.k) + math.log(2 * math.pi) + torch.log(sc.c_var**2))
    torch.testing.assert_close(nll_stable(F1, None, F_star, sc), sc.k / 2 * (F1 - F_star) ** 2 + const,
                               rtol=1e-12, atol=1e-12)
    # G = None and G = 0 are the same thing
    torch.testing.assert_close(nll_stable(F1, torch.zeros_like(F1), F_star, sc),
                               nll_stable(F1, None, F_star, sc))


def test_confidence_nll_without_head_is_edm_loss():
    """ConfidenceNLL on head='none' = ½k·‖F − F*‖² + const (T11); a backbone returning G to a head-less
    denoiser is an error, not silently dropped; EDMLoss = ½λ‖D − x0‖² with λ = 1/c_out², = ½‖F − F*‖²."""
    N, d = 6, 3
    sigma = torch.tensor([0.002, 0.05, 0.3, 1.0, 4.0, 80.0], dtype=F64)
    x0, _, xn = random_batch((N, d), sigma.view(-1, 1), seed=10)
    batch = NoisyBatch(x0=x0, x_noisy=xn, sigma=sigma)
    d1, d2 = Denoiser(FOnly(0.0), SIGMA_D, head="none"), Denoiser(FOnly(0.7), SIGMA_D, head="none")
    sc = edm_scalings(sigma.view(-1, 1), SIGMA_D)
    F_star = f_target(x0, xn, sc)
    F1, F2 = d1.predict(xn, sigma).F, d2.predict(xn, sigma).F
    l1, l2 = ConfidenceNLL()(d1, batch), ConfidenceNLL()(d2, batch)
    assert l1.shape == (N,)
    torch.testing.assert_close(l1 - l2, (sc.k / 2 * ((F1 - F_star) ** 2 - (F2 - F_star) ** 2)).sum(1),
                               rtol=1e-9, atol=1e-12)
    const = (0.5 * ((1 - sc.k) + math.log(2 * math.pi) + torch.log(sc.c_var**2))).expand(N, d).sum(1)
    torch.testing.assert_close(l1, (sc.k / 2 * (F1 - F_star) ** 2).sum(1) + const, rtol=1e-12, atol=1e-12)

    # a backbone that also returns G to a head-less denoiser: a clear error
    with pytest.raises(ValueError, match="head='none' takes no G"):
        Denoiser(DiagNet(), SIGMA_D, head="none").predict(xn, sigma)

    edm = EDMLoss()(d1, batch)
    torch.testing.assert_close(edm, 0.5 * ((F1 - F_star) ** 2).sum(1), rtol=1e-9, atol=1e-12)
    mu = d1(xn, sigma)
    torch.testing.assert_close(edm, 0.5 * ((mu - x0) ** 2 / sc.c_out**2).sum(1), rtol=1e-12, atol=0)
    # ConfidenceNLL − const = k · EDM loss: the same optimum per σ, weighted k(σ) across σ (T11)
    torch.testing.assert_close(l1 - const, sc.k[:, 0] * edm, rtol=1e-9, atol=1e-12)


# ---- T12: full covariance ------------------------------------------------------------------------

def _random_G(N, d, seed, scale=0.6):
    return torch.randn(N, d * (d + 1) // 2, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _random_spd(N, d, seed):
    A = torch.randn(N, d, d, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.3
    return A @ A.transpose(1, 2) + 0.05 * torch.eye(d, dtype=F64)


def test_tril_factor_layout():
    G = torch.tensor([[0.4, -1.0, 2.0, 0.3, -0.5, 0.7]], dtype=F64)
    S = tril_factor(G, 3)[0]
    expected = torch.tensor([[math.exp(-0.2), 0, 0],
                             [0.3, math.exp(0.5), 0],
                             [-0.5, 0.7, math.exp(-1.0)]], dtype=F64)
    torch.testing.assert_close(S, expected)
    torch.testing.assert_close(tril_factor(torch.zeros(2, 3, dtype=F64), 2),
                               torch.eye(2, dtype=F64).expand(2, 2, 2))


@pytest.mark.parametrize("sigma_kind", ["scalar", "per-example"])
def test_nll_full_with_diagonal_factor_is_T9_summed(sigma_kind):
    N, d = 32, 2
    sigma = (torch.tensor(0.3, dtype=F64) if sigma_kind == "scalar"
             else torch.logspace(-3, 3, N, dtype=F64).view(N, 1))
    x0, _, xn = random_batch((N, d), sigma, seed=11)
    sc = edm_scalings(sigma, SIGMA_D)
    F_star = f_target(x0, xn, sc)
    g = torch.Generator().manual_seed(12)
    F = torch.randn(N, d, generator=g, dtype=F64)
    Gd = torch.randn(N, d, generator=g, dtype=F64)
    G = torch.cat([Gd, torch.zeros(N, 1, dtype=F64)], 1)          # [g1, g2, 0]: S diagonal
    torch.testing.assert_close(nll_full(F, G, F_star, sc), nll_stable(F, Gd, F_star, sc).sum(1),
                               rtol=1e-12, atol=1e-12)


def _direct_full_two_L(F, G, F_star, sc, source_cov, sigma):
    """2L = −log det Σ_φ⁻¹ + tr(Σ_φ⁻¹(σ²I + Σ_src)) + (μ−x0)ᵀΣ_φ⁻¹(μ−x0) + d log 2π, the Gaussian
    expectation."""
    N, d = F.shape
    S = tril_factor(G, d)
    c_var = torch.broadcast_to(sc.c_var, (N, d))[:, :1, None]
    c_out = torch.broadcast_to(sc.c_out, (N, d))[:, :1]
    P = S @ S.transpose(1, 2) / c_var**2
    s2 = torch.broadcast_to(torch.as_tensor(sigma, dtype=F64), (N, d))[:, :1, None] ** 2
    noise = s2 * torch.eye(d, dtype=F64) + (0 if source_cov is None else source_cov)
    e = c_out * (F - F_star)
    return (-torch.logdet(P) + torch.einsum("nij,nji->n", P, noise) + torch.einsum("ni,nij,nj->n", e, P, e)
            + d * math.log(2 * math.pi))


@pytest.mark.parametrize("d", [2, 3])
def test_nll_full_equals_direct_gaussian_expectation(d):
    N = 24
    sigma = torch.logspace(-2, 1.5, N, dtype=F64).view(N, 1)
    x0, _, xn = random_batch((N, d), sigma, seed=13)
    sc = edm_scalings(sigma, SIGMA_D)
    F_star = f_target(x0, xn, sc)
    F = torch.randn(N, d, generator=torch.Generator().manual_seed(14), dtype=F64)
    G = _random_G(N, d, 15)
    src = _random_spd(N, d, 16)
    for cov in (None, src):
        torch.testing.assert_close(2 * nll_full(F, G, F_star, sc, cov),
                                   _direct_full_two_L(F, G, F_star, sc, cov, sigma), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [2, 3])
def test_nll_full_optimum(d):
    """Σ_φ* = σ²I + Σ_src + (μ−x0)(μ−x0)ᵀ: parametrise S = c_var·chol(Σ_φ*⁻¹) through G; the gradient wrt G
    vanishes, the Hessian is positive definite, and 2L* = log det(2πΣ_φ*) + d."""
    N = 5
    sigma = torch.tensor([0.01, 0.1, 0.5, 2.0, 10.0], dtype=F64).view(N, 1)
    x0, _, xn = random_batch((N, d), sigma, seed=17)
    sc = edm_scalings(sigma, SIGMA_D)
    F_star = f_target(x0, xn, sc)
    F = F_star + torch.randn(N, d, generator=torch.Generator().manual_seed(18), dtype=F64)
    src = _random_spd(N, d, 19)
    e = sc.c_out * (F - F_star)
    cov_opt = sigma[:, :, None] ** 2 * torch.eye(d, dtype=F64) + src + e[:, :, None] * e[:, None, :]
    S = sc.c_var[:, :, None] * torch.linalg.cholesky(torch.linalg.inv(cov_opt))
    rows, cols = torch.tril_indices(d, d, offset=-1)
    G_opt = torch.cat([-2 * torch.log(torch.diagonal(S, dim1=1, dim2=2)), S[:, rows, cols]], 1)
    torch.testing.assert_close(tril_factor(G_opt, d), S)

    G = G_opt.clone().requires_grad_()
    L = nll_full(F, G, F_star, sc, src)
    (grad,) = torch.autograd.grad(L.sum(), G)
    assert grad.abs().max().item() < 1e-9
    torch.testing.assert_close(2 * L.detach(), torch.logdet(2 * math.pi * cov_opt) + d,
                               rtol=1e-11, atol=1e-11)
    for n in range(N):
        H = torch.autograd.functional.hessian(lambda g: nll_full(F[n:n + 1], g[None], F_star[n:n + 1],
                                                                 edm_scalings(sigma[n:n + 1], SIGMA_D),
                                                                 src[n:n + 1]).sum(), G_opt[n])
        assert torch.linalg.eigvalsh(H).min().item() > 0


def test_full_covariance_nll_callable_and_sigma_forms():
    N, d = 6, 2
    x0, _, xn = random_batch((N, d), 0.4, seed=20)
    den = Denoiser(FullNet(d), SIGMA_D, head="full")
    src = _random_spd(N, d, 21)
    ref = None
    for sigma in (0.4, torch.tensor(0.4, dtype=F64), torch.full((N,), 0.4, dtype=F64),
                  torch.full((N, 1), 0.4, dtype=F64), torch.full((N, d), 0.4, dtype=F64)):
        out = ConfidenceNLL()(den, NoisyBatch(x0=x0, x_noisy=xn, sigma=sigma, source_cov=src))
        assert out.shape == (N,)
        if ref is None:
            p = den.predict(xn, 0.4)
            ref = nll_full(p.F, p.G, f_target(x0, xn, p.scalings), p.scalings, src)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # Different σ per example: equals row-by-row evaluation
    sig = torch.tensor([0.01, 0.1, 0.3, 1.0, 3.0, 30.0], dtype=F64)
    out = ConfidenceNLL()(den, NoisyBatch(x0=x0, x_noisy=xn, sigma=sig, source_cov=src))
    rows = torch.cat([ConfidenceNLL()(den, NoisyBatch(x0=x0[i:i + 1], x_noisy=xn[i:i + 1],
                                                      sigma=sig[i].item(), source_cov=src[i:i + 1]))
                      for i in range(N)])
    torch.testing.assert_close(out, rows, rtol=1e-12, atol=1e-12)


def test_nll_full_rejects_anisotropic_sigma():
    """T12 assumes noise σ²I per example: a per-element σ that differs within an example must not be
    silently reduced to its first element."""
    N, d = 4, 2
    sigma = torch.tensor([[0.1, 0.2]], dtype=F64).expand(N, d)
    x0, _, xn = random_batch((N, d), sigma, seed=22)
    den = Denoiser(FullNet(d), SIGMA_D, head="full")
    with pytest.raises(ValueError, match="one σ per example"):
        ConfidenceNLL()(den, NoisyBatch(x0=x0, x_noisy=xn, sigma=sigma))


# ---- per-element σ (T3) -------------------------------------------------------------------------

@pytest.mark.parametrize("loss", [ConfidenceNLL(), EDMLoss(), ScoreMatchingLoss()],
                         ids=lambda l: type(l).__name__)
def test_loss_sigma_forms_agree(loss):
    N, shape = 5, (5, 2, 3)
    score = torch.randn(shape, generator=torch.Generator().manual_seed(23), dtype=F64)

    def run(x0, xn, sigma):
        return loss(Denoiser(DiagNet(), SIGMA_D, head="diag"),
                    NoisyBatch(x0=x0, x_noisy=xn, sigma=sigma, score=score))

    # equal σ everywhere: scalar, [N], [N, 1, 1], shaped like x
    x0, _, xn = random_batch(shape, 0.6, seed=24)
    forms = [0.6, torch.tensor(0.6, dtype=F64), torch.full((N,), 0.6, dtype=F64),
             torch.full((N, 1, 1), 0.6, dtype=F64), torch.full(shape, 0.6, dtype=F64)]
    outs = [run(x0, xn, s) for s in forms]
    for o in outs[1:]:
        assert o.shape == (N,)
        torch.testing.assert_close(o, outs[0], rtol=1e-13, atol=1e-13)
    # different σ per example: [N] = [N, 1, 1] = expanded to x's shape
    sig = torch.tensor([0.01, 0.2, 1.0, 5.0, 50.0], dtype=F64)
    x0, _, xn = random_batch(shape, sig.view(N, 1, 1), seed=25)
    a, b, c = (run(x0, xn, s) for s in (sig, sig.view(N, 1, 1), sig.view(N, 1, 1).expand(shape).clone()))
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-13)


def test_confidence_nll_per_element_sigma_is_T7_per_element():
    """A σ that varies within each example (T3): ConfidenceNLL = Σ over elements of T7 with that element's
    σ."""
    shape = (4, 3, 5)
    sigma = torch.logspace(-3, 2, 60, dtype=F64).view(shape)
    x0, _, xn = random_batch(shape, sigma, seed=26)
    den = Denoiser(DiagNet(), SIGMA_D, head="diag")
    p = den.predict(xn, sigma)
    ref = nll_direct(p.mu, p.sigma_phi, x0, sigma).flatten(1).sum(1)
    got = ConfidenceNLL()(den, NoisyBatch(x0=x0, x_noisy=xn, sigma=sigma))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


# ---- Prediction and scores (T13–T15) ------------------------------------------------------------------

def test_prediction_precision_and_covariance_are_inverses():
    N, d = 7, 3
    x = torch.randn(N, d, generator=torch.Generator().manual_seed(27), dtype=F64)
    sigma = torch.logspace(-2, 1, N, dtype=F64)
    eye = torch.eye(d, dtype=F64).expand(N, d, d)
    for head, net in (("full", FullNet(d)), ("diag", DiagNet()), ("none", FOnly())):
        p = Denoiser(net, SIGMA_D, head=head).predict(x, sigma)
        P, C = p.precision(), p.covariance()
        torch.testing.assert_close(P @ C, eye, rtol=0, atol=1e-10)
        torch.testing.assert_close(C, C.transpose(1, 2), rtol=0, atol=1e-12)
        assert torch.linalg.eigvalsh(C).min() > 0
        if head != "full":
            torch.testing.assert_close(C, torch.diag_embed(p.sigma_phi**2), rtol=1e-12, atol=0)
    p = Denoiser(FOnly(), SIGMA_D, head="none").predict(x, sigma)
    torch.testing.assert_close(p.sigma_phi, p.scalings.c_var.expand(N, d))        # no head: σ_φ = c_var
    pf = Denoiser(FullNet(d), SIGMA_D, head="full").predict(x, sigma)
    S = tril_factor(pf.G, d)                                                       # Σ_φ⁻¹ = SSᵀ/c_var² (T12)
    torch.testing.assert_close(pf.precision(), S @ S.transpose(1, 2) / pf.scalings.c_var[:, :, None] ** 2)
    # a full head's per-element variance is the marginal: the diagonal of Σ_φ
    torch.testing.assert_close(pf.variance(), torch.diagonal(pf.covariance(), dim1=-2, dim2=-1))


def test_scores_T13_T14_T15():
    N, d = 6, 2
    x = torch.randn(N, d, generator=torch.Generator().manual_seed(28), dtype=F64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 3.0, 20.0], dtype=F64)
    s_col = sigma.view(N, 1)
    den = Denoiser(DiagNet(), SIGMA_D, head="diag")
    p = den.predict(x, sigma)
    torch.testing.assert_close(tweedie_score(p.mu, x, sigma), (p.mu - x) / s_col**2, rtol=1e-14, atol=0)
    torch.testing.assert_close(phi_score(p), (p.mu - x) / p.sigma_phi**2, rtol=1e-14, atol=0)
    torch.testing.assert_close(ode_derivative(x, p.mu, sigma), (x - p.mu) / s_col, rtol=1e-14, atol=0)
    # the ODE derivative is −σ·score (T13 into T15)
    torch.testing.assert_close(ode_derivative(x, p.mu, sigma), -s_col * tweedie_score(p.mu, x, sigma))
    torch.testing.assert_close(denoiser_from_score(tweedie_score(p.mu, x, sigma), x, sigma), p.mu)
    # PhiScoreDenoiser returns x + σ²·s_φ
    torch.testing.assert_close(PhiScoreDenoiser(den)(x, sigma), x + s_col**2 * phi_score(p),
                               rtol=1e-14, atol=1e-14)
    # full head: s_φ = Σ_φ⁻¹(μ − x) = solve(Σ_φ, μ − x)
    pf = Denoiser(FullNet(d), SIGMA_D, head="full").predict(x, sigma)
    torch.testing.assert_close(phi_score(pf), torch.linalg.solve(pf.covariance(), pf.mu - x),
                               rtol=1e-10, atol=1e-10)
    assert with_score_mode(den, "tweedie") is den
    assert isinstance(with_score_mode(den, "phi"), PhiScoreDenoiser)


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma,match", [
    (0.0, "finite and > 0"),
    (-1.0, "finite and > 0"),
    (float("nan"), "finite and > 0"),
    (float("inf"), "finite and > 0"),
    (torch.tensor([0.1, 0.2, 0.0, 0.3, 0.4]), "finite and > 0"),
    (torch.tensor([0.1, 0.2, 0.3]), "one value per example"),
    (torch.ones(5, 3), "does not broadcast"),
])
def test_bad_sigma(sigma, match):
    x = torch.randn(5, 2)
    den = Denoiser(DiagNet(), SIGMA_D, head="diag")
    with pytest.raises(ValueError, match=match):
        den(x, sigma)
    with pytest.raises(ValueError, match=match):
        tweedie_score(x, x, sigma)


def test_bad_configuration():
    with pytest.raises(ValueError, match="head='bogus' is not allowed"):
        Denoiser(DiagNet(), head="bogus")
    with pytest.raises(ValueError, match="sigma_data"):
        Denoiser(DiagNet(), 0.0)
    with pytest.raises(ValueError, match="returning \\(F, G\\)"):
        Denoiser(FOnly(), head="diag")(torch.randn(3, 2), 0.5)
    with pytest.raises(ValueError, match="expected x's"):
        Denoiser(lambda x, c: x[:, :1], head="none")(torch.randn(3, 2), 0.5)
    with pytest.raises(ValueError, match="d\\(d\\+1\\)/2 = 3"):
        tril_factor(torch.zeros(4, 2), 2)
    x = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="batch.score"):
        ScoreMatchingLoss()(Denoiser(DiagNet()), NoisyBatch(x0=x, x_noisy=x, sigma=0.5))
    with pytest.raises(ValueError, match="score_mode='bogus'"):
        with_score_mode(Denoiser(FOnly()), "bogus")


# ---- property-based: T7 ≡ T9 for any σ, σ_d and outputs ------------------------------------------

from hypothesis import given, settings
from hypothesis import strategies as st

_f = st.floats(-5, 5, allow_nan=False)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(log_sigma=st.floats(-4 * 2.302585, 4 * 2.302585), sigma_data=st.floats(0.1, 2.0),
       x0=_f, eps=_f, F=_f, G=st.floats(-8, 8))
def test_T9_is_T7_for_any_inputs(log_sigma, sigma_data, x0, eps, F, G):
    t = lambda v: torch.tensor(v, dtype=F64)
    sigma = t(log_sigma).exp()
    sc = edm_scalings(sigma, sigma_data)
    assert torch.isclose(sc.c_var.square(), sigma.square() + sc.c_out.square(), rtol=1e-12)   # T5
    xn = t(x0) + sigma * t(eps)
    mu, sigma_phi = sc.c_skip * xn + sc.c_out * t(F), sc.c_var * torch.exp(t(G) / 2)          # T6
    direct = nll_direct(mu, sigma_phi, t(x0), sigma)                                          # T7
    stable = nll_stable(t(F), t(G), f_target(t(x0), xn, sc), sc)                              # T9
    assert abs(float(direct - stable)) <= 1e-9 * max(1.0, abs(float(direct)))


def test_diag_precision_and_covariance_with_per_element_sigma():
    """T3: σ per element; the diagonal head's Σ_φ is diag(σ_φ²) element by element."""
    class Net(torch.nn.Module):
        def forward(self, x, c_noise):
            return x * 0.3, x * 0.1 - 0.2
    D = Denoiser(Net(), SIGMA_D, "diag")
    x = torch.randn(4, 2, dtype=F64)
    sigma = torch.tensor([0.1, 2.0], dtype=F64).expand(4, 2)
    p = D.predict(x, sigma)
    torch.testing.assert_close(torch.diagonal(p.covariance(), dim1=-2, dim2=-1), p.sigma_phi.square())
    torch.testing.assert_close(torch.diagonal(p.precision(), dim1=-2, dim2=-1),
                               p.sigma_phi.square().reciprocal())


def test_head_output_shapes_are_checked():
    class Net(torch.nn.Module):
        def __init__(self, g):
            super().__init__()
            self.g = g

        def forward(self, x, c_noise):
            return x * 0, torch.zeros(x.shape[0], self.g, dtype=x.dtype)
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="head='diag'.*G has shape"):
        Denoiser(Net(3), SIGMA_D, "diag")(x, 0.5)
    with pytest.raises(ValueError, match="head='full'.*G has shape"):
        Denoiser(Net(2), SIGMA_D, "full")(x, 0.5)
    with pytest.raises(ValueError, match="head='none' takes no G"):
        Denoiser(Net(3), SIGMA_D, "none")(x, 0.5)


# ---- the registry harness: every entry of losses.LOSSES meets an analytic oracle --------------------------
# Data x0 ~ N(0, σ_d²I): the exact posterior mean is D* = σ_d²/(σ² + σ_d²)·x̃ = c_skip·x̃ (T4), i.e. F ≡ 0
# under EDM's preconditioning, with E[(D* − x0)² | x̃] = σ²σ_d²/(σ² + σ_d²) = c_out². The backbone F ≡ δ gives
# μ = D* + c_out·δ, so each loss's expectation over (x0, ε) is a closed form in (σ, δ), per example
# (d elements).

class ConstNet(nn.Module):
    def __init__(self, delta: float):
        super().__init__()
        self.delta = delta

    def forward(self, x_in, c_noise):
        return torch.full_like(x_in, self.delta)


def _edm(sigma):
    s2, d2 = sigma**2, SIGMA_D**2
    c_out2 = s2 * d2 / (s2 + d2)
    return c_out2, s2 + c_out2                         # c_out², c_var² (T4, T5)


LOSS_ORACLES = {  # losses.LOSSES name -> E[loss per example](σ, δ, d)
    # T7 with σ_φ = c_var (no head): ½[log 2πc_var² + (σ² + c_out²(1 + δ²))/c_var²] per element
    "nll": lambda s, dl, d: 0.5 * d * (math.log(2 * math.pi * _edm(s)[1]) + (s**2 + _edm(s)[0] * (1 + dl**2))
                                       / _edm(s)[1]),
    # without a source std in the batch it is "nll"; with one, tests/test_latent.py (T36 (c) against T7, T12)
    "nll-source-trace": lambda s, dl, d: LOSS_ORACLES["nll"](s, dl, d),
    "edm": lambda s, dl, d: 0.5 * d * (1 + dl**2),     # EDM: ½‖D − x0‖²/c_out²
    "score-matching": lambda s, dl, d: d * _edm(s)[0] * dl**2 / s**2,   # ‖D − D*‖²/σ² (exact, per example)
    "simple-x0": lambda s, dl, d: d * _edm(s)[0] * (1 + dl**2),        # ‖μ − x0‖² = ‖D* − x0 + c_out·δ‖²
    "simple-eps": lambda s, dl, d: d * _edm(s)[0] * (1 + dl**2) / s**2,   # ‖ε̂ − ε‖² = ‖μ − x0‖²/σ² (T2)
    # IDDPM's hybrid loss needs a DDPM and 8-bit data: its oracles are T24's closed-form posteriors and the
    # unbiasedness against likelihood.ddpm_vlb, in tests/test_data_training.py (test_hybrid_*)
    "hybrid": "tests/test_data_training.py::test_hybrid_vlb_term_per_step_against_t24_posteriors",
    # trains T37's excess head only (refuses a headless denoiser): its oracles are the Gaussian prior's
    # optimum (T8) and T7 + the readout NLL term by term, in tests/test_posterior_nll.py
    "nll-posterior": "tests/test_posterior_nll.py::test_optimum_is_T8s_on_a_gaussian_prior",
    # T37's excess head only, too: value = T7, F's gradient = T37's, G's = T9's at the same σ_φ, T8's optimum,
    # in tests/test_log_grad_nll.py
    "nll-log-grad": "tests/test_log_grad_nll.py::test_optimum_is_T8s_on_a_gaussian_prior",
}


def test_every_loss_has_an_oracle():
    """A new entry of LOSSES must bring its oracle (diffusers' SchedulerCommonTest, with analytic references).
    Breakage tried: EDMLoss weighted 1/c_out instead of 1/c_out²: test_loss_meets_its_oracle[edm] failed."""
    assert set(LOSS_ORACLES) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_meets_its_oracle(name):
    """The batch mean of each registered loss at the optimum (δ = 0) and off it (δ = 0.7) equals its
    closed-form expectation within 5 standard errors, at σ from 0.05 to 5."""
    n, d = 40000, 4
    for sigma in (0.05, 0.5, 5.0):
        x0, _, x_noisy = random_batch((n, d), sigma, seed=3)
        s = torch.full((n,), sigma, dtype=F64)
        # exact score of N(0, (σ_d² + σ²)I)
        batch = NoisyBatch(x0, x_noisy, s, score=-x_noisy / (SIGMA_D**2 + sigma**2))
        if isinstance(LOSS_ORACLES[name], str):
            pytest.skip(f"{name}: its analytic oracle is {LOSS_ORACLES[name]}")
        for delta in (0.0, 0.7):
            loss = make_loss(name)(Denoiser(ConstNet(delta), EDMPrecond(SIGMA_D)), batch)
            assert loss.shape == (n,)
            want = LOSS_ORACLES[name](sigma, delta, d)
            assert (abs(float(loss.mean()) - want)
                    < 5 * float(loss.std()) / math.sqrt(n) + 1e-9 * (1 + abs(want))), \
                (sigma, delta, float(loss.mean()), want)
