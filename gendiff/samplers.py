"""Samplers: pure functions over the denoiser contract `D(x, σ) -> μ` (STYLE 1).

`sample_<name>(denoiser, x, sigmas_or_steps, *, generator=None, callback=None, **knobs) -> x`. The σ-grid
samplers (Euler, Heun, DPM-Solver++(2M), Euler–Maruyama, predictor–corrector) take a strictly decreasing VE
grid ending in 0 (`schedules.edm_sigmas`), with `x` at σ = sigmas[0]; annealed Langevin takes its noise
scales σ_1 > … > σ_L (`ncsn_sigmas`); DDPM and DDIM take the DDPM latent z_T and a `process.DDPM`.
Samplers know only the denoiser: the score they follow is chosen by wrapping it, `scores.with_score_mode(D,
mode, hybrid_sigma)` (tweedie: T13; phi: T14; hybrid: T14 below `hybrid_sigma`), so "does σ_φ make a better
score?" can be asked of each; `scores.CountCalls(D)` counts its evaluations. Each docstring gives the
sampler's NFE (denoiser evaluations). Stochastic samplers draw all noise from `generator`.
callback(i, x, sigma, denoised) is called after every step with the new x.
"""
from __future__ import annotations

import math

import torch

from .checks import check_choice, check_positive
from .io import randn
from .process import DDPM_VARIANCES  # noqa: F401  (re-exported: the choices of sample_ddpm's variance)


def _randn(x, generator):
    return randn(x.shape, generator, x.dtype).to(x.device)   # a torch.Generator or an io.StackedGenerator


def _check_grid(sigmas) -> list:
    s = [float(v) for v in sigmas]
    if len(s) < 2 or s[-1] != 0 or not all(math.isfinite(v) and v > 0 for v in s[:-1]) \
            or any(a <= b for a, b in zip(s, s[1:])):
        raise ValueError("sigmas must be a strictly decreasing grid of finite σ > 0 ending in a single 0 "
                         f"(e.g. edm_sigmas()); got {s[:3]}…{s[-2:]}")
    return s


