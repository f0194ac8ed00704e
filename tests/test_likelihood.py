"""Likelihoods against closed forms: the continuous-time ELBO (VDM, THEORY T17/T22), the PF-ODE likelihood
(T15, T31), the DDPM bound (T23, T24, T26, T27), 8-bit units (T27), the confidence NLL curve (T8, T10).

Breakages tried (each fails here): diffusion term without the ½; λ'(t) sign flipped; prior KL with
α₁ instead of α₁²; reconstruction with +λ_0; LearnedSchedule without the (ĝ − ĝ(0))/(ĝ(1) − ĝ(0)) rescaling
(endpoints drift).
Also tried (the test that catches each): PF-ODE divergence sign flipped, prior dropped, prior with σ_max
instead of σ_max², exact divergence missing the last dimension, σ-time divergence not divided by σ
(Gaussian PF-ODE, tree PF-ODE; most also the ELBO ≥ PF-ODE test); Gaussian instead of Rademacher probes
(Gaussian PF-ODE with Hutchinson, exact only for Rademacher); β and β̃ swapped (closed-form VLB terms,
bound-and-tighten, tree bound, perfect-mean variance terms, step subsample); IDDPM v and 1 − v swapped
(perfect-mean variance terms); DDPM prior with |x0| for x0² (prior KL test); VE map σ̃ = √(1 − ᾱ) without 1/√ᾱ
(closed-form VLB terms, VE-map test); x̃ = z without 1/√ᾱ (VE-map test); step weight T/k for (T − 1)/k
(step subsample); Gaussian decoder variance √β_1 for β_1 (closed-form VLB terms, discretised vs density);
KL without its log term (closed-form terms, perfect-mean terms); bin half-width 2/255 (bins sum to one,
density × width, tails); edge bin not extended to −∞ (bins sum to one); log-CDF difference without the
tail mirroring (bins sum to one, tails); 8-bit shift log 255 for log 127.5 (uniform 8 bits,
piecewise-constant); confidence NLL with σ_φ for σ_φ², or without log 2π (both confidence-curve tests).
Issue 18 (each seen to fail, then reverted): off-centre dequantisation [x_k, x_k + Δ) and the 8-bit shift
log₂ 128 (the PF-ODE discrete-Gaussian oracle); β̃_2 as β_2(1 − ᾱ_2)/(1 − ᾱ_1) (closed-form terms);
the two fixed decoders' names swapped (closed-form terms); v and 1 − v swapped at t = 1 (perfect-mean
terms); step_var without the finite-population factor 1 − k/(T − 1), divided by k², or from the weighted
per-step KLs (step-subsample test); step_var 0 (spread-of-repeats test).
"""
import math

import pytest
import torch

from gendiff.data.toy import GaussianMixture
from gendiff.likelihood import (bits_per_dim, confidence_nll_curve, continuous_elbo, ddpm_vlb, dequantize,
                                discretized_gaussian_log_prob, log_likelihood, nll_8bit_to_bits_per_dim)
from gendiff.precond import Denoiser, EDMPrecond
from gendiff.process import DDPM, VP
from gendiff.schedules import LearnedSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
S, D = 0.7, 2


class ExactGaussian(torch.nn.Module):
    """D*(x̃, σ) = x̃·s²/(s² + σ²) for data N(0, s²I)."""

    def forward(self, x, sigma):
        return x * S**2 / (S**2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2)


def closed_form_bound(lam_min, lam_max):
    """E_x of the three terms with the exact denoiser: ½∫ d·s²/(s² + e^(−λ)) dλ, the prior KL, the decoder."""
    lam = torch.linspace(lam_min, lam_max, 400001, dtype=F64)
    diffusion = 0.5 * float(torch.trapezoid(D * S**2 / (S**2 + torch.exp(-lam)), lam))
    a2, s2 = 1 / (1 + math.exp(-lam_min)), 1 / (1 + math.exp(lam_min))
    prior = 0.5 * D * (s2 + a2 * S**2 - 1 - math.log(s2))
    recon = 0.5 * D * (1 + math.log(2 * math.pi) - lam_max)
    return diffusion + prior + recon


def test_bound_is_tight_for_the_exact_model_on_a_gaussian():
    true_nll = 0.5 * D * (math.log(2 * math.pi * S**2) + 1)          # E[−log N(x; 0, s²I)]
    b = closed_form_bound(-12.0, 12.0)
    assert true_nll <= b < true_nll + 1e-4
    assert closed_form_bound(-4.0, 4.0) > b + 0.01                    # narrower endpoints: a looser bound


@pytest.mark.parametrize("schedule", [VP(-12.0, 12.0), LearnedSchedule(-12.0, 12.0),
                                      LearnedSchedule(-12.0, 12.0, hidden=8)],
                         ids=["vp-linear", "learned", "learned-8"])
def test_monte_carlo_elbo_matches_the_closed_form_whatever_the_shape(schedule):
    """Only the endpoints matter (VDM++ §2): linear-λ VP and two random monotone shapes, same endpoints."""
    g = torch.Generator().manual_seed(1)
    n = 100000
    x = S * torch.randn(n, D, generator=g, dtype=F64)
    r = continuous_elbo(ExactGaussian(), x, schedule, generator=g)
    se = float(r["total"].std()) / math.sqrt(n)
    assert abs(float(r["total"].mean()) - closed_form_bound(-12.0, 12.0)) < 4 * se
    torch.testing.assert_close(r["bits_per_dim"], r["total"] / (D * math.log(2)))
    torch.testing.assert_close(r["total"], r["diffusion"] + r["prior"] + r["reconstruction"])


