"""Noise schedules: the sampling σ grid, the training σ density, and the learning-rate schedule.

THEORY T18 ("EDM training", "EDM sampling") and §10. STYLE 5: grids end with a trailing zero;
densities are objects with `sample(n, generator)` and a density, so the loss never draws σ itself.
"""
from __future__ import annotations

import math

import torch

from .checks import check_positive
from .process import flow_matching_lam, flow_matching_t_of_lam


def edm_sigmas(steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 5.0, rho: float = 7.0,
               dtype=torch.float64) -> torch.Tensor:
    """EDM eq. 5: σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, with a trailing 0:
    [steps + 1]."""
    check_positive("steps", steps, integer=True)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
    check_positive("rho", rho)
    i = torch.arange(steps, dtype=dtype) / max(steps - 1, 1)
    s = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def distill_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 5.0, rho: float = 7.0,
                   dtype=torch.float64) -> torch.Tensor:
    """The σ grid of progressive distillation (T35): EDM's ρ-spaced interval [σ_max, σ_min] cut into `steps`
    equal parts in σ^(1/ρ), the start of each part, then 0: σ_i = (σ_max^(1/ρ) + i/steps·(σ_min^(1/ρ) −
    σ_max^(1/ρ)))^ρ for i < steps, [steps + 1]. Unlike `edm_sigmas` the last point before 0 is σ(1 − 1/steps),
    not σ_min, so the grids nest: `distill_sigmas(2N)[::2] == distill_sigmas(N)` exactly (2i/2N is the float
    i/N), and each round's teacher (2N steps) lands on every point of its student's grid (N steps). One step
    (N = 1) is σ_max → 0."""
    check_positive("steps", steps, integer=True)
    _check_range(sigma_min, sigma_max)
    check_positive("rho", rho)
    i = torch.arange(steps, dtype=dtype) / steps
    s = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def _t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64) if not torch.is_tensor(x) else x


class NoiseSchedule:
    """A training noise density in log-SNR (T18): λ = lam(t) for t ~ U(0, 1), decreasing in t, so
    p(λ) = −dt/dλ. `sample(n, generator)` gives the VE noise level σ = exp(−λ/2) (T2) that the losses
    and `train` consume; `sample_lam` gives λ. `stratified=True` draws t = (i + u)/n with one shared u
    (VDM's low-discrepancy sampler): the same marginal, lower estimator variance."""
    lam_min, lam_max = -math.inf, math.inf   # the support of p(λ)

    def lam(self, t):
        raise NotImplementedError

    def t_of_lam(self, lam):
        raise NotImplementedError

    def pdf(self, lam):
        raise NotImplementedError

    def cdf(self, lam) -> torch.Tensor:
        """P(Λ ≤ λ) = 1 − t(λ) (λ decreases with t)."""
        return 1 - self.t_of_lam(lam)

    def sample_lam(self, n: int, generator=None, dtype=torch.float32,
                   stratified: bool = False) -> torch.Tensor:
        check_positive("n", n, integer=True)
        if stratified:
            u = torch.rand(1, generator=generator, dtype=torch.float64)
            t = (torch.arange(n, dtype=torch.float64) + u) / n
        else:
            t = torch.rand(n, generator=generator, dtype=torch.float64)
        return self.lam(t.clamp(1e-12, 1 - 1e-12)).to(dtype)

    def sample(self, n: int, generator=None, dtype=torch.float32, stratified: bool = False) -> torch.Tensor:
        """σ = exp(−λ/2): [n]."""
        return torch.exp(-self.sample_lam(n, generator, torch.float64, stratified) / 2).to(dtype)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Cosine(NoiseSchedule):
    """T18 cosine: λ = −2 log tan(πt/2) + 2s, p(λ) = sech(λ/2 − s)/(2π); shift s = 0 is the plain cosine."""

    def __init__(self, shift: float = 0.0):
        if isinstance(shift, bool) or not (isinstance(shift, (int, float)) and math.isfinite(shift)):
            raise ValueError(f"shift={shift!r} must be a finite number (0: the plain cosine schedule)")
        self.shift = float(shift)

    def lam(self, t):
        return -2 * torch.log(torch.tan(math.pi * _t(t) / 2)) + 2 * self.shift

    def t_of_lam(self, lam):
        return 2 / math.pi * torch.atan(torch.exp(-(_t(lam) - 2 * self.shift) / 2))

    def pdf(self, lam):
        return 1 / (2 * math.pi * torch.cosh(_t(lam) / 2 - self.shift))


