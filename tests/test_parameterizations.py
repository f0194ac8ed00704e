"""T21: conversions between x0, ε, v, score and F are exact, for scalar, per-example and per-element noise.

Breakages tried (each fails here): v's x = αz − σv (true only when α² + σ² = 1) with a VE α/σ;
score with σ instead of σ²; F with c_skip of σ instead of σ/α.
"""
import itertools

import pytest
import torch

from gendiff.parameterizations import KINDS, convert, from_x0, to_x0
from gendiff.precond import EDMPrecond

F64 = torch.float64
g = torch.Generator().manual_seed(0)
X0 = torch.randn(6, 3, generator=g, dtype=F64) * 0.5
EPS = torch.randn(6, 3, generator=g, dtype=F64)
_T = torch.rand(6, 3, generator=g, dtype=F64) * 0.9 + 0.05                # flow matching: α = 1 − t, σ = t
NOISE = {  # (α, σ): VP scalar, VE per example, flow per element, a general per-element pair
    "vp-scalar": (torch.tensor(0.8, dtype=F64), torch.tensor(0.6, dtype=F64)),
    "ve-per-example": (torch.tensor(1.0, dtype=F64), torch.logspace(-2, 1, 6, dtype=F64)[:, None]),
    "flow-per-element": (1 - _T, _T),
    "general-per-element": (torch.rand(6, 3, generator=g, dtype=F64) + 0.3,
                            torch.rand(6, 3, generator=g, dtype=F64) * 3 + 0.01),
}


@pytest.mark.parametrize("noise", list(NOISE))
def test_every_kind_round_trips_through_every_other(noise):
    alpha, sigma = NOISE[noise]
    z = alpha * X0 + sigma * EPS                                          # T1
    truth = {"x0": X0, "eps": EPS, "v": alpha * EPS - sigma * X0, "score": -EPS / sigma,
             "F": ((X0 - EDMPrecond(0.5)(sigma / alpha).c_skip * z / alpha)
                   / EDMPrecond(0.5)(sigma / alpha).c_out)}
    for kind in KINDS:                                                    # each kind's value of the true x0
        torch.testing.assert_close(from_x0(kind, X0, z, alpha, sigma), truth[kind], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(to_x0(kind, truth[kind], z, alpha, sigma), X0, rtol=1e-10, atol=1e-10)
    for a, b in itertools.permutations(KINDS, 2):
        torch.testing.assert_close(convert(truth[a], a, b, z, alpha, sigma), truth[b], rtol=1e-10, atol=1e-10)
    # the conversion chain ε → x0 → v → score → F → ε
    p, kinds = truth["eps"], ["eps", "x0", "v", "score", "F", "eps"]
    for a, b in zip(kinds, kinds[1:]):
        p = convert(p, a, b, z, alpha, sigma)
    torch.testing.assert_close(p, EPS, rtol=1e-10, atol=1e-10)


def test_F_is_the_edm_denoiser_output():
    """F from x0 equals the F* target of T6 in VE space (α = 1): (σ·x0 − σ_d²·ε)/(σ_d·√(σ² + σ_d²))."""
    sigma = torch.logspace(-3, 2, 6, dtype=F64)[:, None]
    z = X0 + sigma * EPS
    F = from_x0("F", X0, z, 1.0, sigma)
    torch.testing.assert_close(F, (sigma * X0 - 0.25 * EPS) / (0.5 * (sigma**2 + 0.25).sqrt()),
                               rtol=1e-10, atol=1e-12)


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind='w'.*x0"):
        to_x0("w", X0, X0, 1.0, 1.0)
