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


class Conditioned(torch.nn.Module):
    """A class-conditional denoiser with its labels bound: `D(x, σ) = D(x, σ, y)`, so samplers, guidance and
    likelihood see the one contract (STYLE 2). labels: [N] class indices (the backbone's null class is ∅)."""

    def __init__(self, denoiser, labels: torch.Tensor):
        super().__init__()
        self.denoiser, self.labels = denoiser, labels

    def forward(self, x, sigma):
        return self.denoiser(x, sigma, class_labels=self.labels)

    def predict(self, x, sigma):
        return self.denoiser.predict(x, sigma, class_labels=self.labels)


def classifier_free(denoiser, labels: torch.Tensor, null_label: int, w: float) -> Guided:
    """Classifier-free guidance (T33) in seed 004's convention: s̃ = (1 + w)·s(x | y) − w·s(x | ∅), w ≥ 0,
    w = 0 the conditional model. T13 is linear in μ, so this is `Guided` with weight 1 + w and the null-class
    model as the guide (the same network with every label set to `null_label`)."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
        raise ValueError(f"cfg weight w={w!r} must be a finite number >= 0 (0 = the conditional model, T33)")
    null = torch.full_like(labels, null_label)
    return Guided(Conditioned(denoiser, labels), Conditioned(denoiser, null), 1 + w)
