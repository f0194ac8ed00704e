"""Every sampler against exact oracles (THEORY T15, T16, T24, T25, T26, T28–T30, DPM-Solver++).

One harness: the exact posterior-mean denoiser of a Gaussian mixture (`GaussianMixture.denoiser`) is a perfect
model, so what a sampler gets wrong is its own discretisation. Checks:
- ground truth: each sampler at a generous step count on the 8-Gaussians mixture gives MMD² and median NLL
  within 4 standard deviations of the spread between independent ground-truth sets of the same size
  (empirical null, 10 pairs; MMD² is unbiased, so the null is centred at 0);
- DDPM: the four update rules (x0, ε, score, μ; T25) give the same samples, and the x0 rule is T24's posterior
  step by step (same noise); DDIM with η = 1 on every step is DDPM with β̃ (same noise); DDIM with η = 0 is
  deterministic and converges to the PF-ODE solution;
- a single Gaussian N(m, C): the deterministic samplers land on the closed-form ODE solution
  m + (C + σ²I)^½(C + σ_max²I)^(−½)(x_T − m); the stochastic ones reproduce m and C;
- bad knobs raise ValueError naming the knob.

Breakages tried (each fails here): DPM-Solver++ without the 1/(2r) extrapolation (order drops: the Gaussian
endpoint test); reverse-diffusion step with noise √(σ_i² + σ_{i+1}²); Langevin step α_i/2 → α_i (ground
truth); PC corrector ε without the factor 2; DDPM ε rule with β_t/(1 − ᾱ_t) instead of β_t/√(1 − ᾱ_t);
DDPM σ_t = β_t where β̃_t was asked; DDIM s without √(1 − ᾱ/ᾱ'); VP Euler–Maruyama with g² = dσ²/dt
(no −2fσ²).
"""
import math

import pytest
import torch

from gendiff.data.toy import GaussianMixture, eight_gaussians
from gendiff.mixture_metrics import median_nll, mmd
from gendiff.process import DDPM, VE, VP
from gendiff.samplers import (GRID_SAMPLERS, ncsn_sigmas, sample_ddim, sample_ddpm, sample_dpmpp_2m,
                              sample_euler, sample_euler_maruyama, sample_heun, sample_langevin, sample_pc)
from gendiff.schedules import edm_sigmas
from gendiff.scores import with_score_mode

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
N = 4096
SMAX = 10.0
VPE = VP(-2 * math.log(80.0), -2 * math.log(0.002))   # VP over EDM's σ̃ ∈ [0.002, 80] (T2)


@pytest.fixture(scope="module")
def harness():
    gt = eight_gaussians()
    g = torch.Generator().manual_seed(11)
    draw = lambda: gt.sample(N, generator=g, dtype=F64)[0]  # noqa: E731
    pairs = [(draw(), draw()) for _ in range(10)]
    null_mmd = torch.tensor([mmd(a, b) for a, b in pairs])
    null_med = torch.tensor([median_nll(a, gt) - median_nll(b, gt) for a, b in pairs])
    ref = draw()
    x_T = gt.sample(N, SMAX, generator=g, dtype=F64)[0]       # exact p(x; σ_max): only the sampler errs
    z_T = torch.randn(N, 2, generator=g, dtype=F64)            # DDPM latent at T
    return dict(gt=gt, D=gt.denoiser("point"), ref=ref, x_T=x_T, z_T=z_T, ddpm=DDPM(1000),
                mmd_sd=float(null_mmd.std()), med_sd=float(null_med.std()), ref_med=median_nll(ref, gt))


def _gen():
    return torch.Generator().manual_seed(5)


