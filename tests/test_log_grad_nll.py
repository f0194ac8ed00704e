"""`nll-log-grad` (losses.ExcessLogGradNLL, issue 18): T37's loss through the excess-variance head, with G's
gradient taken with respect to H = log(σ_φ²/c_var²) = log(1 − k + k·e^G), T6's G at the same σ_φ.

Oracle: a Gaussian prior N(0, σ_d²) under EDM's preconditioning at σ_data = σ_d, where E[x0 | x̃] = c_skip·x̃
(F* has posterior mean 0) and Var[x0 | x̃] = c_out² (G* = 0, THEORY T37), so a backbone that outputs the
constants (F, G) = (a, g) is at T8's optimum at a = g = 0; T7 (nll_direct) for the value and T9
(nll_stable, T6's head) for the gradient G receives.

Breakages tried (the test that catches each): the straight-through left out (G's gradient is then T37's:
the T9 gradient test and the does-not-vanish test fail); the value's log_den detached entirely (G gets no
gradient: T9 gradient test); the detach moved onto F's path (the F gradient test); the natural gradient,
∂L/∂H times e^H/(k·e^G) (T9 gradient test); log(1 − k + k·e^G) computed directly instead of by logaddexp
(the extreme-G test at g = 200); the loss accepting T6's head (the refusal test).
"""
import math

import pytest
import torch
# the Gaussian-prior oracle's backbone and batches, shared with nll-posterior's tests (same oracle)
from test_posterior_nll import F64, SD, batch, den, grads

from gendiff.heads import nll_direct, nll_stable
from gendiff.losses import ExcessLogGradNLL, NoisyBatch, make_loss
from gendiff.precond import EDMPrecond


@pytest.mark.parametrize("sigma", [1e-4, 0.05, 1.0, 1e4])
def test_value_is_T7_at_T37s_sigma_phi(sigma):
    """The value is T37's, i.e. T7 at σ_φ² = σ² + c_out²·e^g (nll_direct, the oracle): only a gradient
    changes."""
    b, d = batch(sigma, n=64), den(0.3, -0.7)
    sc = EDMPrecond(SD)(b.sigma)
    mu = sc.c_skip * b.x_noisy + sc.c_out * 0.3
    want = nll_direct(mu, torch.sqrt(sigma ** 2 + sc.c_out ** 2 * math.exp(-0.7)), b.x0, b.sigma)
    torch.testing.assert_close(ExcessLogGradNLL()(d, b), want.sum(1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ExcessLogGradNLL()(d, b), make_loss("nll")(d, b), rtol=1e-12, atol=1e-12)
    assert make_loss("nll-log-grad").__class__ is ExcessLogGradNLL


@pytest.mark.parametrize("sigma", [0.05, 1.0, 20.0])
@pytest.mark.parametrize("a,g", [(0.2, -1.0), (-0.4, -6.0), (0.1, 1.5)])
def test_F_gets_T37s_gradient_and_G_gets_T9s_at_the_same_sigma_phi(sigma, a, g):
    """∂/∂F is T37's (the mean's weighting, T8, unchanged); ∂/∂G equals T9's gradient with respect to T6's G
    at the same σ_φ, G_T6 = log(1 − k + k·e^g)."""
    b = batch(sigma, n=4096)
    da, dg = grads(ExcessLogGradNLL(), den(a, g), b)
    da_t37 = grads(make_loss("nll"), den(a, g), b)[0]
    torch.testing.assert_close(da, da_t37, rtol=1e-12, atol=1e-14)
    sc = EDMPrecond(SD)(b.sigma)
    g6 = torch.log(1 - sc.k + sc.k * math.exp(g)).detach().requires_grad_(True)
    f_star = (b.x0 - sc.c_skip * b.x_noisy) / sc.c_out
    t9 = nll_stable(torch.full_like(b.x0, a), g6.expand_as(b.x0), f_star, sc).sum(1).mean()
    (dg6,) = torch.autograd.grad(t9, [g6])
    torch.testing.assert_close(dg, dg6, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.5, 5.0])
def test_optimum_is_T8s_on_a_gaussian_prior(sigma):
    """At (a, g) = (0, 0), the exact posterior mean and Var[x0 | x̃] = c_out², the sample-mean gradients vanish
    within their Monte-Carlo error; at g = ±0.5 the G gradient points back to 0
    (its size ∝ k, not to e^g·k²)."""
    b = batch(sigma)
    da, dg = grads(ExcessLogGradNLL(), den(), b)
    assert abs(dg.item()) < 0.01 and abs(da.item()) < 0.01, (da, dg)
    k = EDMPrecond(SD)(b.sigma).k.item()                  # ∂/∂G ≈ ½·k·(e^g − 1) near the optimum
    assert grads(ExcessLogGradNLL(), den(g=0.5), b)[1] > 0.2 * k
    assert grads(ExcessLogGradNLL(), den(g=-0.5), b)[1] < -0.1 * k


def test_G_gradient_does_not_vanish_where_the_excess_is_small():
    """The reason for it: at σ = 1 a head that says Var = c_out²·e^(−6) (400× too confident, the exact mean)
    gets a G gradient ~e^(−6)·k² from T37 and O(k) from this loss; both pull G up."""
    b = batch(1.0)
    t37 = grads(make_loss("nll"), den(g=-6.0), b)[1].item()
    log_grad = grads(ExcessLogGradNLL(), den(g=-6.0), b)[1].item()
    k = EDMPrecond(SD)(torch.tensor(1.0, dtype=F64)).k.item()
    assert t37 < 0 and abs(t37) < 1e-3, t37
    assert log_grad < -0.3 * k, (log_grad, k)             # ½(1 − 1/(1 − k + k·e^(−6))) ≈ −½·k/(1 − k)


@pytest.mark.parametrize("g", [-89.0, -1000.0, 200.0])
def test_finite_in_float32_at_extreme_G(g):
    b = batch(0.05, n=256)
    b = NoisyBatch(x0=b.x0.float(), x_noisy=b.x_noisy.float(), sigma=b.sigma.float())
    d = den(0.5, g).float()
    loss = ExcessLogGradNLL()(d, b).mean()
    (dg,) = torch.autograd.grad(loss, [d.net.g])
    assert torch.isfinite(loss) and torch.isfinite(dg), (loss, dg)


def test_refuses_another_head():
    with pytest.raises(ValueError, match="excess-variance head"):
        ExcessLogGradNLL()(den(head="diag"), batch(0.1, n=8))
