"""Progressive distillation (THEORY T35; Salimans & Ho 2022) in VE σ-space, as a loss of the one training
loop: `train(student, loss, source, cfg, sigma_density=loss.density)` with
`loss = DistillationLoss(teacher, sigmas)`.

One round. The teacher takes two DDIM steps σ_t → σ_m → σ_s on its grid of 2N steps (`sigmas`, e.g.
schedules.distill_sigmas(2N)); in VE space DDIM is Euler on the PF-ODE (T15), so each step is
x ↦ (σ_s/σ_t)·x + (1 − σ_s/σ_t)·D(x; σ_t) (`ddim_step`). The student, initialised from the teacher, must land
where the teacher lands in one step of its own grid, `sigmas[::2]` (N steps: every other point of the
teacher's). Its training inputs are x_t = x0 + σ_t·ε, x0 from the data, σ_t drawn uniformly from the starts of
the student's steps (`schedules.GridSteps`, `loss.density`); its target D* (`two_step_target`) and loss
max(1/σ_t², 1)·‖D_student − D*‖² (truncated SNR, `snr_weight`) are T35's.

A confidence head (`head_loss="nll"`). D* is a deterministic function of x_t: it has no noise of its own. The
head is trained by its own NLL (Head.nll: T9, T12 or T37, whichever the student has) of x0 := D* at σ_t, with
the network's mean outputs held (a stop-gradient on F and μ, as HybridLoss holds IDDPM's mean for L_vlb: the
NLL's gradient reaches the mean only through the layers F shares with G, as in IDDPM, not through F itself).
T7 keeps its σ² term, so at the optimum (T8) σ_φ² = σ_t² + E[(μ − D*)² | x_t]: the excess σ_φ² − σ_t², which
the teacher's head spent on Var[x0 | x_t], becomes the student's own squared error against its teacher's
two-step target: where the few-step generator is unsure of what its teacher would have done, not where the
data are ambiguous. The σ² term is kept, not dropped, because every head is built around it (T37's σ_φ ≥ σ
cannot go below it) and every reader of σ_φ (calibration, T14, T38) subtracts σ². `head_loss="none"` gives the
head no loss of its own: it starts as the teacher's (Var[x0 | x_t]), and a G that shares the backbone with F
drifts as the mean is trained.
"""
from __future__ import annotations

import dataclasses

import torch

from .checks import as_sigma, check_choice
from .guidance import Conditioned
from .heads import ExcessHead, NetPrediction, _sum_elements
from .losses import NoisyBatch, readout_nll
from .schedules import GridSteps

HEAD_LOSSES = ("nll", "posterior", "none")


def ddim_step(denoiser, x: torch.Tensor, s_t, s_s) -> torch.Tensor:
    """One DDIM step σ_t → σ_s in VE space (T35), Euler on the PF-ODE (T15):
    (σ_s/σ_t)·x + (1 − σ_s/σ_t)·D(x; σ_t). σ_t > 0 and σ_s ≥ 0 are scalars or one per example; σ_s = 0 gives
    D(x; σ_t)."""
    r = as_sigma(s_s, x, "s_s", allow_zero=True) / as_sigma(s_t, x, "s_t")
    return r * x + (1 - r) * denoiser(x, s_t)


def two_step_target(teacher, x_t: torch.Tensor, s_t, s_m, s_s) -> tuple[torch.Tensor, torch.Tensor]:
    """T35's student target: the teacher's two DDIM steps σ_t → σ_m → σ_s from x_t under no_grad, landing at
    x_s^T, and the denoiser output D* = (x_s^T − (σ_s/σ_t)·x_t)/(1 − σ_s/σ_t) whose one step lands there
    (D* = x_s^T when σ_s = 0). Returns (D*, x_s^T)."""
    with torch.no_grad():
        x_m = ddim_step(teacher, x_t, s_t, s_m)
        x_s = ddim_step(teacher, x_m, s_m, s_s)
    r = as_sigma(s_s, x_t, "s_s", allow_zero=True) / as_sigma(s_t, x_t, "s_t")
    return (x_s - r * x_t) / (1 - r), x_s


def snr_weight(sigma: torch.Tensor) -> torch.Tensor:
    """Truncated SNR weighting max(SNR, 1) with SNR = 1/σ² in VE space (T35; Salimans & Ho's
    "truncated SNR")."""
    return torch.clamp(torch.as_tensor(sigma).reciprocal().square(), min=1.0)


