"""EDM preconditioning with the confidence scaling c_var, and the one denoiser contract.

THEORY §2 (T4–T6). Every σ may be a scalar, per example `[N]` or per element (T3);
every formula here broadcasts.

Contract used by samplers, guidance and metrics: `denoiser(x, sigma) -> μ` (a tensor
shaped like x). `denoiser.predict(x, sigma) -> Prediction` adds the raw outputs and
the confidence σ_φ (diagonal head) or the precision factor S (full head, T12).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .checks import as_sigma, check_choice

HEADS = ("none", "diag", "full")


class Scalings(NamedTuple):
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor
    c_var: torch.Tensor
    k: torch.Tensor  # σ_d² / (σ² + 2σ_d²) = c_out² / c_var², the weight in T9/T12


def edm_scalings(sigma: torch.Tensor, sigma_data: float) -> Scalings:
    """THEORY T4, T5 (seed 000 with its c_skip typo fixed: σ_d², not σ_d)."""
    sigma = torch.as_tensor(sigma)
    s2, d2 = sigma.square(), sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data * torch.rsqrt(s2 + d2)
    c_in = torch.rsqrt(s2 + d2)
    c_noise = sigma.log() / 4
    c_var = sigma * torch.sqrt(1 + d2 / (s2 + d2))  # T5: c_var² = σ² + c_out²
    k = d2 / (s2 + 2 * d2)
    return Scalings(c_skip, c_out, c_in, c_noise, c_var, k)


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


@dataclass
class Prediction:
    """Everything one network evaluation gives (THEORY T6)."""
    x: torch.Tensor            # the noisy input x̃
    mu: torch.Tensor           # μ = c_skip·x̃ + c_out·F
    F: torch.Tensor            # raw mean output
    G: torch.Tensor | None     # raw confidence output (None: σ_φ = c_var)
    scalings: Scalings
    head: str

    @property
    def sigma_phi(self) -> torch.Tensor:
        """Per-element σ_φ = c_var·exp(G/2) (diag head; without a head σ_φ = c_var)."""
        if self.head == "full":
            raise ValueError("sigma_phi is per element; a full head gives precision()/covariance()")
        c_var = self.scalings.c_var
        return torch.broadcast_to(c_var, self.mu.shape) if self.G is None else c_var * torch.exp(self.G / 2)

    def factor(self) -> torch.Tensor:
        """S with Σ_φ⁻¹ = S·Sᵀ/c_var² (T12), [N, d, d]; diagonal heads give S = diag(e^(−G/2))."""
        d = self.mu.shape[-1]
        if self.head == "full":
            return tril_factor(self.G, d)
        G = torch.zeros_like(self.mu) if self.G is None else self.G
        return torch.diag_embed(torch.exp(-G / 2))

    def _example_c_var(self) -> torch.Tensor:
        """c_var as [N, 1, 1]: a full factor needs one σ per example (T12)."""
        c_var = torch.broadcast_to(self.scalings.c_var, self.mu.shape)
        if not torch.equal(c_var, c_var[..., :1].expand_as(c_var)):
            raise ValueError("a full covariance head needs one σ per example; got a σ that differs within one")
        return c_var[..., :1, None]

    def precision(self) -> torch.Tensor:
        """Σ_φ⁻¹, [N, d, d], for points x: [N, d]; diagonal heads give diag(1/σ_φ²) (σ may be per element)."""
        if self.head != "full":
            return torch.diag_embed(self.sigma_phi.square().reciprocal())
        S = self.factor()
        return S @ S.transpose(-1, -2) / self._example_c_var().square()

    def covariance(self) -> torch.Tensor:
        """Σ_φ = c_var²·(S·Sᵀ)⁻¹, [N, d, d]; diagonal heads give diag(σ_φ²)."""
        if self.head != "full":
            return torch.diag_embed(self.sigma_phi.square())
        S_inv = torch.linalg.solve_triangular(self.factor(), _eye_like(self.mu), upper=False)
        return self._example_c_var().square() * S_inv.transpose(-1, -2) @ S_inv


def _eye_like(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return torch.eye(d, dtype=x.dtype, device=x.device).expand(*x.shape[:-1], d, d)


class Denoiser(nn.Module):
    """EDM-preconditioned denoiser around any backbone `net(c_in·x̃, c_noise) -> F | (F, G)` (T6).

    head: "none" (EDM: σ_φ = c_var), "diag" (G shaped like x), "full" (G: [N, d(d+1)/2]).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, head: str = "none"):
        super().__init__()
        check_choice("head", head, HEADS)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data={sigma_data!r} must be > 0")
        self.net, self.sigma_data, self.head = net, float(sigma_data), head

    def predict(self, x: torch.Tensor, sigma) -> Prediction:
        sigma = as_sigma(sigma, x)
        sc = edm_scalings(sigma, self.sigma_data)
        out = self.net(sc.c_in * x, sc.c_noise)
        F, G = (out if isinstance(out, tuple) else (out, None))
        if self.head == "none":
            G = None
        elif G is None:
            raise ValueError(f"head={self.head!r} needs a backbone returning (F, G); it returned F only")
        if F.shape != x.shape:
            raise ValueError(f"backbone output F has shape {tuple(F.shape)}, expected x's {tuple(x.shape)}")
        if G is not None:
            want = x.shape if self.head == "diag" else (*x.shape[:-1], x.shape[-1] * (x.shape[-1] + 1) // 2)
            if G.shape != want:
                raise ValueError(f"head={self.head!r}: backbone output G has shape {tuple(G.shape)}, "
                                 f"expected {tuple(want)}")
        mu = sc.c_skip * x + sc.c_out * F
        return Prediction(x=x, mu=mu, F=F, G=G, scalings=sc, head=self.head)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return self.predict(x, sigma).mu


LOG_2PI = math.log(2 * math.pi)
