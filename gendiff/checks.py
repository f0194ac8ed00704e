"""Input validation helpers: clear ValueErrors naming the option, the value and what is allowed."""
from __future__ import annotations

import math

import torch


def as_sigma(sigma, like: torch.Tensor, name: str = "sigma") -> torch.Tensor:
    """σ as a tensor of `like`'s dtype/device, checked > 0 and finite.

    σ may be a Python scalar, a 0-d tensor, a per-example `[N]` tensor (reshaped to
    `[N, 1, ...]` so it broadcasts over the element dimensions of `like`), or a
    per-element tensor broadcastable to `like` (THEORY T3).
    """
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.ndim == 1 and like.ndim > 1 and s.shape[0] == like.shape[0] and s.shape[0] != 1:
        s = s.reshape(-1, *([1] * (like.ndim - 1)))
    try:
        torch.broadcast_shapes(s.shape, like.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {tuple(s.shape)}, which does not broadcast to x of shape {tuple(like.shape)}; "
            f"allowed: a scalar, one value per example [N], or a per-element tensor broadcastable to x"
        ) from None
    if not torch.all(torch.isfinite(s) & (s > 0)):
        bad = s[~(torch.isfinite(s) & (s > 0))].flatten()[0].item()
        raise ValueError(f"{name} must be finite and > 0 everywhere; got {bad}")
    return s


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {sorted(allowed)}")


def check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    """value > 0 (or >= 0), finite, a real number (an int if `integer`); else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name}={value!r} must be {'an integer' if integer else 'a finite number'}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")
