"""`nll-posterior` (losses.ExcessPosteriorNLL, issue 18): T7 through T37's excess-variance head plus the NLL
of x0 under the head's own readout N(μ, σ_φ² − σ²) with μ held, ½[log 2πc_out²(e^G + ε) + (sg(F) − F*)²/(e^G
+ ε)], ε = VAR_FLOOR.

Oracle: a Gaussian prior N(0, σ_d²) under EDM's preconditioning at σ_data = σ_d, where E[x0 | x̃] = c_skip·x̃
(F* has posterior mean 0) and Var[x0 | x̃] = c_out² (G* = 0, THEORY T37), so a backbone that outputs the
constants (F, G) = (a, g) is at T8's optimum at a = g = 0.

Breakages tried (the test that catches each): sg(F) dropped (F's gradient then differs from T7's:
mean_gradient_is_T7s); e^(−G) → e^(G) in the added term (the optimum test: ∂/∂g ≠ 0 at g = 0); the c_out²
factor left out of the variance (the value test against the direct formula); the T7 part dropped (value
test); T6's head accepted (the refusal test); ε dropped (e^(−G)·r² in float32: the extreme-G test).
"""
import math

import pytest
import torch
from torch import nn

from gendiff.heads import nll_direct
from gendiff.losses import ExcessPosteriorNLL, NoisyBatch, make_loss
from gendiff.precond import Denoiser, EDMPrecond

F64 = torch.float64
SD = 0.5


class Constant(nn.Module):
    """A backbone whose F and G are two learnable constants, whatever the input."""

    def __init__(self, a=0.0, g=0.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=F64))
        self.g = nn.Parameter(torch.tensor(g, dtype=F64))

    def forward(self, x_in, c_noise):
        zero = torch.zeros_like(x_in)
        return zero + self.a, zero + self.g


def batch(sigma, n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = SD * torch.randn(n, 1, generator=g, dtype=F64)
    return NoisyBatch(x0=x0, x_noisy=x0 + sigma * torch.randn(n, 1, generator=g, dtype=F64),
                      sigma=torch.tensor(sigma, dtype=F64))


def den(a=0.0, g=0.0, head="excess"):
    return Denoiser(Constant(a, g), EDMPrecond(SD), head)


def grads(loss_fn, d, b):
    loss = loss_fn(d, b).mean()
    return torch.autograd.grad(loss, [d.net.a, d.net.g])


@pytest.mark.parametrize("sigma", [0.002, 0.05, 1.0, 20.0])
def test_value_is_T7_plus_the_readout_nll(sigma):
    """Per example: T7 at σ_φ² = σ² + c_out²e^g (nll_direct, the oracle) plus the Gaussian NLL of x0 under
    N(μ, c_out²(e^g + ε)), both from their direct formulas."""
    b, d = batch(sigma, n=64), den(0.3, -0.7)
    sc = EDMPrecond(SD)(b.sigma)
    mu = sc.c_skip * b.x_noisy + sc.c_out * 0.3
    e = sc.c_out ** 2 * math.exp(-0.7)                               # T37's excess
    v = sc.c_out ** 2 * (math.exp(-0.7) + ExcessPosteriorNLL.VAR_FLOOR)   # the readout's variance
    want = nll_direct(mu, torch.sqrt(sigma ** 2 + e), b.x0, b.sigma) + \
        0.5 * (torch.log(2 * math.pi * v) + (mu - b.x0).square() / v)
    got = ExcessPosteriorNLL()(d, b)
    torch.testing.assert_close(got, want.sum(1), rtol=1e-10, atol=1e-10)
    assert make_loss("nll-posterior").__class__ is ExcessPosteriorNLL


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.5, 5.0])
def test_optimum_is_T8s_on_a_gaussian_prior(sigma):
    """At (a, g) = (0, 0), the exact posterior mean and Var[x0 | x̃] = c_out², the sample-mean gradients vanish
    within their Monte-Carlo error; at g = ±0.5 the G gradient points back to 0."""
    b = batch(sigma)
    da, dg = grads(ExcessPosteriorNLL(), den(), b)
    assert abs(dg.item()) < 0.01 and abs(da.item()) < 0.01, (da, dg)
    assert grads(ExcessPosteriorNLL(), den(g=0.5), b)[1] > 0.1
    assert grads(ExcessPosteriorNLL(), den(g=-0.5), b)[1] < -0.1


def test_G_gradient_does_not_vanish_where_the_excess_is_small():
    """The reason for the term: at σ = 0.05 a head that says Var = c_out²·e^(−6) (400× too confident) gets a
    G gradient ~e^(−6)·(c_out/σ)² from T7 alone, and O(1) from the added term."""
    b = batch(0.05)
    t7 = grads(make_loss("nll"), den(g=-6.0), b)[1].item()
    both = grads(ExcessPosteriorNLL(), den(g=-6.0), b)[1].item()
    assert t7 < 0 and abs(t7) < 2e-3
    assert both < -100, both                          # ½(1 − e^6·1): the pull back toward g = 0


def test_mean_gradient_is_T7s():
    """μ's gradient is T7's alone (the added term holds μ): the weighting of T8 is unchanged."""
    for sigma in (0.05, 1.0):
        b = batch(sigma, n=4096)
        da_t7 = grads(make_loss("nll"), den(0.2, -1.0), b)[0]
        da = grads(ExcessPosteriorNLL(), den(0.2, -1.0), b)[0]
        torch.testing.assert_close(da, da_t7, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("g", [-89.0, -1000.0, 80.0])
def test_finite_in_float32_at_extreme_G(g):
    """ε = VAR_FLOOR keeps the added term and its gradient finite where e^(−G)·r² would overflow float32."""
    b = batch(0.05, n=256)
    b = NoisyBatch(x0=b.x0.float(), x_noisy=b.x_noisy.float(), sigma=b.sigma.float())
    d = den(0.5, g).float()
    loss = ExcessPosteriorNLL()(d, b).mean()
    (dg,) = torch.autograd.grad(loss, [d.net.g])
    assert torch.isfinite(loss) and torch.isfinite(dg), (loss, dg)


def test_refuses_another_head():
    with pytest.raises(ValueError, match="excess-variance head"):
        ExcessPosteriorNLL()(den(head="diag"), batch(0.1, n=8))