def test_learned_schedule_is_monotone_with_fixed_endpoints():
    sch = LearnedSchedule(-7.0, 9.0)
    t = torch.linspace(0, 1, 1001, dtype=F64)
    gam = sch.gamma(t).detach()
    assert float(gam[0]) == pytest.approx(-9.0) and float(gam[-1]) == pytest.approx(7.0)
    assert bool((gam[1:] > gam[:-1]).all())
    torch.testing.assert_close(sch.lam(t), -gam)
    assert not sch.ends.requires_grad and LearnedSchedule(learn_endpoints=True).ends.requires_grad
    with pytest.raises(ValueError, match="lam_min < lam_max"):
        LearnedSchedule(3.0, 1.0)


# =================================================================================================
# PF-ODE likelihood (T15, T31), bits/dim and dequantisation (T27), the DDPM bound (T23, T24,
# T26, T27), the confidence NLL curve (T8, T10).
# =================================================================================================

M2 = torch.tensor([0.3, -0.5], dtype=F64)          # a 2-D Gaussian N(m, diag(s²)) with an exact denoiser
S2 = torch.tensor([0.5, 0.8], dtype=F64)


class CountingGaussian:
    """D(x̃, σ) = m + s²/(s² + σ²)·(x̃ − m) per dimension: the exact posterior mean for data
    N(m, diag(s²))."""

    def __init__(self, m=M2, s=S2):
        self.m, self.s, self.calls = m, s, 0

    def __call__(self, x, sigma):
        self.calls += 1
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2
        m, v = self.m.to(x.dtype), self.s.to(x.dtype) ** 2
        return m + v / (v + s2) * (x - m)


def log_normal_diag(x, m, var):
    """log N(x; m, diag(var)) per row."""
    return -0.5 * ((x - m).square() / var + torch.log(2 * math.pi * var)).sum(1)


@pytest.mark.parametrize("method,time,dtype", [("exact", "sigma", F64), ("exact", "log_sigma", F64),
                                               ("hutchinson", "sigma", F64),
                                               ("exact", "sigma", torch.float32)])
def test_pf_ode_likelihood_of_a_gaussian_is_the_smoothed_density(method, time, dtype):
    """Data N(m, diag(s²)), exact D: the PF-ODE maps p_σmin = N(m, s² + σ_min²) onto p_σmax exactly, along
    x(σ) = m + (x − m)·√((s² + σ²)/(s² + σ_min²)), with ∫∇·f dσ = Σ_i ½ log((s_i² + σ_max²)/(s_i² + σ_min²)).
    The Jacobian is diagonal, so Rademacher Hutchinson is exact (ε_i² = 1). The only error of the result
    is the prior: log N(x_T; 0, σ_max²) − log N(x_T; m, s² + σ_max²), computed here and also bounded."""
    smin, smax = 0.002, 80.0
    g = torch.Generator().manual_seed(3)
    x = (M2 + S2 * torch.randn(32, 2, generator=g, dtype=F64)).to(dtype)
    D = CountingGaussian()
    lp, info = log_likelihood(D, x, sigma_min=smin, sigma_max=smax, method=method, probes=3, time=time,
                              generator=g)
    assert lp.dtype == F64 and lp.shape == (32,) and info["nfe"] == D.calls > 0
    x64 = x.double()
    truth = log_normal_diag(x64, M2, S2**2 + smin**2)
    x_T = M2 + (x64 - M2) * ((S2**2 + smax**2) / (S2**2 + smin**2)).sqrt()
    torch.testing.assert_close(info["x_T"], x_T, rtol=1e-4, atol=1e-3)
    delta = 0.5 * torch.log((S2**2 + smax**2) / (S2**2 + smin**2)).sum()
    torch.testing.assert_close(info["delta_logp"], delta.expand(32), rtol=0, atol=2e-4)
    torch.testing.assert_close(info["prior"], log_normal_diag(info["x_T"], torch.zeros(2, dtype=F64),
                                                              torch.full((2,), smax**2, dtype=F64)))
    mismatch = info["prior"] - log_normal_diag(info["x_T"], M2, S2**2 + smax**2)
    torch.testing.assert_close(lp - mismatch, truth, rtol=0, atol=5e-4)
    # the bound: |Δ| ≤ ‖m‖‖x_T‖/σ² + ‖m‖²/2σ² + Σ(s²/2σ²)(1 + x_T²/σ²) to first order in 1/σ_max²
    bound = (M2.norm() * info["x_T"].norm(dim=1) + M2.square().sum() / 2
             + (S2**2 / 2 * (1 + info["x_T"].square() / smax**2)).sum(1)) / smax**2
    assert bool((mismatch.abs() <= 1.01 * bound).all())
    assert float((lp - truth).abs().max()) < 0.02
    if method == "hutchinson":
        assert info["delta_logp_probes"].shape == (3, 32)


@pytest.fixture(scope="module")
def tree_points(tree_a):
    x, _ = tree_a.sample(64, generator=torch.Generator().manual_seed(11), dtype=F64)
    return x


