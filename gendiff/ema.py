"""EMA of the weights (EDM2, Karras et al. 2024): the classic and the power-function EMA as objects, and the
power EMA's post-hoc reconstruction.

A power EMA with exponent γ averages the training trajectory θ_τ, τ ≤ t, with weights ∝ τ^γ; its relative
standard deviation σ_rel (the averaging length as a fraction of training) fixes γ (`power_ema_gamma`). Storing
snapshots of two such EMAs during training lets any other (t, σ_rel) be reconstructed afterwards as a linear
combination of the snapshots (`posthoc_coefficients`, EDM2 §3.2 and App. C.2): the combination whose weight
profile over τ is closest in L² to the target profile.

`EMA(model, decay)` and `PowerEMA(model, sigma_rel)` hold an averaged copy of the model (`.module`), updated
after each optimiser step by `update(model, step)` and checkpointed through `state_dict` / `load_state_dict`.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import torch
from safetensors import safe_open

from .io import save_state


def power_ema_gamma(sigma_rel: float) -> float:
    """EDM2's power-function EMA (Karras et al. 2024, eq. 3–4): the exponent γ of the profile ∝ τ^γ whose
    relative standard deviation σ_rel = √(γ + 1)/((γ + 2)√(γ + 3)); the real root > −1 of
    γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0. σ_rel must be in (0, 1/√12 ≈ 0.2887) (γ → 0 there)."""
    if not 0 < sigma_rel < 12 ** -0.5:
        raise ValueError(f"ema_sigma_rel={sigma_rel!r} must be in (0, {12 ** -0.5:.4f}) (EDM2 power EMA; "
                         "0 selects the classic EMA)")
    c = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real > -1))


def power_ema_decay(t: int, gamma: float) -> float:
    """The decay of step t ≥ 1, β_t = (1 − 1/t)^(γ + 1): the EMA then averages θ_τ with weights ∝ τ^γ."""
    return (1 - 1 / t) ** (gamma + 1)


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ after every step, with the constant decay d = `decay` (`decay_at` gives the
    decay of a step; subclasses change only that). `.module` is the averaged copy, in eval mode, without
    grads."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    def decay_at(self, step: int) -> float:
        return self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Average in `model`'s parameters after optimiser step `step` ≥ 1 (the model the copy was made
        from)."""
        d = self.decay_at(step)   # one multi-tensor lerp: the same p_ema += (1 − d)(p − p_ema) per tensor
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1 - d)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


class PowerEMA(EMA):
    """EDM2's power-function EMA (phema.PowerFunctionEMA with one σ_rel): decay β_t = (1 − 1/t)^(γ + 1) at
    step t, averaging the trajectory with weights ∝ τ^γ, γ = power_ema_gamma(sigma_rel)."""

    def __init__(self, model: torch.nn.Module, sigma_rel: float):
        self.sigma_rel, self.gamma = sigma_rel, power_ema_gamma(sigma_rel)
        super().__init__(model, decay=float("nan"))

    def decay_at(self, step: int) -> float:
        return power_ema_decay(step, self.gamma)


def _log_dot(t_a, g_a, t_b, g_b):
    """log ⟨p_a, p_b⟩ of the continuous power profiles p(τ) = (γ + 1)·τ^γ/t^(γ+1) on [0, t]:
    ∫_0^m p_a p_b dτ = (γ_a + 1)(γ_b + 1)·m^(γ_a + γ_b + 1) / ((γ_a + γ_b + 1)·t_a^(γ_a + 1)·t_b^(γ_b + 1)),
    m = min."""
    m = np.minimum(t_a, t_b)
    return (np.log(g_a + 1) + np.log(g_b + 1) + (g_a + g_b + 1) * np.log(m) - np.log(g_a + g_b + 1)
            - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))


def posthoc_coefficients(steps, gammas, target_step: float, target_sigma_rel: float) -> np.ndarray:
    """Weights x of stored power-EMA snapshots (snapshot i: step t_i, exponent γ_i) whose combination Σ
    x_i·p_i best matches, in L², the profile of a power EMA with σ_rel = target_sigma_rel at target_step
    (EDM2 App. C.2): the normal equations A·x = b, A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_target⟩, solved by least
    squares (A is ill-conditioned when snapshots are dense). Profiles are the continuous ones; the discrete
    EMA of `power_ema_decay` follows them up to O(1/t)."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    if t.ndim != 1 or len(t) == 0 or t.shape != g.shape or not np.all(t > 0):
        raise ValueError(f"steps={list(t)} and gammas={list(g)} must be equally long non-empty lists with "
                         "steps > 0")
    if not target_step > 0:
        raise ValueError(f"target_step={target_step!r} must be > 0")
    g_t = power_ema_gamma(target_sigma_rel)
    A = np.exp(_log_dot(t[:, None], g[:, None], t[None, :], g[None, :]))
    b = np.exp(_log_dot(t, g, float(target_step), g_t))
    return np.linalg.lstsq(A, b, rcond=None)[0]


def posthoc_ema(snapshots, target_step: float, target_sigma_rel: float) -> dict:
    """The reconstructed EMA state dict from `snapshots` = [(step, γ, state_dict), …] (EDM2 post-hoc EMA)."""
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots: train with train.ema_posthoc = [σ_rel, …] (e.g. [0.05, "
                         "0.1])")
    x = posthoc_coefficients([s[0] for s in snapshots], [s[1] for s in snapshots], target_step,
                             target_sigma_rel)
    keys = snapshots[0][2].keys()
    return {k: sum(float(w) * snap[2][k].double()
                   for w, snap in zip(x, snapshots)).to(snapshots[0][2][k].dtype)
            for k in keys}


def save_posthoc(folder: str, step: int, emas) -> None:
    """posthoc-<k>-<step>.safetensors: PowerEMA k of `emas` at `step`, with step, γ and σ_rel in its
    metadata."""
    os.makedirs(folder, exist_ok=True)
    for k, ema in enumerate(emas):
        save_state(ema.state_dict(), os.path.join(folder, f"posthoc-{k}-{step:08d}.safetensors"),
                   metadata={"step": str(step), "gamma": repr(ema.gamma), "sigma_rel": repr(ema.sigma_rel)})


def load_posthoc(folder: str, max_step: int | None = None) -> list:
    """[(step, γ, state_dict), …] of the post-hoc snapshots in `folder` (safetensors only;
    steps ≤ max_step)."""
    out = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not (name.startswith("posthoc-") and name.endswith(".safetensors")):
            continue
        with safe_open(os.path.join(folder, name), "pt") as f:
            meta = f.metadata() or {}
            step, gamma = int(meta["step"]), float(meta["gamma"])
            if max_step is None or step <= max_step:
                out.append((step, gamma, {k: f.get_tensor(k) for k in f.keys()}))
    return out
