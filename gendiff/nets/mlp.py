"""The toy denoiser backbone of THEORY §10: an MLP on (c_in·x̃, c_noise, 1)."""
from __future__ import annotations

import torch
from torch import nn

from ..checks import check_choice, check_positive
from ..precond import HEADS


def head_size(head: str, dim: int) -> int:
    """Outputs of the confidence head G: none 0, diag d, full d(d+1)/2 (T12)."""
    return {"none": 0, "diag": dim, "full": dim * (dim + 1) // 2}[head]


class ToyMLP(nn.Module):
    """`hidden_layers` SiLU layers of width `width`; heads F (d) and G (see `head_size`), each
    scaled by a zero-initialised gain, so training starts from μ = c_skip·x̃ and σ_φ = c_var."""

    def __init__(self, dim: int = 2, width: int = 64, hidden_layers: int = 4, head: str = "none"):
        super().__init__()
        check_choice("head", head, HEADS)
        check_positive("width", width, integer=True)
        check_positive("hidden_layers", hidden_layers, integer=True)
        self.dim, self.head = dim, head
        layers, fan_in = [], dim + 2
        for _ in range(hidden_layers):
            layers += [nn.Linear(fan_in, width), nn.SiLU()]
            fan_in = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim + head_size(head, dim))
        self.gain = nn.Parameter(torch.zeros(2 if head != "none" else 1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor):
        # x: [N, d]; c_noise: scalar, [N] or [N, 1]
        c = torch.as_tensor(c_noise, dtype=x.dtype, device=x.device)
        if c.numel() not in (1, x.shape[0]):
            raise ValueError(f"ToyMLP takes one noise level per example; c_noise has shape {tuple(c.shape)}")
        c = c.reshape(-1, 1).expand(x.shape[0], 1)
        h = self.out(self.body(torch.cat([x, c, torch.ones_like(c)], 1)))
        F = h[:, :self.dim] * self.gain[0]
        if self.head == "none":
            return F
        return F, h[:, self.dim:] * self.gain[1]
