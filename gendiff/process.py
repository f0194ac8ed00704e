"""Forward processes as reparametrisations of the one VE/EDM process, through the log-SNR λ.

THEORY §1 (T1, T2) and §6 (T23, T24). A process is z = α(t)·x0 + σ(t)·ε with λ = log(α²/σ²) (T1);
x̃ = z/α, σ̃ = σ/α = exp(−λ/2) turns it into x̃ = x0 + σ̃·ε (T2), so one VE denoiser D(x̃, σ̃) → x0
serves VE, VP, flow matching and DDPM alike (VDM++ §2): `Process.denoise(D, z, t)`.

DDPM's reverse step p(x_{t−1} | x_t) = N(μ, Σ_t) is chosen in one place for the sampler and the bound:
`DDPM.reverse_step` (x̂0 and Σ_t from one denoiser evaluation) and `DDPM.reverse_variance` (Σ_t = β, β̃,
IDDPM's learned v, or T38's β̃ + c_0²·Var[x0 | x_t] per element from the head, "phi", or one number per step,
"analytic", Analytic-DPM's v̄_t from `analytic_variances`).

Time t is a scalar or one value per example `[N]` (a per-element tensor also broadcasts); λ decreases
with t. Continuous processes use t ∈ [0, 1]; DDPM uses its step index t ∈ {0, 1, …, T} (T23).
Python numbers become float64 tensors; tensors keep their floating dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import check_choice, check_ordered, check_positive


def _t(x) -> torch.Tensor:
    """A floating tensor: float64 from Python numbers or integer tensors."""
    x = torch.as_tensor(x)
    return x if x.is_floating_point() else x.to(torch.float64)


def _expand(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A per-time value broadcast against z: scalar as is, [N] → [N, 1, ...], per element as is."""
    v = v.to(z.dtype)
    return v.reshape(-1, *([1] * (z.ndim - 1))) if v.ndim == 1 and z.ndim > 1 else v


def _check_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")