def _churn(x, sigma, steps, churn, s_tmin, s_tmax, s_noise, generator):
    """EDM Algorithm 2 lines 4–6: raise σ to σ̂ = σ(1 + γ) and add the matching fresh noise."""
    gamma = min(churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * _randn(x, generator), sigma_hat


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                s_noise: float = 1.0, second_order: bool = True, generator=None, callback=None):
    """EDM Algorithm 2 (Karras et al. 2022): Heun's 2nd-order method on the PF-ODE dx/dσ = (x − D)/σ (T15),
    with optional stochastic churn. `second_order=False` gives Euler. NFE = 2·steps − 1 (Heun), steps (Euler).
    """
    check_positive("churn", churn, allow_zero=True)
    check_positive("s_tmin", s_tmin, allow_zero=True)
    if not (isinstance(s_tmax, (int, float)) and not isinstance(s_tmax, bool) and s_tmax >= s_tmin):
        raise ValueError(f"s_tmax={s_tmax!r} must be a number >= s_tmin={s_tmin!r} (math.inf: no upper gate)")
    check_positive("s_noise", s_noise, allow_zero=True)
    sigmas = _check_grid(sigmas)
    steps = len(sigmas) - 1
    for i in range(steps):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        x, s_hat = _churn(x, s_cur, steps, churn, s_tmin, s_tmax, s_noise, generator)
        denoised = denoiser(x, s_hat)
        d = (x - denoised) / s_hat
        x_next = x + (s_next - s_hat) * d
        if second_order and s_next > 0:
            d_next = (x_next - denoiser(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * (d + d_next) / 2
        x = x_next
        if callback is not None:
            callback(i, x, s_next, denoised)
    return x



def sample_euler(denoiser, x, sigmas, **knobs):
    """Euler's method on the PF-ODE (T15): `sample_heun(..., second_order=False)`. NFE = steps."""
    return sample_heun(denoiser, x, sigmas, second_order=False, **knobs)


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep data-prediction solver of the PF-ODE (T15) in VE
    space. With h_i = log(σ_i/σ_{i+1}) the exact solution of dx/dσ = (x − D)/σ for a D constant over the step
    is x_{i+1} = (σ_{i+1}/σ_i)·x_i + (1 − σ_{i+1}/σ_i)·D; 2M replaces D by the linear extrapolation in log σ
    D̂ = (1 + 1/(2r))·D_i − D_{i−1}/(2r), r = h_{i−1}/h_i, from the second step on; the first step uses D_0
    and the last (to σ = 0) returns D_i (both first order). Deterministic (`generator` unused).
    NFE = steps."""
    sigmas = _check_grid(sigmas)
    d_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        d = denoiser(x, s_cur)
        h = math.log(s_cur / s_next) if s_next > 0 else None
        d_hat = d
        if d_prev is not None and h is not None:
            r = h_prev / h
            d_hat = (1 + 1 / (2 * r)) * d - d_prev / (2 * r)
        x = d_hat if s_next == 0 else (s_next / s_cur) * x + (1 - s_next / s_cur) * d_hat
        d_prev, h_prev = d, h
        if callback is not None:
            callback(i, x, s_next, d)
    return x


def _ve_reverse_step(denoiser, x, s_cur, s_next, generator):
    """One reverse-diffusion step of the VE SDE (T16) from σ_i to σ_{i+1}: the discretised reverse SDE
    x + (σ_i² − σ_{i+1}²)·s(x; σ_i) + √(σ_i² − σ_{i+1}²)·z. To σ = 0 it returns the noiseless mean
    x + σ_i²·s = D(x; σ_i) (Tweedie, T13). Returns (x_next, D(x; σ_i))."""
    d = denoiser(x, s_cur)
    if s_next == 0:
        return d, d
    var = s_cur**2 - s_next**2
    score = (d - x) / s_cur**2
    return x + var * score + math.sqrt(var) * _randn(x, generator), d


def _process_coefficients(process, t: float):
    """f(t) = d log α/dt and g²(t) = dσ²/dt − 2f·σ² of the forward SDE dz = f·z dt + g dw whose marginals are
    the process's z = α·x0 + σ·ε (T1), by autograd at a scalar t."""
    tt = torch.tensor(float(t), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        log_a, s2 = torch.log(process.alpha(tt)), process.sigma(tt) ** 2
        f = torch.autograd.grad(log_a, tt, allow_unused=True)[0] if log_a.requires_grad else None  # VE: α ≡ 1
        ds2 = torch.autograd.grad(s2, tt)[0]
    f = 0.0 if f is None else float(f)
    return f, float(ds2) - 2 * f * float(s2)


def _em_step(denoiser, x, s_cur, s_next, process, generator):
    """One Euler–Maruyama step of the reverse SDE (T16) from σ̃_i to σ̃_{i+1} (> 0) under `process`, in VE
    coordinates in and out (x̃ = z/α, T2); process=None is the VE step. Returns (x_next, D(x; σ_i))."""
    if process is None:
        return _ve_reverse_step(denoiser, x, s_cur, s_next, generator)
    t, t_next = (float(v) for v in process.t_of_lam(-2 * torch.log(torch.tensor([s_cur, s_next],
                                                                                   dtype=torch.float64))))
    tt = torch.tensor(t, dtype=torch.float64)
    a, sg = float(process.alpha(tt)), float(process.sigma(tt))
    f, g2 = _process_coefficients(process, t)
    d = denoiser(x, s_cur)
    z = a * x
    score_z = (a * d - z) / sg**2
    dt = t - t_next                                                    # > 0: backwards in time
    z = z - (f * z - g2 * score_z) * dt + math.sqrt(g2 * dt) * _randn(z, generator)
    return z / float(process.alpha(torch.tensor(t_next, dtype=torch.float64))), d


@torch.no_grad()
def sample_euler_maruyama(denoiser, x, sigmas, *, process=None, generator=None, callback=None):
    """Euler–Maruyama on the reverse SDE (T16) over the σ grid. process=None: the VE SDE in σ,
    x ← x + (σ_i² − σ_{i+1}²)·s + √(σ_i² − σ_{i+1}²)·z. A `process.Process` (VP, flow matching, …): the grid's
    σ̃ are mapped to that process's times t_i (λ = −2 log σ̃, T2) and the reverse SDE
    dz = [f·z − g²·s_z] dt + g dw̄ of its latent z = α·x̃ (f = d log α/dt, g² = dσ²/dt − 2fσ²; VP: f = −β/2,
    g² = β) is stepped in t, with s_z(z, t) = (α·D(z/α; σ/α) − z)/σ². `x` and the result are in VE space
    (x̃ = z/α). The last step (to σ = 0) returns D(x; σ_last) without noise. NFE = steps."""
    sigmas = _check_grid(sigmas)
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        x, d = _em_step(denoiser, x, s_cur, s_next, None if s_next == 0 else process, generator)
        if callback is not None:
            callback(i, x, s_next, d)
    return x


PREDICTORS = ("reverse-diffusion", "euler-maruyama", "none")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _langevin_snr_step(denoiser, x, sigma, snr, generator):
    """One Langevin corrector step at σ with the step size of a target SNR r (T30):
    ε = 2·(r·‖z‖/‖s‖)² with the norms averaged over the batch (as score SDE does: per-example norms blow the
    step up wherever s ≈ 0, e.g. at a mode's centre in low dimension), x ← x + ε·s + √(2ε)·z."""
    score = (denoiser(x, sigma) - x) / sigma**2
    z = _randn(x, generator)
    z_norm, s_norm = z.flatten(1).norm(dim=1).mean(), score.flatten(1).norm(dim=1).mean()
    eps = 2 * (snr * z_norm / s_norm.clamp_min(1e-30)) ** 2
    return x + eps * score + torch.sqrt(2 * eps) * z


@torch.no_grad()
def sample_pc(denoiser, x, sigmas, *, snr: float = 0.16, corrector_steps: int = 1,
              predictor: str = "reverse-diffusion", process=None, generator=None, callback=None):
    """Predictor–corrector (Song et al. 2021, T30): per step a predictor from σ_i to σ_{i+1}
    (reverse-diffusion: the VE step of `sample_euler_maruyama`; euler-maruyama: its step under `process`;
    none: only the corrector, i.e. annealed Langevin with the SNR rule), then `corrector_steps` Langevin steps
    at σ_{i+1}: x ← x + ε·s + √(2ε)·z with ε = 2·(r·‖z‖/‖s‖)² (batch-mean norms), so that the step's
    signal-to-noise ratio ‖ε·s‖/‖√(2ε)·z‖ is the target r = `snr` on average. The last step (to σ = 0) returns
    D(x; σ_last). NFE = steps + corrector_steps·(steps − 1) (predictor "none": one fewer per step but the
    last)."""
    check_positive("snr", snr)
    _check_int("corrector_steps", corrector_steps, 0)
    check_choice("predictor", predictor, PREDICTORS)
    if predictor == "euler-maruyama" and process is None:
        raise ValueError("predictor='euler-maruyama' needs process= (a process.Process); "
                         "for the VE SDE use predictor='reverse-diffusion'")
    if process is not None and predictor != "euler-maruyama":
        raise ValueError(f"process={process!r} is only used by predictor='euler-maruyama'; got "
                         f"predictor={predictor!r}")
    sigmas = _check_grid(sigmas)
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        d = None
        if s_next == 0:
            x, d = _ve_reverse_step(denoiser, x, s_cur, 0.0, generator)
        elif predictor != "none":
            x, d = _em_step(denoiser, x, s_cur, s_next, process if predictor == "euler-maruyama" else None,
                            generator)
        if s_next > 0:
            for _ in range(corrector_steps):
                x = _langevin_snr_step(denoiser, x, s_next, snr, generator)
        if callback is not None:
            callback(i, x, s_next, d)
    return x


def ncsn_sigmas(data: torch.Tensor, levels: int = 10, sigma_min: float = 0.01, max_points: int = 4096):
    """NCSN noise scales (T28): geometric from σ_1 = the maximum pairwise distance of a data sample (NCSNv2's
    technique 1: σ_1 must reach across the data) down to σ_L = sigma_min, [levels] float64, decreasing.
    At most `max_points` points (the first ones) enter the distance."""
    _check_int("levels", levels, 2)
    check_positive("sigma_min", sigma_min)
    x = data[:max_points].flatten(1).double()
    if len(x) < 2:
        raise ValueError(f"ncsn_sigmas needs at least 2 data points; got {len(x)}")
    sigma_max = float(torch.cdist(x, x).max())
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_min={sigma_min} must be below the data's maximum pairwise distance "
                         f"{sigma_max:.4g}")
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), levels, dtype=torch.float64))