SAMPLERS = {  # name -> (sampler on the harness); generous steps
    "euler": lambda h: sample_euler(h["D"], h["x_T"], edm_sigmas(256, 0.002, SMAX)),
    "heun": lambda h: sample_heun(h["D"], h["x_T"], edm_sigmas(64, 0.002, SMAX)),
    "heun-churn": lambda h: sample_heun(h["D"], h["x_T"], edm_sigmas(64, 0.002, SMAX), churn=20,
                                        generator=_gen()),
    "dpmpp_2m": lambda h: sample_dpmpp_2m(h["D"], h["x_T"], edm_sigmas(64, 0.002, SMAX)),
    "euler_maruyama-ve": lambda h: sample_euler_maruyama(h["D"], h["x_T"], edm_sigmas(512, 0.002, SMAX),
                                                         generator=_gen()),
    "euler_maruyama-vp": lambda h: sample_euler_maruyama(h["D"], h["x_T"], edm_sigmas(512, 0.002, SMAX),
                                                         process=VPE, generator=_gen()),
    "euler_maruyama-ve-process": lambda h: sample_euler_maruyama(h["D"], h["x_T"],
                                                                 edm_sigmas(512, 0.002, SMAX),
                                                                 process=VE(0.002, 80.0), generator=_gen()),
    "pc": lambda h: sample_pc(h["D"], h["x_T"], edm_sigmas(256, 0.002, SMAX), generator=_gen()),
    "pc-em-vp": lambda h: sample_pc(h["D"], h["x_T"], edm_sigmas(256, 0.002, SMAX),
                                    predictor="euler-maruyama", process=VPE, generator=_gen()),
    "langevin": lambda h: sample_langevin(h["D"], h["x_T"], ncsn_sigmas(h["ref"], 10, 0.01),
                                          steps_per_scale=100, generator=_gen()),
    # annealed Langevin mixes slowly: with 100 steps per scale a single broad Gaussian keeps ~10% of extra
    # covariance from the larger scales (measured; not a bug), 500 steps per scale remove it
    "langevin-long": lambda h: sample_langevin(h["D"], h["x_T"], ncsn_sigmas(h["ref"], 10, 0.01),
                                               steps_per_scale=500, generator=_gen()),
    "ddpm": lambda h: sample_ddpm(h["D"], h["z_T"], h["ddpm"], generator=_gen()),
    "ddim": lambda h: sample_ddim(h["D"], h["z_T"], h["ddpm"], 250),
}


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "langevin-long"])
def test_every_sampler_reproduces_the_ground_truth_with_the_exact_denoiser(harness, name):
    """Tolerance: 4 null standard deviations. MMD² and the median NLL of two independent ground-truth sets of
    N points scatter by this much; a sampler whose own bias were larger would fail."""
    x = SAMPLERS[name](harness)
    assert torch.isfinite(x).all()
    assert abs(mmd(x, harness["ref"])) < 4 * harness["mmd_sd"], (mmd(x, harness["ref"]), harness["mmd_sd"])
    diff = median_nll(x, harness["gt"]) - harness["ref_med"]
    assert abs(diff) < 4 * harness["med_sd"], (diff, harness["med_sd"])


def test_a_broken_sampler_fails_the_harness(harness):
    """The harness can fail: Euler with 4 steps is visibly off."""
    x = sample_euler(harness["D"], harness["x_T"], edm_sigmas(4, 0.002, SMAX))
    assert abs(mmd(x, harness["ref"])) > 4 * harness["mmd_sd"] or \
        abs(median_nll(x, harness["gt"]) - harness["ref_med"]) > 4 * harness["med_sd"]


# ---- DDPM and DDIM against T24, step by step ------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    gm = eight_gaussians()
    return gm.denoiser("point"), DDPM(50, "cosine"), torch.randn(512, 2,
                                                                 generator=torch.Generator().manual_seed(2),
                                                                 dtype=F64)


def test_ddpm_rules_agree_and_equal_the_t24_posterior_step_by_step(small):
    D, ddpm, z = small
    outs = {r: sample_ddpm(D, z, ddpm, rule=r, generator=_gen()) for r in ("x0", "eps", "score", "mu")}
    for r in ("eps", "score", "mu"):
        torch.testing.assert_close(outs[r], outs["x0"], rtol=1e-9, atol=1e-9)
    g, zz = _gen(), z.clone()                         # the same chain by hand: T24 with x̂0 = D(z/√ᾱ, σ̃)
    for t in range(ddpm.T, 0, -1):
        ab = float(ddpm.alpha_bar[t])
        x0 = D(zz / math.sqrt(ab), math.sqrt((1 - ab) / ab))
        mean, var = ddpm.posterior(zz, x0, t)
        zz = mean + (var.sqrt() * torch.randn(zz.shape, generator=g, dtype=F64) if t > 1 else 0)
    torch.testing.assert_close(outs["x0"], zz, rtol=1e-9, atol=1e-9)


