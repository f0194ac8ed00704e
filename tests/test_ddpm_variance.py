"""DDPM's reverse variance (THEORY T24, T26, T38) against the closed forms of Gaussian data.

Data x0 ~ N(m, diag(v)) with unequal v: every element is its own 1-D Gaussian, the forward chain (T23) is
linear-Gaussian, and so is everything here:
- Var[x0 | x_t] = v·σ̃_t²/(v + σ̃_t²), σ̃_t² = (1 − ᾱ_t)/ᾱ_t (T2); the exact model `GaussianMixture(...)
  .denoiser()` predicts μ = E[x0 | x̃] and σ_φ² = σ̃² + Var[x0 | x̃] (T8);
- the true reverse step q(x_{t−1} | x_t) is Gaussian; its variance comes here from the joint covariance of
  (x_{t−1}, x_t) (P_{t−1} − α_t·P_{t−1}²/P_t, P_t = ᾱ_t·v + 1 − ᾱ_t), a derivation independent of T38's
  β̃_t + c_0²·Var[x0 | x_t];
- with those exact steps the model's joint is q's except for p(x_T) = N(0, I), so the DDPM bound is
  E[−log p(x0)] + KL(q(x_T) ‖ N(0, I)) exactly (the per-step KLs do not vanish: they sum to it);
- the sampler's output moments follow the recursion mean' = c_t·mean + c_0·E[x0 | ·],
  var' = (c_t + c_0·k_t)²·var + Σ_t from z_T ~ N(0, I) (no noise at t = 1).
Respaced processes (`DDPM(1000).respaced(k)`, k = 10, 25, 100, IDDPM) are what the comparison at equal steps
uses, so most checks run on them.

Breakages tried (each seen to fail, then reverted; the test that caught it):
- T38 with c_0 for c_0² (true reverse variance; bound tight; sampler moments);
- T38 with β_t in place of β̃_t (true reverse variance; bound tight);
- phi reading σ_φ² instead of σ_φ² − σ̃² (true reverse variance; sampler: phi's variance error);
- the t = 1 floor removed, or β̃_1 = 0 not clipped to β̃_2 (t = 1 floor test; a fixed decoder's β̃_2 of
  test_likelihood's closed-form terms);
- the phi/analytic bound decoding with the fixed β_1 instead of its own Σ_1 (perfect-mean terms; the bound
  test does not see it: for these v, Var[x0 | x_1] is within 0.1% of β_1);
- analytic_variances dividing by the number of images instead of elements, or at σ̃ = √(1 − ᾱ) without 1/√ᾱ
  (analytic table converges), its noise drawn per batch (batch independence);
- the sampler reading x0_var[t − 1] for x0_var[t] (sampler moments, analytic);
- ddpm_vlb with phi not calling `predict` (it then has no σ_φ; the bad-options test) and the sampler's
  v= not checked against phi (bad-options test).
"""
import math

import pytest
import torch

from gendiff.data.toy import GaussianMixture
from gendiff.heads import Prediction
from gendiff.likelihood import ddpm_vlb
from gendiff.process import DDPM, analytic_variances
from gendiff.samplers import sample_ddpm

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
M = torch.tensor([0.3, -0.5, 0.1, 0.0], dtype=F64)
V = torch.tensor([0.25, 0.5, 1.0, 2.0], dtype=F64)       # unequal per-element variances
EXACT = GaussianMixture([1.0], M[None], torch.diag(V)[None]).denoiser("point")
NAMES = ("beta", "beta_tilde", "phi", "analytic")


def respaced(k):
    return DDPM(1000).respaced(k)


def tables(dd, t):
    ab, om = dd.alpha_bar[t], dd.one_minus_alpha_bar[t]
    return ab, om, dd.alphas[t], dd.alpha_bar[t - 1], dd.one_minus_alpha_bar[t - 1]


def x0_var(dd, t):
    """Var[x0 | x_t] per element [d]."""
    ab, om = dd.alpha_bar[t], dd.one_minus_alpha_bar[t]
    s2 = om / ab
    return V * s2 / (V + s2)