PF_TREE = dict(sigma_min=0.01, sigma_max=40.0, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tree_exact(tree_a, tree_points):
    return log_likelihood(tree_a.denoiser("point"), tree_points, **PF_TREE)


def test_pf_ode_likelihood_on_the_tree_mixture_is_the_exact_density(tree_a, tree_points, tree_exact):
    """T31 with the exact mixture denoiser: log p_σmin(x) from the ODE against the mixture's closed form."""
    lp, info = tree_exact
    truth = tree_a.logp(tree_points, PF_TREE["sigma_min"])
    assert abs(float((lp - truth).mean())) < 0.02
    # with the true p_σmax in place of the prior the two agree to the solver's tolerance, point by point
    exact_prior = info["prior"] - tree_a.logp(info["x_T"], PF_TREE["sigma_max"])
    assert float((lp - exact_prior - truth).abs().max()) < 2e-3


def test_hutchinson_agrees_with_the_exact_divergence_within_its_standard_error(tree_a, tree_points,
                                                                               tree_exact):
    """Each probe integrates one unbiased estimate of ∫∇·f (fixed probes); their spread gives the SE."""
    lp, _ = tree_exact
    probes = 6
    h, info = log_likelihood(tree_a.denoiser("point"), tree_points, method="hutchinson", probes=probes,
                             generator=torch.Generator().manual_seed(5), **PF_TREE)
    per_probe = info["delta_logp_probes"]                                  # [P, N]
    torch.testing.assert_close(info["delta_logp"], per_probe.mean(0))
    se = float(per_probe.var(0).sum().sqrt()) / (math.sqrt(probes) * len(h))
    assert se > 0.01                                                       # off-diagonal Jacobian: noisy
    assert abs(float((h - lp).mean())) < 4 * se + 2e-3


def gaussian_kl_steps(ddpm, variance, s=S2):
    """E[KL_t] for t = 2..T, [T − 1], for the exact model on data N(m, diag(s²)): KL_t = ½Σ_i[log(Σ/β̃) + β̃/Σ
    − 1 + c_0²·(x0 − x̂0)²/Σ] with c_0 = √ᾱ_{t−1}β_t/(1 − ᾱ_t) (T24), and E(x0 − x̂0)² = Var[x0 | x̃] =
    s²σ̃²/(s² + σ̃²), σ̃² = (1 − ᾱ_t)/ᾱ_t (T2)."""
    T, ab, om, b = ddpm.T, ddpm.alpha_bar, ddpm.one_minus_alpha_bar, ddpm.betas
    t = torch.arange(2, T + 1)
    bt = b[t] * om[t - 1] / om[t]
    var = (bt if variance == "beta_tilde" else b[t])[:, None]
    c0 = (ab[t - 1].sqrt() * b[t] / om[t])[:, None]
    st2 = (om[t] / ab[t])[:, None]
    post = s**2 * st2 / (s**2 + st2)
    return (0.5 * (torch.log(var / bt[:, None]) + bt[:, None] / var - 1 + c0**2 * post / var)).sum(1)


def gaussian_vlb_terms(ddpm, variance, s=S2, m=M2, decoder_variance="beta"):
    """E over x0 and the x_t draws of the three DDPM terms for the exact model on data N(m, diag(s²)): the
    diffusion term Σ_t E[KL_t] (gaussian_kl_steps), the prior KL, and the decoder N(x̂0, Σ_1), Σ_1 = β_1 or
    β̃_2: ½Σ_i[log 2πΣ_1 + Var[x0 | x̃_1]/Σ_1]."""
    T, ab, om, b = ddpm.T, ddpm.alpha_bar, ddpm.one_minus_alpha_bar, ddpm.betas
    prior = float(0.5 * (om[T] - 1 - torch.log(om[T]) + ab[T] * (m**2 + s**2)).sum())
    s1, var1 = om[1] / ab[1], (b[1] if decoder_variance == "beta" else b[2] * om[1] / om[2])
    recon = float(0.5 * (torch.log(2 * math.pi * var1) + s**2 * s1 / (s**2 + s1) / var1).sum())
    return {"prior": prior, "diffusion": float(gaussian_kl_steps(ddpm, variance, s).sum()),
            "reconstruction": recon}


def gaussian_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return M2 + S2 * torch.randn(n, 2, generator=g, dtype=F64), g


@pytest.mark.parametrize("schedule,T", [("linear", 10), ("cosine", 1000)])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_vlb_terms_match_their_closed_form_expectations(schedule, T, variance):
    x, g = gaussian_data(2000, 7)
    ddpm = DDPM(T, schedule)
    r = ddpm_vlb(CountingGaussian(), x, ddpm, variance=variance, generator=g)
    want = gaussian_vlb_terms(ddpm, variance)
    for name in ("prior", "diffusion", "reconstruction"):
        se = float(r[name].std()) / math.sqrt(len(x))
        assert abs(float(r[name].mean()) - want[name]) < 4 * se + 1e-9, name
    for dv in ("beta", "beta_tilde"):                  # both fixed decoders, from the same x_1 and x̂0
        got = r["reconstruction_by_variance"][dv]
        want_dv = gaussian_vlb_terms(ddpm, variance, decoder_variance=dv)["reconstruction"]
        assert abs(float(got.mean()) - want_dv) < 4 * float(got.std()) / math.sqrt(len(x)) + 1e-9, dv
    torch.testing.assert_close(r["reconstruction"], r["reconstruction_by_variance"]["beta"])   # the default
    torch.testing.assert_close(r["total"], r["prior"] + r["diffusion"] + r["reconstruction"])
    torch.testing.assert_close(r["bits_per_dim"], r["total"] / (2 * math.log(2)))


def test_ddpm_vlb_bounds_the_gaussian_nll_and_tightens_with_T():
    """E[total] ≥ E[−log p(x)] (the bound), and the gap shrinks as T grows (linear β, T = 10, 100, 1000)."""
    x, g = gaussian_data(2000, 8)
    nll = -log_normal_diag(x, M2, S2**2)
    true = float(0.5 * (torch.log(2 * math.pi * S2**2) + 1).sum())
    for variance in ("beta_tilde", "beta"):
        gaps, closed = [], []
        for T in (10, 100, 1000):
            gap = ddpm_vlb(CountingGaussian(), x, DDPM(T, "linear"), variance=variance,
                           generator=g)["total"] - nll
            gaps.append((float(gap.mean()), float(gap.std()) / math.sqrt(len(x))))
            closed.append(sum(gaussian_vlb_terms(DDPM(T, "linear"), variance).values()) - true)
        assert all(c >= 0 for c in closed) and closed[0] > closed[1] > closed[2]
        assert all(mean > -4 * se for mean, se in gaps)
        assert gaps[0][0] - 4 * gaps[0][1] > gaps[2][0] + 4 * gaps[2][1]
        if variance == "beta_tilde":
            assert gaps[1][0] - 4 * gaps[1][1] > gaps[2][0] + 4 * gaps[2][1]


def test_ddpm_vlb_bounds_the_tree_mixture_nll(tree_a):
    x, _ = tree_a.sample(128, generator=torch.Generator().manual_seed(2), dtype=F64)
    nll = -tree_a.logp(x, 0.0)
    g = torch.Generator().manual_seed(4)
    gaps = []
    for T in (10, 100):
        gap = ddpm_vlb(tree_a.denoiser("point"), x, DDPM(T, "cosine"), variance="beta",
                       generator=g)["total"] - nll
        gaps.append((float(gap.mean()), float(gap.std()) / math.sqrt(len(x))))
    assert all(mean > 3 * se for mean, se in gaps)
    assert gaps[0][0] - 3 * gaps[0][1] > gaps[1][0] + 3 * gaps[1][1]


class KnowsX0:
    """A 'denoiser' that returns the true x0 of its batch: μ_θ = μ_q, so each KL is the variance mismatch
    only."""

    def __init__(self, x0):
        self.x0 = x0

    def __call__(self, x, sigma):
        return self.x0.to(x.dtype)


@pytest.mark.parametrize("variance,v", [("beta_tilde", None), ("beta", None), ("beta_tilde", 1.0),
                                        ("beta_tilde", 0.0), ("beta_tilde", 0.3)])
def test_ddpm_vlb_variance_terms_are_exact_with_a_perfect_mean(variance, v):
    """With x̂0 = x0: KL_t = ½d[log(Σ/β̃) + β̃/Σ − 1] (T24), Σ = β, β̃, or exp(v log β + (1 − v) log β̃)
    (T26); reconstruction ½d·log 2πΣ_1 (T27 with the Gaussian decoder; Σ_1 = β_1, or the learned one with β̃_2
    in place of β̃_1 = 0); all exact, no Monte Carlo left."""
    ddpm = DDPM(50, "cosine")
    x, g = gaussian_data(4, 1)
    vfun = None if v is None else (lambda z, t: torch.full_like(z, v))
    r = ddpm_vlb(KnowsX0(x), x, ddpm, variance=variance, v=vfun, generator=g, decoder_variance="beta_tilde")
    t = torch.arange(2, 51)
    b, bt = ddpm.betas[t], ddpm.betas[t] * ddpm.one_minus_alpha_bar[t - 1] / ddpm.one_minus_alpha_bar[t]
    w = (1.0 if variance == "beta" else 0.0) if v is None else v
    var = torch.exp(w * b.log() + (1 - w) * bt.log())
    want = float((torch.log(var / bt) + bt / var - 1).sum())               # ½·d with d = 2
    torch.testing.assert_close(r["diffusion"], torch.full((4,), want, dtype=F64))
    var1 = bt[0]                                                     # t = 1: β̃_2 (asked for), or the learned
    if v is not None:                                                # Σ_θ(1), log β̃_1 clipped to log β̃_2
        var1 = torch.exp(v * ddpm.betas[1].log() + (1 - v) * bt[0].log())
    torch.testing.assert_close(r["reconstruction"],
                               torch.full((4,), math.log(2 * math.pi * float(var1)), dtype=F64))
    if v is None:
        for dv, var1 in (("beta", ddpm.betas[1]), ("beta_tilde", bt[0])):
            torch.testing.assert_close(r["reconstruction_by_variance"][dv],
                                       torch.full((4,), math.log(2 * math.pi * float(var1)), dtype=F64))
    else:
        assert r["reconstruction_by_variance"] is None


def test_ddpm_vlb_fixed_decoders_are_the_ends_of_the_learned_one():
    """Like with like (T26): the learned head's decoder at v = 0 is the fixed β̃_2 decoder and at v = 1 the
    fixed β_1 decoder, on 8-bit data with the discretised decoder and a real (exact Gaussian) denoiser; the
    two differ, and β̃_2 is β̃_1 = 0 clipped, β_2(1 − ᾱ_1)/(1 − ᾱ_2)."""
    x, _ = gaussian_data(64, 13)
    x = ((x.clamp(-0.9, 0.9) + 1) * 127.5).round() / 127.5 - 1
    ddpm = DDPM(100, "linear")
    run = lambda **kw: ddpm_vlb(CountingGaussian(), x, ddpm, decoder="discretized",  # noqa: E731
                                generator=torch.Generator().manual_seed(0), **kw)
    fixed = run()["reconstruction_by_variance"]
    for v, name in ((0.0, "beta_tilde"), (1.0, "beta")):
        learned = run(v=lambda z, t, v=v: torch.full_like(z, v))["reconstruction"]
        torch.testing.assert_close(learned, fixed[name], rtol=1e-12, atol=1e-12)
    assert float((fixed["beta"] - fixed["beta_tilde"]).abs().mean()) > 0.1
    # with x̂0 = x0 (interior bins) each pixel's probability is 2Φ(Δ/2 / √Σ_1) − 1, Σ_1 = β_1 or β̃_2
    exact = ddpm_vlb(KnowsX0(x), x, ddpm, decoder="discretized",
                     generator=torch.Generator().manual_seed(0))["reconstruction_by_variance"]
    bt2 = ddpm.betas[2] * ddpm.betas[1] / ddpm.one_minus_alpha_bar[2]      # 1 − ᾱ_1 = β_1
    for name, var1 in (("beta", ddpm.betas[1]), ("beta_tilde", bt2)):
        p_bin = math.erf(1 / 255 / math.sqrt(2 * float(var1)))
        torch.testing.assert_close(exact[name], torch.full((64,), -2 * math.log(p_bin), dtype=F64))


def test_ddpm_vlb_prior_is_the_kl_of_the_last_latent():
    """prior = KL(q(x_T | x0) ‖ N(0, I)) with q(x_T | x0) = N(√ᾱ_T x0, (1 − ᾱ_T)I) (T23), per example, against
    torch.distributions; a short linear schedule leaves ᾱ_T ≈ 0.9, so x0 matters."""
    ddpm = DDPM(10, "linear")
    x = torch.tensor([[0.0, 0.0], [1.5, -2.0], [-3.0, 0.5]], dtype=F64)
    r = ddpm_vlb(KnowsX0(x), x, ddpm, generator=torch.Generator().manual_seed(0))
    q = torch.distributions.Normal(ddpm.alpha_bar[10].sqrt() * x, ddpm.one_minus_alpha_bar[10].sqrt())
    want = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(r["prior"], want)


class RecordsVE:
    """Records what the bound feeds the VE denoiser (T2): x̃ = z_t/√ᾱ_t must be x0 + σ̃ε,
    σ̃² = (1 − ᾱ_t)/ᾱ_t."""

    def __init__(self, x0):
        self.x0, self.calls = x0, []

    def __call__(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=F64)
        self.calls.append((float(sigma), float(((x - self.x0) / sigma).square().mean())))
        return self.x0.to(x.dtype)


def test_ddpm_vlb_feeds_the_denoiser_the_ve_map_of_the_latent():
    ddpm = DDPM(20, "cosine")
    x, g = gaussian_data(4000, 5)
    den = RecordsVE(x)
    ddpm_vlb(den, x, ddpm, generator=g)
    sig = (ddpm.one_minus_alpha_bar / ddpm.alpha_bar).sqrt()
    order = list(range(2, 21)) + [1]                                      # steps 2..T, then the decoder's x_1
    torch.testing.assert_close(torch.tensor([c[0] for c in den.calls], dtype=F64), sig[order])
    assert all(abs(ms - 1) < 0.1 for _, ms in den.calls)                  # (x̃ − x0)/σ̃ ~ N(0, I)


def test_ddpm_vlb_step_subsample_is_unbiased_and_states_its_variance():
    """steps=k: k of the T − 1 steps, weighted (T − 1)/k. With x̂0 = x0 the per-step KL is deterministic
    (T24: ½d[log(β/β̃) + β̃/β − 1]), so the only randomness is the subset: its mean over repeats equals the
    full sum, and its variance is the closed form of a simple random sample without replacement,
    (T − 1)²(1 − k/(T − 1))·S²/k with S² the variance (divisor T − 2) of the T − 1 per-step KLs; the
    `step_var` each call reports is an unbiased estimate of it (its mean over repeats); 0 for all steps."""
    ddpm, k, reps = DDPM(10, "cosine"), 3, 2000
    x, g = gaussian_data(1, 2)
    r = ddpm_vlb(KnowsX0(x), x, ddpm, variance="beta", generator=g)
    full = float(r["diffusion"])
    assert float(r["step_var"]) == 0.0
    runs = [ddpm_vlb(KnowsX0(x), x, ddpm, variance="beta", steps=k, generator=g) for _ in range(reps)]
    est = torch.stack([q["diffusion"][0] for q in runs])
    assert abs(float(est.mean()) - full) < 4 * float(est.std()) / math.sqrt(reps)
    assert float(est.std()) > 0.01 * full
    t = torch.arange(2, 11)
    b, bt = ddpm.betas[t], ddpm.betas[t] * ddpm.one_minus_alpha_bar[t - 1] / ddpm.one_minus_alpha_bar[t]
    kl = torch.log(b / bt) + bt / b - 1                                   # ½·d with d = 2, per step
    var = 9**2 * (1 - k / 9) * float(kl.var()) / k
    assert float(est.var()) == pytest.approx(var, rel=0.1)               # sd of a variance over 2000: ~3%
    assert float(torch.stack([q["step_var"] for q in runs]).mean()) == pytest.approx(var, rel=0.1)


def test_ddpm_vlb_standard_error_with_a_step_subsample_matches_the_spread_of_repeats():
    """A real estimate (exact Gaussian denoiser, fresh data and latents each repeat, 40 of 199 steps): the
    standard error the bound states, √(Var_examples(total)/N + step_var), matches the spread of the batch mean
    over independent repeats; without step_var it would be far too small here (few steps, many examples)."""
    ddpm, n, k, reps = DDPM(200, "linear"), 400, 40, 150
    means, stated, images_only = [], [], []
    for i in range(reps):
        x, g = gaussian_data(n, 100 + i)
        r = ddpm_vlb(CountingGaussian(), x, ddpm, steps=k, generator=g)
        means.append(float(r["total"].mean()))
        images_only.append(float(r["total"].var()) / n)
        stated.append(images_only[-1] + float(r["step_var"]))
    spread = float(torch.tensor(means, dtype=F64).var())
    assert 0.7 < spread / (sum(stated) / reps) < 1.4, (spread, sum(stated) / reps)
    assert spread > 3 * sum(images_only) / reps                           # the steps' share dominates


def test_elbos_are_above_the_pf_ode_nll_for_the_exact_gaussian_model():
    """Same data, nats: the PF-ODE density of the exact model is p_σmin ≈ p_data, and both bounds
    (discrete DDPM, VDM's continuous one with short λ endpoints) sit above it on average."""
    x, g = gaussian_data(8192, 9)
    D = CountingGaussian()
    lp, _ = log_likelihood(D, x, sigma_min=0.002, sigma_max=80.0)
    pf = -lp
    for total in (ddpm_vlb(D, x, DDPM(100, "linear"), generator=g)["total"],
                  continuous_elbo(D, x, VP(-2.0, 2.0), generator=g)["total"]):
        gap = total - pf
        assert float(gap.mean()) > 4 * float(gap.std()) / math.sqrt(len(x))


# ---- the discretised decoder, dequantisation, bits/dim -------------------------------------------

GRID = torch.arange(256, dtype=F64) * 2 / 255 - 1                       # the 256 8-bit values in [−1, 1]


@pytest.mark.parametrize("mean,std", [(0.0, 0.1), (0.37, 1e-3), (-0.999, 0.02), (0.99, 3.0), (5.0, 0.01)])
def test_discretized_gaussian_bins_sum_to_one(mean, std):
    logp = discretized_gaussian_log_prob(GRID, torch.tensor(mean, dtype=F64), std)
    assert logp.dtype == F64 and bool(torch.isfinite(logp).all())
    assert abs(float(logp.exp().sum()) - 1) < 1e-12


def test_discretized_gaussian_is_density_times_bin_width_for_a_wide_std():
    """Midpoint rule: ∫_{x−Δ/2}^{x+Δ/2} φ = Δ·φ(x)·(1 + O(Δ²(z² − 1)/24s²)); interior bins, |z| ≤ 2."""
    mean, std = 0.1, 0.2
    x = GRID[(GRID - mean).abs() <= 2 * std]
    p = discretized_gaussian_log_prob(x, torch.tensor(mean, dtype=F64), std).exp()
    dens = torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    torch.testing.assert_close(p, dens * 2 / 255, rtol=1e-3, atol=0)


def test_discretized_gaussian_is_exact_far_in_the_tails():
    """log P in both far tails (z ≈ ±40 and an edge bin at z ≈ −200) against a quadrature of φ in log space:
    log ∫_a^b φ = −a²/2 − ½log 2π + log ∫_0^{b−a} e^{−au − u²/2} du (a > 0; the lower tail by symmetry)."""
    def oracle(a, b):
        u = torch.linspace(0, b - a, 200001, dtype=F64)
        return (-a * a / 2 - 0.5 * math.log(2 * math.pi)
                + math.log(float(torch.trapezoid(torch.exp(-a * u - u * u / 2), u))))
    std = 0.01
    x = torch.tensor([GRID[200].item(), GRID[40].item(), 1.0], dtype=F64)
    mean = torch.tensor([x[0] - 40 * std, x[1] + 40 * std, -1.0], dtype=F64)
    logp = discretized_gaussian_log_prob(x, mean, std)
    a0 = float((x[0] - 1 / 255 - mean[0]) / std)                         # upper tail: P = ∫_{a0}^{a0 + Δ/s} φ
    a1 = -float((x[1] + 1 / 255 - mean[1]) / std)                        # lower tail, mirrored
    a2 = float((x[2] - 1 / 255 - mean[2]) / std)                         # edge bin: P = ∫_{a2}^∞ φ
    want = torch.tensor([oracle(a0, a0 + 2 / 255 / std), oracle(a1, a1 + 2 / 255 / std),
                         oracle(a2, a2 + 1.0)], dtype=F64)
    torch.testing.assert_close(logp, want, rtol=1e-7, atol=0)


def test_discretized_decoder_vlb_is_the_density_vlb_minus_the_bin_volume():
    """Same draws (same seed): prior and diffusion are identical, and with √β_1 ≫ Δ the discretised
    reconstruction is the Gaussian one + d·log(1/Δ) up to the midpoint-rule error (T27)."""
    x, _ = gaussian_data(256, 12)
    x = ((x.clamp(-0.9, 0.9) + 1) * 127.5).round() / 127.5 - 1             # 8-bit values
    ddpm = DDPM(20, "cosine")
    assert math.sqrt(float(ddpm.betas[1])) > 10 * 2 / 255
    cont = ddpm_vlb(CountingGaussian(), x, ddpm, generator=torch.Generator().manual_seed(0))
    disc = ddpm_vlb(CountingGaussian(), x, ddpm, decoder="discretized",
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(disc["diffusion"], cont["diffusion"])
    torch.testing.assert_close(disc["prior"], cont["prior"])
    shift = 2 * math.log(255 / 2)
    assert float((disc["reconstruction"] - (cont["reconstruction"] + shift)).abs().mean()) < 0.02


def test_dequantised_uniform_data_is_eight_bits_per_dim():
    """Uniform bytes and the uniform density on the dequantised range [−1 − 1/255, 1 + 1/255]^d (centred
    bins): P(k) = 1/256 exactly, so −log p(y) + d·log 127.5 = d·log 256, i.e. 8 bits/dim (Jensen is tight:
    p is flat)."""
    g = torch.Generator().manual_seed(0)
    d = 3
    x = GRID[torch.randint(256, (1000, d), generator=g)]
    y = dequantize(x, g)
    u = (y - x) * 255 / 2 + 0.5                                         # y = x + Δ(u − ½)
    assert bool(((u >= 0) & (u < 1)).all()) and abs(float(u.mean()) - 0.5) < 0.02
    nll = torch.full((1000,), d * math.log(2 + 2 / 255), dtype=F64)     # −log of the density (255/512)^d
    torch.testing.assert_close(nll_8bit_to_bits_per_dim(nll, d), torch.full((1000,), 8.0, dtype=F64))


def test_piecewise_constant_density_gives_the_discrete_nll_exactly():
    """p(y) = π_k/Δ on bin k (Δ = 2/255, bins as `dequantize` fills them): the bound is tight, so the
    converted bits/dim equal −Σ log₂ π_k / d for every example, whatever the noise u."""
    g = torch.Generator().manual_seed(1)
    d = 2
    probs = torch.rand(256, generator=g, dtype=F64) + 0.1
    probs = probs / probs.sum()
    k = torch.randint(256, (500, d), generator=g)
    y = dequantize(GRID[k], g)
    bins = torch.floor((y + 1 + 1 / 255) / (2 / 255) + 1e-9).long()          # the (centred) bin of y
    nll = -(probs[bins] / (2 / 255)).log().sum(1)
    want = -probs[k].log2().sum(1) / d
    torch.testing.assert_close(nll_8bit_to_bits_per_dim(nll, d), want)
    assert bits_per_dim(3 * d * math.log(2), d) == pytest.approx(3.0)
    assert bits_per_dim(0.0, d, shift=1.5) == 1.5


def test_pf_ode_bits_per_dim_of_centred_dequantisation_is_the_discrete_gaussian_likelihood():
    """The whole 8-bit evaluation against a closed form. Data N(m, diag(s²)) with its exact denoiser: the
    PF-ODE density is p_σmin = N(m, s² + σ_min²) (T31), so the discrete likelihood of the byte grid value x_k
    is P(k) = Π_i ∫ N(y; m_i, s_i² + σ_min²) dy over the bin [x_k − Δ/2, x_k + Δ/2) (Φ differences). The
    dequantised estimate E_u[−log p(y)] + d·log 127.5, over many u per point, must equal −log₂ P(k)/d up to
    its Monte Carlo error and the Jensen gap (≈ dΔ²/24(s² + σ_min²) nats, below 1e-3 here). Points on the
    grid where the density slopes (m + 2s, m − 1.5s, an edge byte −1) and m itself: an off-centre bin
    [x_k, x_k + Δ) moves the estimate by ≈ Δ/2·Σ(x − m)/s² nats, here several times the tolerance."""
    smin, reps, d = 0.002, 400, 2
    m, s = torch.tensor([0.3, -0.5], dtype=F64), torch.tensor([0.2, 0.3], dtype=F64)
    pts = torch.tensor([[0.7, 0.1], [0.0, -0.95], [0.3, -0.5], [-0.2, -1.0]], dtype=F64)
    pts = ((pts + 1) * 127.5).round() / 127.5 - 1                         # on the 8-bit grid
    g = torch.Generator().manual_seed(21)
    y = dequantize(pts.repeat_interleave(reps, 0), g)
    sig_max = 80.0
    lp, info = log_likelihood(CountingGaussian(m, s), y, sigma_min=smin, sigma_max=sig_max, rtol=1e-6,
                              atol=1e-6)
    # the ODE's one known error, its N(0, σ_max²) prior for the true p_σmax (≈ ‖m‖‖x_T‖/σ_max², up to 0.01
    # nats here), put back so that only the dequantisation is under test
    lp = lp - (info["prior"] - log_normal_diag(info["x_T"], m, s**2 + sig_max**2))
    bpd = nll_8bit_to_bits_per_dim(-lp, d).view(len(pts), reps)
    sd = (s**2 + smin**2).sqrt()
    normal = torch.distributions.Normal(m, sd)
    want = -(normal.cdf(pts + 1 / 255) - normal.cdf(pts - 1 / 255)).log2().sum(1) / d    # [K]
    tol = 4 * bpd.std(1) / math.sqrt(reps) + 1e-3
    assert bool(((bpd.mean(1) - want).abs() < tol).all()), (bpd.mean(1) - want, tol)
    off_centre = (1 / 255 * ((pts - m) / sd**2).sum(1)).abs() / (d * math.log(2))
    assert float((off_centre / tol).max()) > 5                          # the test would see that shift


# ---- the confidence NLL curve --------------------------------------------------------------------

def test_confidence_nll_curve_of_the_exact_single_gaussian_is_the_closed_form():
    """One Gaussian N(m, s²I) as a mixture, `denoiser("point")` exact: Var[x0 | x̃] = v = s²σ²/(s² + σ²),
    σ_φ² = σ² + v (T8), E(x0 − μ)² = v, so the NLL per dim is ½[log 2π(σ² + v) + v/(σ² + v)]."""
    s, m = 0.6, [0.2, -0.4]
    mix = GaussianMixture([1.0], [m], [[[s * s, 0.0], [0.0, s * s]]])
    sigmas = [0.05, 0.5, 5.0]
    x, _ = mix.sample(4000, generator=torch.Generator().manual_seed(0), dtype=F64)
    r = confidence_nll_curve(mix.denoiser("point"), x, sigmas, generator=torch.Generator().manual_seed(1))
    sig = torch.tensor(sigmas, dtype=F64)
    v = s * s * sig**2 / (s * s + sig**2)
    want = 0.5 * (torch.log(2 * math.pi * (sig**2 + v)) + v / (sig**2 + v))
    assert bool(((r["nll_per_dim"] - want).abs() < 4 * r["nll_se"] / 2).all())
    torch.testing.assert_close(r["nll"], 2 * r["nll_per_dim"])
    torch.testing.assert_close(r["sigma"], sig)


class ZeroNet(torch.nn.Module):
    def forward(self, x, c_noise):
        return torch.zeros_like(x)


def test_confidence_nll_curve_of_a_headless_denoiser_uses_c_var():
    """No head: σ_φ = c_var (T5); with F ≡ 0, μ = c_skip·x̃ and E(x0 − μ)² = (1 − c_skip)²s² + c_skip²σ²."""
    s, sd = 0.7, 0.5
    den = Denoiser(ZeroNet(), EDMPrecond(sd))
    x = s * torch.randn(4000, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    sigmas = [0.1, 1.0]
    r = confidence_nll_curve(den, x, sigmas, generator=torch.Generator().manual_seed(3))
    for i, sig in enumerate(sigmas):
        c_skip = sd**2 / (sig**2 + sd**2)
        c_var2 = sig**2 * (1 + sd**2 / (sig**2 + sd**2))
        err2 = (1 - c_skip) ** 2 * s**2 + c_skip**2 * sig**2
        want = 1.5 * (math.log(2 * math.pi * c_var2) + err2 / c_var2)
        assert abs(float(r["nll"][i]) - want) < 4 * float(r["nll_se"][i])


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [(dict(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
                                      (dict(method="trace"), "method"), (dict(rtol=0.0), "rtol"),
                                      (dict(atol=-1.0), "atol"), (dict(probes=0), "probes"),
                                      (dict(solver="rk45"), "solver"), (dict(time="t"), "time")])
def test_log_likelihood_rejects_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        log_likelihood(CountingGaussian(), torch.zeros(2, 2, dtype=F64), **kw)


@pytest.mark.parametrize("kw,match", [(dict(variance="learned"), "variance"),
                                      (dict(decoder="bernoulli"), "decoder"), (dict(steps=0), "steps"),
                                      (dict(steps=10), "steps"), (dict(v=0.5), "v=")])
def test_ddpm_vlb_rejects_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        ddpm_vlb(CountingGaussian(), torch.zeros(2, 2, dtype=F64), DDPM(10), **kw)


def test_eight_bit_helpers_and_curve_reject_bad_input():
    off_grid = torch.tensor([[0.5, 0.0]], dtype=F64)                     # 0.5 is not 2k/255 − 1
    with pytest.raises(ValueError, match="8-bit"):
        dequantize(off_grid)
    with pytest.raises(ValueError, match="8-bit"):
        ddpm_vlb(CountingGaussian(), off_grid, DDPM(10), decoder="discretized")
    with pytest.raises(ValueError, match="std"):
        discretized_gaussian_log_prob(GRID, 0.0, 0.0)
    with pytest.raises(ValueError, match="dim"):
        bits_per_dim(1.0, 0)
    with pytest.raises(ValueError, match="sigmas"):
        confidence_nll_curve(GaussianMixture([1.0], [[0.0, 0.0]],
                                             [[[1.0, 0.0], [0.0, 1.0]]]).denoiser("point"),
                             torch.zeros(2, 2, dtype=F64), [0.1, -1.0])
