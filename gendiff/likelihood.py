"""Likelihoods and bounds: VDM's continuous ELBO (T17, T22), the exact PF-ODE likelihood (T15, T31), DDPM's
discrete bound (T23, T24, T26, T27), bits/dim with 8-bit dequantisation (T27), the confidence NLL curve
(T8, T10).

`continuous_elbo(denoiser, x, schedule)`: VDM's continuous-time variational bound on −log p(x), per example,
split into its three terms, for any VE-space denoiser D(x̃, σ̃) (T2) and any schedule with `lam(t)`
(λ decreasing in t; `schedules.LearnedSchedule`, or a `process.Process`):
- diffusion: ½·E_t[−λ'(t)·‖ε − ε̂(x̃_t; σ̃_t)‖²], t ~ U(0, 1), λ' by autograd; equal to ½∫‖ε − ε̂‖² dλ over
  [λ(1), λ(0)], so only the endpoints matter (VDM++ §2);
- prior: KL(q(z_1 | x) ‖ N(0, I)) of the VP latent at λ_1 = λ(1): ½Σ(σ₁² + α₁²x² − 1 − log σ₁²);
- reconstruction: −E log p(x | z_0) for the Gaussian decoder N(x; z_0/α_0, σ̃_0²): ½·d·(1 + log 2πσ̃_0²)
  (continuous data; the discretised decoder of T27 is `ddpm_vlb`'s).

`log_likelihood(D, x)`: log p_{σ_min}(x) through the probability-flow ODE (T15, T31), exact or Hutchinson
divergence, torchdiffeq's adaptive solver. `ddpm_vlb(D, x, ddpm)`: the discrete DDPM bound, every step summed
(or an unbiased subsample), Σ_t = β̃_t, β_t, IDDPM's learned interpolation (T26), or T38's
β̃_t + c_0²·Var[x0 | x_t] (per element from the head, or Analytic-DPM's one number per step), Gaussian or
discretised decoder (T27). `bits_per_dim`, `dequantize`, `nll_8bit_to_bits_per_dim`: units and the 8-bit
volume term.
`confidence_nll_curve(D, x, sigmas)`: the model's own −log q(x0 | x̃) per σ (T8, T10), a diagnostic.
"""
from __future__ import annotations

import math

import torch
from torchdiffeq import odeint

from .checks import check_choice, check_ordered, check_positive
from .process import DDPM_VARIANCES


def continuous_elbo(denoiser, x: torch.Tensor, schedule, *, generator=None, stratified: bool = True) -> dict:
    """Per-example terms in nats ([N] each), their sum `total` and `bits_per_dim` (total / (d·ln 2)).
    stratified: t_i = (i/n + u) mod 1 with one shared u (VDM's low-discrepancy draw); else t_i iid uniform.
    Random draws come from `generator` on the CPU and are moved to x's device."""
    n, d = x.shape[0], x[0].numel()
    u = torch.rand(1 if stratified else n, generator=generator, dtype=torch.float64)
    t = ((torch.arange(n, dtype=torch.float64) / n + u) % 1.0) if stratified else u
    t = t.to(x.dtype).clamp(1e-6, 1 - 1e-6).requires_grad_(True)
    with torch.enable_grad():
        lam = schedule.lam(t)
        dlam = torch.autograd.grad(lam.sum(), t)[0]                                    # λ'(t) < 0
    lam, dlam = lam.detach().to(x.dtype).to(x.device), dlam.detach().to(x.dtype).to(x.device)
    sig = torch.exp(-lam / 2)                                                           # σ̃ (T2)
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    col = sig.view(-1, *([1] * (x.ndim - 1)))
    x_noisy = x + col * eps
    with torch.no_grad():
        eps_hat = (x_noisy - denoiser(x_noisy, sig)) / col
    diffusion = 0.5 * (-dlam) * (eps - eps_hat).flatten(1).square().sum(1)
    ends = schedule.lam(torch.tensor([0.0, 1.0], dtype=torch.float64)).detach().double()
    lam0, lam1 = float(ends[0]), float(ends[1])
    a2, s2 = torch.sigmoid(torch.tensor(lam1)).item(), torch.sigmoid(torch.tensor(-lam1)).item()
    prior = 0.5 * (s2 + a2 * x.flatten(1).double().square() - 1 - math.log(s2)).sum(1).to(x.dtype)
    recon = torch.full((n,), 0.5 * d * (1 + math.log(2 * math.pi) - lam0), dtype=x.dtype, device=x.device)
    total = diffusion + prior + recon
    return {"diffusion": diffusion, "prior": prior, "reconstruction": recon, "total": total,
            "bits_per_dim": total / (d * math.log(2))}


