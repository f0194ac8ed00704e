"""Confidence heads and what one network evaluation predicts (THEORY §3, T6–T12, T14; STYLE 4).

A head is declared once, on the `Denoiser`; it owns how many raw outputs G it needs, how G becomes
σ_φ (or the precision factor S), its negative log-likelihood, and its T14 score:

- `NoHead()`: no G, σ_φ = c_var (EDM's denoiser; the T11 baseline).
- `DiagonalHead()`: G shaped like x, σ_φ = c_var·exp(G/2) per element (T6, T9).
- `FullHead()`: for points [N, d], G: [N, d(d+1)/2] → lower-triangular S, Σ_φ⁻¹ = S·Sᵀ/c_var² (T12).
- `ExcessHead()`: G shaped like x, σ_φ² = σ² + c_out²·e^G per element (T37): σ_φ ≥ σ for every G.
- `SigmaOnlyHead()`: one log-variance u(σ) per noise level, σ_φ² = c_var²·e^u for every element (EDM2's
  learned u(σ) as a confidence head); u comes from a small module of c_noise that the `Denoiser` owns
  (`head.module()`), not from the backbone.

The formulas are plain functions on tensors (the test oracles call them directly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .checks import one_per_example

LOG_2PI = math.log(2 * math.pi)


class Scalings(NamedTuple):
    """The preconditioning coefficients at σ (T4–T6): D = c_skip·x̃ + c_out·F(c_in·x̃, c_noise); made by
    `precond.Precond`, read by the formulas and heads below."""
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor
    c_var: torch.Tensor
    k: torch.Tensor  # c_out² / c_var², the weight in T9/T12 (EDM: σ_d² / (σ² + 2σ_d²))
    sigma: torch.Tensor | None = None  # the σ they were made for (the total σ with a known source, T3)

    @property
    def one_minus_k(self) -> torch.Tensor:
        """1 − k = σ²/c_var² (c_var² = σ² + c_out², T5 generalised), without the cancellation of 1 − k where
        k → 1 (x0-prediction at small σ); 1 − k itself when σ is not known."""
        return 1 - self.k if self.sigma is None else self.sigma.square() / self.c_var.square()


# ---- the formulas ------------------------------------------------------------------------------

def f_target(x0: torch.Tensor, x_noisy: torch.Tensor, sc: Scalings) -> torch.Tensor:
    """F* = (x0 − c_skip·x̃)/c_out (T6, T12)."""
    return (x0 - sc.c_skip * x_noisy) / sc.c_out


def nll_direct(mu, sigma_phi, x0, sigma) -> torch.Tensor:
    """THEORY T7, per element: ½[log σ_φ² + (σ² + (μ − x0)²)/σ_φ² + log 2π]. The oracle for T9."""
    var = sigma_phi.square()
    return 0.5 * (var.log() + (sigma.square() + (mu - x0).square()) / var + LOG_2PI)


def nll_stable(F, G, F_star, sc: Scalings, source_var=None) -> torch.Tensor:
    """THEORY T9, per element: ½[G + e^(−G)(1 + k(‖F − F*‖² − 1)) + log(2π·c_var²)]; G=None means G ≡ 0.

    1 − k = σ²/c_var² for every preconditioning (c_var² = σ² + c_out²). `source_var`: a known
    per-element variance of x0's source, the diagonal case of T12's tr(SSᵀΣ_src)/c_var² term.
    """
    G = torch.zeros_like(F) if G is None else G
    inner = 1 + sc.k * ((F - F_star).square() - 1)
    if source_var is not None:
        inner = inner + source_var / sc.c_var.square()
    return 0.5 * (G + torch.exp(-G) * inner + LOG_2PI + 2 * torch.log(sc.c_var))


def nll_excess(F, G, F_star, sc: Scalings, source_var=None, log_variance_grad: bool = False) -> torch.Tensor:
    """THEORY T37, per element, for σ_φ² = σ² + c_out²·e^G = c_var²·(1 − k + k·e^G):
    2L = log(2π·c_var²) + log(1 − k + k·e^G) + [(1 − k) + k‖F − F*‖² (+ σ_src²/c_var²)] / (1 − k + k·e^G).

    It is T7 at that σ_φ (and T9 at e^(G_T6) = 1 − k + k·e^G). The log of the denominator is a logaddexp of
    log(1 − k) and log k + G, and the bracket is multiplied by its exp(−·): finite for any σ and any finite
    G (the denominator is ≥ 1 − k, ≥ ½ for EDM). `source_var`: a known per-element variance of x0's source,
    the diagonal T12 term as in `nll_stable`.

    log_variance_grad: the same value and the same gradient for F, but G receives the gradient with respect to
    H = log(1 − k + k·e^G) = log(σ_φ²/c_var²) (T6's G at this σ_φ, so T9's gradient 1 − inner·e^(−H)) instead
    of ∂L/∂G = (k·e^G/e^H)·∂L/∂H. The factor dropped, k·e^G/e^H = c_out²e^G/σ_φ² ≤ 1 (the claimed excess
    over σ_φ²), is what makes T37's G gradient vanish where the claimed Var[x0 | x̃] ≪ σ² (issue 18:
    background pixels whose excess stays far above their error). Per element only a positive factor of G's
    gradient changes, so the expected gradient given x̃ vanishes where it did (T8's e^G = E[‖F − F*‖² | x̃]);
    the pair (∂/∂F, ∂/∂H) is not the gradient of any loss, so a network shared across elements and σ may
    settle on another compromise than T37's (confident elements count more). Bounded:
    |1 − inner·e^(−H)| ≤ max(1, k‖F − F*‖²/(1 − k) + σ_src²/σ²), the last term only with `source_var`
    (unlike the x0 readout NLL of `readout_nll`, unbounded as e^G → 0).
    """
    omk = sc.one_minus_k
    log_den = torch.logaddexp(torch.log(omk), torch.log(sc.k) + G)    # log(1 − k + k·e^G)
    if log_variance_grad:    # value log_den; d/dG = 1 (straight-through from G to H)
        log_den = log_den.detach() + (G - G.detach())
    inner = omk + sc.k * (F - F_star).square()
    if source_var is not None:
        inner = inner + source_var / sc.c_var.square()
    return 0.5 * (LOG_2PI + 2 * torch.log(sc.c_var) + log_den + inner * torch.exp(-log_den))


def log_q(x, F, G, x_noisy, sc: Scalings) -> torch.Tensor:
    """THEORY T10, per element: log q(x | x̃) = −½[G + e^(−G)·k·(F − (x − c_skip·x̃)/c_out)² + log
    2πc_var²]."""
    G = torch.zeros_like(F) if G is None else G
    r = F - (x - sc.c_skip * x_noisy) / sc.c_out
    return -0.5 * (G + torch.exp(-G) * sc.k * r.square() + LOG_2PI + 2 * torch.log(sc.c_var))


def tril_factor(G: torch.Tensor, d: int) -> torch.Tensor:
    """Lower-triangular S from d(d+1)/2 raw outputs: diag e^(−g/2), then free off-diagonal (T12).

    G: [N, d(d+1)/2] -> S: [N, d, d]; S = I when G = 0.
    """
    if G.shape[-1] != d * (d + 1) // 2:
        raise ValueError(f"full-covariance head needs d(d+1)/2 = {d * (d + 1) // 2} outputs for d = {d}; "
                         f"got {G.shape[-1]}")
    S = torch.diag_embed(torch.exp(-G[..., :d] / 2))
    if d > 1:
        rows, cols = torch.tril_indices(d, d, offset=-1, device=G.device)
        off = G.new_zeros(*G.shape[:-1], d, d)
        off[..., rows, cols] = G[..., d:]
        S = S + off
    return S


def nll_full(F, G, F_star, sc: Scalings, source_cov=None) -> torch.Tensor:
    """THEORY T12, per example, for points [N, d] with σ one value per example.

    2L = −log det(SSᵀ) + (1 − k)·tr(SSᵀ) + tr(SSᵀ·Σ_src)/c_var² + k·‖Sᵀ(F − F*)‖² + d·log(2π·c_var²).
    The quadratic term contracts Sᵀ with the error vector (the seed's training.py multiplies each error
    component by a row sum of S instead; its logp has the correct contraction).
    """
    N, d = F.shape
    k = one_per_example(sc.k, (N, d), "nll_full (T12)")
    c_var = one_per_example(sc.c_var, (N, d), "nll_full (T12)")
    S = tril_factor(G, d)
    logdet = G[:, :d].sum(1)                              # −log det(SSᵀ) = Σ g_i
    tr = S.square().sum((1, 2))                           # tr(SSᵀ) = ‖S‖²_F
    Se = (S.transpose(1, 2) @ (F - F_star)[:, :, None]).squeeze(-1)
    two_l = logdet + (1 - k) * tr + k * Se.square().sum(1) + d * (LOG_2PI + 2 * torch.log(c_var))
    if source_cov is not None:
        two_l = two_l + ((source_cov @ S) * S).sum((1, 2)) / c_var.square()  # tr(SᵀΣ_src S)
    return 0.5 * two_l


def _source_var(source_cov, source_var):
    """The per-element source variance from a covariance [N, d, d] (its diagonal) or given as is."""
    if source_cov is not None and source_var is not None:
        raise ValueError("give the source's covariance (source_cov) or its per-element variance "
                         "(source_var), not both")
    return source_var if source_cov is None else torch.diagonal(source_cov, dim1=-2, dim2=-1)


def _sum_elements(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).sum(1)


def _eye_like(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return torch.eye(d, dtype=x.dtype, device=x.device).expand(*x.shape[:-1], d, d)


# ---- predictions --------------------------------------------------------------------------------

def _sigma_like(sigma, like: torch.Tensor) -> torch.Tensor:
    """σ as a tensor of `like`'s dtype/device that broadcasts to it: a scalar, per element (like.ndim
    dimensions), or one per example ([N], or [N, 1] as the toy evaluator passes it) reshaped to [N, 1, …]."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return s if s.ndim in (0, like.ndim) else s.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class Prediction:
    """A Gaussian prediction of the clean data, q(x0 | x̃) = N(μ, Σ_φ) (THEORY T6–T8).

    Analytic denoisers (the exact mixture, wrappers) fill `var` (per element, shaped like x) or `cov`
    ([N, d, d]); a network's prediction (`NetPrediction`) derives them through its head.
    """
    x: torch.Tensor                    # the noisy input x̃
    mu: torch.Tensor                   # μ
    var: torch.Tensor | None = None    # σ_φ² per element
    cov: torch.Tensor | None = None    # Σ_φ, [N, d, d]

    def variance(self) -> torch.Tensor:
        """σ_φ² per element, shaped like x (a full covariance gives its diagonal, the marginal variances)."""
        if self.var is not None:
            return torch.broadcast_to(self.var, self.mu.shape)
        if self.cov is not None:
            return torch.diagonal(self.cov, dim1=-2, dim2=-1)
        raise ValueError("this prediction carries no confidence (no σ_φ)")

    @property
    def sigma_phi(self) -> torch.Tensor:
        return self.variance().sqrt()

    def excess_variance(self, sigma) -> torch.Tensor:
        """Var[x0 | x̃] as this prediction states it: σ_φ² − σ² per element, shaped like x (T8; the marginal
        variances of a full covariance). sigma: the σ of x̃, a scalar or one per example. A network's
        prediction (`NetPrediction`) reads it from its head without the subtraction where the head allows."""
        return self.variance() - _sigma_like(sigma, self.mu).square()

    def covariance(self) -> torch.Tensor:
        """Σ_φ, [N, d, d]; per-element variances become diagonal matrices."""
        return self.cov if self.cov is not None else torch.diag_embed(self.variance())

    def precision(self) -> torch.Tensor:
        """Σ_φ⁻¹, [N, d, d]."""
        if self.cov is not None:
            return torch.linalg.inv(self.cov)
        return torch.diag_embed(self.variance().reciprocal())

    def phi_score(self) -> torch.Tensor:
        """T14: s = Σ_φ⁻¹(μ − x̃) (per element (μ − x̃)/σ_φ² without a full covariance)."""
        if self.cov is not None:
            return (self.precision() @ (self.mu - self.x)[..., None]).squeeze(-1)
        return (self.mu - self.x) / self.variance()

    def with_mean(self, mu: torch.Tensor) -> Prediction:
        """The same confidence around another mean (wrappers: guidance, T14)."""
        return Prediction(self.x, mu, var=self.var, cov=self.cov)


