"""Guidance as a denoiser wrapper (THEORY T32, T33, T34; STYLE 6).

D̃ = D_guide + w·(D_main − D_guide): autoguidance when the guide is a weaker version of the
same model, classifier-free guidance when the guide is the unconditional model. w = 1 is the
main model, w = 0 the guide. In score space this is the same thing (T13 is linear in μ).
A guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"): with
`interval=(σ_lo, σ_hi)` the guided D̃ is used only for σ_lo ≤ σ ≤ σ_hi and the main model alone elsewhere.

Classifier guidance (T32) adds w·∇ₓ log p_σ(y | x) to the score; through T13 the denoiser moves by
w·σ²·∇ₓ log p_σ(y | x) (`ClassifierGuided`), with a noise-aware classifier `classifier(x, σ) -> logits`
(trained by `train_noisy_classifier` on x0 + σε, or the exact one of the toy mixture).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

from .checks import as_sigma, check_positive
from .io import generator


def check_weight(w, meaning: str, name: str = "guidance weight") -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
        raise ValueError(f"{name} w={w!r} must be a finite number >= 0 ({meaning})")
    return float(w)


def check_interval(interval) -> tuple[float, float] | None:
    """A guidance interval (σ_lo, σ_hi) with 0 ≤ σ_lo < σ_hi (σ_hi may be math.inf), as floats; None: none."""
    if interval is None:
        return None
    ok = isinstance(interval, (tuple, list)) and len(interval) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) for v in interval)
    if not ok or not 0 <= interval[0] < interval[1]:
        raise ValueError(f"guidance interval={interval!r} must be two numbers (σ_lo, σ_hi) with "
                         "0 <= σ_lo < σ_hi (σ_hi may be inf); None: guidance at every σ")
    return float(interval[0]), float(interval[1])


class Guided(torch.nn.Module):
    """D̃ = D_guide + w·(D_main − D_guide) (T33, T34), w ≥ 0: w = 1 is the main model, w = 0 the guide.

    interval: None (guidance at every σ) or (σ_lo, σ_hi): D̃ where σ_lo ≤ σ ≤ σ_hi, the main model alone
    elsewhere (Kynkäänniemi et al. 2024); σ is a scalar (the samplers') or one per example, decided per
    example.
    The guide is not called for a batch whose every σ is outside. `predict` moves the mean only: with an
    interval and a batch partly inside, the confidence is the main model's for every example."""

    def __init__(self, main, guide, w: float, interval=None):
        super().__init__()
        check_weight(w, "1 = no guidance")
        self.main, self.guide, self.w = main, guide, float(w)
        self.interval = check_interval(interval)

    def _inside(self, x, sigma) -> torch.Tensor | None:
        """Where guidance applies, broadcastable to x (one value per example); None: everywhere."""
        if self.interval is None:
            return None
        s = as_sigma(sigma, x)
        lo, hi = self.interval
        return ((s >= lo) & (s <= hi)).flatten(1).all(1).view(-1, *[1] * (x.ndim - 1)) if s.ndim \
            else (s >= lo) & (s <= hi)

    def _guided(self, x, sigma):
        if self.w == 1:
            return self.main(x, sigma)
        d_guide = self.guide(x, sigma)
        if self.w == 0:
            return d_guide
        return torch.lerp(d_guide, self.main(x, sigma), self.w)

    def forward(self, x, sigma):
        inside = self._inside(x, sigma)
        if inside is None or bool(inside.all()):
            return self._guided(x, sigma)
        if not bool(inside.any()):
            return self.main(x, sigma)
        d_main = self.main(x, sigma)
        guided = d_main if self.w == 1 else torch.lerp(self.guide(x, sigma), d_main, self.w)
        return torch.where(inside, guided, d_main)

    def predict(self, x, sigma):
        """The guided mean with the main model's confidence (guidance moves the mean only); w = 0 is the
        guide (at every σ inside the interval, where all of a batch is)."""
        inside = self._inside(x, sigma)
        if inside is not None and not bool(inside.all()):
            p = self.main.predict(x, sigma)
            if not bool(inside.any()) or self.w == 1:
                return p
            return p.with_mean(torch.where(inside, torch.lerp(self.guide(x, sigma), p.mu, self.w), p.mu))
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


def classifier_free(denoiser, labels: torch.Tensor, null_label: int, w: float, interval=None) -> Guided:
    """Classifier-free guidance (T33) in seed 004's convention: s̃ = (1 + w)·s(x | y) − w·s(x | ∅), w ≥ 0,
    w = 0 the conditional model. T13 is linear in μ, so this is `Guided` with weight 1 + w and the null-class
    model as the guide (the same network with every label set to `null_label`). interval: as `Guided`'s, the
    conditional model alone outside it."""
    check_weight(w, "0 = the conditional model, T33", "cfg weight")
    null = torch.full_like(labels, null_label)
    return Guided(Conditioned(denoiser, labels), Conditioned(denoiser, null), 1 + w, interval)


def _check_labels(labels, n: int, num_classes: int) -> torch.Tensor:
    y = torch.as_tensor(labels)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex() or y.ndim != 1 or len(y) != n:
        raise ValueError(f"labels must be integer class indices of shape [{n}]; got dtype {y.dtype}, "
                         f"shape {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels range over [{int(y.min())}, {int(y.max())}]; allowed: 0 … "
                         f"{num_classes - 1} (the classifier has {num_classes} classes)")
    return y.long()


def class_log_prob_grad(classifier, x: torch.Tensor, sigma, labels: torch.Tensor) -> torch.Tensor:
    """∇ₓ log p_σ(y | x) of a noise-aware classifier (`classifier(x, σ) -> logits [N, C]`), by autograd, in
    x's shape. Works under torch.no_grad (the samplers' context); the classifier runs in float32 even inside a
    bf16 autocast region (it was trained and tested in float32). When the caller itself differentiates through
    x (x.requires_grad with gradients enabled: a PF-ODE divergence, a JVP), the gradient is built with
    create_graph, so that the shift's own Jacobian is not dropped. A classifier in training mode (dropout,
    batch statistics: random guidance) or a non-finite gradient is a ValueError."""
    if isinstance(classifier, torch.nn.Module) and classifier.training:
        raise ValueError(f"the classifier ({type(classifier).__name__}) is in training mode; call .eval() "
                         "first (dropout or batch statistics would make the guidance random)")
    outer = torch.is_grad_enabled() and x.requires_grad
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        xg = x if outer else x.detach().requires_grad_(True)
        logits = classifier(xg.float() if xg.dtype in (torch.float16, torch.bfloat16) else xg, sigma)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"the classifier must return logits of shape [N, classes] = [{x.shape[0]}, C]; "
                             f"got {tuple(logits.shape)}")
        y = _check_labels(labels, x.shape[0], logits.shape[1]).to(logits.device)
        lp = torch.log_softmax(logits.double(), -1).gather(1, y[:, None]).sum()
        grad = torch.autograd.grad(lp, xg, create_graph=outer)[0]
    if not torch.isfinite(grad).all():
        raise ValueError("the classifier's ∇ₓ log p_σ(y | x) is not finite (NaN or inf): check the "
                         "classifier's weights and its input scaling at this σ")
    return grad.to(x.dtype)