def exact_table(dd):
    """Analytic-DPM's v̄_t of the exact model: the element-mean of Var[x0 | x_t], [T + 1], v̄_0 = 0."""
    return torch.tensor([0.0] + [float(x0_var(dd, t).mean()) for t in range(1, dd.T + 1)], dtype=F64)


def true_reverse(dd, t):
    """(gain, variance) of q(x_{t−1} | x_t) = N(E[x_{t−1}] + gain·(x_t − E[x_t]), variance) from the joint
    covariance of (x_{t−1}, x_t): Cov = √α_t·P_{t−1}, P_t = ᾱ_t·v + 1 − ᾱ_t (T23)."""
    ab, om, a, ab_prev, om_prev = tables(dd, t)
    p_prev, p = ab_prev * V + om_prev, ab * V + om
    cov = a.sqrt() * p_prev
    return cov / p, p_prev - cov**2 / p


def model_variance(dd, t, name):
    """Σ_t [d] of each choice from the closed forms (T38's two from `true_reverse`, not from c_0)."""
    b, bt = dd.betas[t], dd.betas[t] * dd.one_minus_alpha_bar[t - 1] / dd.one_minus_alpha_bar[t]
    phi = true_reverse(dd, t)[1]
    return {"beta": b.expand(4), "beta_tilde": bt.expand(4), "phi": phi,
            "analytic": phi.mean().expand(4)}[name]


def kw(name, dd):
    return {"x0_var": exact_table(dd)} if name == "analytic" else {}


# ---- (a) T38 is the true reverse step -------------------------------------------------------------------

@pytest.mark.parametrize("dd", [DDPM(1000), respaced(10), DDPM(200, "cosine").respaced(25)],
                         ids=["linear-1000", "linear-1000-respaced-10", "cosine-200-respaced-25"])
def test_phi_step_is_the_true_reverse_step_at_every_t(dd):
    """The exact model's phi step (`reverse_step`: x̂0 and Σ_t from one `predict`) is q(x_{t−1} | x_t): its
    mean E[x_{t−1} | x_t] and its variance Var[x_{t−1} | x_t] per element, at every t ≥ 2, on the respaced
    tables too. At t = 1 (β̃_1 = 0) T38 gives Var[x0 | x_1], above the β̃_2 floor for these v."""
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    for t in range(1, dd.T + 1):
        x0, var = dd.reverse_step(EXACT, z, t, "phi")
        gain, want = true_reverse(dd, t)
        mean = dd.posterior(z, x0, t)[0]
        want_mean = dd.alpha_bar[t - 1].sqrt() * M + gain * (z - dd.alpha_bar[t].sqrt() * M)
        torch.testing.assert_close(mean, want_mean, rtol=1e-9, atol=1e-12)
        if t == 1:
            assert bool((want > dd.reverse_variance(1, "beta_tilde")).all())         # the floor is not active
        torch.testing.assert_close(var, want.expand_as(z), rtol=1e-9, atol=0)


def test_t1_decoder_variance_is_floored_at_the_clipped_beta_tilde():
    """At t = 1 every fixed choice is DDPM's/IDDPM's clipped decoder (β_1, β̃_2) and T38's Var[x0 | x_1] is
    floored at β̃_2: kept where above, β̃_2 where below (a pixel the head is sure of)."""
    dd = respaced(25)
    b1 = float(dd.betas[1])
    bt2 = float(dd.betas[2] * dd.one_minus_alpha_bar[1] / dd.one_minus_alpha_bar[2])
    assert dd.reverse_variance(1, "beta") == b1 and dd.reverse_variance(1, "beta_tilde") == bt2
    got = dd.reverse_variance(1, "phi", x0_var=torch.tensor([1e-9, 0.5], dtype=F64))
    torch.testing.assert_close(got, torch.tensor([bt2, 0.5], dtype=F64))
    assert dd.reverse_variance(1, "analytic", x0_var=1e-9) == bt2
    assert dd.reverse_variance(1, "beta_tilde", v=1.0) == pytest.approx(b1, rel=1e-12)


# ---- (b), (c) the bound ---------------------------------------------------------------------------------

