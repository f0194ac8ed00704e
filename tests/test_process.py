"""Forward processes (THEORY §1 T1–T2, §6 T23–T24) against analytic oracles, in float64.

Oracles: α² + σ² = 1 (VP); λ = log(α²/σ²) and its inverse; the T2 map x̃ = z/α = x0 + e^{−λ/2}ε; the
exact mixture denoiser giving one x0 estimate for VE, VP, flow matching and DDPM at matched λ (VDM++ §2);
DDPM's β, ᾱ and cosine closed forms rebuilt here; q(x_t | x0) against a simulated T23 Markov chain; the
T24 posterior against Gaussian conditioning of the joint of (x_{t−1}, x_t) given x0.

Breakages verified to fail here (one at a time, in a scratch copy of gendiff/process.py):
- wrong sign of λ in FlowMatching.lam (2 log(t/(1−t)))  → log-ratio, roundtrip, closed-form, T2 tests
- wrong sign of λ in VE.lam (+2 log σ)                  → log-ratio, roundtrip/decreasing, T2 tests
- VP λ increasing in t (endpoints swapped)              → roundtrip/decreasing, VP, VDM++ tests
- wrong sign in FlowMatching.t_of_lam                   → roundtrip, VDM++ tests
- missing sqrt in VP.alpha (α = sigmoid(λ))             → log-ratio, α²+σ²=1, T2, VDM++ tests
- σ̃ = σ/α² instead of σ/α in to_ve                      → T2, VDM++ tests
- missing sqrt of α_t in the T24 posterior mean         → posterior tests
- off-by-one ᾱ_t for ᾱ_{t−1} in the T24 posterior       → posterior tests (both in √ᾱ_{t−1} and 1 − ᾱ_{t−1})
- off-by-one ᾱ_t = ∏_{i<t} α_i                          → cumprod, cosine, Markov-chain, posterior, λ tests
- cosine β clipped at 0.99 instead of 0.999             → cosine closed-form test
"""
from __future__ import annotations

import math

import pytest
import torch

from gendiff.process import DDPM, PROCESSES, VE, VP, FlowMatching, Process, make_process

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000
PROCS = {
    "ve": VE(),
    "vp": VP(),
    "flow": FlowMatching(),
    "ddpm-linear": DDPM(),
    "ddpm-cosine": DDPM(schedule="cosine"),
}


def _times(proc: Process) -> torch.Tensor:
    """Interior times: steps 1..T (and fractional ones) for DDPM, (0, 1) otherwise."""
    if isinstance(proc, DDPM):
        return torch.cat([torch.arange(1, T + 1, dtype=F64), torch.linspace(1, T, 777, dtype=F64)])
    return torch.linspace(0.01, 0.99, 99, dtype=F64)


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- λ and its inverse (T1) ---------------------------------------------------------------------

@pytest.mark.parametrize("name", PROCS)
def test_lam_is_log_snr(name):
    p, t = PROCS[name], _times(PROCS[name])
    a, s = p.alpha(t), p.sigma(t)
    _close(p.lam(t), torch.log(a**2 / s**2))             # T1
    _close(p.sigma_ve(t), torch.exp(-p.lam(t) / 2))


@pytest.mark.parametrize("name", PROCS)
def test_lam_roundtrip_and_decreasing(name):
    p, t = PROCS[name], _times(PROCS[name])
    lam = p.lam(t)
    _close(p.t_of_lam(lam), t)
    lam_grid = torch.linspace(lam.min().item(), lam.max().item(), 301, dtype=F64)
    _close(p.lam(p.t_of_lam(lam_grid)), lam_grid)
    ts = t.sort().values.unique()
    assert torch.all(p.lam(ts).diff() < 0)


def test_vp_is_variance_preserving():
    p = VP(lam_min=-15, lam_max=12)
    t = torch.linspace(0, 1, 201, dtype=F64)
    _close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t))
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    _close(p.lam(ends), torch.tensor([12.0, -15.0], dtype=F64))  # the stated endpoints


def test_closed_forms_of_ve_and_flow():
    t = torch.linspace(0.01, 0.99, 50, dtype=F64)
    ve = VE(0.002, 80)
    _close(ve.sigma(t), 0.002 * (80 / 0.002) ** t)
    _close(ve.alpha(t), torch.ones_like(t))
    fm = FlowMatching()
    _close(fm.alpha(t), 1 - t)
    _close(fm.sigma(t), t)
    _close(fm.lam(t), 2 * torch.log((1 - t) / t))