@dataclass
class NetPrediction(Prediction):
    """One preconditioned network evaluation (T6): raw outputs F, G, the scalings, and the head that reads
    G."""
    F: torch.Tensor | None = None
    G: torch.Tensor | None = None
    scalings: Scalings | None = None
    head: Head | None = None

    def variance(self):
        return self.head.variance(self)

    def excess_variance(self, sigma=None):
        """σ_φ² − σ² from the head (`Head.excess_variance`, against the σ the scalings were made for). Given a
        `sigma` other than that one (a model called with a known source std, whose scalings are at the total
        τ = √(σ² + s²), T3), τ² − σ² is added back, so the result is σ_φ² − sigma² whichever path made the
        prediction (the same as `Prediction.excess_variance` after `with_mean`)."""
        out = self.head.excess_variance(self)
        tau = self.scalings.sigma
        if sigma is None or tau is None:
            return out
        return out + (tau.square() - _sigma_like(sigma, out).square())   # exactly 0 at the scalings' σ

    def covariance(self):
        return self.head.covariance(self)

    def precision(self):
        return self.head.precision(self)

    def phi_score(self):
        return self.head.phi_score(self)

    def factor(self) -> torch.Tensor:
        """S with Σ_φ⁻¹ = S·Sᵀ/c_var² (T12), [N, d, d]."""
        return self.head.factor(self)

    def with_mean(self, mu):
        return Prediction(self.x, mu, **self.head.confidence(self))