class ClassifierGuided(torch.nn.Module):
    """Classifier guidance (T32): ∇ log p(x | y) = ∇ log p(x) + w·∇ log p_σ(y | x). Through Tweedie (T13,
    D = x + σ²·∇ log p) the guided denoiser is D̃(x, σ) = D(x, σ) + w·σ²·∇ₓ log p_σ(y | x): w = 0 is the
    denoiser, w = 1 with the exact p and classifier is exactly the class-conditional denoiser, w > 1 sharpens
    (Dhariwal & Nichol's "scale"). σ: a scalar or one per example (isotropic noise). Guidance moves the mean
    only: `predict` keeps the denoiser's confidence."""

    def __init__(self, denoiser, classifier, labels: torch.Tensor, w: float):
        super().__init__()
        self.denoiser, self.classifier, self.labels = denoiser, classifier, labels
        self.w = check_weight(w, "0 = the unguided denoiser, T32")

    def shift(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """w·σ²·∇ₓ log p_σ(y | x): the guided mean minus the denoiser's."""
        s = as_sigma(sigma, x)
        return self.w * s.square() * class_log_prob_grad(self.classifier, x, sigma, self.labels)

    def forward(self, x, sigma):
        d = self.denoiser(x, sigma)
        return d if self.w == 0 else d + self.shift(x, sigma)

    def predict(self, x, sigma):
        p = self.denoiser.predict(x, sigma)
        return p if self.w == 0 else p.with_mean(p.mu + self.shift(x, sigma))


def train_noisy_classifier(classifier, x0: torch.Tensor, labels: torch.Tensor, sigma_density, *,
                           steps: int = 2000, batch: int = 512, lr: float = 2e-3,
                           seed: int = 0) -> list[float]:
    """Fit a noise-aware classifier `classifier(x̃, σ) -> logits` by cross-entropy on x̃ = x0 + σε, σ drawn
    from `sigma_density` (a schedules density: `.sample(n, generator)`), Adam with a cosine-decayed learning
    rate. Deterministic under `seed` (batches, σ and ε from their own derived generator). Returns the
    per-step losses; the classifier is left in eval mode."""
    check_positive("steps", steps, integer=True)
    check_positive("batch", batch, integer=True)
    check_positive("lr", lr)
    if x0.ndim < 2 or len(x0) == 0:
        raise ValueError(f"x0 must be a non-empty batch [N, ...]; got shape {tuple(x0.shape)}")
    if not torch.isfinite(x0).all():
        raise ValueError("x0 holds NaN or infinite values")
    g = generator(seed, "noisy-classifier")               # draws on the CPU, moved to x0's device: any device
    opt = torch.optim.Adam(classifier.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    classifier.train()
    y_all, losses, dev = None, [], x0.device
    for step in range(steps):
        idx = torch.randint(0, len(x0), (batch,), generator=g).to(dev)
        sigma = sigma_density.sample(batch, g).to(device=dev, dtype=x0.dtype)
        eps = torch.randn((batch, *x0.shape[1:]), generator=g, dtype=x0.dtype).to(dev)
        x = x0[idx] + sigma.view(-1, *[1] * (x0.ndim - 1)) * eps
        logits = classifier(x, sigma)
        if y_all is None:
            y_all = _check_labels(labels, len(x0), logits.shape[1]).to(dev)
        loss = nnf.cross_entropy(logits, y_all[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_noisy_classifier: the loss is {loss.item()} at step {step}; "
                                     f"lower lr={lr} or check the classifier's input scaling")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    classifier.eval()
    return losses