def test_ddpm_variances(small):
    """σ_t = β_t differs from β̃_t; the learned interpolation v ≡ 0 is β̃ and v ≡ 1 is β (T26); the σ_φ
    variance of an exact predictor is β̃ + c_0²·Var[x0 | x_t] ≥ β̃."""
    D, ddpm, z = small
    bt = sample_ddpm(D, z, ddpm, variance="beta_tilde", generator=_gen())
    b = sample_ddpm(D, z, ddpm, variance="beta", generator=_gen())
    assert (bt - b).abs().max() > 1e-3
    torch.testing.assert_close(sample_ddpm(D, z, ddpm, v=lambda zt, t: torch.zeros_like(zt),
                                           generator=_gen()), bt)
    torch.testing.assert_close(sample_ddpm(D, z, ddpm, v=lambda zt, t: torch.ones_like(zt),
                                           generator=_gen()), b)
    phi = sample_ddpm(D, z, ddpm, variance="phi", generator=_gen())
    assert torch.isfinite(phi).all() and (phi - bt).abs().max() > 1e-6


def test_ddpm_phi_variance_is_beta_tilde_plus_the_posterior_variance_term(gauss):
    """variance='phi' with an exact Gaussian predictor: Σ_t = β̃_t + c_0²·Var[x0 | x_t] where Var[x0 | x̃] =
    C − C(C + σ̃²I)⁻¹C is the closed form (checked on one step: the sample spread around the rule's mean)."""
    gm = GaussianMixture([1.0], M[None], C[None])
    ddpm, t = DDPM(20, "cosine"), 7
    ab, om = float(ddpm.alpha_bar[t]), float(ddpm.one_minus_alpha_bar[t])
    s2 = om / ab
    n = 200000
    z = torch.full((n, 2), 0.1, dtype=F64)            # one x_t: the first step's spread is exactly √Σ_t
    steps = []
    sample_ddpm(gm.denoiser("point"), z, ddpm, variance="phi", t_start=t, generator=_gen(),
                callback=lambda i, zz, s, x0: steps.append(zz.clone()))
    b, om_prev = float(ddpm.betas[t]), float(ddpm.one_minus_alpha_bar[t - 1])
    c0 = math.sqrt(float(ddpm.alpha_bar[t - 1])) * b / om
    post = C - C @ torch.linalg.inv(C + s2 * torch.eye(2, dtype=F64)) @ C
    expect = b * om_prev / om + c0**2 * post.diagonal()
    got = steps[0].var(0)
    torch.testing.assert_close(got, expect, rtol=0.02, atol=0)


def test_ddim_eta0_converges_to_the_pf_ode_solution(gauss):
    """DDIM with η = 0 is a discretisation of the PF-ODE (T15): on N(m, C) its endpoint approaches the
    closed-form m + C^½(C + σ̃_T²I)^(−½)(x̃_T − m) as the steps grow (x̃_T = z_T/√ᾱ_T)."""
    ddpm = DDPM(1000)
    z = torch.randn(500, 2, generator=_gen(), dtype=F64)
    ab = float(ddpm.alpha_bar[ddpm.T])
    s2 = float(ddpm.one_minus_alpha_bar[ddpm.T]) / ab
    x_T = z / math.sqrt(ab)
    expect = M + (x_T - M) @ (_sqrtm(C) @ _sqrtm(C + s2 * torch.eye(2, dtype=F64), -0.5)).T
    err = [float((sample_ddim(gauss.denoiser(), z, ddpm, n) - expect).abs().max()) for n in (25, 100, 400)]
    assert err[2] < err[1] < err[0] and err[2] < 0.02, err