class LogNormalSigma(NoiseSchedule):
    """EDM's training density: ln σ ~ N(P_mean, P_std²), i.e. λ = −2 ln σ ~ N(−2·P_mean, (2·P_std)²) (T18
    "EDM training"; THEORY's P_mean = −1.2, P_std = 1.2 gives N(2.4, 2.4²); the toy uses −2.4, 1.5).
    λ = F_N⁻¹(1 − t) (THEORY's sign-fixed form). `sample` draws ln σ directly, as EDM does."""

    def __init__(self, p_mean: float = -2.4, p_std: float = 1.5):
        if isinstance(p_mean, bool) or not (isinstance(p_mean, (int, float)) and math.isfinite(p_mean)):
            raise ValueError(f"p_mean={p_mean!r} must be a finite number")
        check_positive("p_std", p_std)
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    @property
    def _m_s(self):
        return -2 * self.p_mean, 2 * self.p_std

    def lam(self, t):
        m, s = self._m_s
        return m + s * math.sqrt(2) * torch.erfinv(2 * (1 - _t(t)) - 1)

    def t_of_lam(self, lam):
        m, s = self._m_s
        return 1 - 0.5 * (1 + torch.erf((_t(lam) - m) / (s * math.sqrt(2))))

    def pdf(self, lam):
        m, s = self._m_s
        return torch.exp(-0.5 * ((_t(lam) - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    def sample(self, n: int, generator=None, dtype=torch.float32, stratified: bool = False) -> torch.Tensor:
        """σ: [n]. Unstratified draws are exp(N(P_mean, P_std²)) from randn, as the reference toy draws
        them."""
        if stratified:
            return super().sample(n, generator, dtype, stratified)
        return (torch.randn(n, generator=generator, dtype=dtype) * self.p_std + self.p_mean).exp()

    def cdf_sigma(self, sigma) -> torch.Tensor:
        """P(σ' ≤ σ) = P(Λ ≥ −2 ln σ)."""
        return self.t_of_lam(-2 * _t(sigma).log())


class EDMSampling(NoiseSchedule):
    """T18 "EDM sampling": the ρ-spaced σ grid of EDM eq. 5 as a density, σ^(1/ρ) uniform between
    σ_min^(1/ρ) and σ_max^(1/ρ); p(λ) = e^(−λ/(2ρ)) / (2ρ(σ_max^(1/ρ) − σ_min^(1/ρ)))."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        _check_range(sigma_min, sigma_max)
        check_positive("rho", rho)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.lam_min, self.lam_max = -2 * math.log(self.sigma_max), -2 * math.log(self.sigma_min)

    def _a_b(self):
        return self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)

    def lam(self, t):
        a, b = self._a_b()
        return -2 * self.rho * torch.log(b + (1 - _t(t)) * (a - b))

    def t_of_lam(self, lam):
        a, b = self._a_b()
        return 1 - (torch.exp(-_t(lam) / (2 * self.rho)) - b) / (a - b)

    def pdf(self, lam):
        a, b = self._a_b()
        lam = _t(lam)
        inside = (lam >= self.lam_min) & (lam <= self.lam_max)
        return torch.where(inside, torch.exp(-lam / (2 * self.rho)) / (2 * self.rho * (b - a)), 0.0)


class FlowMatchingSchedule(NoiseSchedule):
    """T18 flow matching (α = 1 − t, σ = t): λ = 2 log((1 − t)/t), p(λ) = sech²(λ/4)/8."""

    def lam(self, t):
        return flow_matching_lam(_t(t))

    def t_of_lam(self, lam):
        return flow_matching_t_of_lam(_t(lam))

    def pdf(self, lam):
        return 1 / (8 * torch.cosh(_t(lam) / 4) ** 2)


class LogUniform(NoiseSchedule):
    """log σ uniform on [log σ_min, log σ_max]: λ uniform on [−2 log σ_max, −2 log σ_min]."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        _check_range(sigma_min, sigma_max)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.lam_min, self.lam_max = -2 * math.log(self.sigma_max), -2 * math.log(self.sigma_min)

    def lam(self, t):
        return self.lam_max - _t(t) * (self.lam_max - self.lam_min)

    def t_of_lam(self, lam):
        return (self.lam_max - _t(lam)) / (self.lam_max - self.lam_min)

    def pdf(self, lam):
        lam = _t(lam)
        inside = (lam >= self.lam_min) & (lam <= self.lam_max)
        return torch.where(inside, torch.full_like(lam, 1 / (self.lam_max - self.lam_min)), 0.0)


class Truncated(NoiseSchedule):
    """A density restricted to σ ∈ [sigma_min, sigma_max] (λ ∈ [−2 log σ_max, −2 log σ_min]) and renormalised:
    equal endpoints for every density, as VDM++ compares processes; keeps float32 batches away from the
    σ where x0 + σε cannot represent σε (σ ≪ 1e-7·|x0|), which the importance weight w/p would amplify."""

    def __init__(self, base: NoiseSchedule, sigma_min: float = 0.002, sigma_max: float = 80.0):
        _check_range(sigma_min, sigma_max)
        self.base, self.sigma_min, self.sigma_max = base, float(sigma_min), float(sigma_max)
        self.lam_min = max(-2 * math.log(self.sigma_max), base.lam_min)
        self.lam_max = min(-2 * math.log(self.sigma_min), base.lam_max)
        t_hi, t_lo = (float(base.t_of_lam(torch.tensor(v, dtype=torch.float64)))
                      for v in (self.lam_max, self.lam_min))
        self._t0, self._z = t_hi, t_lo - t_hi               # base t of the upper λ end, and the mass kept
        if not self._z > 0:
            raise ValueError(f"{base!r} has no mass in σ ∈ [{sigma_min}, {sigma_max}]")

    def lam(self, t):
        return self.base.lam(self._t0 + _t(t) * self._z)

    def t_of_lam(self, lam):
        return (self.base.t_of_lam(_t(lam).clamp(self.lam_min, self.lam_max)) - self._t0) / self._z

    def pdf(self, lam):
        lam = _t(lam)
        inside = (lam >= self.lam_min) & (lam <= self.lam_max)
        return torch.where(inside, self.base.pdf(lam) / self._z, 0.0)

    def sample(self, n, generator=None, dtype=torch.float32, stratified=False):
        return NoiseSchedule.sample(self, n, generator, dtype, stratified)

    def __repr__(self):
        return f"Truncated({self.base!r}, sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class AdaptiveSchedule(NoiseSchedule):
    """T20 (VDM++ §5): a piecewise-constant p(λ) on `bins` equal bins of [λ_min, λ_max], fitted online so that
    the importance-weighted loss w(λ)/p(λ)·E[‖ε̂ − ε‖² | λ] is flat: p(λ) ∝ w(λ)·E[‖ε̂ − ε‖² | λ], the
    zero-variance choice for a non-negative integrand. `update(sigma, eps_loss)` feeds per-example
    ‖ε̂ − ε‖² (the trainer calls it after each step); the per-bin means are exponential moving averages
    (decay `ema`), and a floor `mix` of the uniform density keeps every bin sampled."""

    def __init__(self, weighting, sigma_min: float = 0.002, sigma_max: float = 80.0, bins: int = 64,
                 ema: float = 0.99, mix: float = 0.05):
        _check_range(sigma_min, sigma_max)
        check_positive("bins", bins, integer=True)
        if not 0 <= ema < 1:
            raise ValueError(f"ema={ema!r} must be in [0, 1)")
        if not 0 < mix <= 1:
            raise ValueError(f"mix={mix!r} must be in (0, 1]: the uniform share that keeps every bin sampled")
        self.weighting, self.ema, self.mix = weighting, float(ema), float(mix)
        self.lam_min, self.lam_max = -2 * math.log(sigma_max), -2 * math.log(sigma_min)
        self.edges = torch.linspace(self.lam_min, self.lam_max, bins + 1, dtype=torch.float64)
        self.mean_loss = torch.ones(bins, dtype=torch.float64)   # E[‖ε̂ − ε‖² | bin], 1 until seen
        self._refit()

    def _refit(self):
        mid = (self.edges[1:] + self.edges[:-1]) / 2
        mass = self.weighting(mid) * self.mean_loss
        mass = (1 - self.mix) * mass / mass.sum() + self.mix / len(mass)
        self.mass = mass                                          # probability of each bin
        self.above = mass.flip(0).cumsum(0).flip(0) - mass        # P(λ above bin i)

    def _bin(self, lam):
        return torch.bucketize(_t(lam), self.edges[1:-1].to(_t(lam).dtype))

    def state_dict(self) -> dict:
        return {"mean_loss": self.mean_loss.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.mean_loss = state["mean_loss"].clone().to(torch.float64)
        self._refit()

    def update(self, sigma: torch.Tensor, eps_loss: torch.Tensor) -> None:
        lam = -2 * sigma.detach().double().log().view(-1)
        b = self._bin(lam)
        total = torch.zeros_like(self.mean_loss).index_add_(0, b, eps_loss.detach().double().view(-1))
        count = torch.zeros_like(self.mean_loss).index_add_(0, b, torch.ones_like(lam))
        seen = count > 0
        self.mean_loss[seen] = self.ema * self.mean_loss[seen] + (1 - self.ema) * total[seen] / count[seen]
        self._refit()

    # λ decreases with t: t runs through the bins from the top (highest λ) down
    def t_of_lam(self, lam):
        lam = _t(lam).clamp(self.lam_min, self.lam_max)
        width = (self.edges[1] - self.edges[0]).item()
        b = self._bin(lam)
        return (self.above[b] + self.mass[b] * (self.edges[b + 1] - lam) / width).to(lam.dtype)

    def lam(self, t):
        t = _t(t)
        top = self.mass.flip(0).cumsum(0)                         # mass of the top k + 1 bins
        b = len(self.mass) - 1 - torch.bucketize(t, top[:-1].to(t.dtype))
        frac = (t - self.above[b]) / self.mass[b]
        return self.edges[b + 1] - frac * (self.edges[1] - self.edges[0])

    def pdf(self, lam):
        lam = _t(lam)
        inside = (lam >= self.lam_min) & (lam <= self.lam_max)
        width = (self.edges[1] - self.edges[0]).item()
        return torch.where(inside, self.mass[self._bin(lam)].to(lam.dtype) / width, 0.0)


class DDPMSteps:
    """The discrete training density of DDPM (seed 004, T23): a step t uniform in 1..T, returned as its VE
    noise level σ̃_t = √((1 − ᾱ_t)/ᾱ_t) (T2), float32. `steps(σ̃)` maps such σ̃ back to t
    (exactly: each σ̃ must be one of the table's values), for losses that need the step (HybridLoss, T26)."""

    def __init__(self, ddpm):
        self.ddpm = ddpm
        self.table = (ddpm.one_minus_alpha_bar[1:] / ddpm.alpha_bar[1:]).sqrt().float()   # [T], σ̃_1 … σ̃_T

    def sample(self, n: int, generator=None, dtype=torch.float32) -> torch.Tensor:
        t = torch.randint(1, self.ddpm.T + 1, (n,), generator=generator)
        return self.table[t - 1].to(dtype)

    def steps(self, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.detach().flatten().float().cpu()
        i = torch.searchsorted(self.table, s).clamp(max=self.ddpm.T - 1)
        if not torch.equal(self.table[i], s):
            bad = s[self.table[i] != s][0].item()
            raise ValueError(f"sigma={bad!r} is not a step σ̃_t of {self!r}; allowed: the values that "
                             "DDPMSteps.sample draws")
        return i + 1

    def __repr__(self):
        return f"DDPMSteps(T={self.ddpm.T}, schedule={self.ddpm.schedule!r})"


class GridSteps:
    """σ drawn uniformly from the points of a σ grid (its trailing 0 excluded), float32: the training density
    of a distillation round, whose student trains only at the starts of its own steps (T35; Salimans & Ho
    draw t uniformly from the student's grid). `index(σ)` maps such σ back to their position in the grid
    (exactly: each must be one of the values `sample` draws)."""

    def __init__(self, sigmas):
        grid = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        s = [float(v) for v in grid]
        if len(s) < 2 or s[-1] != 0 or not all(math.isfinite(v) and v > 0 for v in s[:-1]) \
                or any(a <= b for a, b in zip(s, s[1:])):
            raise ValueError("sigmas must be a strictly decreasing grid of finite σ > 0 ending in a single 0 "
                             f"(e.g. distill_sigmas(4)); got {s[:3]}…{s[-2:]}")
        self.sigmas = grid
        self.table = grid[:-1].float()      # [steps], the points σ is drawn from

    def sample(self, n: int, generator=None, dtype=torch.float32) -> torch.Tensor:
        i = torch.randint(0, len(self.table), (n,), generator=generator)
        return self.table[i].to(dtype)

    def index(self, sigma: torch.Tensor) -> torch.Tensor:
        """The grid position i (σ = sigmas[i]) of each σ: [n] long."""
        s = torch.as_tensor(sigma).detach().flatten().float().cpu()
        hit = s[:, None] == self.table[None, :]
        if not bool(hit.any(1).all()):
            bad = s[~hit.any(1)][0].item()
            raise ValueError(f"sigma={bad!r} is not a point of {self!r}; allowed: the values "
                             "GridSteps.sample draws (train with sigma_density= this GridSteps)")
        return hit.float().argmax(1)

    def __repr__(self):
        return f"GridSteps(steps={len(self.table)}, sigma_max={float(self.table[0]):.4g})"


def _check_range(sigma_min, sigma_max):
    check_positive("sigma_min", sigma_min)
    check_positive("sigma_max", sigma_max)
    if not sigma_min < sigma_max:
        raise ValueError(f"need sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")


SCHEDULES = {"cosine": Cosine, "edm-training": LogNormalSigma, "edm-sampling": EDMSampling,
             "flow-matching": FlowMatchingSchedule, "log-uniform": LogUniform}


def make_schedule(name: str, truncate: tuple | None = None, **kw) -> NoiseSchedule:
    """A training density by name (the CLI's boundary): cosine (shift=s for the shifted cosine),
    edm-training, edm-sampling, flow-matching, log-uniform; `truncate=(σ_min, σ_max)` restricts it."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is not allowed; choose one of {sorted(SCHEDULES)}")
    sch = SCHEDULES[name](**kw)
    return sch if truncate is None else Truncated(sch, *truncate)


class Weighting:
    """w(λ) of the weighted loss T17 (T19). `monotonic`: w is non-increasing in λ (more weight at more
    noise), which makes the loss an ELBO of noise-augmented data (VDM++ Theorem 1)."""
    monotonic = False

    def __call__(self, lam) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ELBOWeighting(Weighting):
    """w ≡ 1: the ELBO up to constants (T17)."""
    monotonic = True

    def __call__(self, lam):
        return torch.ones_like(_t(lam))


class SigmoidWeighting(Weighting):
    """w = sigmoid(−λ + b); b = 2 is VDM++'s best (T19)."""
    monotonic = True

    def __init__(self, bias: float = 2.0):
        if isinstance(bias, bool) or not (isinstance(bias, (int, float)) and math.isfinite(bias)):
            raise ValueError(f"bias={bias!r} must be a finite number")
        self.bias = float(bias)

    def __call__(self, lam):
        return torch.sigmoid(-_t(lam) + self.bias)


class EDMWeighting(Weighting):
    """EDM in ε-space (T19): w(λ) = p_EDM(λ)·(e^(−λ) + σ_d²)/σ_d², so that w/p_EDM·‖ε̂ − ε‖²/2 is EDM's
    ½λ(σ)‖D − x0‖² = ½‖F − F*‖² (`losses.EDMLoss`). Not monotonic (a bump around the density's mode)."""

    def __init__(self, sigma_data: float = 0.5, density: LogNormalSigma | None = None):
        check_positive("sigma_data", sigma_data)
        self.sigma_data = float(sigma_data)
        self.density = density or LogNormalSigma(-1.2, 1.2)

    def __call__(self, lam):
        lam = _t(lam)
        d2 = self.sigma_data ** 2
        return self.density.pdf(lam) * (torch.exp(-lam) + d2) / d2


class EDMMonotonicWeighting(EDMWeighting):
    """EDM-monotonic (VDM++ §4/Table 2, T19): EDM's weighting made non-increasing in λ by holding it at its
    peak for every λ below the peak, w(λ) = w_EDM(max(λ, λ*)) with λ* = argmax w_EDM, so that the loss is an
    ELBO of noise-augmented data (VDM++ Theorem 1) while keeping EDM's shape on the low-noise side.
    λ* is found on a float64 grid of step 1e-4 over the density's ±12 std, then by two Newton steps on
    d log w/dλ = −(λ − m)/s² − e^(−λ)/(e^(−λ) + σ_d²)."""
    monotonic = True

    def __init__(self, sigma_data: float = 0.5, density: LogNormalSigma | None = None):
        super().__init__(sigma_data, density)
        m, s = self.density._m_s
        grid = torch.arange(m - 12 * s, m + 12 * s, 1e-4, dtype=torch.float64)
        lam = grid[torch.argmax(EDMWeighting.__call__(self, grid))]
        d2 = self.sigma_data ** 2
        for _ in range(2):
            e = torch.exp(-lam)
            g = -(lam - m) / s ** 2 - e / (e + d2)                 # d log w / dλ
            h = -1 / s ** 2 + e * d2 / (e + d2) ** 2               # its derivative
            lam = lam - g / h
        self.lam_peak = float(lam)

    def __call__(self, lam):
        lam = _t(lam)
        return super().__call__(torch.clamp(lam, min=self.lam_peak))


class VWeighting(Weighting):
    """v-prediction's implied weighting w = exp(−λ/2) (T19)."""
    monotonic = True

    def __call__(self, lam):
        return torch.exp(-_t(lam) / 2)


class EpsCosineWeighting(Weighting):
    """ε-prediction trained under the cosine schedule: w = sech(λ/2) (T19)."""

    def __call__(self, lam):
        return 1 / torch.cosh(_t(lam) / 2)


class MinSNRWeighting(Weighting):
    """Min-SNR-γ (Hang et al. 2023) in ε-space: w = min(SNR, γ)/SNR = min(1, γ·e^(−λ))."""
    monotonic = True

    def __init__(self, gamma: float = 5.0):
        check_positive("gamma", gamma)
        self.gamma = float(gamma)

    def __call__(self, lam):
        return torch.clamp(self.gamma * torch.exp(-_t(lam)), max=1.0)


WEIGHTINGS = {"elbo": ELBOWeighting, "sigmoid": SigmoidWeighting, "edm": EDMWeighting,
              "edm-monotonic": EDMMonotonicWeighting, "v": VWeighting,
              "eps-cosine": EpsCosineWeighting, "min-snr": MinSNRWeighting}


def make_weighting(name: str, **kw) -> Weighting:
    if name not in WEIGHTINGS:
        raise ValueError(f"weighting={name!r} is not allowed; choose one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](**kw)


def inverse_sqrt_lr(lr: float, i: int, ref: int) -> float:
    """The reference toy's learning rate at iteration i: lr / √max(i/ref, 1) (§10; EDM2's decay)."""
    return lr / math.sqrt(max(i / ref, 1))


class LearnedSchedule(torch.nn.Module):
    """VDM's learned noise schedule (T22): γ_η(t) = −λ(t), monotone increasing in t, as
    γ(t) = γ_0 + (γ_1 − γ_0)·(ĝ(t) − ĝ(0))/(ĝ(1) − ĝ(0)), ĝ(t) = l1(t) + l3(sigmoid(l2(l1(t)))) with
    positive weights (softplus), so only the shape between the endpoints is free; `learn_endpoints`
    makes γ_0 = −λ_max and γ_1 = −λ_min parameters too. Only the endpoints change the continuous ELBO."""

    def __init__(self, lam_min: float = -10.0, lam_max: float = 10.0, hidden: int = 64,
                 learn_endpoints: bool = False):
        super().__init__()
        for name, v in (("lam_min", lam_min), ("lam_max", lam_max)):
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{name}={v!r} must be a finite number")
        if not lam_min < lam_max:
            raise ValueError(f"need lam_min < lam_max; got lam_min={lam_min}, lam_max={lam_max}")
        check_positive("hidden", hidden, integer=True)
        ends = torch.tensor([-lam_max, -lam_min], dtype=torch.float64)
        self.ends = (torch.nn.Parameter(ends) if learn_endpoints
                     else torch.nn.Parameter(ends, requires_grad=False))
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(1, generator=g, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64))
        self.b2 = torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64))
        self.w3 = torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64) / hidden)

    def _g(self, t):
        sp = torch.nn.functional.softplus
        h = sp(self.w1) * t
        return h + (torch.sigmoid(h[..., None] * sp(self.w2) + self.b2) * sp(self.w3)).sum(-1)

    def gamma(self, t) -> torch.Tensor:
        t = _t(t).to(self.ends.dtype)
        g0, g1 = self._g(torch.zeros_like(t)), self._g(torch.ones_like(t))
        return self.ends[0] + (self.ends[1] - self.ends[0]) * (self._g(t) - g0) / (g1 - g0)

    def lam(self, t) -> torch.Tensor:
        return -self.gamma(t)


class LearnedDensity(NoiseSchedule):
    """A `LearnedSchedule` as a training density (T22 with T17): t ~ U(0, 1), λ = λ_η(t), so
    p(λ) = 1/|λ'_η(t)|. With fixed endpoints the weighted loss' mean ∫ ½w(λ)E[‖ε̂ − ε‖² | λ]dλ does not depend
    on γ's shape, so VDM trains the shape to minimise the estimator's variance: `train` steps the denoiser on
    the loss' mean and η (`parameters()`) on its second moment. `sample` returns σ = e^(−λ_η(t)/2)
    differentiable in η; `pdf(λ)` is 1/|λ'_η(t)| at t = t_of_lam(λ) held fixed, which at a sampled λ = λ_η(t)
    is that t, so autograd gives the derivative at fixed t, the one the variance gradient needs.
    `t_of_lam` inverts λ_η by linear interpolation on a `grid`-point table (no gradient)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, hidden: int = 64, grid: int = 4097,
                 schedule: LearnedSchedule | None = None):
        _check_range(sigma_min, sigma_max)
        check_positive("grid", grid, integer=True)
        if grid < 2:
            raise ValueError(f"grid={grid} must be >= 2")
        self.schedule = schedule or LearnedSchedule(-2 * math.log(sigma_max),
                                                    -2 * math.log(sigma_min), hidden)
        self.grid = int(grid)

    @property
    def lam_min(self):
        return -float(self.schedule.ends[1])

    @property
    def lam_max(self):
        return -float(self.schedule.ends[0])

    def parameters(self):
        return [p for p in self.schedule.parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)

    def lam(self, t):
        return self.schedule.lam(t)

    def t_of_lam(self, lam):
        lam = _t(lam)
        with torch.no_grad():
            tg = torch.linspace(0, 1, self.grid, dtype=torch.float64)
            lg = self.schedule.lam(tg).flip(0)                     # increasing in λ, t decreasing
            x = lam.detach().double().clamp(lg[0], lg[-1])
            i = torch.searchsorted(lg, x).clamp(1, self.grid - 1)
            frac = (x - lg[i - 1]) / (lg[i] - lg[i - 1])
            t_hi, t_lo = tg.flip(0)[i - 1], tg.flip(0)[i]
            return (t_hi + frac * (t_lo - t_hi)).to(lam.dtype)

    def pdf(self, lam):
        lam = _t(lam)
        t, graph = self.t_of_lam(lam).double().requires_grad_(True), torch.is_grad_enabled()
        with torch.enable_grad():
            lt = self.schedule.lam(t)
            (dlam,) = torch.autograd.grad(lt.sum(), t, create_graph=graph)
        inside = (lam >= self.lam_min) & (lam <= self.lam_max)
        return torch.where(inside, 1 / (-dlam), 0.0).to(lam.dtype)

    def __repr__(self):
        return f"LearnedDensity(lam=[{self.lam_min:.3f}, {self.lam_max:.3f}], grid={self.grid})"
