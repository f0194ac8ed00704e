"""The excess-variance head (THEORY T37) and EDM2's learned u(σ) as a head (issue 18, items 2 and 3), against
analytic oracles: T7, the exact tree's posterior (T8), a Gaussian prior's posterior; and both from the CLI.

Breakages tried (each seen to fail the tests named, then restored):
- nll_excess without log k in the denominator, logaddexp(log(1 − k), G): T37_equals_T7 (every precond),
  T37_is_T9_at_equal_sigma_phi, T37_optimum_on_the_exact_tree, mean_gradient_is_T8_under_both_heads.
- nll_excess dividing the bracket by e^G instead of 1 − k + k·e^G: the same four.
- nll_excess without the (1 − k) term in the bracket: T37_equals_T7, T37_is_T9, T37_optimum.
- nll_excess dropping the source term σ_src²/c_var²: T37_equals_T7 (every precond), T37_is_T9.
- Scalings.one_minus_k always 1 − k (cancellation where k → 1): T37_equals_T7[x0] (x0-prediction, σ = 1e-4).
- ExcessHead.variance = c_var²·e^G (T6's): excess_head_never_below_sigma (every precond, both dtypes),
  T37_optimum, mean_gradient (G_zero_is_c_var passes: T6 at G = 0 is c_var² too).
- ExcessHead.variance = c_var² + c_out²·e^G: G_zero_is_c_var, T37_optimum, mean_gradient.
- Denoiser.predict not asking head_net for G: sigma_only_G_is_one_value_per_example, sigma_only_optimum,
  sigma_only_u_survives_a_checkpoint_round_trip.
- LogVarianceOfSigma giving one u for the whole batch (u.mean()): G_is_one_value_per_example, optimum.
- SigmaOnlyHead.variance = c_var²·e^(G/2): G_is_one_value_per_example, sigma_only_optimum (|u*| ≥ 0.12 there,
  so e^(u/2) is ≥ 6% off against a 3% tolerance).
- train._compiled without head_net (a fresh u(σ) that never trains): compiled_denoiser_shares_u.
- head_net kept out of the Denoiser's modules (object.__setattr__): sigma_only_optimum (not among the
  parameters), checkpoint_round_trip.
(The registry harness in test_contracts.py checks both heads' Σ_φ, score and NLL against the oracles too.)
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from gendiff import checkpoint as ckpt
from gendiff.cli import main
from gendiff.experiments.kinds import load_run
from gendiff.heads import (DiagonalHead, ExcessHead, NetPrediction, NoHead, Prediction, SigmaOnlyHead,
                           f_target, nll_direct, nll_excess, nll_stable)
from gendiff.losses import ConfidenceNLL, NoisyBatch
from gendiff.precond import PRECONDS, Denoiser, EDMPrecond
from gendiff.train import _compiled

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
SD = 0.5
SIGMAS = torch.logspace(-4, 4, 33, dtype=F64)          # 1e-4 … 1e4, a quarter decade apart
GS = torch.linspace(-20, 20, 41, dtype=F64)            # raw head outputs


def gen(seed):
    return torch.Generator().manual_seed(seed)


def grid(dtype=F64):
    """σ and G on a [33, 41] grid (every σ with every G), with x0, x̃ and F drawn per cell."""
    g = gen(0)
    s = SIGMAS.to(dtype)[:, None].expand(-1, len(GS))
    G = GS.to(dtype)[None, :].expand(len(SIGMAS), -1)
    x0 = SD * torch.randn(s.shape, generator=g, dtype=F64).to(dtype)
    x_noisy = x0 + s * torch.randn(s.shape, generator=g, dtype=F64).to(dtype)
    F = torch.randn(s.shape, generator=g, dtype=F64).to(dtype)
    return s, G, x0, x_noisy, F


def prediction(head, x_noisy, sigma, F, G, precond=None):
    """A NetPrediction of `head` from raw outputs F, G at σ (the Denoiser's arithmetic, T6)."""
    sc = (precond or EDMPrecond(SD))(sigma)
    return NetPrediction(x=x_noisy, mu=sc.c_skip * x_noisy + sc.c_out * F, F=F, G=G, scalings=sc, head=head)


# ---- T37: the loss ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRECONDS))
def test_T37_equals_T7_over_sigma_and_G(name):
    """nll_excess (T37's stable form) == nll_direct (T7) at σ_φ² = σ² + c_out²·e^G, σ ∈ [1e-4, 1e4], G ∈ [−20,
    20], float64, to 3e-12 relative (the oracle's rounding); with a known source variance, T7 plus
    ½σ_src²/σ_φ² (the diagonal T12 term). In float32 it is finite there (and its gradients too) and within
    1e-5 of float64 on the same inputs."""
    pre = PRECONDS[name](SD)
    s, G, x0, x_noisy, F = grid()
    sc = pre(s)
    mu = sc.c_skip * x_noisy + sc.c_out * F
    phi = torch.sqrt(s ** 2 + sc.c_out ** 2 * torch.exp(G))
    stable = nll_excess(F, G, f_target(x0, x_noisy, sc), sc)
    direct = nll_direct(mu, phi, x0, s)
    # 3e-12: the oracle's own rounding (μ − x0 from μ = c_skip·x̃ + c_out·F where |μ − x0| ~ c_out ≪ |x0|)
    torch.testing.assert_close(stable, direct, rtol=3e-12, atol=1e-12)
    src = 0.1 * torch.rand(s.shape, generator=gen(3), dtype=F64)
    torch.testing.assert_close(nll_excess(F, G, f_target(x0, x_noisy, sc), sc, src),
                               direct + 0.5 * src / phi ** 2, rtol=3e-12, atol=1e-12)
    # float32 against float64 on the same float32-rounded inputs (rounding F and F* alone moves a small
    # F − F* by ~1e-4 relative: the inputs' conditioning, not T37's)
    s32, G32, F32, Fs32 = (t.float() for t in (s, G, F, f_target(x0, x_noisy, sc)))
    G32.requires_grad_(True)
    F32.requires_grad_(True)
    l32 = nll_excess(F32, G32, Fs32, pre(s32))
    assert torch.isfinite(l32).all()
    dF, dG = torch.autograd.grad(l32.sum(), (F32, G32))
    assert torch.isfinite(dF).all() and torch.isfinite(dG).all()
    ref = nll_excess(F32.detach().double(), G32.detach().double(), Fs32.double(), pre(s32.double()))
    torch.testing.assert_close(l32.double(), ref, rtol=1e-5, atol=1e-5)


def test_T37_is_T9_at_equal_sigma_phi():
    """The same σ_φ gives the same loss: nll_excess at G equals T6's nll_stable at e^(G_T6) = 1 − k + k·e^G
    (σ_φ² = c_var²·e^(G_T6) = σ² + c_out²·e^G), with and without a known source variance."""
    s, G, x0, x_noisy, F = grid()
    sc = EDMPrecond(SD)(s)
    G6 = torch.log(1 - sc.k + sc.k * torch.exp(G))
    Fs = f_target(x0, x_noisy, sc)
    src = 0.1 * torch.rand(s.shape, generator=gen(4), dtype=F64)
    for v in (None, src):
        torch.testing.assert_close(nll_excess(F, G, Fs, sc, v), nll_stable(F, G6, Fs, sc, v), rtol=1e-12,
                                   atol=1e-12)


# ---- T37: σ_φ ----------------------------------------------------------------------------------------------

def test_excess_head_G_zero_is_c_var():
    """G ≡ 0: σ_φ = c_var (EDM's limit), the variance of NoHead at every σ (T37, T11)."""
    s = SIGMAS[:, None].expand(-1, 3)
    x = torch.randn(s.shape, generator=gen(1), dtype=F64)
    F, G = torch.zeros_like(x), torch.zeros_like(x)
    excess = prediction(ExcessHead(), x, s, F, G)
    none = prediction(NoHead(), x, s, F, None)
    torch.testing.assert_close(excess.variance(), none.variance(), rtol=1e-13, atol=0)
    torch.testing.assert_close(excess.sigma_phi, EDMPrecond(SD)(s).c_var, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", sorted(PRECONDS))
def test_excess_head_never_below_sigma(name, dtype):
    """σ_φ² ≥ σ² for every G, exactly (no rounding below), G ∈ [−200, 60], σ ∈ [1e-4, 1e4]; T6's head with the
    same G falls below σ² (the reachable set T37 removes)."""
    s = SIGMAS.to(dtype)[:, None].expand(-1, 57)
    G = torch.linspace(-200, 60, 57, dtype=dtype)[None].expand(len(SIGMAS), -1)
    x = torch.zeros_like(s)
    pre = PRECONDS[name](SD)
    var = prediction(ExcessHead(), x, s, x, G, pre).variance()
    assert torch.isfinite(var).all()
    assert bool((var >= s.square()).all())
    assert bool((prediction(DiagonalHead(), x, s, x, G, pre).variance() < s.square()).any())


@pytest.mark.parametrize("name", sorted(PRECONDS))
def test_excess_variance_is_sigma_phi2_minus_sigma2_without_the_subtraction(name):
    """Head.excess_variance = σ_φ² − σ² (T8's Var[x0 | x̃] as the head states it) for every head, in float64 to
    1e-14·(σ_φ² + σ² + c_var²) (the forms' rounding) over σ ∈ [1e-4, 1e4], G ∈ [−20, 20]: T37 c_out²·e^G,
    T6 and u(σ) c_var²·expm1(G) + c_out², no head
    c_out²; an analytic Prediction subtracts σ² given per example. In float32 T37's head keeps the excess's
    relative precision where it is tiny against σ² (T37's point): within 1e-5 relative of float64, where
    σ_φ² − σ² in float32 is off by more than 10% somewhere on the grid. (T6's excess with G < 0 is itself a
    difference, c_var²·expm1(G) + c_out², which may be negative: no relative precision to keep.)
    Breakages tried: T6's form c_var²·e^G − c_out² (fails the float64 check); ExcessHead.excess_variance =
    variance − σ² (fails the float32 precision check); Prediction.excess_variance without the per-example
    reshape of σ (fails the shape check)."""
    pre = PRECONDS[name](SD)
    s, G, _, x_noisy, F = grid()
    for head in (ExcessHead(), DiagonalHead(), SigmaOnlyHead(), NoHead()):
        p = prediction(head, x_noisy, s, F, None if isinstance(head, NoHead) else G, pre)
        # both forms round at ~eps·(σ_φ² + σ² + c_var²) (T6 with G < 0 cancels in either): the tolerance
        scale = p.variance() + s.square() + p.scalings.c_var.square()
        assert bool(((p.excess_variance() - (p.variance() - s.square())).abs() <= 1e-14 * scale).all())
        if isinstance(head, ExcessHead):
            exact = p.excess_variance()
            p32 = prediction(head, x_noisy.float(), s.float(), F.float(), G.float(), pre)
            torch.testing.assert_close(p32.excess_variance().double(), exact, rtol=1e-5, atol=0)
            naive = (p32.variance() - s.float().square()).double()
            assert float(((naive - exact).abs() / exact).max()) > 0.1
    # scalings made for a total τ = √(σ² + s̄²) (a known source std, T3): asked for σ, σ_φ² − σ², the same as
    # the plain Prediction that with_mean returns (breakage tried: ignoring sigma gives σ_φ² − τ², s̄² off)
    sig_small = torch.full((7, 3), 0.1, dtype=F64)
    tau = (sig_small ** 2 + 0.3 ** 2).sqrt()
    Gs = torch.linspace(-2, 2, 21, dtype=F64).view(7, 3)
    for head in (ExcessHead(), DiagonalHead()):
        p = prediction(head, torch.zeros_like(tau), tau, torch.zeros_like(tau), Gs)
        want = p.variance() - sig_small ** 2
        torch.testing.assert_close(p.excess_variance(sig_small), want, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(p.with_mean(p.mu).excess_variance(sig_small), want, rtol=1e-12, atol=1e-15)
    # an analytic prediction (no head): σ per example, [N] or [N, 1], against a per-element variance
    var = torch.rand(5, 3, generator=gen(5), dtype=F64) + 1.0
    sig = torch.linspace(0.1, 0.9, 5, dtype=F64)
    ana = Prediction(x=torch.zeros(5, 3, dtype=F64), mu=torch.zeros(5, 3, dtype=F64), var=var)
    for sg in (sig, sig[:, None]):
        torch.testing.assert_close(ana.excess_variance(sg), var - sig[:, None] ** 2, rtol=0, atol=0)


# ---- T37: the optimum on the exact tree --------------------------------------------------------------------

def _expected(nll, F, G, sc, var):
    """E over x0 ~ p(x0 | x̃) of a per-element loss quadratic in F − F*, at μ = E[x0 | x̃]:
    E[(μ − x0)²] = Var, so E‖F − F*‖² = Var/c_out², and the loss is affine in ‖F − F*‖²: evaluate it at
    F* = F − √Var/c_out."""
    return nll(F, G, F - var.sqrt() / sc.c_out.abs(), sc)


def test_T37_optimum_on_the_exact_tree(tree_a):
    """Held-out-style points of the tree mixture at σ ∈ [0.005, 20]; μ = the exact posterior mean, e^(G*) =
    Var[x0 | x̃]/c_out² per element. The expected loss (closed form over the exact posterior) has zero
    derivative in G at G*, is higher at G* ± δ, and σ_φ² at G* is σ² + Var[x0 | x̃] = the exact optimum of T8
    (the diagonal of the ExactDenoiser's Σ_φ*)."""
    n = 512
    g = gen(5)
    x0, _ = tree_a.sample(n, generator=g, dtype=F64)
    sigma = torch.logspace(math.log10(0.005), math.log10(20), n, dtype=F64)
    x_noisy = x0 + sigma[:, None] * torch.randn(x0.shape, generator=g, dtype=F64)
    post = tree_a.posterior(x_noisy, sigma)
    var = post.cov.diagonal(dim1=-2, dim2=-1)                                 # Var[x0 | x̃], [n, 2]
    s = sigma[:, None]
    sc = EDMPrecond(SD)(s)
    F = (post.mean - sc.c_skip * x_noisy) / sc.c_out                          # μ = E[x0 | x̃]
    G_star = torch.log(var / sc.c_out ** 2).requires_grad_(True)
    loss = _expected(nll_excess, F, G_star, sc, var)
    (dG,) = torch.autograd.grad(loss.sum(), G_star)
    assert dG.abs().max() < 1e-12
    for delta in (-0.05, 0.05):
        assert bool((_expected(nll_excess, F, G_star.detach() + delta, sc, var) > loss.detach()).all())
    pred = prediction(ExcessHead(), x_noisy, s, F, G_star.detach())
    torch.testing.assert_close(pred.variance(), s ** 2 + var, rtol=1e-13, atol=0)
    exact = tree_a.denoiser("point").predict(x_noisy, sigma)
    torch.testing.assert_close(pred.variance(), exact.variance(), rtol=1e-12, atol=0)
    torch.testing.assert_close(pred.mu, exact.mu, rtol=1e-12, atol=1e-12)


def test_mean_gradient_is_T8_under_both_heads():
    """∂L/∂μ = (μ − x0)/σ_φ² under ExcessHead (T37), and equal to DiagonalHead's at the same σ_φ: the loss'
    automatic weighting does not depend on the parameterisation. μ = c_skip·x̃ + c_out·F, so
    ∂L/∂μ = (∂L/∂F)/c_out."""
    s, G, x0, x_noisy, F = grid()
    sc = EDMPrecond(SD)(s)
    Fs = f_target(x0, x_noisy, sc)
    G6 = torch.log(1 - sc.k + sc.k * torch.exp(G))                 # T6's G at the same σ_φ
    Fe, Fd = F.clone().requires_grad_(True), F.clone().requires_grad_(True)
    (ge,) = torch.autograd.grad(nll_excess(Fe, G, Fs, sc).sum(), Fe)
    (gd,) = torch.autograd.grad(nll_stable(Fd, G6, Fs, sc).sum(), Fd)
    pred = prediction(ExcessHead(), x_noisy, s, F, G)
    want = (pred.mu - x0) / pred.variance()
    torch.testing.assert_close(ge / sc.c_out, want, rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(gd / sc.c_out, ge / sc.c_out, rtol=1e-10, atol=1e-300)


# ---- EDM2's u(σ) as a head ---------------------------------------------------------------------------------

class FOnly(nn.Module):
    """A parameter-free backbone returning F only (any shape)."""

    def forward(self, x_in, c_noise):
        return torch.sin(2 * x_in + c_noise.reshape(-1, *([1] * (x_in.ndim - 1))))


class WithG(FOnly):
    def forward(self, x_in, c_noise):
        F = super().forward(x_in, c_noise)
        return F, torch.zeros_like(F)


def randomised(den, seed=7):
    for p in den.head_net.parameters():
        p.data = 0.3 * torch.randn(p.shape, generator=gen(seed), dtype=p.dtype)
    return den


@pytest.mark.parametrize("shape", [(5, 3), (5, 2, 4, 4)])
def test_sigma_only_G_is_one_value_per_example(shape):
    """G = u(c_noise) broadcast to x: one value per example (identical across its elements), different across
    examples at different σ; σ_φ² = c_var²·e^u; the backbone gets no G outputs (outputs(d) = 0)."""
    head = SigmaOnlyHead()
    assert head.outputs(shape[1]) == 0
    den = randomised(Denoiser(FOnly(), EDMPrecond(SD), head).double())
    x = torch.randn(shape, generator=gen(2), dtype=F64)
    sigma = torch.logspace(-2, 1, shape[0], dtype=F64)
    p = den.predict(x, sigma)
    assert p.G.shape == x.shape
    flat = p.G.flatten(1)
    assert torch.equal(flat, flat[:, :1].expand_as(flat))
    assert len(set(flat[:, 0].tolist())) == shape[0]
    u = den.head_net(sigma.log() / 4, sigma)                      # [N] -> [N]
    torch.testing.assert_close(flat[:, 0], u, rtol=0, atol=0)
    cv2 = EDMPrecond(SD)(sigma).c_var ** 2
    torch.testing.assert_close(p.variance().flatten(1), (cv2 * torch.exp(u))[:, None].expand_as(flat),
                               rtol=1e-13, atol=0)


def test_sigma_only_refuses_a_backbone_G_and_a_wrong_module():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="takes G from its own module of c_noise"):
        Denoiser(WithG(), head="sigma-only").predict(x, 0.3)
    with pytest.raises(ValueError, match="head_net=Linear does not fit head='diag'"):
        Denoiser(FOnly(), head="diag", head_net=nn.Linear(2, 1))
    with pytest.raises(ValueError, match="does not fit head='sigma-only'"):
        Denoiser(FOnly(), head="sigma-only", head_net=nn.Linear(2, 1))


class GaussianPosteriorMean(nn.Module):
    """The exact F of x0 ~ N(0, diag(v)): μ = v/(σ² + v)·x̃, F = (μ − c_skip·x̃)/c_out (σ from c_noise)."""

    def __init__(self, v, precond):
        super().__init__()
        self.v, self.precond = v, precond

    def forward(self, x_in, c_noise):
        sigma = torch.exp(4 * c_noise)[:, None]
        sc = self.precond(sigma)
        x = x_in / sc.c_in
        return (self.v / (sigma ** 2 + self.v) * x - sc.c_skip * x) / sc.c_out


def test_sigma_only_optimum_on_a_gaussian_prior():
    """x0 ~ N(0, diag(v)) in d = 4 dims, μ the exact posterior mean. The best scalar per σ is
    c_var²·e^u = σ² + mean_j Var[x0_j | x̃] = σ² + mean_j σ²v_j/(σ² + v_j).
    (1) u at that value (bias = u*, weights 0): the closed-form expected loss (E[(μ − x0)²] = Var) has zero
    gradient in the module's parameters and is higher at u* ± δ.
    (2) training u(σ) alone (the Denoiser's parameters, the backbone has none) with ConfidenceNLL on sampled
    batches at four fixed σ reaches it within 3% at each."""
    v = torch.tensor([1e-4, 0.01, 1.0, 10.0], dtype=F64)   # |u*| ≥ 0.12 at every σ: away from EDM c_var
    pre = EDMPrecond(SD)
    sigmas = torch.tensor([0.05, 0.3, 1.0, 3.0], dtype=F64)
    best = sigmas ** 2 + (sigmas[:, None] ** 2 * v / (sigmas[:, None] ** 2 + v)).mean(1)      # [4]
    u_star = torch.log(best / pre(sigmas).c_var ** 2)
    for i, s in enumerate(sigmas):
        den = Denoiser(GaussianPosteriorMean(v, pre), pre, "sigma-only").double()
        x = torch.randn(8, 4, generator=gen(i), dtype=F64) * (v + s ** 2).sqrt()
        post_var = (s ** 2 * v / (s ** 2 + v)).expand(8, 4)

        def expected(bias):
            den.head_net.bias.data = torch.as_tensor(bias, dtype=F64)
            p = den.predict(x, s)
            return _expected(nll_stable, p.F, p.G, p.scalings, post_var).sum()
        loss = expected(u_star[i])
        grads = torch.autograd.grad(loss, list(den.head_net.parameters()))
        assert max(float(gr.abs().max()) for gr in grads) < 1e-10 * float(loss.detach().abs())
        with torch.no_grad():
            assert expected(u_star[i] + 0.05) > loss and expected(u_star[i] - 0.05) > loss
    torch.manual_seed(0)
    den = Denoiser(GaussianPosteriorMean(v, pre), pre, "sigma-only").double()
    assert [n for n, _ in den.named_parameters()] == ["head_net.weight", "head_net.bias"]
    opt = torch.optim.Adam(den.parameters(), lr=0.01)
    g, n = gen(11), 2048
    sig = sigmas.repeat_interleave(n)
    for step in range(400):
        if step == 300:                        # a lower rate at the end: the iterate settles at the optimum
            opt.param_groups[0]["lr"] = 0.001
        x0 = torch.randn(len(sig), 4, generator=g, dtype=F64) * v.sqrt()
        batch = NoisyBatch(x0, x0 + sig[:, None] * torch.randn(x0.shape, generator=g, dtype=F64), sig)
        opt.zero_grad()
        ConfidenceNLL()(den, batch).mean().backward()
        opt.step()
    with torch.no_grad():
        learned = den.predict(torch.zeros(4, 4, dtype=F64), sigmas).variance()[:, 0]
    torch.testing.assert_close(learned, best, rtol=0.03, atol=0)


def test_sigma_only_u_survives_a_checkpoint_round_trip(tmp_path):
    """gendiff.checkpoint saves the Denoiser's head module (weights and Fourier features) and restores u(σ)
    into a fresh Denoiser."""
    den = randomised(Denoiser(FOnly(), EDMPrecond(SD), "sigma-only"))
    ckpt.save_objects(str(tmp_path), 3, {"model": den})
    fresh = Denoiser(FOnly(), EDMPrecond(SD), "sigma-only")
    x, sigma = torch.randn(6, 3, generator=gen(1)), torch.logspace(-2, 1, 6)
    assert not torch.equal(fresh.predict(x, sigma).G, den.predict(x, sigma).G)
    assert ckpt.load_objects(str(tmp_path), {"model": fresh}) == 3
    assert torch.equal(fresh.predict(x, sigma).G, den.predict(x, sigma).G)
    keys = {"head_net.weight", "head_net.bias", "head_net.freqs", "head_net.phases"}
    assert keys <= set(fresh.state_dict())


def test_compiled_denoiser_shares_u():
    """train.py's compiled view (compile=true) shares u(σ)'s parameters with the plain module it trains."""
    den = Denoiser(FOnly(), EDMPrecond(SD), "sigma-only")
    view = _compiled(den)
    assert view.head_net is den.head_net
    assert Denoiser(FOnly(), EDMPrecond(SD), "diag").head_net is None


# ---- from recipes and the CLI ------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["confidence-excess", "confidence-sigma-only"])
def test_toy_recipe_from_the_cli(recipe, tmp_path):
    """`gendiff train --preset toy-quick --set recipe=…` trains and writes its run, whose model (read back by
    load_run) has the recipe's head; u(σ) is in the weights and has moved from its zero initialisation (the
    optimiser saw it); the excess head's σ_φ is ≥ σ on held-out-style points."""
    from safetensors.torch import load_file
    out = str(tmp_path / "run")
    assert main(["train", "--preset", "toy-quick", "--set", f"recipe={recipe}", "--set",
                 "train.iterations=32", "--set", "train.batch=128", "--set", "eval.samples=256", "--set",
                 "eval.eval_points=256", "--threads", "1", "--no-progress", "--out", out]) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert np.isfinite(m["median_nll"]) and np.isfinite(m["score_error"])
    w = load_file(os.path.join(out, "model.safetensors"))
    _, model = load_run(out)
    want = {"confidence-sigma-only": SigmaOnlyHead, "confidence-excess": ExcessHead}[recipe]
    assert type(model.head) is want
    if recipe == "confidence-sigma-only":
        assert w["head_net.weight"].abs().max() > 0
    else:
        assert not any(k.startswith("head_net") for k in w)
        x, sigma = torch.randn(64, 2, generator=gen(0)), torch.logspace(-3, 1, 64)
        assert bool((model.predict(x, sigma).variance() >= sigma[:, None] ** 2).all())


@pytest.fixture(scope="module")
def blobs(blobs_npz):
    """240 labelled 28×28 8-bit images: a bright square in one of four quadrants (the label); conftest's."""
    return blobs_npz


@pytest.mark.parametrize("recipe", ["confidence-excess", "confidence-sigma-only"])
def test_image_recipe_from_the_cli(recipe, blobs, tmp_path):
    """An image smoke run of each new head (mnist-tiny on tiny data): it trains, and the calibration of its
    σ_φ is measured like the diagonal head's (the per-σ table in metrics.json)."""
    out = str(tmp_path / "run")
    assert main(["train", "--preset", "mnist-tiny", "--set", f"data.path={blobs}", "--set", "data.name=npz",
                 "--set", f"recipe={recipe}", "--set", "model.attn_resolutions=[]", "--set",
                 "train.iterations=8", "--set", "eval.samples=16", "--set", "eval.calibration_images=4",
                 "--set", "eval.likelihood_images=2", "--threads", "1", "--no-progress", "--out", out]) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    bins = m["calibration"]["bins"]
    assert set(bins) == {f"sigma={s:g}" for s in (0.05, 0.1, 0.2, 0.5, 1, 2)}
    assert all(b["head"]["floored_share"] == 0.0 for b in bins.values())   # σ_φ > σ for both heads here


def test_paired_calibration_from_the_cli(blobs, tmp_path, capsys):
    """`gendiff eval RUN --calibration-against OTHER`: two heads (T37 and T6) compared on the same noisy test
    images; against an identical copy of itself a run gains exactly 0 with sd 0 in every σ bin (the same
    noise, the same pixels: a paired difference). Refused: a run without a confidence head, two runs of one
    name. With --recalibrate nll / coverage each model's variance gets its own scale per σ, recorded; the copy
    gets the reference's and still gains 0. --recalibrate alone is refused. Breakages tried: noise drawn per
    model (the copy's gain is then not 0); --recalibrate not passed on to calibrate_paired (no
    "recalibration" key)."""
    import shutil
    runs = {}
    for recipe in ("confidence-excess", "confidence", "edm"):
        out = str(tmp_path / recipe)
        assert main(["train", "--preset", "mnist-tiny", "--set", f"data.path={blobs}", "--set",
                     "data.name=npz", "--set", f"recipe={recipe}", "--set", "model.attn_resolutions=[]",
                     "--set", "train.iterations=4", "--set", "eval.samples=8", "--set",
                     "eval.calibration_images=6", "--set", "eval.likelihood_images=2", "--threads", "1",
                     "--no-progress", "--out", out]) == 0
        runs[recipe] = out
    copy = str(tmp_path / "copy")
    shutil.copytree(runs["confidence-excess"], copy)
    capsys.readouterr()
    assert main(["eval", runs["confidence-excess"], "--calibration-against", f"{copy},{runs['confidence']}",
                 "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "gain" in text and "sigma=0.5" in text
    res = json.load(open(os.path.join(runs["confidence-excess"], "calibration-paired.json")))
    assert set(res["against"]) == {"copy", "confidence"}
    for row in res["bins"].values():
        assert row["gain"]["copy"]["nll"] == 0.0 and row["gain"]["copy"]["nll_sd"] == 0.0
        assert row["gain"]["copy"]["verdict"] == "not resolved"
        assert math.isfinite(row["gain"]["confidence"]["nll"])
        assert row["rest"] <= row["elements"]
    for how in ("nll", "coverage"):        # --recalibrate: one scale per σ and model, fitted on the fit half
        assert main(["eval", runs["confidence-excess"], "--calibration-against",
                     f"{copy},{runs['confidence']}", "--recalibrate", how, "--threads", "1"]) == 0
        rec = json.load(open(os.path.join(runs["confidence-excess"], f"calibration-paired-recal-{how}.json")))
        maps = rec["recalibration"]["maps"]
        assert rec["recalibration"]["how"] == how and rec["recalibration"]["groups"] == 1
        assert set(maps) == {"confidence-excess", "copy", "confidence"}
        assert maps["copy"] == maps["confidence-excess"] and all(
            c > 0 and math.isfinite(c) for v in maps.values() for m in v for c in m["scales"])
        for label, row in rec["bins"].items():
            assert row["gain"]["copy"]["nll"] == 0.0
            assert row["head"]["nll"] != res["bins"][label]["head"]["nll"]     # rescaled: another NLL
    assert main(["eval", runs["confidence-excess"], "--calibration-against", copy, "--recalibrate", "nll",
                 "--recalibrate-groups", "2", "--threads", "1"]) == 0
    rec = json.load(open(os.path.join(runs["confidence-excess"],
                                      "calibration-paired-recal-nll-2groups.json")))
    assert rec["recalibration"]["groups"] == 2
    assert all(len(m["scales"]) == 2 and len(m["edges"]) == 1 for m in rec["recalibration"]["maps"]["copy"])
    import importlib.util                  # benchmarks/recalibration_check.py on the same runs: both splits
    spec = importlib.util.spec_from_file_location(
        "recalibration_check",
        os.path.join(os.path.dirname(__file__), "..", "benchmarks", "recalibration_check.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    chk = bench.check(runs["confidence-excess"], [copy], "model.safetensors", groups=2, images=6)
    assert list(chk["splits"]) == ["fit even, measure odd", "fit odd, measure even"]
    for res in chk["splits"].values():
        for row in res["bins"].values():
            assert row["examples"] == 3                   # the other half of the 6 images, at each σ
            assert row["background"]["n"] + row["ink"]["n"] == row["elements"]
            assert sum(g["n"] for g in row["by_group"]) == row["elements"]
            assert 0 <= row["head"]["coverage_1s"] <= row["head"]["coverage_2s"] <= 1
    assert "fit odd" in bench.markdown(chk)
    capsys.readouterr()
    for against, why in ((runs["edm"], "has no confidence head"), (f"{copy},{copy}", "two runs are named")):
        args = ["eval", runs["confidence-excess"], "--calibration-against", against, "--threads", "1"]
        assert main(args) != 0
        assert why in capsys.readouterr().err
    assert main(["eval", runs["confidence-excess"], "--recalibrate", "nll", "--threads", "1"]) != 0
    assert "--recalibrate nll goes with --calibration-against" in capsys.readouterr().err
    assert main(["eval", runs["confidence-excess"], "--recalibrate-groups", "2", "--threads", "1"]) != 0
    assert "--recalibrate-groups 2 goes with --recalibrate" in capsys.readouterr().err


def test_head_recalibration_refits_only_G_and_is_read_by_eval(blobs, tmp_path, capsys):
    """benchmarks/head_recalibration.py: the EMA model's conv_out G rows refitted on its own error; every
    other weight, F's rows included, is unchanged bit for bit (so μ and the samples are the EMA's), G's rows
    move, the loss it reports falls on a run whose head starts at σ_φ = c_var (4 training steps), and the
    weights file is read by `gendiff eval --weights … --calibration-against`. A run with T6's head is refused.
    Breakage tried: the F rows' gradient mask left out (the script's own μ check raises, and the F rows
    differ)."""
    import importlib.util
    import shutil
    from safetensors.torch import load_file
    spec = importlib.util.spec_from_file_location(
        "head_recalibration", os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                           "head_recalibration.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = {}
    for recipe in ("confidence-excess-loggrad", "confidence"):
        out = str(tmp_path / recipe)
        assert main(["train", "--preset", "mnist-tiny", "--set", f"data.path={blobs}", "--set",
                     "data.name=npz", "--set", f"recipe={recipe}", "--set", "model.attn_resolutions=[]",
                     "--set", "train.iterations=4", "--set", "eval.samples=8", "--set",
                     "eval.calibration_images=6", "--set", "eval.likelihood_images=0", "--threads", "1",
                     "--no-progress", "--out", out]) == 0
        runs[recipe] = out
    run = runs["confidence-excess-loggrad"]
    name, stats = bench.recalibrate(run, steps=30, batch=16, lr=3e-2, seed=0)
    assert stats["loss_last"] < stats["loss_first"], stats
    before, after = load_file(os.path.join(run, "model.safetensors")), load_file(os.path.join(run, name))
    assert before.keys() == after.keys()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert sorted(moved) == ["net.conv_out.bias", "net.conv_out.weight"], moved
    assert torch.equal(before["net.conv_out.weight"][:1], after["net.conv_out.weight"][:1])     # F's row
    assert not torch.equal(before["net.conv_out.weight"][1:], after["net.conv_out.weight"][1:])  # G's row
    copy = str(tmp_path / "ema")
    shutil.copytree(run, copy)
    capsys.readouterr()
    assert main(["eval", run, "--weights", name, "--calibration-against", copy, "--threads", "1"]) == 0
    res = json.load(open(os.path.join(run, "calibration-paired.json")))
    assert res["reference_weights"] == name
    assert any(row["gain"]["ema"]["nll"] != 0.0 for row in res["bins"].values())
    with pytest.raises(SystemExit, match="excess-variance head"):
        bench.recalibrate(runs["confidence"], steps=1, batch=4, lr=1e-3, seed=0)