@torch.no_grad()
def sample_langevin(denoiser, x, sigmas, *, steps_per_scale: int = 100, step_lr: float = 2e-5,
                    final_denoise: bool = True, generator=None, callback=None):
    """Annealed Langevin dynamics of NCSN (T29): for each noise scale σ_i of `sigmas` (decreasing, all > 0;
    `ncsn_sigmas`), `steps_per_scale` steps x ← x + (α_i/2)·s(x; σ_i) + √α_i·z with α_i = δ·σ_i²/σ_L²
    (δ = `step_lr`); `final_denoise` then returns D(x; σ_L) (NCSNv2's last denoising step, Tweedie T13).
    NFE = len(sigmas)·steps_per_scale (+ 1 with final_denoise). callback after each scale."""
    _check_int("steps_per_scale", steps_per_scale, 1)
    check_positive("step_lr", step_lr)
    s = [float(v) for v in sigmas]
    if len(s) < 1 or not all(math.isfinite(v) and v > 0 for v in s) or any(a <= b for a, b in zip(s, s[1:])):
        raise ValueError("sigmas must be strictly decreasing noise scales > 0 (ncsn_sigmas(data)); got "
                         f"{s[:3]}…")
    d = None
    for i, sigma in enumerate(s):
        alpha = step_lr * sigma**2 / s[-1] ** 2
        for _ in range(steps_per_scale):
            d = denoiser(x, sigma)
            x = x + alpha / 2 * (d - x) / sigma**2 + math.sqrt(alpha) * _randn(x, generator)
        if callback is not None:
            callback(i, x, sigma, d)
    return denoiser(x, s[-1]) if final_denoise else x