# ---- the T2 map onto VE -------------------------------------------------------------------------

@pytest.mark.parametrize("name", PROCS)
def test_to_ve_preserves_lam_and_inverts(name):
    p = PROCS[name]
    t = _times(p)[::37]                                   # [N]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(t.numel(), 3, generator=gen, dtype=F64)
    eps = torch.randn(t.numel(), 3, generator=gen, dtype=F64)
    z = p.perturb(x0, t, eps)
    x_tilde, sigma_tilde = p.to_ve(z, t)
    assert sigma_tilde.shape == t.shape
    _close(sigma_tilde, torch.exp(-p.lam(t) / 2))         # σ̃ = σ/α = exp(−λ/2)
    _close(x_tilde, x0 + sigma_tilde[:, None] * eps)      # x̃ = x0 + σ̃ε
    _close(p.from_ve(x_tilde, t), z)
    t0 = t[1]                                             # one scalar t for the batch
    x_tilde, sigma_tilde = p.to_ve(z, t0)
    assert sigma_tilde.ndim == 0
    _close(x_tilde, z / p.alpha(t0))
    _close(p.from_ve(x_tilde, t0), z)


# ---- VDM++: one VE denoiser serves every process --------------------------------------------------

def test_one_denoiser_serves_every_process(tree_a):
    D = tree_a.denoiser("point")
    n = 64
    gen = torch.Generator().manual_seed(1)
    x0, _ = tree_a.sample(n, generator=gen, dtype=F64)
    eps = torch.randn(n, 2, generator=gen, dtype=F64)
    lam = torch.linspace(-4, 4, n, dtype=F64)             # matched λ, one per point
    s = torch.exp(-lam / 2)
    reference = D(x0 + s[:, None] * eps, s)               # the VE denoiser at σ̃ = exp(−λ/2)
    ls = torch.nn.functional.logsigmoid
    analytic = {                                          # (α, σ) at λ, from each process's definition
        "vp": (torch.exp(ls(lam) / 2), torch.exp(ls(-lam) / 2)),
        "ddpm-linear": (torch.exp(ls(lam) / 2), torch.exp(ls(-lam) / 2)),
        "flow": (torch.sigmoid(lam / 2), torch.sigmoid(-lam / 2)),   # 1 − t, t with t = sigmoid(−λ/2)
        "ve": (torch.ones_like(lam), s),
    }
    for name, (alpha, sigma) in analytic.items():
        p = PROCS[name]
        z = alpha[:, None] * x0 + sigma[:, None] * eps   # T1
        _close(p.denoise(D, z, p.t_of_lam(lam)), reference)


# ---- DDPM (T23, T24) ----------------------------------------------------------------------------

def _linear_betas():
    return torch.linspace(1e-4, 0.02, T, dtype=F64)


def test_ddpm_linear_alpha_bar_is_cumprod():
    p = PROCS["ddpm-linear"]
    beta = _linear_betas()
    _close(p.betas[1:], beta)
    _close(p.alpha_bar[1:], torch.cumprod(1 - beta, 0), tol=1e-12)
    assert p.alpha_bar[0] == 1 and p.betas[0] == 0
    steps = torch.arange(1, T + 1)
    _close(p.alpha(steps.to(F64)) ** 2, torch.cumprod(1 - beta, 0))
    _close(p.sigma(steps.to(F64)) ** 2, 1 - torch.cumprod(1 - beta, 0))