class Process:
    """z = α(t)·x0 + σ(t)·ε (T1). Subclasses give alpha, sigma, lam and its inverse t_of_lam."""

    def alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def lam(self, t) -> torch.Tensor:
        """log-SNR λ = log(α²/σ²) (T1), strictly decreasing in t."""
        raise NotImplementedError

    def t_of_lam(self, lam) -> torch.Tensor:
        raise NotImplementedError

    def sigma_ve(self, t) -> torch.Tensor:
        """The equivalent VE noise level σ̃ = exp(−λ/2) (T2)."""
        return torch.exp(-self.lam(t) / 2)

    def perturb(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """z = α·x0 + σ·ε (T1); x0, noise: [N, ...]."""
        t = _t(t)
        return _expand(self.alpha(t), x0) * x0 + _expand(self.sigma(t), x0) * noise

    def to_ve(self, z: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̃, σ̃) = (z/α, σ/α) (T2); σ̃ has t's shape (scalar or [N]), ready for D(x̃, σ̃)."""
        t = _t(t)
        alpha = self.alpha(t)
        return z / _expand(alpha, z), (self.sigma(t) / alpha).to(z.dtype)

    def from_ve(self, x_tilde: torch.Tensor, t) -> torch.Tensor:
        """z = α·x̃ (T2), the inverse of to_ve."""
        return _expand(self.alpha(_t(t)), x_tilde) * x_tilde

    def denoise(self, denoiser, z: torch.Tensor, t) -> torch.Tensor:
        """The x0 estimate of a VE denoiser `D(x̃, σ̃) -> x0` at process latent z and time t (T2).
        x0 is the same in every parametrisation, so the output needs no rescaling."""
        x_tilde, sigma_tilde = self.to_ve(z, t)
        return denoiser(x_tilde, sigma_tilde)


class VE(Process):
    """VE / EDM: α = 1, σ(t) = σ_min^(1−t)·σ_max^t (geometric), λ = −2 log σ (THEORY §1.1)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        check_positive("sigma_min", sigma_min)
        check_positive("sigma_max", sigma_max)
        check_ordered("sigma_min", sigma_min, "sigma_max", sigma_max)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._log_min, self._log_max = math.log(sigma_min), math.log(sigma_max)

    def alpha(self, t):
        return torch.ones_like(_t(t))

    def sigma(self, t):
        t = _t(t)
        return torch.exp((1 - t) * self._log_min + t * self._log_max)

    def lam(self, t):
        t = _t(t)
        return -2 * ((1 - t) * self._log_min + t * self._log_max)

    def t_of_lam(self, lam):
        return (-_t(lam) / 2 - self._log_min) / (self._log_max - self._log_min)


class VP(Process):
    """Variance preserving: α² = sigmoid(λ), σ² = sigmoid(−λ) (THEORY §1.1), so α² + σ² = 1.
    Choice: λ(t) is linear in t from lam_max at t = 0 to lam_min at t = 1 (fixed endpoints in log-SNR,
    which is all that matters in continuous time, T22), not the β-linear VP SDE of Song et al."""

    def __init__(self, lam_min: float = -10.0, lam_max: float = 10.0):
        _check_finite("lam_min", lam_min)
        _check_finite("lam_max", lam_max)
        check_ordered("lam_min", lam_min, "lam_max", lam_max)
        self.lam_min, self.lam_max = lam_min, lam_max

    def alpha(self, t):
        return torch.exp(F.logsigmoid(self.lam(t)) / 2)  # √sigmoid(λ), stable for large |λ|

    def sigma(self, t):
        return torch.exp(F.logsigmoid(-self.lam(t)) / 2)

    def lam(self, t):
        return self.lam_max + _t(t) * (self.lam_min - self.lam_max)

    def t_of_lam(self, lam):
        return (self.lam_max - _t(lam)) / (self.lam_max - self.lam_min)


def flow_matching_lam(t: torch.Tensor) -> torch.Tensor:
    """Flow matching's log-SNR (α = 1 − t, σ = t; T18): λ = 2 log((1 − t)/t). The one formula, shared by
    `FlowMatching` and `schedules.FlowMatchingSchedule`."""
    return 2 * (torch.log1p(-t) - torch.log(t))


def flow_matching_t_of_lam(lam: torch.Tensor) -> torch.Tensor:
    """The inverse of `flow_matching_lam`: t = sigmoid(−λ/2)."""
    return torch.sigmoid(-lam / 2)


class FlowMatching(Process):
    """Rectified flow / OT path: α = 1 − t, σ = t, λ = 2 log((1 − t)/t), t = sigmoid(−λ/2) (THEORY §1.1, T18).
    The endpoints are singular (λ = ±∞; to_ve divides by α = 0 at t = 1): use t ∈ (0, 1)."""

    def alpha(self, t):
        return 1 - _t(t)

    def sigma(self, t):
        return _t(t).clone()

    def lam(self, t):
        return flow_matching_lam(_t(t))

    def t_of_lam(self, lam):
        return flow_matching_t_of_lam(_t(lam))


DDPM_SCHEDULES = ("linear", "cosine")
DDPM_VARIANCES = ("beta", "beta_tilde", "phi", "analytic")   # Σ_t of the reverse step (T24, T38; v: T26)


def _lerp_table(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through (xp, fp), xp increasing, x within [xp[0], xp[-1]]; exact at the knots."""
    if xp.numel() == 1:
        return fp[0].expand(x.shape).clone()
    j = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, xp.numel() - 1)
    x0, x1 = xp[j - 1], xp[j]
    return torch.lerp(fp[j - 1], fp[j], (x - x0) / (x1 - x0))


