"""Preconditioning objects with the confidence scaling c_var, and the one denoiser contract.

THEORY §2 (T4–T6). Every σ may be a scalar, per example `[N]` or per element (T3); every
formula here broadcasts.

Contract used by samplers, guidance and metrics: `denoiser(x, sigma) -> μ` (a tensor shaped
like x). `denoiser.predict(x, sigma) -> Prediction` adds the confidence: σ_φ per element,
or Σ_φ / Σ_φ⁻¹ for a full head (heads.py).
"""
from __future__ import annotations

import torch
from torch import nn

from .checks import as_sigma, check_choice, check_positive, per_example
from .heads import Head, NetPrediction, Scalings, make_head


class Precond:
    """D(x̃; σ) = c_skip·x̃ + c_out·F(c_in·x̃, c_noise) (T6). A subclass gives c_skip, c_out, c_in, c_noise;
    c_var² = σ² + c_out² for every one of them (T5 generalised), so T9 holds for each with
    k = c_out²/c_var²."""

    def __init__(self, sigma_data: float = 0.5):
        check_positive("sigma_data", sigma_data)
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        raise NotImplementedError

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log() / 4  # EDM Table 1

    def __call__(self, sigma) -> Scalings:
        sigma = torch.as_tensor(sigma)
        c_skip, c_out, c_in = self.coefficients(sigma)
        s2, o2 = sigma.square(), c_out.square()
        c_var2 = s2 + o2
        return Scalings(c_skip, c_out, c_in, self.c_noise(sigma), c_var2.sqrt(), o2 / c_var2, sigma)

    def __repr__(self):
        return f"{type(self).__name__}(sigma_data={self.sigma_data})"


class EDMPrecond(Precond):
    """THEORY T4, T5 (seed 000 with its c_skip typo fixed: σ_d², not σ_d); F is EDM's F (−v)."""
    name = "edm"

    def coefficients(self, sigma):
        s2, d2 = sigma.square(), self.sigma_data ** 2
        c_skip = d2 / (s2 + d2)
        c_out = sigma * self.sigma_data * torch.rsqrt(s2 + d2)
        return c_skip, c_out, torch.rsqrt(s2 + d2)

    def __call__(self, sigma) -> Scalings:
        sc = super().__call__(sigma)
        sigma, d2 = torch.as_tensor(sigma), self.sigma_data ** 2
        # T5 in closed form, exact at any σ: c_var = σ·√(1 + σ_d²/(σ² + σ_d²)), k = σ_d²/(σ² + 2σ_d²)
        c_var = sigma * torch.sqrt(1 + d2 / (sigma.square() + d2))
        return sc._replace(c_var=c_var, k=d2 / (sigma.square() + 2 * d2))


class EpsPrecond(Precond):
    """ε-prediction in VE space: D = x̃ − σ·F, F ≈ ε (T21)."""
    name = "eps"

    def coefficients(self, sigma):
        return torch.ones_like(sigma), -sigma, torch.rsqrt(sigma.square() + self.sigma_data ** 2)


class X0Precond(Precond):
    """x0-prediction: D = σ_d·F, F ≈ x0/σ_d (T21)."""
    name = "x0"

    def coefficients(self, sigma):
        return torch.zeros_like(sigma), torch.full_like(sigma, self.sigma_data), \
            torch.rsqrt(sigma.square() + self.sigma_data ** 2)


class VPrecond(Precond):
    """v-prediction in VE space (T21; k-diffusion's VDenoiser): EDM's F with the sign flipped."""
    name = "v"

    def coefficients(self, sigma):
        s2, d2 = sigma.square(), self.sigma_data ** 2
        return d2 / (s2 + d2), -sigma * self.sigma_data * torch.rsqrt(s2 + d2), torch.rsqrt(s2 + d2)


class ScoreVPPrecond(Precond):
    """Score prediction for the VP/DDPM latent (seed 004; T21 s = −ε̂/σ): F ≈ ∇_z log p(z) at z = α·x̃ with
    α = 1/√(1 + σ̃²), σ_vp = σ̃·α. Tweedie in VE space, D = x̃ + σ̃²·∇_x̃ log p = x̃ + σ̃²·α·F (T13)."""
    name = "score-vp"

    def coefficients(self, sigma):
        s2 = sigma.square()
        return torch.ones_like(sigma), s2 * torch.rsqrt(1 + s2), torch.rsqrt(s2 + self.sigma_data ** 2)