def test_ddim_eta1_is_ddpm_and_eta0_is_deterministic(small):
    D, ddpm, z = small
    torch.testing.assert_close(sample_ddim(D, z, ddpm, list(range(ddpm.T, 0, -1)), eta=1.0, generator=_gen()),
                               sample_ddpm(D, z, ddpm, generator=_gen()), rtol=1e-9, atol=1e-9)
    a = sample_ddim(D, z, ddpm, 25, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, sample_ddim(D, z, ddpm, 25, generator=torch.Generator().manual_seed(2)))


# ---- a single Gaussian: closed forms -----------------------------------------------------------------------

M = torch.tensor([0.3, -0.2], dtype=F64)
C = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=F64)


def _sqrtm(A, power=0.5):
    L, Q = torch.linalg.eigh(A)
    return Q @ torch.diag(L**power) @ Q.T


class _Gauss(GaussianMixture):
    """N(m, C) with the closed-form posterior mean D(x; σ) = m + C(C + σ²I)⁻¹(x − m) as its denoiser (cheaper
    than the mixture's general code; checked against it below)."""

    def denoiser(self, mode="point"):
        def D(x, sigma):
            A = C @ torch.linalg.inv(C + float(sigma) ** 2 * torch.eye(2, dtype=F64))
            return M + (x - M) @ A.T
        return D


@pytest.fixture(scope="module")
def gauss():
    g = _Gauss([1.0], M[None], C[None])
    x = torch.randn(50, 2, dtype=F64, generator=_gen())
    torch.testing.assert_close(g.denoiser()(x, 0.7), GaussianMixture.denoiser(g)(x, 0.7))
    return g


def test_deterministic_samplers_follow_the_closed_form_ode(gauss):
    """For N(m, C) the PF-ODE (T15) is linear: x(σ) = m + (C + σ²I)^½(C + σ_max²I)^(−½)(x_T − m)."""
    x_T = M + (torch.randn(2000, 2, generator=_gen(), dtype=F64)
               @ _sqrtm(C + SMAX**2 * torch.eye(2, dtype=F64)))
    s_min = 1e-4
    expect = M + (x_T - M) @ (_sqrtm(C + s_min**2 * torch.eye(2, dtype=F64))
                              @ _sqrtm(C + SMAX**2 * torch.eye(2, dtype=F64), -0.5)).T
    D = gauss.denoiser("point")
    grid = edm_sigmas(128, s_min, SMAX)
    for name, x in (("heun", sample_heun(D, x_T, grid)), ("dpmpp_2m", sample_dpmpp_2m(D, x_T, grid))):
        err = float((x - expect).abs().max())
        assert err < 2e-3, (name, err)
    coarse = [float((sample_dpmpp_2m(D, x_T, edm_sigmas(n, s_min, SMAX)) - expect).abs().max())
              for n in (16, 32)]
    assert coarse[1] < coarse[0] / 3, coarse     # second order: ~4× per doubling


@pytest.mark.parametrize("name", ["euler_maruyama-ve", "euler_maruyama-vp", "euler_maruyama-ve-process", "pc",
                                  "langevin-long", "ddpm", "ddim", "heun-churn"])
def test_stochastic_and_ddpm_samplers_match_the_gaussian_moments(gauss, name):
    """Sample mean and covariance of 20000 draws against m and C. Tolerance: 5 standard errors of the sample
    mean (√(C_ii/n)) and covariance (C_ii·√(2/n) scale) plus 0.01 for discretisation."""
    n = 20000
    g = torch.Generator().manual_seed(7)
    h = {"D": gauss.denoiser("point"), "x_T": gauss.sample(n, SMAX, generator=g, dtype=F64)[0],
         "z_T": torch.randn(n, 2, generator=g, dtype=F64), "ddpm": DDPM(1000),
         "ref": gauss.sample(n, generator=g, dtype=F64)[0]}
    x = SAMPLERS[name](h)
    se_mean = (C.diagonal() / n).sqrt()
    assert ((x.mean(0) - M).abs() < 5 * se_mean + 0.01).all(), (x.mean(0), M)
    cov = torch.cov(x.T)
    assert ((cov - C).abs() < 5 * C.diagonal().max() * math.sqrt(2 / n) + 0.01).all(), (cov, C)