# ---- heads --------------------------------------------------------------------------------------

class Head:
    """What a confidence head is: its output size, σ_φ, Σ_φ, its NLL and its T14 score."""
    name = "?"
    has_confidence = True   # σ_φ is learned (a confidence to calibrate); False: σ_φ is c_var

    def module(self) -> nn.Module | None:
        """The parameters the head owns apart from the backbone, as a module `(c_noise [N], x) -> G` that the
        `Denoiser` holds (and trains with the net); None: G, if any, comes from the backbone."""
        return None

    def g_shape(self, x_shape: tuple) -> tuple | None:
        """Shape of the raw output G for an input x of `x_shape` (None: no G)."""
        raise NotImplementedError

    def outputs(self, dim: int) -> int:
        """G features per example for vectors [N, dim] (or channels per pixel for a conv backbone)."""
        shape = self.g_shape((1, dim))
        return 0 if shape is None else shape[-1]

    def check(self, G, x: torch.Tensor) -> None:
        want = self.g_shape(tuple(x.shape))
        if want is None and G is not None:
            raise ValueError(f"head={self.name!r} takes no G, but the backbone returned one of shape "
                             f"{tuple(G.shape)}; build the backbone with head.outputs(dim) extra outputs, or "
                             "use a head that reads them")
        if want is not None and G is None:
            raise ValueError(f"head={self.name!r} needs a backbone returning (F, G) with G of shape {want}; "
                             "it returned F only")
        if want is not None and tuple(G.shape) != want:
            raise ValueError(f"head={self.name!r}: backbone output G has shape {tuple(G.shape)}, expected "
                             f"{want}")

    def factor(self, p: NetPrediction) -> torch.Tensor:
        G = torch.zeros_like(p.mu) if p.G is None else p.G
        return torch.diag_embed(torch.exp(-G / 2))

    def variance(self, p: NetPrediction) -> torch.Tensor:
        raise NotImplementedError

    def excess_variance(self, p: NetPrediction) -> torch.Tensor:
        """Var[x0 | x̃] as the head predicts it, σ_φ² − σ² per element (T8), shaped like x. Here by
        subtraction (σ² from the scalings: c_var²·(1 − k)); the diagonal heads override it with a form that
        never subtracts σ² from σ_φ², so a small excess under a large σ² keeps its relative precision."""
        sc = p.scalings
        return self.variance(p) - (sc.c_var.square() * sc.one_minus_k if sc.sigma is None
                                   else sc.sigma.square())

    def covariance(self, p: NetPrediction) -> torch.Tensor:
        return torch.diag_embed(self.variance(p))

    def precision(self, p: NetPrediction) -> torch.Tensor:
        return torch.diag_embed(self.variance(p).reciprocal())

    def confidence(self, p: NetPrediction) -> dict:
        """The confidence as `Prediction` fields."""
        return {"var": self.variance(p)}

    def phi_score(self, p: NetPrediction) -> torch.Tensor:
        """T14 per element: (μ − x̃)/σ_φ²."""
        return (p.mu - p.x) / self.variance(p)

    def nll(self, p: NetPrediction, x0: torch.Tensor, source_cov=None, source_var=None) -> torch.Tensor:
        """The Gaussian NLL of x0 under this prediction, per example [N] (T9; T12 with a known Σ_src).

        source_cov: [N, d, d]; a diagonal head uses its diagonal, which is exact for a diagonal S.
        source_var: or a per-element source variance shaped like x0 (T36's s², images included), the same
        term. Either enters as tr(SSᵀΣ_src)/c_var², on top of the (1 − k) = σ²/c_var² of the σ the scalings
        were made for: for a source whose std is already in those scalings (Denoiser.predict(source_sigma=))
        pass neither, or it counts twice.
        """
        var = _source_var(source_cov, source_var)
        return _sum_elements(nll_stable(p.F, p.G, f_target(x0, p.x, p.scalings), p.scalings, var))

    def __repr__(self):
        return f"{type(self).__name__}()"

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