DDPM_RULES = ("x0", "eps", "score", "mu")


def _ddpm_x0(denoiser, z, ddpm, t: int):
    """x̂0 = D(z/√ᾱ_t; √((1 − ᾱ_t)/ᾱ_t)), the VE denoiser read at the DDPM latent (T2)."""
    ab, om = float(ddpm.alpha_bar[t]), float(ddpm.one_minus_alpha_bar[t])
    return denoiser(z / math.sqrt(ab), math.sqrt(om / ab))


@torch.no_grad()
def sample_ddpm(denoiser, z, ddpm, *, rule: str = "eps", variance: str = "beta_tilde", v=None, x0_var=None,
                t_start=None, generator=None, callback=None):
    """DDPM ancestral sampling (T25) from the latent z_T ~ N(0, I) of `ddpm` (a process.DDPM, or its
    `respaced(k)`), t = T … 1 (or from z at step `t_start` ≤ T, e.g. √ᾱ_t·x̃ with x̃ ~ p(x; σ̃_t), to start
    where the σ-grid samplers do): x_{t−1} = mean + √Σ_t·z (no noise at t = 1). The mean by seed 004's update
    for each parameterisation, all read from the one denoiser: x0: c_t·x_t + c_0·x̂0; eps:
    (x_t − β_t/√(1 − ᾱ_t)·ε̂)/√α_t; score: (x_t + β_t·ŝ)/√α_t; mu: T24's posterior mean
    `ddpm.posterior(x_t, x̂0)` — equal up to rounding (tested). Σ_t (`DDPM.reverse_step`, shared with
    `likelihood.ddpm_vlb`): beta (β_t), beta_tilde (β̃_t, T24), phi (T38: β̃_t + c_0²·(σ_φ² − σ̃²)⁺, the
    confidence head's Var[x0 | x_t] per element through the x0 coefficient c_0 = √ᾱ_{t−1}β_t/(1 − ᾱ_t), from
    the same `predict` call as the mean), analytic (T38 with Analytic-DPM's one number per step, x0_var =
    `process.analytic_variances(...)`, [T + 1]), or a learned interpolation `v(z_t, t) -> v` (IDDPM, T26):
    Σ = exp(v·log β_t + (1 − v)·log β̃_t). Returns x_0 (data units, ᾱ_0 = 1). NFE = t_start (T by default)."""
    check_choice("rule", rule, DDPM_RULES)
    ddpm.check_reverse_variance(variance, denoiser=denoiser, x0_var=x0_var, v=v)
    t_start = ddpm.T if t_start is None else t_start
    _check_int("t_start", t_start, 1)
    if t_start > ddpm.T:
        raise ValueError(f"t_start={t_start} must be <= T={ddpm.T}")
    for t in range(t_start, 0, -1):
        ab, om = float(ddpm.alpha_bar[t]), float(ddpm.one_minus_alpha_bar[t])
        a, b = float(ddpm.alphas[t]), float(ddpm.betas[t])
        ab_prev, om_prev = float(ddpm.alpha_bar[t - 1]), float(ddpm.one_minus_alpha_bar[t - 1])
        x0, var = ddpm.reverse_step(denoiser, z, t, variance, x0_var=x0_var, v=v)
        eps = (z - math.sqrt(ab) * x0) / math.sqrt(om)
        if rule == "x0":
            mean = (math.sqrt(a) * om_prev / om) * z + (math.sqrt(ab_prev) * b / om) * x0
        elif rule == "eps":
            mean = (z - b / math.sqrt(om) * eps) / math.sqrt(a)
        elif rule == "score":
            mean = (z + b * (-eps / math.sqrt(om))) / math.sqrt(a)
        else:
            mean = ddpm.posterior(z, x0, t)[0]
        z = mean + (torch.sqrt(var) * _randn(z, generator) if t > 1 else 0)
        if callback is not None:
            callback(t_start - t, z, math.sqrt(om_prev / ab_prev) if t > 1 else 0.0, x0)
    return z