# ---- bad knobs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda D, x, z, dd: sample_ddim(D, z, dd, 10, eta=1.5), "eta"),
    (lambda D, x, z, dd: sample_ddim(D, z, dd, 0), "steps"),
    (lambda D, x, z, dd: sample_ddim(D, z, dd, [5, 7]), "steps"),
    (lambda D, x, z, dd: sample_pc(D, x, edm_sigmas(8), snr=0.0), "snr"),
    (lambda D, x, z, dd: sample_pc(D, x, edm_sigmas(8), corrector_steps=-1), "corrector_steps"),
    (lambda D, x, z, dd: sample_pc(D, x, edm_sigmas(8), predictor="bogus"), "predictor"),
    (lambda D, x, z, dd: sample_pc(D, x, edm_sigmas(8), predictor="euler-maruyama"), "process"),
    (lambda D, x, z, dd: sample_pc(D, x, edm_sigmas(8), process=VPE), "only used by predictor"),
    (lambda D, x, z, dd: sample_ddpm(D, z, dd, variance="beta", v=lambda zt, t: zt * 0), "replaces variance"),
    (lambda D, x, z, dd: sample_ddpm(D, z, dd, variance="phi"), "predict"),
    (lambda D, x, z, dd: sample_ddpm(D, z, dd, v=lambda zt, t: torch.zeros(3)), "shape"),
    (lambda D, x, z, dd: sample_langevin(D, x, [1.0, 2.0]), "sigmas"),
    (lambda D, x, z, dd: sample_langevin(D, x, [1.0], steps_per_scale=0), "steps_per_scale"),
    (lambda D, x, z, dd: sample_langevin(D, x, [1.0], step_lr=-1.0), "step_lr"),
    (lambda D, x, z, dd: sample_dpmpp_2m(D, x, [1.0, 2.0, 0.0]), "sigmas"),
    (lambda D, x, z, dd: sample_euler_maruyama(D, x, [1.0]), "sigmas"),
    (lambda D, x, z, dd: sample_ddpm(D, z, dd, rule="bogus"), "rule"),
    (lambda D, x, z, dd: sample_ddpm(D, z, dd, variance="bogus"), "variance"),
    (lambda D, x, z, dd: sample_ddpm(D, z, dd, t_start=11), "t_start"),
    (lambda D, x, z, dd: sample_heun(with_score_mode(D, "bogus"), x, edm_sigmas(8)), "score_mode"),
    (lambda D, x, z, dd: ncsn_sigmas(x[:1]), "2 data points"),
])
def test_bad_knobs_raise_a_clear_error(call, match, gauss):
    D, x = gauss.denoiser("point"), torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match=match):
        call(D, x, x, DDPM(10))


def test_every_sampler_follows_the_score_mode_wrapper():
    """T14 through the wrapper `with_score_mode`: with a head-less σ_φ = c_var denoiser the T14 score differs
    from T13, so every sampler handed the wrapped denoiser moves differently."""
    from gendiff.nets.mlp import toy_denoiser
    torch.manual_seed(0)
    den = toy_denoiser("none").double()
    x = torch.randn(64, 2, dtype=F64, generator=_gen())
    for f in (lambda d: sample_heun(d, x, edm_sigmas(4)),
              lambda d: sample_dpmpp_2m(d, x, edm_sigmas(4)),
              lambda d: sample_euler_maruyama(d, x, edm_sigmas(4), generator=_gen()),
              lambda d: sample_pc(d, x, edm_sigmas(4), generator=_gen()),
              lambda d: sample_langevin(d, x, [1.0, 0.1], steps_per_scale=2, generator=_gen()),
              lambda d: sample_ddpm(d, x, DDPM(10), generator=_gen()),
              lambda d: sample_ddim(d, x, DDPM(10), 5)):
        assert torch.equal(f(with_score_mode(den, "tweedie")), f(den))
        assert (f(den) - f(with_score_mode(den, "phi"))).abs().max() > 1e-6