def expected_bound(dd, name):
    """E over x0 and the x_t draws of the DDPM bound of the exact mean with Σ_t = model_variance (Gaussian
    decoder with its own Σ_1 for phi/analytic, β̃_2 for beta_tilde, β_1 for beta): the prior KL, Σ_t≥2
    ½Σ_i[log(Σ/β̃) + (β̃ + c_0²V_t)/Σ − 1] with c_0²V_t = phi − β̃ (T24: the mean error c_0(x0 − x̂0)), and
    ½Σ_i[log 2πΣ_1 + V_1/Σ_1]."""
    T = dd.T
    ab_T, om_T = dd.alpha_bar[T], dd.one_minus_alpha_bar[T]
    total = float(0.5 * (om_T + ab_T * (M**2 + V) - 1 - torch.log(om_T)).sum())
    for t in range(2, T + 1):
        bt = dd.betas[t] * dd.one_minus_alpha_bar[t - 1] / dd.one_minus_alpha_bar[t]
        s, true = model_variance(dd, t, name), true_reverse(dd, t)[1]
        total += float(0.5 * (torch.log(s / bt) + true / s - 1).sum())
    v1 = x0_var(dd, 1)
    s1 = {"beta": dd.betas[1].expand(4), "beta_tilde": torch.full((4,), dd.reverse_variance(1, "beta_tilde"),
                                                                  dtype=F64),
          "phi": v1, "analytic": v1.mean().expand(4)}[name]
    return total + float(0.5 * (torch.log(2 * math.pi * s1) + v1 / s1).sum())


def nll_plus_prior_gap(dd):
    """E[−log N(x0; m, v)] + KL(q(x_T) ‖ N(0, I)): the bound of the exact reverse chain."""
    p_T = dd.alpha_bar[dd.T] * V + dd.one_minus_alpha_bar[dd.T]
    kl = 0.5 * (p_T + dd.alpha_bar[dd.T] * M**2 - 1 - torch.log(p_T))
    return float((0.5 * (torch.log(2 * math.pi * V) + 1) + kl).sum())


@pytest.mark.parametrize("k", [10, 25, 100])
def test_phi_bound_is_tight_and_analytic_lies_between_phi_and_beta_tilde(k):
    """(b) The exact model with phi: E[bound] = −log p(x0) + KL(q(x_T) ‖ N(0, I)) in closed form (the per-step
    sum agrees with that identity to 1e-9), and ddpm_vlb's Monte Carlo mean agrees within 4 standard errors;
    it is below the β̃ bound (decoder β̃_2) and the β bound (decoder β_1). (c) analytic with the exact v̄_t
    lies between phi's and β̃'s. The comparisons are paired: one seed, the same x_t draws for every variance,
    the difference's mean beyond 4 of its standard errors."""
    dd = respaced(k)
    closed = {name: expected_bound(dd, name) for name in NAMES}
    assert closed["phi"] == pytest.approx(nll_plus_prior_gap(dd), abs=1e-9)
    assert closed["phi"] < closed["analytic"] < closed["beta_tilde"] and closed["phi"] < closed["beta"]
    n = 3000
    x = M + V.sqrt() * torch.randn(n, 4, generator=torch.Generator().manual_seed(k), dtype=F64)
    dec = {"beta": "beta", "beta_tilde": "beta_tilde"}
    tot = {name: ddpm_vlb(EXACT, x, dd, variance=name, generator=torch.Generator().manual_seed(1),
                          decoder_variance=dec.get(name, "beta"), **kw(name, dd))["total"] for name in NAMES}
    se = lambda v: float(v.std()) / math.sqrt(n)  # noqa: E731
    for name in NAMES:
        assert abs(float(tot[name].mean()) - closed[name]) < 4 * se(tot[name]), name
    for lo, hi in (("phi", "beta_tilde"), ("phi", "beta"), ("phi", "analytic"), ("analytic", "beta_tilde")):
        diff = tot[hi] - tot[lo]
        assert float(diff.mean()) > 4 * se(diff), (lo, hi)


class KnowsX0WithExcess:
    """x̂0 = the true x0 of its batch and σ_φ² = σ̃² + c per element: the bound's KLs are then the variance
    mismatch only, in closed form (T24), with Var[x0 | x_t] read as c."""

    def __init__(self, x0, c):
        self.x0, self.c = x0, c

    def __call__(self, x, sigma):
        return self.x0

    def predict(self, x, sigma):
        return Prediction(x, self.x0, var=sigma**2 + self.c)