# =================================================================================================
# Exact likelihood through the probability-flow ODE (T15, T31), bits/dim and dequantisation (T27),
# the discrete DDPM bound (T23, T24, T26, T27), and the confidence NLL curve (T8, T10).
# =================================================================================================

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)
LOG_127_5 = math.log(127.5)                 # log(255/2): 8-bit data k ∈ {0..255} ↦ x = 2k/255 − 1
BIN = 2 / 255                               # the width of one 8-bit bin in [−1, 1]
PF_METHODS = ("exact", "hutchinson")
PF_TIMES = ("log_sigma", "sigma")
ODE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")   # torchdiffeq's adaptive ones
VLB_VARIANCES = DDPM_VARIANCES               # Σ_t: beta, beta_tilde, phi, analytic (T24, T38); v: T26
VLB_DECODERS = ("gaussian", "discretized")
DECODER_VARIANCES = ("beta", "beta_tilde")   # Σ_1 of a fixed-variance DDPM: β_1, or β̃_1 clipped to β̃_2


def _sum_dims(v: torch.Tensor) -> torch.Tensor:
    """Per-example sum over all but the batch dimension: [N, ...] -> [N]."""
    return v.flatten(1).sum(1)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example [N] (or scalar) value broadcast against like [N, ...]."""
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim == 1 else v


# ---- the probability-flow ODE likelihood (T15, T31) -----------------------------------------------

def _drift_and_divergence(denoiser, x: torch.Tensor, sigma: torch.Tensor, model_dtype, probes):
    """g = x − D(x; σ) and its divergence ∇·g (exact when `probes` is None, else one Hutchinson estimate
    εᵀ(∂g/∂x)ε per probe: [P, N]). g is σ times the T15 drift f = (x − D)/σ.

    Exact: one vector-Jacobian product per dimension, ∂g_i/∂x_i = e_iᵀ(∂g/∂x)e_i, summed; examples are
    independent (the denoiser must not mix examples, e.g. no batch statistics), so one backward pass
    gives the i-th diagonal entry for every example at once. Cost: d backward passes (low d only)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        mu = denoiser(xg.to(model_dtype), sigma.to(model_dtype)).to(F64)
        g = xg - mu
        n, d = x.shape[0], x[0].numel()
        if probes is None:
            div = torch.zeros(n, dtype=F64, device=x.device)
            flat = g.reshape(n, d)
            for i in range(d):
                gi = torch.autograd.grad(flat[:, i].sum(), xg, retain_graph=i < d - 1)[0]
                div = div + gi.reshape(n, d)[:, i]
        else:
            ests = []
            for k in range(probes.shape[0]):
                vjp = torch.autograd.grad(g, xg, probes[k], retain_graph=k < probes.shape[0] - 1)[0]
                ests.append(_sum_dims(vjp * probes[k]))           # εᵀ(∂g/∂x)ε
            div = torch.stack(ests)                                # [P, N]
    return g.detach(), div.detach()