def test_ddpm_cosine_closed_form():
    s = 0.008
    p = PROCS["ddpm-cosine"]
    t = torch.arange(T + 1, dtype=F64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    ab = f / f[0]                                         # IDDPM eq. 17
    beta = 1 - ab[1:] / ab[:-1]
    clipped = beta > 0.999
    first = int(clipped.nonzero()[0]) + 1 if clipped.any() else T + 1  # first clipped step
    assert first > T // 2
    _close(p.alpha_bar[:first], ab[:first])               # the closed form until the clip matters
    _close(p.betas[1:], beta.clamp(max=0.999))
    _close(p.alpha_bar[1:], torch.cumprod(1 - beta.clamp(max=0.999), 0))


def test_ddpm_marginal_matches_markov_chain():
    """q(x_t | x0) = N(√ᾱ_t x0, 1 − ᾱ_t) (T23) against x_t = √α_t x_{t−1} + √β_t ε simulated step by step."""
    p = PROCS["ddpm-linear"]
    beta = _linear_betas()
    gen = torch.Generator().manual_seed(2)
    n, x0 = 50_000, 1.5
    x = torch.full((n,), x0, dtype=F64)
    checks = {10: None, 100: None, 400: None, T: None}
    for t in range(1, T + 1):
        x = (1 - beta[t - 1]).sqrt() * x + beta[t - 1].sqrt() * torch.randn(n, generator=gen, dtype=F64)
        if t in checks:
            checks[t] = (x.mean().item(), x.var().item())
    for t, (mean, var) in checks.items():
        tt = torch.tensor(float(t), dtype=F64)
        exp_var = p.sigma(tt).item() ** 2
        assert abs(var - exp_var) < 5 * exp_var * math.sqrt(2 / n) + 1e-12, (t, var, exp_var)
        assert abs(mean - p.alpha(tt).item() * x0) < 5 * math.sqrt(exp_var / n), (t, mean)
        assert exp_var == pytest.approx(1 - p.alpha_bar[t].item(), rel=1e-10)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_posterior_is_gaussian_conditional(schedule):
    p = PROCS[f"ddpm-{schedule}"]
    steps = torch.tensor([1, 2, 10, 500, 999, T])
    beta = p.betas[steps]
    ab_prev = torch.cumprod(1 - p.betas, 0)[steps - 1]    # ᾱ_{t−1}, ᾱ_0 = 1
    # joint given x0: x_{t−1} ~ N(√ᾱ_{t−1} x0, 1 − ᾱ_{t−1}), x_t | x_{t−1} ~ N(√α_t x_{t−1}, β_t)
    v11 = 1 - ab_prev
    v12 = (1 - beta).sqrt() * v11
    v22 = (1 - beta) * v11 + beta
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(steps.numel(), 4, generator=gen, dtype=F64)
    x_t = torch.randn(steps.numel(), 4, generator=gen, dtype=F64)
    m1 = ab_prev.sqrt()[:, None] * x0
    m2 = (1 - beta).sqrt()[:, None] * m1
    mean_ref = m1 + (v12 / v22)[:, None] * (x_t - m2)
    var_ref = v11 - v12**2 / v22
    mean, var = p.posterior(x_t, x0, steps)
    _close(mean, mean_ref)
    _close(var.squeeze(-1), var_ref)
    _close(var[0, 0], torch.tensor(0.0, dtype=F64))       # t = 1: x0 is known exactly
    m_scalar, v_scalar = p.posterior(x_t[3], x0[3], 500)  # scalar step
    _close(m_scalar, mean_ref[3])
    _close(v_scalar, var_ref[3])


# ---- bad settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kw, option", [
    ("ve", dict(sigma_min=1.0, sigma_max=1.0), "sigma_min"),
    ("ve", dict(sigma_min=-1.0), "sigma_min"),
    ("vp", dict(lam_min=3.0, lam_max=-3.0), "lam_min"),
    ("vp", dict(lam_max=math.inf), "lam_max"),
    ("ddpm", dict(T=0), "T"),
    ("ddpm", dict(T=10.5), "T"),
    ("ddpm", dict(beta_start=0.0), "beta_start"),
    ("ddpm", dict(beta_end=1.0), "beta_end"),
    ("ddpm", dict(schedule="sqrt"), "schedule"),
    ("ddpm", dict(cosine_s=-0.1), "cosine_s"),
])
def test_bad_settings_name_the_option(name, kw, option):
    with pytest.raises(ValueError, match=option):
        make_process(name, **kw)


def test_registry_and_bad_inputs():
    assert set(PROCESSES) == {"ve", "vp", "flow", "ddpm"}
    with pytest.raises(ValueError, match=r"process='edm'.*ddpm.*flow.*ve.*vp"):
        make_process("edm")
    p = PROCS["ddpm-linear"]
    with pytest.raises(ValueError, match="step t"):
        p.lam(torch.tensor([0.5], dtype=F64))
    with pytest.raises(ValueError, match="lam"):
        p.t_of_lam(torch.tensor([50.0], dtype=F64))
    with pytest.raises(ValueError, match="step t"):
        p.posterior(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]))
