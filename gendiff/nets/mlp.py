"""The toy denoiser backbone of THEORY §10 and the seed's `ToyModel`: an MLP on (c_in·x̃, c_noise, 1)."""
from __future__ import annotations

import torch
from torch import nn

from ..checks import as_sigma, check_positive, one_per_example
from ..heads import make_head
from ..precond import Denoiser


class ToyMLP(nn.Module):
    """The seed's network: an input layer (d + 2 → width), then `hidden_layers` layers width → width,
    SiLU before each of them and before the heads (five linear layers for hidden_layers = 4). Heads:
    F (d outputs) and G (`g_outputs`, 0 for none; take it from the denoiser's head: `head.outputs(d)`),
    each scaled by a zero-initialised gain, so training starts from μ = c_skip·x̃ and σ_φ = c_var.
    """

    def __init__(self, dim: int = 2, width: int = 64, hidden_layers: int = 4, g_outputs: int = 0):
        super().__init__()
        check_positive("dim", dim, integer=True)
        check_positive("width", width, integer=True)
        check_positive("hidden_layers", hidden_layers, integer=True)
        check_positive("g_outputs", g_outputs, integer=True, allow_zero=True)
        self.dim, self.g_outputs = dim, g_outputs
        layers = [nn.Linear(dim + 2, width)]
        for _ in range(hidden_layers):
            layers += [nn.SiLU(), nn.Linear(width, width)]
        self.body = nn.Sequential(*layers, nn.SiLU())
        self.out = nn.Linear(width, dim + g_outputs)
        self.gain = nn.Parameter(torch.zeros(2 if g_outputs else 1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor):
        # x: [N, d]; c_noise: [N] (one per example, the Denoiser's contract) or a scalar
        c = torch.as_tensor(c_noise, dtype=x.dtype, device=x.device)
        if c.numel() not in (1, x.shape[0]):
            raise ValueError(f"ToyMLP takes one noise level per example: c_noise of shape [{x.shape[0]}] or "
                             f"a scalar; got shape {tuple(c.shape)}")
        c = c.reshape(-1, 1).expand(x.shape[0], 1)
        h = self.out(self.body(torch.cat([x, c, torch.ones_like(c)], 1)))
        F = h[:, :self.dim] * self.gain[0]
        if not self.g_outputs:
            return F
        return F, h[:, self.dim:] * self.gain[1]


def toy_denoiser(head="none", dim: int = 2, width: int = 64, hidden_layers: int = 4, precond=None):
    """A `Denoiser` around a `ToyMLP` whose G outputs match the head (declared once, here)."""
    head = make_head(head)
    return Denoiser(ToyMLP(dim, width, hidden_layers, head.outputs(dim)), precond, head)


class ToyClassifier(nn.Module):
    """A noise-aware classifier for classifier guidance (T32): logits of p_σ(y | x̃) from an MLP on
    (c_in·x̃, c_noise, 1) with EDM's c_in = 1/√(σ² + σ_data²) and c_noise = ln(σ)/4 (T4), so its inputs
    stay O(1) at every σ. SiLU between `hidden_layers + 1` linear layers of `width`, then a linear
    read-out."""

    def __init__(self, dim: int = 2, classes: int = 2, width: int = 64, hidden_layers: int = 3,
                 sigma_data: float = 0.5):
        super().__init__()
        check_positive("dim", dim, integer=True)
        check_positive("classes", classes, integer=True)
        check_positive("width", width, integer=True)
        check_positive("hidden_layers", hidden_layers, integer=True)
        check_positive("sigma_data", sigma_data)
        self.dim, self.classes, self.sigma_data = dim, classes, float(sigma_data)
        layers = [nn.Linear(dim + 2, width)]
        for _ in range(hidden_layers):
            layers += [nn.SiLU(), nn.Linear(width, width)]
        self.net = nn.Sequential(*layers, nn.SiLU(), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        # x: [N, d]; sigma: a scalar or [N] -> logits [N, classes]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ToyClassifier expects x of shape [N, {self.dim}]; got {tuple(x.shape)}")
        s = one_per_example(as_sigma(sigma, x), x.shape, "ToyClassifier").reshape(-1, 1)     # [N, 1]
        c_in = torch.rsqrt(s.square() + self.sigma_data ** 2)
        c = s.log() / 4
        return self.net(torch.cat([c_in * x, c, torch.ones_like(c)], 1))