def log_likelihood(denoiser, x: torch.Tensor, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   method: str = "exact", probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
                   solver: str = "dopri5", time: str = "sigma", generator=None):
    """log p_{σ_min}(x) per example through the probability-flow ODE (THEORY T15, T31), in nats.

    The model: the density of x̃ = x0 + σ_min·ε that the PF-ODE of the denoiser transports from the prior
    N(0, σ_max²I) (VE space, T2). T15: dx/dσ = f(x, σ) = (x − D(x; σ))/σ. Along a solution the continuity
    equation gives d log p_σ(x(σ))/dσ = −∇·f(x(σ), σ). Sign convention: we integrate *upwards*, from the
    data x(σ_min) = x to x(σ_max) = x_T, together with δ(σ) = ∫_{σ_min}^{σ} ∇·f dσ', so that
        log p_{σ_min}(x) = log N(x_T; 0, σ_max²I) + δ(σ_max)        (T31; `prior` + `delta_logp`).
    For the exact denoiser of data N(m, s²I), ∇·f = dσ/(s² + σ²) > 0: δ > 0, the density decreases as σ grows.
    The prior replaces the true p_{σ_max}; the error is log N(x_T; 0, σ_max²I) − log p_{σ_max}(x_T),
    O(E‖x0‖²/σ_max²) for data of bounded scale.

    x: [N, ...], any shape; the ODE state (x and δ) is float64, the denoiser is called in x's dtype with one
    scalar σ for the whole batch (a 0-d tensor; per-example σ is never needed since all examples share σ).
    time: the integration variable: "sigma" (default) integrates T15 in σ itself; "log_sigma" solves the same
    ODE in t = log σ, dx/dt = σ·f = x − D(x; e^t), dδ/dt = σ·∇·f (the solution x(σ) is unchanged; the drift
    is O(1) on every decade of σ; on the tree toy both take about the same number of steps).
    method: "exact" divergence by autograd (d backward passes: low d), or "hutchinson": ∇·f ≈ εᵀ(∂f/∂x)ε
    with `probes` Rademacher vectors ε, averaged. The probes are drawn once per call from `generator` and
    kept fixed along the whole ODE: the right-hand side is then a smooth deterministic function that an
    adaptive solver can integrate (fresh noise at each evaluation would make its error control chase noise),
    and since the integral is linear in the estimator, E_ε ∫ εᵀ(∂f/∂x)ε dσ = ∫ ∇·f dσ: the integrated
    estimate is still unbiased, with one independent estimate per probe.
    rtol, atol, solver: torchdiffeq `odeint` settings (an adaptive solver; tolerances on x and δ).

    Returns (logp [N] float64, info) with info: `nfe` (denoiser evaluations), `prior` [N] (log N(x_T; 0,
    σ_max²I)), `delta_logp` [N] (δ(σ_max), probe-averaged), `x_T` [N, ...] (float64), and for Hutchinson
    `delta_logp_probes` [P, N] (one integrated estimate per probe: their spread over probes gives the
    estimator's standard error).
    """
    check_positive("sigma_min", sigma_min)
    check_positive("sigma_max", sigma_max)
    check_ordered("sigma_min", sigma_min, "sigma_max", sigma_max)
    check_choice("method", method, PF_METHODS)
    check_positive("probes", probes, integer=True)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    check_choice("solver", solver, ODE_SOLVERS)
    check_choice("time", time, PF_TIMES)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a batch [N, ...] with N >= 1; got shape {tuple(x.shape)}")
    model_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    n, d = x.shape[0], x[0].numel()
    x64 = x.detach().to(F64)
    eps = None
    if method == "hutchinson":                                     # Rademacher ±1, fixed for the whole ODE
        eps = torch.randint(0, 2, (probes, *x.shape), generator=generator, dtype=F64).mul_(2).sub_(1)
        eps = eps.to(x.device)
    nfe = 0

    def rhs(t, state):
        nonlocal nfe
        nfe += 1
        sigma = t.exp() if time == "log_sigma" else t
        g, div = _drift_and_divergence(denoiser, state[0], sigma, model_dtype, eps)
        if time == "sigma":                                        # T15: f = g/σ, ∇·f = ∇·g/σ
            return g / sigma, div / sigma
        return g, div                                              # d/d log σ = σ·d/dσ

    ends = [sigma_min, sigma_max] if time == "sigma" else [math.log(sigma_min), math.log(sigma_max)]
    t_span = torch.tensor(ends, dtype=F64, device=x.device)
    delta0 = torch.zeros((n,) if eps is None else (probes, n), dtype=F64, device=x.device)
    with torch.no_grad():
        xs, deltas = odeint(rhs, (x64, delta0), t_span, rtol=rtol, atol=atol, method=solver)
    x_T, delta = xs[-1], deltas[-1]
    prior = -0.5 * _sum_dims(x_T.square()) / sigma_max**2 - 0.5 * d * (LOG_2PI + 2 * math.log(sigma_max))
    info = {"nfe": nfe, "prior": prior, "x_T": x_T}
    if eps is not None:
        info["delta_logp_probes"] = delta
        delta = delta.mean(0)
    info["delta_logp"] = delta
    return prior + delta, info