def test_langevin_corrector_step_has_the_target_snr(gauss):
    """T30: ε = 2(r·‖z‖/‖s‖)² (batch-mean norms) makes ‖ε·s‖/‖√(2ε)·z‖ = r; the step is x + ε·s + √(2ε)·z."""
    from gendiff.samplers import _langevin_snr_step
    D, r, sigma = gauss.denoiser(), 0.16, 0.3
    x = torch.randn(256, 2, dtype=F64, generator=_gen())
    out = _langevin_snr_step(D, x, sigma, r, torch.Generator().manual_seed(9))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    s = (D(x, sigma) - x) / sigma**2
    eps = 2 * (r * z.norm(dim=1).mean() / s.norm(dim=1).mean()) ** 2
    torch.testing.assert_close(out, x + eps * s + (2 * eps).sqrt() * z)
    snr = (eps * s).norm(dim=1).mean() / ((2 * eps).sqrt() * z).norm(dim=1).mean()
    assert float(snr) == pytest.approx(r, rel=1e-12)


# ---- the registry harness: every entry of samplers.GRID_SAMPLERS meets an analytic oracle ------------------

def _ode_endpoint_oracle(steps, tol):
    """Deterministic: on N(m, C) the PF-ODE (T15) endpoint m + (C + σ_min²I)^½(C + σ_max²I)^(−½)(x_T − m)
    within `tol` at `steps`, and the error shrinks when the steps double (a converging discretisation)."""
    def check(sampler, D):
        x_T = M + (torch.randn(2000, 2, generator=_gen(), dtype=F64)
                   @ _sqrtm(C + SMAX**2 * torch.eye(2, dtype=F64)))
        s_min = 1e-4
        expect = M + (x_T - M) @ (_sqrtm(C + s_min**2 * torch.eye(2, dtype=F64))
                                  @ _sqrtm(C + SMAX**2 * torch.eye(2, dtype=F64), -0.5)).T
        err = [float((sampler(D, x_T, edm_sigmas(n, s_min, SMAX), generator=_gen()) - expect).abs().max())
               for n in (steps // 2, steps)]
        assert err[1] < tol and err[1] < err[0], err
    return check


def _moments_oracle(steps):
    """Stochastic: from exact p(x; σ_max) the samples have N(m, C)'s mean and covariance
    (5 standard errors plus 0.01 for discretisation, as
    test_stochastic_and_ddpm_samplers_match_the_gaussian_moments)."""
    def check(sampler, D):
        n, g = 20000, torch.Generator().manual_seed(7)
        x_T = M + torch.randn(n, 2, generator=g, dtype=F64) @ _sqrtm(C + SMAX**2 * torch.eye(2, dtype=F64))
        x = sampler(D, x_T, edm_sigmas(steps, 0.002, SMAX), generator=_gen())
        assert ((x.mean(0) - M).abs() < 5 * (C.diagonal() / n).sqrt() + 0.01).all(), (x.mean(0), M)
        cov = torch.cov(x.T)
        assert ((cov - C).abs() < 5 * C.diagonal().max() * math.sqrt(2 / n) + 0.01).all(), (cov, C)
    return check


GRID_ORACLES = {  # samplers.GRID_SAMPLERS name -> its analytic oracle on N(m, C)
    "euler": _ode_endpoint_oracle(2048, 5e-3),      # first order: 0.0094 at 512 steps
    "heun": _ode_endpoint_oracle(128, 2e-3),
    "dpmpp_2m": _ode_endpoint_oracle(128, 2e-3),
    "euler_maruyama": _moments_oracle(512),
    "pc": _moments_oracle(256),
}


def test_every_grid_sampler_has_an_oracle():
    """A new entry of GRID_SAMPLERS must bring its oracle (diffusers' SchedulerCommonTest, with analytic
    references). Breakage tried: Heun's corrector averaging d and d_next with weights (1, 0) instead of ½ each
    (i.e. Euler under Heun's name): test_grid_sampler_meets_its_oracle[heun] failed."""
    assert set(GRID_ORACLES) == set(GRID_SAMPLERS)


@pytest.mark.parametrize("name", sorted(GRID_SAMPLERS))
def test_grid_sampler_meets_its_oracle(gauss, name):
    GRID_ORACLES[name](GRID_SAMPLERS[name], gauss.denoiser("point"))