@pytest.mark.parametrize("name", ["phi", "analytic"])
def test_bound_terms_are_exact_with_a_perfect_mean(name):
    """With x̂0 = x0 and Var[x0 | x_t] = c (per element from predict for phi, the table for analytic):
    KL_t = ½Σ_i[log(Σ_t/β̃_t) + β̃_t/Σ_t − 1] with Σ_t = β̃_t + c_0²·c (T38), and the decoder is the
    Gaussian N(x0; x0, Σ_1) with its own Σ_1 = max(c, β̃_2), ½Σ_i log 2πΣ_1; no Monte Carlo left. c below
    and above the floor, unequal per element (phi)."""
    dd = respaced(25)
    x = M + V.sqrt() * torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    c = torch.tensor([1e-7, 0.01, 0.2, 1.0] if name == "phi" else [0.05] * 4, dtype=F64)
    extra = {"x0_var": torch.full((dd.T + 1,), 0.05, dtype=F64)} if name == "analytic" else {}
    r = ddpm_vlb(KnowsX0WithExcess(x, c), x, dd, variance=name, generator=torch.Generator().manual_seed(3),
                 **extra)
    diffusion = 0.0
    for t in range(2, dd.T + 1):
        bt = dd.betas[t] * dd.one_minus_alpha_bar[t - 1] / dd.one_minus_alpha_bar[t]
        c0 = dd.alpha_bar[t - 1].sqrt() * dd.betas[t] / dd.one_minus_alpha_bar[t]
        s = bt + c0**2 * c
        diffusion += float(0.5 * (torch.log(s / bt) + bt / s - 1).sum())
    s1 = c.clamp_min(dd.betas[2] * dd.one_minus_alpha_bar[1] / dd.one_minus_alpha_bar[2])
    assert float(s1[0]) > 1e-7                                                     # the floor is active
    torch.testing.assert_close(r["diffusion"], torch.full((5,), diffusion, dtype=F64), rtol=1e-9, atol=0)
    torch.testing.assert_close(r["reconstruction"],
                               torch.full((5,), float(0.5 * torch.log(2 * math.pi * s1).sum()), dtype=F64))
    assert r["reconstruction_by_variance"] is None


def test_analytic_is_the_element_mean_of_phi_at_every_step():
    """(c) Σ_t of analytic with the exact v̄_t = mean_i Var[x0 | x_t] is the element-mean of phi's Σ_t (T38 is
    linear in Var), at every t ≥ 2 of a respaced process; at t = 1 both are above the floor here."""
    dd = respaced(25)
    tab = exact_table(dd)
    for t in range(1, dd.T + 1):
        phi = dd.reverse_variance(t, "phi", x0_var=x0_var(dd, t))
        assert dd.reverse_variance(t, "analytic", x0_var=float(tab[t])) == pytest.approx(float(phi.mean()),
                                                                                        rel=1e-12)


def test_analytic_variances_converge_to_the_closed_form():
    """(c) analytic_variances on n samples of the data, the exact model: at every step within 5 standard
    errors of mean_i Var[x0 | x_t]; the error of the exact model's x̂0 is N(0, V_t) per element, so the mean
    of its square over n·d elements has variance Σ_i 2V_i²/(n·d²). Float64, v̄_0 = 0, seeded, and the same for
    any batch size."""
    dd, n = respaced(25), 4000
    x = M + V.sqrt() * torch.randn(n, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    got = analytic_variances(EXACT, x, dd, generator=torch.Generator().manual_seed(4))
    assert got.dtype == F64 and got.shape == (dd.T + 1,) and float(got[0]) == 0.0
    want = exact_table(dd)
    se = torch.stack([(2 * x0_var(dd, t).square()).sum().sqrt() / (4 * math.sqrt(n))
                      for t in range(1, dd.T + 1)])
    z = ((got[1:] - want[1:]) / se).abs()
    assert float(z.max()) < 5, z
    torch.testing.assert_close(analytic_variances(EXACT, x, dd, generator=torch.Generator().manual_seed(4),
                                                  batch=333), got, rtol=1e-12, atol=0)
    torch.testing.assert_close(analytic_variances(EXACT, x, dd), analytic_variances(EXACT, x, dd))


# ---- (d) sampling ---------------------------------------------------------------------------------------

def sampler_moments(dd, name):
    """Mean and variance per element of sample_ddpm's output from z_T ~ N(0, I) with the exact mean and
    Σ_t = model_variance: E[x0 | x_t] = m + k_t·(x_t − √ᾱ_t·m), k_t = √ᾱ_t·v/P_t, the mean of T24 c_t·x_t +
    c_0·E[x0 | x_t] written as the true reverse step's E[x_{t−1}] + gain·(x_t − E[x_t]); no noise at t = 1."""
    mean, var = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)
    for t in range(dd.T, 0, -1):
        gain = true_reverse(dd, t)[0]
        mean = dd.alpha_bar[t - 1].sqrt() * M + gain * (mean - dd.alpha_bar[t].sqrt() * M)
        var = gain**2 * var + (model_variance(dd, t, name) if t > 1 else 0)
    return mean, var


