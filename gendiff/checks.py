"""Input validation helpers: clear ValueErrors naming the option, the value and what is allowed."""
from __future__ import annotations

import math

import torch


def as_sigma(sigma, like: torch.Tensor, name: str = "sigma", allow_zero: bool = False) -> torch.Tensor:
    """σ as a tensor of `like`'s dtype/device, checked > 0 (>= 0 with allow_zero: a known source std, T36)
    and finite (THEORY T3 shapes).

    Exactly three forms, so that σ's meaning never depends on the batch size:
    - a scalar (Python number or 0-d tensor): one σ for everything;
    - a 1-D `[N]` tensor, N = like.shape[0]: always one σ per example, returned as `[N, 1, ...]`;
    - a tensor with `ndim == like.ndim`, broadcastable to `like`: per element (non-isotropic noise).
    Anything else is a ValueError naming the shape.
    """
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    allowed = (f"allowed: a scalar, one value per example [{like.shape[0] if like.ndim else 'N'}], "
               f"or a per-element tensor with {like.ndim} dimensions broadcastable to x")
    if s.ndim == 1 and like.ndim > 1:
        if s.shape[0] != like.shape[0]:
            raise ValueError(f"{name} has shape {tuple(s.shape)}: a 1-D sigma is one value per example, but "
                             f"x has {like.shape[0]} examples (shape {tuple(like.shape)}); {allowed}")
        s = s.reshape(-1, *([1] * (like.ndim - 1)))
    elif s.ndim not in (0, like.ndim):
        raise ValueError(f"{name} has shape {tuple(s.shape)} for x of shape {tuple(like.shape)}; {allowed}")
    try:
        torch.broadcast_shapes(s.shape, like.shape)
    except RuntimeError:
        raise ValueError(f"{name} has shape {tuple(s.shape)}, which does not broadcast to x of shape "
                         f"{tuple(like.shape)}; {allowed}") from None
    ok = torch.isfinite(s) & ((s >= 0) if allow_zero else (s > 0))
    if not torch.all(ok):
        raise ValueError(f"{name} must be finite and {'>=' if allow_zero else '>'} 0 everywhere; got "
                         f"{s[~ok].flatten()[0].item()}")
    return s


def per_example(sigma: torch.Tensor, n: int) -> torch.Tensor:
    """One noise level per example, [n], from a checked σ (`as_sigma`): the value itself when σ is
    scalar or per example, the root mean square over an example's elements when σ is per element."""
    if sigma.ndim == 0:
        return sigma.expand(n)
    flat = torch.broadcast_to(sigma, (n, *sigma.shape[1:])).flatten(1)
    return flat.square().mean(1).sqrt()


def one_per_example(t: torch.Tensor, shape, what: str) -> torch.Tensor:
    """A noise level or scaling that must be constant within each example (isotropic noise σ²I: T12, T17,
    the exact mixture), as [N]; a value that differs within an example is a ValueError naming `what`."""
    full = torch.broadcast_to(t, tuple(shape)).flatten(1)
    if not torch.equal(full, full[:, :1].expand_as(full)):
        raise ValueError(f"{what} needs one σ per example (isotropic noise σ²I); got a σ that differs within "
                         "an example")
    return full[:, 0]


def check_ordered(lo_name: str, lo, hi_name: str, hi) -> None:
    """lo < hi (both already checked numbers), else a ValueError naming both."""
    if not lo < hi:
        raise ValueError(f"{lo_name}={lo!r} must be < {hi_name}={hi!r}; allowed: {lo_name} < {hi_name}")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {sorted(allowed)}")


def check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    """value > 0 (or >= 0), finite, a real number (an int if `integer`); else a ValueError naming it."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (integer and not isinstance(value, int))):
        raise ValueError(f"{name}={value!r} must be {'an integer' if integer else 'a finite number'}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")