class DDPM(Process):
    """Discrete DDPM (T23): β_t, α_t = 1 − β_t, ᾱ_t = ∏_{i≤t} α_i for steps t = 1..T.

    Time is the step index t ∈ {0, 1, …, T}. `betas`, `alphas`, `alpha_bar` are float64 tables [T + 1]
    indexed by step, with the identity step 0 (β_0 = 0, ᾱ_0 = 1, λ = +∞). As a process α = √ᾱ_t,
    σ = √(1 − ᾱ_t); fractional t ∈ [1, T] interpolates λ linearly between steps (α, σ from λ as in VP).
    linear: β = linspace(beta_start, beta_end, T) (DDPM). cosine: ᾱ(t) = f(t)/f(0),
    f(t) = cos²((t/T + s)/(1 + s)·π/2), β_t = 1 − ᾱ(t)/ᾱ(t−1) clipped at 0.999 (IDDPM), ᾱ = ∏(1 − β).
    """

    def __init__(self, T: int = 1000, schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, cosine_s: float = 0.008):
        check_positive("T", T, integer=True)
        check_choice("schedule", schedule, DDPM_SCHEDULES)
        for name, b in (("beta_start", beta_start), ("beta_end", beta_end)):
            _check_finite(name, b)
            if not 0 < b < 1:
                raise ValueError(f"{name}={b!r} is out of range; allowed: 0 < {name} < 1")
        check_positive("cosine_s", cosine_s, allow_zero=True)
        self.T, self.schedule = T, schedule
        f64 = torch.float64
        if schedule == "linear":
            beta = torch.linspace(beta_start, beta_end, T, dtype=f64)
        else:
            f = torch.cos((torch.arange(T + 1, dtype=f64) / T + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # 1 − ᾱ(t)/ᾱ(t−1); f(0) cancels
        self._set_betas(beta)

    def _set_betas(self, beta: torch.Tensor) -> None:
        T, f64 = len(beta), torch.float64
        self.betas = torch.cat([beta.new_zeros(1), beta])             # [T + 1], β_0 = 0
        self.alphas = 1 - self.betas                                  # [T + 1]
        log_ab = torch.cumsum(torch.log1p(-self.betas), 0)            # log ᾱ_t, T23
        self.alpha_bar = torch.exp(log_ab)                            # [T + 1], ᾱ_0 = 1
        self.one_minus_alpha_bar = -torch.expm1(log_ab)               # 1 − ᾱ_t without cancellation
        self._lam = log_ab - torch.log(self.one_minus_alpha_bar)      # [T + 1], λ_0 = +∞
        self._steps = torch.arange(T + 1, dtype=f64)

    def respaced(self, steps: int) -> DDPM:
        """A DDPM over `steps` evenly spaced steps of this one (IDDPM §4 respacing): the same ᾱ at the kept
        steps (so the same σ̃, and a denoiser trained on this process reads them unchanged),
        β'_i = 1 − ᾱ'_i/ᾱ'_{i−1}. A learned variance (T26) then interpolates the new β', β̃', as IDDPM does.
        steps = T returns self."""
        check_positive("steps", steps, integer=True)
        if steps > self.T:
            raise ValueError(f"steps={steps} must be <= T={self.T}")
        if steps == self.T:
            return self
        # increasing, ends at T
        keep = torch.linspace(self.T, 1, steps, dtype=torch.float64).round().long().flip(0)
        ab = torch.cat([self.alpha_bar.new_ones(1), self.alpha_bar[keep]])
        out = DDPM.__new__(DDPM)
        out.T, out.schedule = steps, f"{self.schedule}, respaced {self.T}->{steps}"
        out._set_betas(1 - ab[1:] / ab[:-1])
        return out

    def _check_steps(self, t: torch.Tensor) -> None:
        bad = ~((t == 0) | ((t >= 1) & (t <= self.T)))
        if bad.any():
            raise ValueError(f"DDPM step t={t[bad].flatten()[0].item()!r} is out of range; "
                             f"allowed: 0 or 1 <= t <= T={self.T}")

    def lam(self, t):
        t = _t(t)
        self._check_steps(t)
        tab = self._lam.to(t.device)
        lam = _lerp_table(t.to(torch.float64), self._steps[1:].to(t.device), tab[1:])
        return torch.where(t == 0, tab[0], lam).to(t.dtype)

    def t_of_lam(self, lam):
        lam = _t(lam)
        tab = self._lam.to(lam.device)
        bad = ~((lam == math.inf) | ((lam >= tab[-1]) & (lam <= tab[1])))
        if bad.any():
            raise ValueError(f"lam={lam[bad].flatten()[0].item()!r} is out of range; allowed: +inf (t = 0) "
                             f"or {tab[-1].item():.6g} <= lam <= {tab[1].item():.6g} (steps T..1)")
        # −λ increases with t
        t = _lerp_table(-lam.to(torch.float64), -tab[1:], self._steps[1:].to(lam.device))
        return torch.where(lam == math.inf, torch.zeros_like(t), t).to(lam.dtype)

    def alpha(self, t):
        return torch.exp(F.logsigmoid(self.lam(t)) / 2)  # √ᾱ_t

    def sigma(self, t):
        return torch.exp(F.logsigmoid(-self.lam(t)) / 2)  # √(1 − ᾱ_t)

    def _beta_tilde(self, t: int) -> float:
        """β̃_t (T24); at t = 1, where β̃_1 = 0, DDPM's and IDDPM's code clip it to β̃_2 (β_1 when T = 1)."""
        if t == 1:
            return float(self.betas[1]) if self.T < 2 else self._beta_tilde(2)
        return float(self.betas[t] * self.one_minus_alpha_bar[t - 1] / self.one_minus_alpha_bar[t])

    def check_reverse_variance(self, variance: str, *, denoiser=None, x0_var=None, v=None) -> None:
        """ValueError unless (variance, x0_var, v) choose one Σ_t of `reverse_variance` and the denoiser can
        give it: v (IDDPM, T26) replaces the default variance; phi needs `denoiser.predict`; analytic needs
        x0_var = v̄_t, one value ≥ 0 per step t = 0..T of this process (`analytic_variances`)."""
        check_choice("variance", variance, DDPM_VARIANCES)
        if v is not None and not callable(v):
            raise ValueError(f"v={v!r} must be a callable (z_t, t) -> v for the learned variance (T26)")
        if v is not None and variance != "beta_tilde":
            raise ValueError(f"v= (the learned variance, T26) replaces variance={variance!r}; give one of "
                             "them")
        if variance == "phi" and denoiser is not None and not hasattr(denoiser, "predict"):
            raise ValueError("variance='phi' needs a denoiser with predict() (σ_φ from a confidence head, or "
                             "the head-less c_var); this one has none")
        if (variance == "analytic") != (x0_var is not None):
            raise ValueError("x0_var= (Analytic-DPM's v̄_t, from analytic_variances) goes with "
                             f"variance='analytic' and only with it; got variance={variance!r} and "
                             f"x0_var={'none' if x0_var is None else 'a table'}")
        if x0_var is not None:
            tab = torch.as_tensor(x0_var)
            if tab.shape != (self.T + 1,) or not bool(torch.all(torch.isfinite(tab) & (tab >= 0))):
                raise ValueError(f"x0_var must hold one finite v̄_t >= 0 per step t = 0..T of this process, "
                                 f"shape ({self.T + 1},); got shape {tuple(tab.shape)}")

    def reverse_variance(self, t: int, variance: str = "beta_tilde", *, x0_var=None, v=None):
        """Σ_t of the reverse step p(x_{t−1} | x_t) = N(μ, Σ_t) at integer t ∈ 1..T, from this process's
        own tables (a `respaced` one: its β', β̃', ᾱ'). The one selection the sampler and the bound share:
        - beta: β_t; beta_tilde: β̃_t (T24);
        - v given (IDDPM, T26; a tensor or number): exp(v·log β_t + (1 − v)·log β̃_t);
        - phi, analytic (T38): β̃_t + c_0²·x0_var with c_0 = √ᾱ_{t−1}·β_t/(1 − ᾱ_t) (T24's x0 coefficient)
          and x0_var = Var[x0 | x_t]: per element (the head's σ_φ² − σ̃_t², phi) or one number per step
          (Analytic-DPM's v̄_t, analytic; Bao et al. 2022 in x0 form).
        At t = 1 (the decoder p(x0 | x_1); the sampler adds no noise there) β̃_1 = 0 is clipped to β̃_2 as
        DDPM's and IDDPM's code do, and T38's Σ_1 = c_0²·Var[x0 | x_1] (c_0 = 1) is floored at that β̃_2: kept
        exactly where it is above, never below what the fixed and learned decoders can reach.
        Returns a float, or a tensor for a tensor v or x0_var."""
        check_choice("variance", variance, DDPM_VARIANCES)
        b, bt = float(self.betas[t]), self._beta_tilde(t)
        if v is not None:
            return torch.exp(v * math.log(b) + (1 - v) * math.log(bt)) if torch.is_tensor(v) else \
                math.exp(v * math.log(b) + (1 - v) * math.log(bt))
        if variance in ("beta", "beta_tilde"):
            return b if variance == "beta" else bt
        if x0_var is None:
            raise ValueError(f"variance={variance!r} needs x0_var = Var[x0 | x_t] (T38)")
        c0 = math.sqrt(float(self.alpha_bar[t - 1])) * b / float(self.one_minus_alpha_bar[t])
        var = (0.0 if t == 1 else bt) + c0**2 * x0_var                        # β̃_1 = 0 in T38 itself
        if t > 1:
            return var
        return var.clamp_min(bt) if torch.is_tensor(var) else max(var, bt)

    def reverse_step(self, denoiser, z: torch.Tensor, t: int, variance: str = "beta_tilde", *, x0_var=None,
                     v=None, model_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, Σ_t) of p(x_{t−1} | x_t) at the DDPM latent z = x_t, integer t ∈ 1..T, from one denoiser
        evaluation: x̂0 = D(z/√ᾱ_t, σ̃_t), σ̃_t = √((1 − ᾱ_t)/ᾱ_t) (T2), and Σ_t = `reverse_variance`: phi
        reads Var[x0 | x_t] = (σ_φ² − σ̃_t²)⁺ (T8) from the same `denoiser.predict` call; analytic reads
        x0_var[t]; a learned v(z, t) is called after the denoiser (a v head that keeps its last G costs
        nothing more). The denoiser runs in model_dtype (default z's) with a float σ̃; x̂0 and Σ_t come back
        in z's dtype, Σ_t broadcastable to z (a v of one value per example [N] becomes [N, 1, …]). Arguments
        as checked by `check_reverse_variance`."""
        ab, om = float(self.alpha_bar[t]), float(self.one_minus_alpha_bar[t])
        sig = math.sqrt(om / ab)
        x_in = (z / math.sqrt(ab)).to(model_dtype or z.dtype)
        post = None
        if variance == "phi":
            pred = denoiser.predict(x_in, sig)
            x0 = pred.mu.to(z.dtype)
            post = pred.excess_variance(sig).to(z.dtype).clamp_min(0)
        else:
            x0 = denoiser(x_in, sig).to(z.dtype)
            if variance == "analytic":
                post = float(torch.as_tensor(x0_var)[t])
        vt = None
        if v is not None:
            vt = torch.as_tensor(v(z, t)).to(device=z.device, dtype=z.dtype)
            if vt.ndim == 1 and z.ndim > 1:                              # one v per example: [N] → [N, 1, …]
                vt = vt.reshape(-1, *([1] * (z.ndim - 1)))
            try:
                ok = torch.broadcast_shapes(vt.shape, z.shape) == z.shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"v(z, t) has shape {tuple(vt.shape)}; need z's {tuple(z.shape)}, [N] or a "
                                 "scalar")
        var = self.reverse_variance(t, variance, x0_var=post, v=vt)
        return x0, torch.as_tensor(var, dtype=z.dtype, device=z.device)

    def posterior(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_{t−1} | x_t, x0) = N(μ_q, β̃_t I) (T24) for integer steps t ∈ 1..T (scalar or [N]).
        Returns (mean shaped like x_t, variance broadcastable to x_t)."""
        t = torch.as_tensor(t)
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError(f"posterior needs integer steps t; got t={t.flatten()[0].item()!r}")
        t = t.long()
        if ((t < 1) | (t > self.T)).any():
            raise ValueError(f"posterior step t={t.flatten()[0].item()!r} is out of range; "
                             f"allowed: 1 <= t <= {self.T}")
        dev = x_t.device
        a, b = self.alphas.to(dev)[t], self.betas.to(dev)[t]                # α_t, β_t = 1 − α_t
        ab_prev = self.alpha_bar.to(dev)[t - 1]                             # ᾱ_{t−1}
        om_prev, om = self.one_minus_alpha_bar.to(dev)[t - 1], self.one_minus_alpha_bar.to(dev)[t]
        c_t, c_0 = a.sqrt() * om_prev / om, ab_prev.sqrt() * b / om
        mean = _expand(c_t, x_t) * x_t + _expand(c_0, x_t) * x0
        return mean, _expand(b * om_prev / om, x_t)


def analytic_variances(denoiser, x: torch.Tensor, ddpm: DDPM, *, generator=None,
                       batch: int = 256) -> torch.Tensor:
    """Analytic-DPM's one number per step (Bao et al. 2022): v̄_t = E‖x0 − x̂0(x_t)‖²/d, the mean squared
    error of the denoiser's x̂0 over elements and the images `x` [N, ...] (training data), at each step's σ̃_t
    of `ddpm` (a `respaced` one: its own steps), x̃ = x0 + σ̃_t·ε (T2). Returns a float64 tensor [T + 1]
    indexed by step, v̄_0 = 0, for `reverse_variance(t, "analytic", x0_var=v̄)`: Σ_t = β̃_t + c_0²·v̄_t (T38).

    Bao et al.'s optimal scalar variance is β̃_t + c_0²·E‖x0 − E[x0 | x_t]‖²/d, which they estimate from the
    norm of the model's ε-prediction; here the squared error of x̂0 itself. For the exact model both are
    the element-mean of Var[x0 | x_t]; for a model with mean x̂0, β̃_t + c_0²·v̄_t is the one scalar that
    minimises the expected KL term of the bound (its optimum for that mean, T24). The noise is drawn per
    step for all images at once from `generator` (default: seed 0), in float64 on the CPU, so the table does
    not depend on `batch` (images per denoiser call); the denoiser runs in x's dtype with a float σ̃."""
    check_positive("batch", batch, integer=True)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a batch [N, ...] of training data with N >= 1; got shape "
                         f"{tuple(x.shape)}")
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    x64 = x.detach().to(torch.float64)
    out = torch.zeros(ddpm.T + 1, dtype=torch.float64)
    for t in range(1, ddpm.T + 1):
        sig = math.sqrt(float(ddpm.one_minus_alpha_bar[t]) / float(ddpm.alpha_bar[t]))
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
        total = 0.0
        for i in range(0, len(x), batch):
            x_noisy = (x64[i:i + batch] + sig * eps[i:i + batch]).to(x.dtype)
            with torch.no_grad():
                mu = denoiser(x_noisy, sig).to(torch.float64)
            total += float((mu - x64[i:i + batch]).square().sum())
        out[t] = total / x.numel()
    return out


PROCESSES: dict[str, type[Process]] = {"ve": VE, "vp": VP, "flow": FlowMatching, "ddpm": DDPM}


def make_process(name: str, **kw) -> Process:
    """A process from the registry by name, e.g. `make_process("ddpm", schedule="cosine")`."""
    check_choice("process", name, PROCESSES)
    return PROCESSES[name](**kw)