PRECONDS = {p.name: p for p in (EDMPrecond, EpsPrecond, X0Precond, VPrecond, ScoreVPPrecond)}


def edm_scalings(sigma, sigma_data: float) -> Scalings:
    """THEORY T4, T5: EDM's scalings with c_var and k."""
    return EDMPrecond(sigma_data)(sigma)


class Denoiser(nn.Module):
    """A preconditioned denoiser around any backbone `net(c_in·x̃, c_noise) -> F | (F, G)` (T6).

    precond: a `Precond` (EDM by default); head: a `Head` (heads.py) that reads G, declared here only:
    build the backbone with `head.outputs(dim)` extra outputs; a mismatch is a ValueError. A head with its
    own parameters (`head.module()`, e.g. EDM2's u(σ)) gets them here as `head_net`, a submodule trained,
    averaged and checkpointed with the net: G = head_net(c_noise, x), and the backbone returns F only.
    `head_net=` passes an existing one (a compiled view sharing the parameters, train.py).

    What the backbone receives: `c_in·x̃` per element (c_in from the total σ), and `c_noise` as one value
    per example `[N]`, from the per-example diffusion σ (the root mean square over an example's elements
    when σ is per element, `checks.per_example`). A backbone with `takes_noise_map = True` also gets
    `noise_map=`, c_noise of the total per-element σ shaped like x, so it can see a per-element source σ.
    """

    def __init__(self, net: nn.Module, precond: Precond | str | float | None = None,
                 head: Head | str = "none", head_net: nn.Module | None = None):
        super().__init__()
        if precond is None or (isinstance(precond, (int, float)) and not isinstance(precond, bool)):
            precond = EDMPrecond(0.5 if precond is None else precond)
        elif isinstance(precond, str):
            if precond not in PRECONDS:
                raise ValueError(f"precond={precond!r} is not allowed; choose one of {sorted(PRECONDS)}, "
                                 "a Precond object or σ_data")
            precond = PRECONDS[precond]()
        if not isinstance(precond, Precond):
            raise ValueError(f"precond={precond!r} must be a Precond object, one of {sorted(PRECONDS)}, or "
                             "σ_data > 0")
        self.net, self.precond, self.head = net, precond, make_head(head)
        if head_net is not None and not isinstance(head_net, type(self.head.module())):
            raise ValueError(f"head_net={type(head_net).__name__} does not fit head={self.head.name!r} (its "
                             f"module: {type(self.head.module()).__name__}); pass head_net only for a head "
                             "with head.module(), and one of that type")
        self.head_net = self.head.module() if head_net is None else head_net

    @property
    def sigma_data(self) -> float:
        return self.precond.sigma_data

    def predict(self, x: torch.Tensor, sigma, source_sigma=None, class_labels=None) -> NetPrediction:
        """source_sigma: an optional known per-element std of x0's source (T3, T36; ≥ 0); the scalings
        (c_skip, c_out, c_in, c_var, k, and Scalings.sigma) then use σ_total = √(σ² + σ_src²) per element,
        while c_noise keeps the diffusion σ, one per example (the U-Net's noise input).
        class_labels: [N] class indices for a class-conditional backbone (passed on as `class_labels=`; the
        backbone's null class is ∅, T33)."""
        sigma = as_sigma(sigma, x)
        total = sigma if source_sigma is None else (
            sigma.square() + as_sigma(source_sigma, x, "source_sigma", allow_zero=True).square()).sqrt()
        sc = self.precond(total)
        c_noise = self.precond.c_noise(per_example(sigma, x.shape[0]))
        extra = {"noise_map": torch.broadcast_to(self.precond.c_noise(total), x.shape)} \
            if getattr(self.net, "takes_noise_map", False) else {}
        if class_labels is not None:
            extra["class_labels"] = class_labels
        out = self.net(sc.c_in * x, c_noise, **extra)
        F, G = (out if isinstance(out, tuple) else (out, None))
        if F.shape != x.shape:
            raise ValueError(f"backbone output F has shape {tuple(F.shape)}, expected x's {tuple(x.shape)}")
        if self.head_net is not None:
            if G is not None:
                raise ValueError(f"head={self.head.name!r} takes G from its own module of c_noise, but the "
                                 f"backbone returned one of shape {tuple(G.shape)}; build the backbone with "
                                 "head.outputs(dim) = 0 extra outputs")
            G = self.head_net(c_noise, x)
        self.head.check(G, x)
        mu = sc.c_skip * x + sc.c_out * F
        return NetPrediction(x=x, mu=mu, F=F, G=G, scalings=sc, head=self.head)

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        return self.predict(x, sigma, class_labels=class_labels).mu