# ---- bits per dimension and 8-bit dequantisation (T27) --------------------------------------------

def bits_per_dim(nll_nats, dim: int, *, shift: float = 0.0):
    """nll / (dim·ln 2) + shift: nats per example to bits per dimension; `shift` is added in bits/dim
    (e.g. log₂ 127.5 for the 8-bit dequantisation volume, `nll_8bit_to_bits_per_dim`)."""
    check_positive("dim", dim, integer=True)
    return nll_nats / (dim * math.log(2)) + shift


def _check_8bit(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """The 8-bit index k = (x + 1)·127.5 ∈ {0..255} of data x = 2k/255 − 1, float64; ValueError otherwise
    (a tolerance of 1e-3 bins absorbs float32 rounding of the grid values)."""
    k = (x.detach().to(F64) + 1) * 127.5
    kr = k.round()
    ok = (kr >= 0) & (kr <= 255) & ((k - kr).abs() <= 1e-3)
    if not torch.all(ok):
        bad = x.detach().flatten()[~ok.flatten()][0].item()
        raise ValueError(f"{name} must be 8-bit data in [-1, 1], x = 2k/255 - 1 with k in 0..255; "
                         f"got {bad!r}")
    return kr


def dequantize(x, generator=None) -> torch.Tensor:
    """Centred uniform dequantisation of 8-bit data x = 2k/255 − 1: y = x + Δ·(u − ½), Δ = 2/255,
    u ~ U[0, 1) per element.

    Convention: the byte k owns the bin [x_k − Δ/2, x_k + Δ/2), centred on the grid value x_k the models are
    trained on (images in [−1, 1] are x_k exactly), as T27's discretised decoder centres its bins; so
    y ∈ [−1 − Δ/2, 1 + Δ/2) and E[y] = x. (The "(k + u)/256" convention, bins [x_k, x_k + Δ), shifts every
    value by Δ/2 off what the model saw, which is not the same for every model: on MNIST, whose pixels are
    mostly −1, it reorders rows.) Any density p(y) defines P(k) = ∫_bin p, bounded in
    `nll_8bit_to_bits_per_dim` (bits/dim = nll/(d·ln 2) + log₂ 127.5, the log-volume of a bin of width Δ;
    the map (k + u)/128 − 1, bins 2/256, would give log₂ 128 = 7 instead: compare published bits/dim in one
    convention). x: floating data on the grid (output in x's dtype, float64 noise), or the bytes k themselves
    as a uint8 tensor or array (x = k/127.5 − 1 in float32 first, the same draw; any integer dtype). Anything
    off the grid is a ValueError."""
    x = torch.as_tensor(x)
    if not x.is_floating_point():                                      # the bytes k (checked on the grid)
        x = x.float() / 127.5 - 1.0
    _check_8bit(x)
    u = torch.rand(x.shape, generator=generator, dtype=F64).to(x.device)
    return (x.to(F64) + BIN * (u - 0.5)).to(x.dtype)


def nll_8bit_to_bits_per_dim(nll_nats_continuous, dim: int):
    """A bound on the discrete NLL of 8-bit data, in bits/dim, from E_u[−log p(y)] of dequantised y (nats).

    With y = x_k + Δ·(u − ½) (Δ = 2/255, `dequantize`), P(k) = ∫_bin p(y) dy = Δ^d·E_u[p(y)], and by
    Jensen log P(k) ≥ E_u[log p(y)] + d·log Δ, so
        −log P(k) ≤ E_u[−log p(y)] + d·log(255/2) = E_u[−log p(y)] + d·log 127.5   (nats),
    i.e. bits/dim = nll / (d·ln 2) + log₂ 127.5 (T27's units). Equality when p is constant on each bin. The
    term d·log(1/Δ) is the log-volume of the bin and does not depend on where the bin sits."""
    return bits_per_dim(nll_nats_continuous, dim, shift=LOG_127_5 / math.log(2))


# ---- the discretised Gaussian decoder (T27) -----------------------------------------------------

def _log1mexp(z: torch.Tensor) -> torch.Tensor:
    """log(1 − e^z) for z ≤ 0, accurate at both ends (expm1 near 0, log1p far below); NaN-free gradients."""
    near = z > -math.log(2)
    a = torch.where(near, z, torch.full_like(z, -1.0))
    b = torch.where(near, torch.full_like(z, -1.0), z)
    return torch.where(near, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def _log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Φ(b) − Φ(a)) for a < b (either may be infinite), stable in both tails: an interval in the upper
    tail is mirrored, Φ(b) − Φ(a) = Φ(−a) − Φ(−b), so that log Φ is only taken where it has full precision."""
    upper = (a + b) > 0
    lo, hi = torch.where(upper, -b, a), torch.where(upper, -a, b)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + _log1mexp(torch.special.log_ndtr(lo) - log_hi)


def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """DDPM's discretised Gaussian decoder (THEORY T27), per element, float64.

    x: 8-bit data in [−1, 1] (x = 2k/255 − 1). P(x) = Φ((x + 1/255 − μ)/s) − Φ((x − 1/255 − μ)/s), with the
    edge bins extended to ±∞ (x = −1: lower edge −∞; x = 1: upper edge +∞), so the 256 bins of each element
    hold all the mass. Computed as a difference of log-CDFs (`_log_ndtr_diff`), exact in the tails."""
    k = _check_8bit(x)
    mean = torch.as_tensor(mean).to(F64)
    std = torch.as_tensor(std, dtype=F64)
    if not torch.all(std > 0):
        raise ValueError(f"std must be > 0; got {std.min().item()!r}")
    centre = 2 * k / 255 - 1
    lo = torch.where(k == 0, -math.inf, (centre - 1 / 255 - mean) / std)
    hi = torch.where(k == 255, math.inf, (centre + 1 / 255 - mean) / std)
    return _log_ndtr_diff(lo, hi)


# ---- the discrete DDPM variational bound (T23, T24, T26, T27) -------------------------------------

def _gauss_kl(m1, v1, m2, v2) -> torch.Tensor:
    """KL(N(m1, v1) ‖ N(m2, v2)) per element: ½[log(v2/v1) + (v1 + (m1 − m2)²)/v2 − 1]."""
    return 0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2).square()) / v2 - 1)


def ddpm_vlb(denoiser, x: torch.Tensor, ddpm, *, variance: str = "beta_tilde", decoder: str = "gaussian",
             v=None, x0_var=None, steps: int | None = None, generator=None,
             decoder_variance: str = "beta") -> dict:
    """DDPM's variational bound on −log p(x0) (Ho et al. 2020 eq. 5; THEORY T23, T24, T26, T27), per example.

    The model: p(x_T) = N(0, I), p_θ(x_{t−1} | x_t) = N(μ_θ, Σ_t) with μ_θ = T24's posterior mean with x0
    replaced by x̂0 = D(x_t/√ᾱ_t, √((1 − ᾱ_t)/ᾱ_t)) (the VE map T2), and Σ_t as the sampler takes it
    (`DDPM.reverse_step`, one denoiser evaluation per step for x̂0 and Σ_t): β̃_t (variance="beta_tilde") or
    β_t ("beta") (T24); T38's β̃_t + c_0²·Var[x0 | x_t] with the head's per-element (σ_φ² − σ̃²)⁺ ("phi",
    from `denoiser.predict`) or Analytic-DPM's one number per step ("analytic", x0_var = v̄ [T + 1] from
    `process.analytic_variances`); or IDDPM's learned Σ_θ = exp(v·log β_t + (1 − v)·log β̃_t) (T26) when a
    callable `v(z_t, t) -> tensor like x` is given (with the default `variance`). A `ddpm.respaced(k)` gives
    the bound of the k-step model (its β', β̃', ᾱ'). Terms in nats, [N] each:
    - prior: KL(q(x_T | x0) ‖ N(0, I)) = ½Σ[(1 − ᾱ_T) + ᾱ_T x0² − 1 − log(1 − ᾱ_T)] (T23), exact;
    - diffusion: Σ_{t=2}^{T} KL(q(x_{t−1} | x_t, x0) ‖ p_θ(x_{t−1} | x_t)), each KL Gaussian in closed form
      at one draw x_t ~ q(x_t | x0) per t (fresh for every t, from `generator`). Every step is summed unless
      `steps=k` (1 <= k <= T − 1): then k distinct steps S ⊂ {2..T} are drawn uniformly (the same for the
      batch) and the sum is estimated by (T − 1)/k·Σ_{t∈S}, unbiased;
    - reconstruction: −log p(x0 | x_1) at one x_1 ~ q(x_1 | x0), with mean μ_θ(x_1, 1) = x̂0 (T24 at t = 1:
      ᾱ_0 = 1) and variance Σ_1: with a learned v the Σ_θ(1) = exp(v·log β_1 + (1 − v)·log β̃_2) that
      `losses.HybridLoss` trains (β̃_1 = 0 is clipped to β̃_2, as IDDPM does); with a fixed variance
      `decoder_variance`: "beta" Σ_1 = β_1 (DDPM's paper, §3.3), "beta_tilde" Σ_1 = β̃_2 (β̃_1 clipped as
      DDPM's and IDDPM's code do for their fixed variances, both of them). These two are the ends of the
      learned head's range (v = 1 and v = 0), so a fixed row measured with both is compared like with like
      with a learned row: the learned head gains what choosing within [β̃_2, β_1] gains and no more. Which
      end is the better fixed decoder depends on the data: for continuous data the optimum is near
      Var[x0 | x_1] ≈ β_1 (the bound then tightens to the NLL as T grows; β̃_2 → β_1/2 does not), while for
      8-bit images whose pixels sit on a bin edge (MNIST's −1 background) the narrower β̃_2 puts more mass in
      the right bin. Both reconstructions are returned (`reconstruction_by_variance`, from the same x̂0);
      phi and analytic decode with their own T38 variance at t = 1, Var[x0 | x_1] floored at β̃_2
      (`DDPM.reverse_variance`), which for the exact model of continuous Gaussian data makes the whole
      bound −log p(x0) + KL(q(x_T) ‖ N(0, I)) (tested);
      decoder="gaussian": the density N(x0; x̂0, Σ_1) (continuous data, e.g. the 2-D toys);
      "discretized": the 8-bit probability `discretized_gaussian_log_prob` (x0 = 2k/255 − 1).
      The defaults (decoder "gaussian", decoder_variance "beta") suit continuous data; for 8-bit images the
      CLI (`experiments.ddpm_variance.ddpm_bound`) passes "discretized" and "beta_tilde", its headline.
    Plus `total` (the sum with `decoder_variance`'s reconstruction, ≥ −log p_θ(x0)), `bits_per_dim` =
    total/(d·ln 2) (a density for "gaussian", a probability of the 8-bit data for "discretized"),
    `reconstruction_by_variance` ({"beta": [N], "beta_tilde": [N]} for a fixed variance; None with a learned
    v, phi or analytic, whose decoder is their own), and `step_var` (a float64 scalar): the variance that
    drawing k of the T − 1 steps adds to the batch mean of `diffusion` (and `total`), which the spread over
    examples does not show since the batch shares one draw: S ⊂ {2..T} is a simple random sample without
    replacement, so Var[(T − 1)/k·Σ_{t∈S} μ_t] = (T − 1)²·(1 − k/(T − 1))·s²/k, with s² the variance
    (divisor k − 1) of the batch-mean KL_t over the drawn steps (unbiased for the same over all steps);
    0 when every step is summed, NaN for k = 1. The standard error of the mean bound is then
    √(Var_examples(total)/N + step_var). All arithmetic in float64; the denoiser runs in x's dtype with one
    scalar σ̃ per step.
    """
    ddpm.check_reverse_variance(variance, denoiser=denoiser, x0_var=x0_var, v=v)
    check_choice("decoder", decoder, VLB_DECODERS)
    check_choice("decoder_variance", decoder_variance, DECODER_VARIANCES)
    T = ddpm.T
    if steps is not None:
        check_positive("steps", steps, integer=True)
        if T < 2 or steps > T - 1:
            raise ValueError(f"steps={steps!r} is out of range; allowed: 1 <= steps <= T - 1 = {T - 1}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a batch [N, ...] with N >= 1; got shape {tuple(x.shape)}")
    if decoder == "discretized":
        _check_8bit(x)
    model_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    x0 = x.detach().to(F64)
    n, d = x.shape[0], x[0].numel()

    def latent(t):                                                 # x_t ~ q(x_t | x0) (T23)
        eps = torch.randn(x0.shape, generator=generator, dtype=F64).to(x0.device)
        return math.sqrt(ddpm.alpha_bar[t].item()) * x0 + math.sqrt(ddpm.one_minus_alpha_bar[t].item()) * eps

    ab_T, om_T = ddpm.alpha_bar[T].item(), ddpm.one_minus_alpha_bar[T].item()
    prior = 0.5 * _sum_dims(om_T + ab_T * x0.square() - 1 - math.log(om_T))

    if steps is None:
        ts, weight = list(range(2, T + 1)), 1.0
    else:
        perm = torch.randperm(T - 1, generator=generator)[:steps] + 2
        ts, weight = sorted(perm.tolist()), (T - 1) / steps
    diffusion = torch.zeros(n, dtype=F64, device=x0.device)
    step_means = []                                                # batch-mean KL_t of each step drawn
    def reverse(z, t):                                             # x̂0 and Σ_t of p_θ(x_{t−1} | x_t)
        with torch.no_grad():
            return ddpm.reverse_step(denoiser, z, t, variance, x0_var=x0_var, v=v, model_dtype=model_dtype)

    for t in ts:
        z = latent(t)
        mean_q, var_q = ddpm.posterior(z, x0, t)                    # T24
        x0_hat, var_p = reverse(z, t)
        mean_p, _ = ddpm.posterior(z, x0_hat, t)
        kl = _sum_dims(_gauss_kl(mean_q, var_q.expand_as(z), mean_p, var_p.expand_as(z)))
        diffusion = diffusion + weight * kl
        step_means.append(kl.mean())
    step_var = torch.zeros((), dtype=F64)
    if steps is not None and steps < T - 1:                        # simple random sample of steps (see above)
        s2 = torch.stack(step_means).var().cpu() if steps > 1 else torch.tensor(math.nan, dtype=F64)
        step_var = (T - 1) ** 2 * (1 - steps / (T - 1)) * s2 / steps

    x0_hat, var1 = reverse(latent(1), 1)                           # μ_θ(x_1, 1) = x̂0 (T24 with ᾱ_0 = 1), Σ_1

    def decode(var1):                                              # −log p(x0 | x_1) per example
        var1 = var1.expand_as(x0_hat)
        if decoder == "gaussian":
            return 0.5 * _sum_dims(LOG_2PI + var1.log() + (x0 - x0_hat).square() / var1)
        return -_sum_dims(discretized_gaussian_log_prob(x0, x0_hat, var1.sqrt()))
    by_variance = None
    if v is not None or variance in ("phi", "analytic"):          # its own Σ_1: learned Σ_θ(1), or T38's
        recon = decode(var1)
    else:                                                          # fixed: β_1 or β̃_2 (β̃_1 clipped)
        by_variance = {name: decode(torch.tensor(ddpm.reverse_variance(1, name), dtype=F64, device=x0.device))
                       for name in DECODER_VARIANCES}
        recon = by_variance[decoder_variance]
    total = prior + diffusion + recon
    return {"prior": prior, "diffusion": diffusion, "reconstruction": recon, "total": total,
            "bits_per_dim": bits_per_dim(total, d), "reconstruction_by_variance": by_variance,
            "step_var": step_var}


# ---- the model's own Gaussian NLL along σ (T8, T10) ------------------------------------------------

def confidence_nll_curve(denoiser, x: torch.Tensor, sigmas, *, generator=None) -> dict:
    """−log q(x0 | x̃) of the clean data under the model's own Gaussian prediction (THEORY T8, T10), per σ.

    For each σ: x̃ = x0 + σε (fresh ε from `generator`), p = denoiser.predict(x̃, σ), and per example
        −log q(x0 | x̃) = ½Σ_elements[log 2πσ_φ² + (x0 − μ)²/σ_φ²],
    σ_φ² = p.variance() (per element: a full-covariance prediction contributes its marginal variances; a
    head-less denoiser its c_var²). A diagnostic of the confidence head: at the optimum (T8)
    σ_φ² = σ² + Var[x0 | x̃]. Returns float64 tensors [S] over σ: `sigma`, `nll` (mean over examples,
    nats per example), `nll_per_dim` (nll/d), `nll_se` (standard error of `nll` over examples).
    """
    sig = torch.as_tensor(sigmas, dtype=F64).flatten()
    if sig.numel() == 0 or not torch.all(torch.isfinite(sig) & (sig > 0)):
        raise ValueError(f"sigmas={sigmas!r} must be a non-empty list of finite values > 0")
    if not hasattr(denoiser, "predict"):
        raise ValueError("denoiser must have .predict(x, sigma) -> Prediction (the confidence, T6)")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a batch [N, ...] with N >= 1; got shape {tuple(x.shape)}")
    n, d = x.shape[0], x[0].numel()
    x0 = x.detach().to(F64)
    nll, se = [], []
    for s in sig.tolist():
        eps = torch.randn(x.shape, generator=generator, dtype=F64).to(x.device)
        x_noisy = (x0 + s * eps).to(x.dtype)
        with torch.no_grad():
            p = denoiser.predict(x_noisy, torch.tensor(s, dtype=x.dtype, device=x.device))
            mu, var = p.mu.to(F64), p.variance().to(F64)
        per = 0.5 * _sum_dims(torch.log(2 * math.pi * var) + (x0 - mu).square() / var)
        nll.append(per.mean())
        se.append(per.std() / math.sqrt(n) if n > 1 else torch.tensor(math.nan, dtype=F64))
    nll = torch.stack(nll)
    return {"sigma": sig, "nll": nll, "nll_per_dim": nll / d, "nll_se": torch.stack(se)}