def draw(dd, name, n=20000):
    z = torch.randn(n, 4, generator=torch.Generator().manual_seed(11), dtype=F64)
    return sample_ddpm(EXACT, z, dd, variance=name, generator=torch.Generator().manual_seed(12),
                       **kw(name, dd))


@pytest.mark.parametrize("name", NAMES)
def test_sampled_moments_follow_the_linear_gaussian_recursion_at_10_steps(name):
    """(d) Each variance's samples at 10 respaced steps have the mean and per-element variance of the
    recursion, within 5 standard errors (√(var/n), var·√(2/n))."""
    dd, n = respaced(10), 20000
    x = draw(dd, name, n)
    mean, var = sampler_moments(dd, name)
    assert bool(((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()), (x.mean(0), mean)
    assert bool(((x.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)).all()), (x.var(0), var)


def test_phi_samples_the_data_and_beats_beta_tilde_at_few_steps():
    """(d) phi draws N(m, v) per element (within 5 standard errors; the recursion says up to the missing
    Var[x0 | x_1] ≤ 1e-4) at 25 and at 10 respaced steps; at 10 steps β̃'s per-element variance error
    max_i |var_i/v_i − 1| is far outside that (it lacks c_0²·Var[x0 | x_t] at every step), phi's within."""
    n = 20000
    tol = 5 * math.sqrt(2 / n)
    for k in (25, 10):
        x = draw(respaced(k), "phi", n)
        assert bool(((x.mean(0) - M).abs() < 5 * (V / n).sqrt()).all()), (k, x.mean(0))
        assert float((x.var(0) / V - 1).abs().max()) < tol, (k, x.var(0))
        torch.testing.assert_close(sampler_moments(respaced(k), "phi")[1], V, rtol=0, atol=1.1e-4)
    err_bt = float((draw(respaced(10), "beta_tilde", n).var(0) / V - 1).abs().max())
    assert err_bt > 10 * tol, err_bt


# ---- bad options ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda dd, z: sample_ddpm(EXACT, z, dd, variance="analytic"), "x0_var"),
    (lambda dd, z: sample_ddpm(EXACT, z, dd, variance="phi", x0_var=torch.zeros(11)), "x0_var"),
    (lambda dd, z: sample_ddpm(EXACT, z, dd, variance="analytic", x0_var=torch.zeros(5)), "shape"),
    (lambda dd, z: sample_ddpm(EXACT, z, dd, variance="analytic", x0_var=-torch.ones(11)), ">= 0"),
    (lambda dd, z: sample_ddpm(EXACT, z, dd, variance="phi", v=lambda zt, t: zt * 0), "replaces variance"),
    (lambda dd, z: ddpm_vlb(lambda x, s: x, z, dd, variance="phi"), "predict"),
    (lambda dd, z: ddpm_vlb(EXACT, z, dd, variance="analytic"), "x0_var"),
    (lambda dd, z: ddpm_vlb(EXACT, z, dd, variance="sigma"), "variance"),
    (lambda dd, z: analytic_variances(EXACT, z[0], dd), "batch"),
    (lambda dd, z: analytic_variances(EXACT, z, dd, batch=0), "batch"),
])
def test_bad_variance_options_raise_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(DDPM(10), torch.zeros(3, 4, dtype=F64))