class DistillationLoss:
    """One round of T35 as a loss `loss(student, batch) -> [N]` for train.train (module docstring).

    teacher: a denoiser D(x, σ) (the teacher's EMA, frozen); sigmas: the teacher's grid, strictly decreasing
    with a trailing 0 and an even number 2N of steps; the student's grid is `sigmas[::2]`, and its training
    σ_t come from `self.density` (GridSteps over the student's N starting points): pass it to train as
    `sigma_density`. Each σ_t = sigmas[2i] is mapped to σ_m = sigmas[2i + 1], σ_s = sigmas[2i + 2]. The batch
    gives x_t = batch.x_noisy at σ_t = batch.sigma (one per example) and, for a class-conditional model, the
    labels both models see; x0 is not read (D* depends on x_t alone). head_loss: "nll" adds the student head's
    NLL of D* with a stop-gradient on its mean outputs (module docstring) where the student has a confidence
    head; "posterior" (T37's excess head only) adds instead the NLL of D* under the head's own readout
    N(sg(μ), σ_φ² − σ_t²) (losses.readout_nll): no σ_t² term, so the excess estimates E[(μ − D*)²] directly
    and G's gradient does not vanish where that error is ≪ σ_t²; "none" trains the mean only."""

    def __init__(self, teacher, sigmas, head_loss: str = "nll"):
        check_choice("head_loss", head_loss, HEAD_LOSSES)
        grid = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        steps = len(grid) - 1
        if steps < 2 or steps % 2:
            raise ValueError(f"sigmas has {steps} steps; the teacher's grid needs an even number 2N ≥ 2 of "
                             "steps (its student takes every other point)")
        GridSteps(grid)                               # checks the teacher's grid
        self.density = GridSteps(grid[::2])
        self.teacher, self.head_loss, self.sigmas = teacher, head_loss, grid
        self.table = grid.float()                     # σ as the batches carry them (float32)

    @property
    def student_sigmas(self) -> torch.Tensor:
        return self.sigmas[::2]

    def steps(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(σ_t, σ_m, σ_s), one each per example, for batch σ_t drawn by `self.density`."""
        i = 2 * self.density.index(sigma)
        t = self.table.to(sigma.device)
        return t[i], t[i + 1], t[i + 2]

    def target(self, x_t: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        """D* at x_t, σ_t (two_step_target on this round's grid)."""
        teacher = self.teacher if labels is None else Conditioned(self.teacher, labels)
        s_t, s_m, s_s = (v.to(x_t.dtype) for v in self.steps(sigma))
        return two_step_target(teacher, x_t, s_t, s_m, s_s)[0]

    def __call__(self, student, batch: NoisyBatch) -> torch.Tensor:
        if batch.source_sigma is not None:
            raise ValueError("DistillationLoss: batches with a per-element source std (T36 mode (c)) are not "
                             "supported; distil a model trained on plain x̃ = x0 + σε")
        sigma = batch.sigma
        if sigma.ndim != 1 or len(sigma) != len(batch.x_noisy):
            raise ValueError(f"DistillationLoss needs one σ per example [N]; got shape {tuple(sigma.shape)}")
        x_t = batch.x_noisy
        target = self.target(x_t, sigma, batch.labels)
        den = student if batch.labels is None else Conditioned(student, batch.labels)
        wants_head = self.head_loss in ("nll", "posterior") and hasattr(den, "predict")
        p = den.predict(x_t, sigma) if wants_head else None
        mu = p.mu if p is not None else den(x_t, sigma)
        loss = snr_weight(sigma) * _sum_elements((mu - target).square())                     # T35
        if self.head_loss == "nll" and isinstance(p, NetPrediction) and p.head.has_confidence:
            held = dataclasses.replace(p, mu=p.mu.detach(), F=p.F.detach())     # no gradient through F
            loss = loss + p.head.nll(held, target)
        elif self.head_loss == "posterior" and wants_head:
            if not isinstance(getattr(p, "head", None), ExcessHead):
                raise ValueError("head_loss='posterior' trains T37's excess-variance head (a student of a "
                                 "confidence-excess run); this student's head is "
                                 f"{type(getattr(p, 'head', None)).__name__}")
            loss = loss + _sum_elements(readout_nll(p, target))                 # F held inside
        return loss


__all__ = ["HEAD_LOSSES", "ddim_step", "two_step_target", "snr_weight", "DistillationLoss"]
