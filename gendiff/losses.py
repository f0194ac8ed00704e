"""Losses: small callables `loss(denoiser, batch) -> [N]`, unreduced per example (STYLE 3).

The noise level is drawn outside (schedules.py) and arrives in the batch, so weighting and sampling
density are ablated independently. THEORY §3 and §10. The formulas themselves (T7–T12) live with the
heads (heads.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checks import as_sigma, check_choice, check_positive, one_per_example
from .heads import LOG_2PI, ExcessHead, _sum_elements, f_target
from .likelihood import discretized_gaussian_log_prob
from .precond import Denoiser


@dataclass
class NoisyBatch:
    """One training batch. x0: [N, ...]; sigma: scalar, [N] or per element (checks.as_sigma).

    source_cov: [N, d, d], a known covariance of x0's source whose trace term enters the NLL (T12); the
    scalings stay those of σ (the toy's source mode).
    score: [N, ...], the exact score ∇ log p(x_noisy; σ) where an oracle knows it (§10).
    labels: [N] class indices for a class-conditional denoiser (already dropped to ∅ where CFG training
    asks for it, T33); None for an unconditional one.
    source_sigma: shaped like x0, a known per-element std s ≥ 0 of x0's source (T36 mode (c): x0 = m, x̃ = m +
    s·ε₁ + σ·ε₂, so x̃ ~ N(x0, σ² + s²), T3); `predict` hands it to the denoiser, whose scalings then come
    from the total σ √(σ² + s²) (c_noise from σ).
    latent_eps: [N, ...] standard normal draws for a loss that samples a latent of its own (the VAE's
    reparameterisation ε, nets/vae.ELBOLoss), drawn by the source with the data.
    """
    x0: torch.Tensor
    x_noisy: torch.Tensor
    sigma: torch.Tensor
    source_cov: torch.Tensor | None = None
    score: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    source_sigma: torch.Tensor | None = None
    latent_eps: torch.Tensor | None = None

    def predict(self, denoiser, total_sigma: bool = True):
        """The denoiser's prediction at this batch (its labels passed only when there are any; the source std
        only when there is one and `total_sigma`: scalings from √(σ² + s²), T36 (c))."""
        kw = {} if self.labels is None else {"class_labels": self.labels}
        if self.source_sigma is not None and total_sigma:
            kw["source_sigma"] = self.source_sigma
        return denoiser.predict(self.x_noisy, self.sigma, **kw)

    def mean(self, denoiser):
        """μ = D(x̃; σ[, y]) (through `predict` when the batch has a source std)."""
        if self.source_sigma is not None:
            return self.predict(denoiser).mu
        if self.labels is None:
            return denoiser(self.x_noisy, self.sigma)
        return denoiser(self.x_noisy, self.sigma, class_labels=self.labels)


class ConfidenceNLL:
    """The confidence-aware Gaussian NLL of x0 under q(x0 | x̃) = N(μ, Σ_φ), read through the denoiser's
    head: T9 (diagonal), T12 (full, with the batch's Σ_src when given).

    With `NoHead` (G ≡ 0) it is EDM's F-space error times k(σ)/2 plus a constant (T11): the optimum per σ
    is EDM's, but the weighting across σ is k(σ) = σ_d²/(σ² + 2σ_d²), not EDM's uniform one (`EDMLoss`).

    A batch with a known per-element source std s (`batch.source_sigma`, T36 mode (c)): x̃ ~ N(x0, V),
    V = σ² + s² per element, and the loss is T7 with V in place of σ², per element
    ½[log σ_φ² + (V + (μ − x0)²)/σ_φ² + log 2π], optimum σ_φ² = σ² + s² + Var[x0 | x̃]. In T9's form
    2L = G + e^(−G)·[V/c_var² + k(F − F*)²] + log 2πc_var². total_sigma=True (T36's choice): the scalings come
    from σ_t = √(σ² + s²), so V/c_var² = σ_t²/c_var² = 1 − k_t and nothing is added (T36's
    "(1 − k) + s²/c_var²" holds with 1 − k read as σ²/c_var², the diffusion part). total_sigma=False: the
    scalings come from σ and s² enters as T12's diagonal trace term s²/c_var² (as Σ_src in the toy's source
    mode).
    """

    def __init__(self, total_sigma: bool = True):
        if not isinstance(total_sigma, bool):
            raise ValueError(f"total_sigma={total_sigma!r} must be true or false")
        self.total_sigma = total_sigma

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        p = batch.predict(denoiser, total_sigma=self.total_sigma)
        var = None if batch.source_sigma is None or self.total_sigma else batch.source_sigma.square()
        return denoiser.head.nll(p, batch.x0, batch.source_cov, source_var=var)


def _excess_head(denoiser: Denoiser, loss: str):
    if not isinstance(denoiser.head, ExcessHead):
        raise ValueError(f"loss {loss!r} trains T37's excess-variance head (head 'excess'); the "
                         f"denoiser's head is {type(denoiser.head).__name__}")
    return denoiser.head


class ExcessLogGradNLL(ConfidenceNLL):
    """T7 through T37's excess-variance head, value and per-x̃ stationary point (T8) unchanged, with G's
    gradient taken with respect to log σ_φ² (`heads.nll_excess(log_variance_grad=True)`; not the gradient of
    any loss): T37's reachable set (σ_φ ≥ σ), T6's well-conditioned gradient for the variance. μ's gradient is
    T7's, (μ − x0)/σ_φ².

    Why (issue 18, measured on MNIST): under T37 ∂L/∂G carries the factor Var[x0 | x̃]/σ_φ², so a pixel whose
    claimed excess is far below σ² (MNIST's background from σ = 0.2 up) hardly moves: at 4000 steps its
    claimed variance stayed 3–10× above its squared error in the middle deciles and ±1 std covered 88–91%."""

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        head = _excess_head(denoiser, "nll-log-grad")
        p = batch.predict(denoiser, total_sigma=self.total_sigma)
        var = None if batch.source_sigma is None or self.total_sigma else batch.source_sigma.square()
        return head.nll(p, batch.x0, batch.source_cov, source_var=var, log_variance_grad=True)


class ExcessPosteriorNLL(ConfidenceNLL):
    """T7 through T37's excess-variance head, plus the Gaussian NLL of x0 under N(μ, Var) with the mean held
    fixed (stop-gradient), Var = c_out²·(e^G + ε) the head's excess (T37) with a relative floor ε =
    VAR_FLOOR, per element:
    ½[log(2π·c_out²) + log(e^G + ε) + ‖sg(F) − F*‖²/(e^G + ε)]  (μ − x0 = c_out·(F − F*), T6).

    Why (issue 18, measured on MNIST): under T7 alone ∂L/∂G = ½·(k·e^G/D)·(1 − inner/D), D = 1 − k + k·e^G, so
    G's gradient vanishes as Var/σ² → 0: a head that says Var ≪ σ² is not pulled back when the error is
    larger (its least certain decile of pixels at σ = 0.05 was 16× overconfident). The added term's
    ∂/∂G = ½·e^G/(e^G + ε)·(1 − (F − F*)²/(e^G + ε)) does not shrink with Var/σ² (it is O(1) near its optimum
    and at most ½·(F − F*)²/ε far below it), and its optimum is T8's, e^G + ε = E[(μ − x0)²]/c_out² =
    (σ_φ² − σ²)/c_out² up to ε: the two terms agree on G, and μ's gradient is T7's alone, (μ − x0)/σ_φ² (the
    weighting of T8 is unchanged). It is the likelihood of x0 under the head's own readout N(μ, σ_φ² − σ²).
    ε keeps it finite for every G (without it e^(−G)·r² overflows float32 below G ≈ −88); Var under
    ε·c_out² (c_out ≈ σ at small σ: the 1e-6·σ² that calibration.FLOOR calls no claim) is not resolved."""

    VAR_FLOOR = 1e-6

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        _excess_head(denoiser, "nll-posterior")
        p = batch.predict(denoiser, total_sigma=self.total_sigma)
        var = None if batch.source_sigma is None or self.total_sigma else batch.source_sigma.square()
        t7 = denoiser.head.nll(p, batch.x0, batch.source_cov, source_var=var)
        return t7 + _sum_elements(readout_nll(p, batch.x0, self.VAR_FLOOR))


def readout_nll(p, target: torch.Tensor, var_floor: float = ExcessPosteriorNLL.VAR_FLOOR) -> torch.Tensor:
    """Per element, the Gaussian NLL of `target` under an excess-variance head's own readout N(sg(μ),
    c_out²·(e^G + ε)) (T37's excess, floored at ε·c_out²; μ held: only G gets a gradient):
    ½[log(2π·c_out²) + log(e^G + ε) + (sg(F) − F*)²/(e^G + ε)], F* = (target − c_skip·x̃)/c_out (T6).
    `ExcessPosteriorNLL` adds it for x0; progressive distillation (head_loss="posterior") for D*."""
    r2 = (p.F.detach() - f_target(target, p.x, p.scalings)).square()
    log_v = torch.logaddexp(p.G, torch.full_like(p.G, math.log(var_floor)))   # log(e^G + ε)
    return 0.5 * (LOG_2PI + 2 * torch.log(p.scalings.c_out) + log_v + torch.exp(-log_v) * r2)


class EDMLoss:
    """EDM's loss with EDM's weighting (EDM eq. 2, Table 1; the seed's baseline `ToyModel.loss(new=False)`):
    ½·λ(σ)·‖D(x̃; σ) − x0‖², λ = 1/c_out², which is ½‖F − F*‖², uniform in F-space at every σ."""

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        p = batch.predict(denoiser)
        return 0.5 * _sum_elements((p.mu - batch.x0).square() / p.scalings.c_out.square())


class ScoreMatchingLoss:
    """Exact score matching against a known score with weight σ² (§10): σ²·‖s_θ − s*‖², s_θ by Tweedie (T13).

    Equals ‖D − E[x0 | x̃]‖²/σ²: regression onto the exact posterior mean.
    """

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        if batch.score is None:
            raise ValueError("ScoreMatchingLoss needs batch.score, the exact score at x_noisy")
        mu = batch.mean(denoiser)
        s2 = as_sigma(batch.sigma, mu).square()  # [N] σ -> [N, 1, ...], as the denoiser reads it
        return _sum_elements(s2 * ((mu - batch.x_noisy) / s2 - batch.score).square())


class WeightedLoss:
    """THEORY T17: ½·(w(λ)/p(λ))·‖ε̂ − ε‖², per example, for any weighting w (schedules.Weighting) and the
    density p(λ) the batch's σ was drawn from (schedules.NoiseSchedule), with the importance weight w/p
    explicit. In VE space (T2) ε̂ − ε = (x0 − D)/σ̃ whatever the process, so one formula serves VE, VP and
    flow matching at equal λ = −2 log σ̃. `losses.EDMLoss` is the case w = EDM weighting, p = EDM density.
    Needs one σ per example."""

    def __init__(self, weighting, density):
        self.weighting, self.density, self.last = weighting, density, None

    def importance(self, sigma: torch.Tensor) -> torch.Tensor:
        lam = -2 * sigma.double().log()
        return (self.weighting(lam) / self.density.pdf(lam)).to(sigma.dtype)

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        mu = batch.mean(denoiser)
        s_ex = one_per_example(as_sigma(batch.sigma, mu), mu.shape, "WeightedLoss (λ per example, T17)")
        eps_loss = _sum_elements((mu - batch.x0).square()) / s_ex.square()     # ‖ε̂ − ε‖² (T2)
        # for an adaptive density (T20): train.py feeds it back
        self.last = (s_ex.detach(), eps_loss.detach())
        return 0.5 * self.importance(s_ex) * eps_loss


class DDPMSimpleLoss:
    """Seed 004's simplified losses (Ho et al. 2020 L_simple), per example, in VE space (T2):
    target "eps": ‖ε̂ − ε‖² = ‖D − x0‖²/σ̃² (also the score loss (1 − ᾱ_t)‖s − s_θ‖², which is the same
    number, T21); "x0": ‖x̂0 − x0‖². The parameterisation is the denoiser's precond (eps, x0, score-vp), the
    step density `schedules.DDPMSteps` (t uniform)."""

    def __init__(self, target: str = "eps"):
        if target not in ("eps", "x0"):
            raise ValueError(f"target={target!r} is not allowed; choose one of ['eps', 'x0']")
        self.target = target

    @classmethod
    def x0(cls):
        return cls("x0")

    @classmethod
    def eps(cls):
        return cls("eps")

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        mu = batch.mean(denoiser)
        err = _sum_elements((mu - batch.x0).square())
        if self.target == "x0":
            return err
        return err / one_per_example(as_sigma(batch.sigma, mu), mu.shape, "DDPMSimpleLoss").square()


class HybridLoss:
    """IDDPM's hybrid loss for a learned variance (T26): L_simple + λ·L_vlb, per example.

    L_simple = ‖ε̂ − ε‖² (summed over elements). L_vlb = T·L_t, the one-step unbiased estimate of the whole
    bound (t uniform, `schedules.DDPMSteps`), in nats summed over elements, with the mean's gradient stopped
    (only the variance head learns from it): for t ≥ 2, L_t = KL(q(x_{t−1} | x_t, x0) ‖ N(μ_θ, Σ_θ)) (T24),
    μ_θ = T24's posterior mean at x̂0 = D.detach(); for t = 1 the discretised decoder −log p(x0 | x_1) (T27)
    with Σ_θ(t = 1), log β̃_1 clipped to log β̃_2 as IDDPM does (β̃_1 = 0). Σ_θ = exp(v log β_t + (1 − v) log
    β̃_t), v from the denoiser's `LearnedVarianceHead`. λ defaults to 0.001 (IDDPM's value; seed 004 prints
    1000, which matches only under another averaging of L_vlb; THEORY T26): with T = 1000 it puts unit weight
    on L_t. Units: both terms are sums over elements and L_vlb is in nats; IDDPM averages both over elements
    and takes L_vlb in bits, so its λ = 0.001 equals ours at 0.001/ln 2 ≈ 0.00144 (only the unit of L_vlb
    differs). x0 must be 8-bit data scaled to [−1, 1] for the t = 1 term (checked).
    """

    def __init__(self, steps, lam: float = 0.001):
        check_positive("lam", lam, allow_zero=True)
        self.steps, self.lam = steps, float(lam)

    def __call__(self, denoiser: Denoiser, batch: NoisyBatch) -> torch.Tensor:
        p = batch.predict(denoiser)
        mu = p.mu
        s = one_per_example(as_sigma(batch.sigma, mu), mu.shape, "HybridLoss")
        simple = _sum_elements((mu - batch.x0).square()) / s.square()
        ddpm, f64 = self.steps.ddpm, torch.float64
        t = self.steps.steps(s).to(mu.device)
        # [N, 1, ...]
        at = lambda table, i: table.to(mu.device)[i].view(-1, *([1] * (mu.ndim - 1)))  # noqa: E731
        beta, ab_prev = at(ddpm.betas, t), at(ddpm.alpha_bar, t - 1)
        om, om_prev = at(ddpm.one_minus_alpha_bar, t), at(ddpm.one_minus_alpha_bar, t - 1)
        beta_tilde = beta * om_prev / om                               # T24; β̃_1 = 0, clipped to β̃_2 below
        bt2 = ddpm.betas[2] * ddpm.one_minus_alpha_bar[1] / ddpm.one_minus_alpha_bar[2]
        log_bt = torch.where(t.view(beta.shape) == 1, bt2.log().item(), beta_tilde.clamp_min(1e-300).log())
        v = denoiser.head.interpolation(p).to(f64)
        log_var = v * beta.log() + (1 - v) * log_bt                    # log Σ_θ (T26)
        # μ_q − μ_θ = c_0·(x0 − x̂0), c_0 = √ᾱ_{t−1}β_t/(1 − ᾱ_t) (T24): x_t cancels; x̂0 detached
        x0, x0_hat = batch.x0.to(f64), mu.detach().to(f64)
        kl = 0.5 * (log_var - log_bt + (beta_tilde + (ab_prev.sqrt() * beta / om * (x0 - x0_hat)).square())
                    / log_var.exp() - 1)
        decoder = -discretized_gaussian_log_prob(x0, x0_hat, (0.5 * log_var).exp())   # t = 1: μ_θ = x̂0
        vlb = _sum_elements(torch.where(t.view(beta.shape) == 1, decoder, kl))
        return (simple.to(f64) + self.lam * ddpm.T * vlb).to(mu.dtype)


LOSSES = {   # name -> loss class; make_loss builds one for a training density
    "nll": ConfidenceNLL,
    # T36 (c) with the scalings of the diffusion σ and s² as T12's trace term (same as "nll" without a source)
    "nll-source-trace": lambda: ConfidenceNLL(total_sigma=False),
    # T37's head with the NLL of x0 under its own readout N(μ, σ_φ² − σ²) added for G (issue 18)
    "nll-posterior": ExcessPosteriorNLL,
    # T37's loss and optimum, G's gradient taken in log σ_φ² (T6's): does not vanish where Var ≪ σ² (issue 18)
    "nll-log-grad": ExcessLogGradNLL,
    "edm": EDMLoss,
    "score-matching": ScoreMatchingLoss,
    "simple-x0": DDPMSimpleLoss.x0,
    "simple-eps": DDPMSimpleLoss.eps,
    "hybrid": HybridLoss,
}


def make_loss(name: str, density=None):
    """The registered loss `name` for a run whose noise levels come from `density` (HybridLoss reads the DDPM
    steps from it, schedules.DDPMSteps; the others take no argument)."""
    check_choice("loss", name, LOSSES)
    return LOSSES[name](density) if LOSSES[name] is HybridLoss else LOSSES[name]()
