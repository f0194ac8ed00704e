"""Guidance as a denoiser wrapper (THEORY T33, T34; STYLE 6).

D̃ = D_guide + w·(D_main − D_guide): autoguidance when the guide is a weaker version of the
same model, classifier-free guidance when the guide is the unconditional model. w = 1 is the
main model, w = 0 the guide. In score space this is the same thing (T13 is linear in μ).
"""
from __future__ import annotations

import math

import torch


class Guided(torch.nn.Module):
    def __init__(self, main, guide, w: float):
        super().__init__()
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
            raise ValueError(f"guidance weight w={w!r} must be a finite number >= 0 (1 = no guidance)")
        self.main, self.guide, self.w = main, guide, float(w)

    def forward(self, x, sigma):
        if self.w == 1:
            return self.main(x, sigma)
        d_guide = self.guide(x, sigma)
        if self.w == 0:
            return d_guide
        return torch.lerp(d_guide, self.main(x, sigma), self.w)

    def predict(self, x, sigma):
        """The guided mean with the main model's confidence (guidance moves the mean only); w = 0 is the guide."""
        if self.w == 0:
            return self.guide.predict(x, sigma)
        p = self.main.predict(x, sigma)
        return p if self.w == 1 else p.with_mean(torch.lerp(self.guide(x, sigma), p.mu, self.w))