def ddim_steps(ddpm, steps: int) -> list:
    """`steps` evenly spaced DDPM steps T = τ_1 > … > τ_S ≥ 1 (DDIM's "uniform" skipping)."""
    _check_int("steps", steps, 1)
    if steps > ddpm.T:
        raise ValueError(f"steps={steps} must be <= T={ddpm.T}")
    return sorted({int(round(v)) for v in torch.linspace(ddpm.T, 1, steps).tolist()}, reverse=True)


@torch.no_grad()
def sample_ddim(denoiser, z, ddpm, steps, *, eta: float = 0.0, generator=None, callback=None):
    """DDIM (Song et al. 2021a) on any decreasing sub-sequence `steps` of the DDPM steps
    (an int: `ddim_steps`): with x̂0 = D, ε̂ = (z − √ᾱ·x̂0)/√(1 − ᾱ) and ᾱ' the next step's
    (1 after the last), z' = √ᾱ'·x̂0 + √(1 − ᾱ' − s²)·ε̂ + s·ξ, s = η·√((1 − ᾱ')/(1 − ᾱ))·√(1 − ᾱ/ᾱ'). η = 0:
    deterministic (a discretisation of the PF-ODE); η = 1 on every step: DDPM with β̃ (T24, tested).
    NFE = len(steps)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta={eta!r} must be a number in [0, 1] (0: deterministic DDIM, 1: ancestral)")
    seq = ddim_steps(ddpm, steps) if isinstance(steps, int) else [int(s) for s in steps]
    if not seq or any(not 1 <= s <= ddpm.T for s in seq) or any(a <= b for a, b in zip(seq, seq[1:])):
        raise ValueError(f"steps must be a strictly decreasing sequence of DDPM steps in [1, T={ddpm.T}]; "
                         f"got {seq[:4]}…")
    for i, t in enumerate(seq):
        ab, om = float(ddpm.alpha_bar[t]), float(ddpm.one_minus_alpha_bar[t])
        t_next = seq[i + 1] if i + 1 < len(seq) else 0
        ab_n, om_n = float(ddpm.alpha_bar[t_next]), float(ddpm.one_minus_alpha_bar[t_next])
        x0 = _ddpm_x0(denoiser, z, ddpm, t)
        eps = (z - math.sqrt(ab) * x0) / math.sqrt(om)
        s = eta * math.sqrt(om_n / om) * math.sqrt(max(1 - ab / ab_n, 0.0))
        z = math.sqrt(ab_n) * x0 + math.sqrt(max(om_n - s * s, 0.0)) * eps
        if s > 0:
            z = z + s * _randn(z, generator)
        if callback is not None:
            callback(i, z, math.sqrt(om_n / ab_n), x0)
    return z


def heun_nfe(steps: int, second_order: bool = True) -> int:
    return 2 * steps - 1 if second_order else steps


GRID_SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m,
                 "euler_maruyama": sample_euler_maruyama, "pc": sample_pc}