class NoHead(Head):
    """σ_φ = c_var: the EDM denoiser. Its NLL is T9 with G ≡ 0, EDM's optimum per σ weighted k(σ)/2 (T11)."""
    name = "none"
    has_confidence = False

    def g_shape(self, x_shape):
        return None

    def variance(self, p):
        return torch.broadcast_to(p.scalings.c_var.square(), p.mu.shape)

    def excess_variance(self, p):
        return torch.broadcast_to(p.scalings.c_out.square(), p.mu.shape)     # c_var² − σ² = c_out² (T5)


class DiagonalHead(Head):
    """σ_φ = c_var·exp(G/2) per element, G shaped like x (T6)."""
    name = "diag"

    def g_shape(self, x_shape):
        return tuple(x_shape)

    def variance(self, p):
        return p.scalings.c_var.square() * torch.exp(p.G)

    def excess_variance(self, p):
        return _excess_of_c_var(p)


class FullHead(Head):
    """A full precision for points [N, d]: Σ_φ⁻¹ = S·Sᵀ/c_var² with S lower-triangular (T12).
    Needs one σ per example."""
    name = "full"

    def g_shape(self, x_shape):
        if len(x_shape) != 2:
            raise ValueError(f"head='full' is for points [N, d]; got x of shape {tuple(x_shape)}")
        d = x_shape[-1]
        return (x_shape[0], d * (d + 1) // 2)

    def factor(self, p):
        return tril_factor(p.G, p.mu.shape[-1])

    def _c_var2(self, p):
        N, d = p.mu.shape
        return one_per_example(p.scalings.c_var, (N, d), "head='full'").square()[:, None, None]

    def precision(self, p):
        S = self.factor(p)
        return S @ S.transpose(-1, -2) / self._c_var2(p)

    def covariance(self, p):
        S_inv = torch.linalg.solve_triangular(self.factor(p), _eye_like(p.mu), upper=False)
        return self._c_var2(p) * S_inv.transpose(-1, -2) @ S_inv

    def variance(self, p):
        return torch.diagonal(self.covariance(p), dim1=-2, dim2=-1)

    def confidence(self, p):
        return {"cov": self.covariance(p)}

    def phi_score(self, p):
        """T14 with a full covariance: s = Σ_φ⁻¹(μ − x̃)."""
        return (self.precision(p) @ (p.mu - p.x)[..., None]).squeeze(-1)

    def nll(self, p, x0, source_cov=None, source_var=None):
        if source_var is not None:
            _source_var(source_cov, source_var)           # not both
            source_cov = torch.diag_embed(source_var)
        return nll_full(p.F, p.G, f_target(x0, p.x, p.scalings), p.scalings, source_cov)


class ExcessHead(Head):
    """σ_φ² = σ² + c_out²·e^G per element, G shaped like x (T37): G ≡ 0 is c_var² (EDM's limit, as NoHead),
    σ_φ ≥ σ for every G, and the excess Var[x0 | x̃] = c_out²·e^G is resolved relatively. NLL: `nll_excess`.
    """
    name = "excess"

    def g_shape(self, x_shape):
        return tuple(x_shape)

    def variance(self, p):
        sc = p.scalings
        floor = sc.c_var.square() * sc.one_minus_k if sc.sigma is None else sc.sigma.square()   # σ²
        return floor + self.excess_variance(p)

    def excess_variance(self, p):
        return p.scalings.c_out.square() * torch.exp(p.G)

    def nll(self, p, x0, source_cov=None, source_var=None, log_variance_grad: bool = False):
        var = _source_var(source_cov, source_var)
        return _sum_elements(nll_excess(p.F, p.G, f_target(x0, p.x, p.scalings), p.scalings, var,
                                        log_variance_grad=log_variance_grad))


class LogVarianceOfSigma(nn.Module):
    """u(σ): one log-variance per noise level from c_noise alone, EDM2's `logvar_fourier` + `logvar_linear`
    (networks_edm2.Precond): √2·cos(2π(f·c_noise + φ)) with fixed random f ~ N(0, 1), φ ~ U[0, 1) (MPFourier,
    `features` of them, drawn from a fixed seed and kept as buffers), then a linear map to one number. The
    linear map starts at zero, so u ≡ 0 and σ_φ = c_var at initialisation (as the toy MLP's G)."""

    def __init__(self, features: int = 128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(features, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(features, generator=g))
        self.weight = nn.Parameter(torch.zeros(features))   # zeros: no draw from the global RNG either
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, c_noise: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # c_noise: [N] (one per example) -> G: u(c_noise) broadcast to like's shape [N, ...]
        c = c_noise.reshape(-1, 1).to(self.freqs.dtype)
        u = (math.sqrt(2) * torch.cos(c * self.freqs + self.phases)) @ self.weight + self.bias      # [N]
        return u.to(like.dtype).view(-1, *([1] * (like.ndim - 1))).expand(like.shape)


class SigmaOnlyHead(Head):
    """EDM2's learned u(σ) as a confidence head: σ_φ² = c_var²·e^(u(σ)), one value for every element of an
    example. G = u(c_noise) broadcast to x's shape comes from `LogVarianceOfSigma`, owned by the `Denoiser`
    (the backbone returns F only); its NLL is T9 with that G (T9 holds for any G). EDM2 uses u(σ) only to
    weight its loss; here it is also the σ-only baseline of the per-element heads."""
    name = "sigma-only"

    def g_shape(self, x_shape):
        return tuple(x_shape)

    def outputs(self, dim):
        return 0   # nothing from the backbone

    def module(self):
        return LogVarianceOfSigma()

    def variance(self, p):
        return p.scalings.c_var.square() * torch.exp(p.G)

    def excess_variance(self, p):
        return _excess_of_c_var(p)


class LearnedVarianceHead(Head):
    """IDDPM's learned variance (T26): G shaped like x is the raw interpolation output; the DDPM step's
    Σ_θ = exp(v·log β_t + (1 − v)·log β̃_t) with v = (G + 1)/2 (IDDPM's range [−1, 1] → [0, 1]; G = 0 at init
    is the geometric midpoint). It is a variance of the reverse *step*, not a confidence in x0: σ_φ is c_var
    (the head-less EDM value), and its loss is `losses.HybridLoss`."""
    name = "v"
    has_confidence = False

    def g_shape(self, x_shape):
        return tuple(x_shape)

    def variance(self, p):
        return torch.broadcast_to(p.scalings.c_var.square(), p.mu.shape)

    def excess_variance(self, p):
        return torch.broadcast_to(p.scalings.c_out.square(), p.mu.shape)

    @staticmethod
    def interpolation(p: NetPrediction) -> torch.Tensor:
        """v of T26 (IDDPM leaves it unconstrained: outside [0, 1] Σ_θ extrapolates, still > 0)."""
        return (p.G + 1) / 2

    def nll(self, p, x0, source_cov=None, source_var=None):
        raise ValueError("head='v' (IDDPM learned variance, T26) has no confidence NLL; train it with "
                         "loss 'hybrid' (losses.HybridLoss)")


def _excess_of_c_var(p: NetPrediction) -> torch.Tensor:
    """σ_φ² − σ² for σ_φ² = c_var²·e^G (T6): c_var²·(e^G − 1) + c_out², since c_var² = σ² + c_out² (T5)."""
    return p.scalings.c_var.square() * torch.expm1(p.G) + p.scalings.c_out.square()


HEADS = {h.name: h for h in (NoHead, DiagonalHead, FullHead, ExcessHead, SigmaOnlyHead, LearnedVarianceHead)}


def make_head(name) -> Head:
    """A head from its name (the CLI's boundary); Head objects pass through."""
    if isinstance(name, Head):
        return name
    if name not in HEADS:
        raise ValueError(f"head={name!r} is not allowed; choose one of {sorted(HEADS)}")
    return HEADS[name]()