SOURCE_SCALINGS = ("diffusion", "total")   # T36: what a latent denoiser's scalings use when sampling


class WithSourceSigma(nn.Module):
    """A denoiser whose scalings assume a fixed source std s̄ (T36's sampling choice "total"):
    `predict(x̃, σ)` is denoiser.predict(x̃, σ, source_sigma=s̄), scalings from τ = √(σ² + s̄²) per element
    and c_noise from σ, as a model trained in T36's mode (c) saw them (losses.ConfidenceNLL,
    total_sigma=True); its μ is E[m | x̃] under noise of total std τ (T3). At sampling the source std of a new
    latent is unknown, so s̄ is a typical value ([1, C, 1, 1] per channel; a scalar or any tensor
    broadcastable to x works).

    What a σ-grid sampler calls (`forward`) is not μ: the sampler integrates dx/dσ = (x − D)/σ (T15), the
    probability-flow ODE of marginals p(x; σ), while these marginals have total std τ. Their ODE in σ is
    dx/dσ = σ·(x − μ)/τ² (dτ/dσ = σ/τ), so D = x − σ²·(x − μ)/τ² (= μ when s̄ = 0). The sampler then ends at a
    latent that still carries the source noise s̄; `final(x)` is μ there (at the smallest σ of the grid), the
    latent to decode. Tested on a Gaussian whose marginals are closed form (tests/test_latent.py)."""

    def __init__(self, denoiser: nn.Module, source_sigma):
        super().__init__()
        self.denoiser, self.source_sigma = denoiser, torch.as_tensor(source_sigma)

    @property
    def sigma_data(self) -> float:
        return self.denoiser.sigma_data

    def predict(self, x: torch.Tensor, sigma, class_labels=None) -> NetPrediction:
        return self.denoiser.predict(x, sigma, source_sigma=self.source_sigma.to(x.device, x.dtype),
                                     class_labels=class_labels)

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        mu = self.predict(x, sigma, class_labels=class_labels).mu
        s2 = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s2 = (s2.view(-1, *([1] * (x.ndim - 1))) if s2.ndim else s2).square()
        return x - s2 / (s2 + self.source_sigma.to(x.device, x.dtype).square()) * (x - mu)

    def final(self, x: torch.Tensor, sigma_min: float, class_labels=None) -> torch.Tensor:
        """E[m | x] for a sample x that ends the sampler with its source noise s̄ still in it."""
        return self.predict(x, torch.full((len(x),), sigma_min, dtype=x.dtype, device=x.device),
                            class_labels=class_labels).mu


def sampling_denoiser(denoiser: nn.Module, source_scalings: str = "diffusion", typical_source_sigma=None):
    """The denoiser a sampler calls for a latent model (T36): "diffusion", the model itself (scalings and
    c_noise from the diffusion σ alone, as if a new latent had no source noise); "total", WithSourceSigma
    with `typical_source_sigma` (scalings from √(σ² + s̄²), c_noise from σ)."""
    check_choice("source_scalings", source_scalings, SOURCE_SCALINGS)
    if source_scalings == "diffusion":
        return denoiser
    if typical_source_sigma is None:
        raise ValueError("source_scalings='total' needs typical_source_sigma, the source std the scalings "
                         "assume (e.g. the per-channel mean of the encoded dataset's s)")
    return WithSourceSigma(denoiser, typical_source_sigma)


__all__ = ["Precond", "EDMPrecond", "EpsPrecond", "X0Precond", "VPrecond", "ScoreVPPrecond", "PRECONDS",
           "edm_scalings", "Denoiser", "SOURCE_SCALINGS", "WithSourceSigma", "sampling_denoiser"]
