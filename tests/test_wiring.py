"""Oracle tests for the training and sampling wiring (THEORY T3, T12–T15, T18, T33/T34, §10).

Each test asserts against a closed form or an independent recomputation (never numbers copied from
a run), with seeded generators, so it is deterministic. Breakages each test was checked against
(each one applied by hand in a scratch copy; the named test fails, all pass on the unbroken code):

 1. data/sources.py `ToyBatches.draw` forms x_noisy from `self.means[k]` instead of `sample` (no Σ_k^½ε₁)
    -> test_batch_source_noise_covariance[point|source|point-cov]
 2. losses.py `ScoreMatchingLoss` with a wrong σ power (`s2 *` -> `s2.sqrt() *`, or `/ s2` -> `/ s2.sqrt()`)
    -> test_score_matching_loss_is_sigma2_weighted_score_error
 3. samplers.py `_churn`: γ = min(churn, √2 − 1) (no `/ steps`), and the `s_tmin <= σ <= s_tmax` gate removed
    -> test_churn_gamma_noise_and_gate (both), test_heun_churn_noise_per_step (both)
 4. train.py `train`: EMA weight swapped (`p_ema.lerp_(p, 1 - cfg.ema)` -> `p_ema.lerp_(p, cfg.ema)`)
    -> test_train_ema_follows_parameter_trajectory
 5. train.py `train`: lr decay removed (the `group["lr"] = inverse_sqrt_lr(...)` line deleted, or set to
    cfg.lr)
    -> test_train_lr_inverse_sqrt_decay (checks TrainResult.lrs and the lr each Adam.step() really used)
 6. schedules.py `LogNormalSigma.sample`: `p_std**2` for `p_std`, or `-p_mean` for `p_mean`
    -> test_lognormal_sigma_ks, test_train_draws_sigma_from_cfg_density (both)
    (test_train_uses_given_sigma_density checks that `train` passes a given density's σ through untouched.)
 7. Guidance end to end on the exact mixture -> test_guided_sampling_end_to_end,
    test_guided_predict_matches_forward
 8. Sampling through the T14 wrapper -> test_phi_score_sampling_equals_model_when_cov_is_sigma2,
    test_phi_score_hybrid_switch_closed_form, test_T14_beats_T13_for_source_optimum_at_small_sigma
 9. The autoguidance paper's tree, recomputed from its construction ->
    test_tree_root_and_first_child_branches, test_tree_class_b_root_after_class_a_draws
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from gendiff.data.toy import GaussianMixture, tree
from gendiff.guidance import Guided
from gendiff.heads import Prediction
from gendiff.losses import EDMLoss, NoisyBatch, ScoreMatchingLoss
from gendiff.nets.mlp import toy_denoiser
from gendiff.samplers import _churn, sample_heun
from gendiff.schedules import LogNormalSigma, edm_sigmas
from gendiff.scores import PhiScoreDenoiser
from gendiff.data.sources import ToyBatches
from gendiff.experiments.config import ToyTrainConfig
from gendiff.train import Outputs, train

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- 1. ToyBatches: x̃ = m_k + Σ_k^½ε₁ + σε₂ (T3) ------------------------------------------------

# Two far-apart components (so the component of a point is its nearest mean, whatever the draw order
# inside `draw`) with clearly anisotropic, correlated covariances and unequal weights.
MIX_MEANS = np.array([[-10.0, 0.0], [10.0, 0.0]])
MIX_COVS = np.array([[[0.50, 0.30], [0.30, 0.25]],
                     [[0.04, -0.05], [-0.05, 0.36]]])
MIX_WEIGHTS = np.array([0.3, 0.7])


def _cov(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    c = v - v.mean(0)
    return c.T @ c / (len(v) - 1)


def _assert_cov(v: torch.Tensor, expect: np.ndarray, z: float = 5.0):
    """Sample covariance of v [n, 2] equals `expect` within z standard errors per entry
    (Var Ĉ_ij = (C_ii C_jj + C_ij²)/n for Gaussian data), and the sample mean is 0 within z SE."""
    n = len(v)
    expect = torch.as_tensor(expect, dtype=F64)
    d = torch.diagonal(expect)
    se = ((d[:, None] * d[None, :] + expect.square()) / n).sqrt()
    got = _cov(v)
    assert torch.all((got - expect).abs() <= z * se), f"covariance {got.tolist()} != {expect.tolist()}"
    assert torch.all(v.double().mean(0).abs() <= z * (d / n).sqrt()), f"mean {v.mean(0).tolist()} != 0"


@pytest.mark.parametrize("mode", ["point", "source", "point-cov"])
def test_batch_source_noise_covariance(mode):
    """Per component k, x̃ − m_k ~ N(0, Σ_k + σ²I) at a fixed σ (T3); x0 = m_k in source mode, and the
    clean sample (x̃ − x0 ~ N(0, σ²I) independent of x0 − m_k ~ N(0, Σ_k)) in point / point-cov modes;
    source_cov = Σ_k in source and point-cov modes, None in point mode."""
    mixture = GaussianMixture(MIX_WEIGHTS, MIX_MEANS, MIX_COVS)
    src = ToyBatches(mixture, mode)
    n, sigma = 60_000, 0.3
    batch = src.draw(n, torch.full((n,), sigma), _gen(11))
    assert batch.x0.shape == batch.x_noisy.shape == (n, 2)
    assert torch.equal(batch.sigma, torch.full((n,), sigma))

    means = torch.as_tensor(MIX_MEANS, dtype=batch.x_noisy.dtype)
    k = (batch.x_noisy[:, None, :] - means[None]).square().sum(-1).argmin(1)
    frac1 = k.double().mean().item()                    # component weights respected: 0.7 ± 5 SE
    assert abs(frac1 - MIX_WEIGHTS[1]) < 5 * math.sqrt(0.21 / n)

    eye = np.eye(2)
    for j in range(2):
        sel = k == j
        _assert_cov(batch.x_noisy[sel] - means[j], MIX_COVS[j] + sigma**2 * eye)
        if mode == "source":
            assert torch.equal(batch.x0[sel], means[j].expand(int(sel.sum()), 2))
        else:
            _assert_cov(batch.x0[sel] - means[j], MIX_COVS[j])
            _assert_cov(batch.x_noisy[sel] - batch.x0[sel], sigma**2 * eye)
            # the diffusion noise is independent of the source noise
            a, b = (batch.x0[sel] - means[j]).double(), (batch.x_noisy[sel] - batch.x0[sel]).double()
            cross = (a - a.mean(0)).T @ (b - b.mean(0)) / (len(a) - 1)
            se = torch.as_tensor(np.sqrt(np.diag(MIX_COVS[j])[:, None] * sigma**2 / len(a)))
            assert torch.all(cross.abs() <= 5 * se)
        if mode == "point":
            assert batch.source_cov is None
        else:
            assert batch.source_cov.shape == (n, 2, 2)
            expect = torch.as_tensor(MIX_COVS[j], dtype=batch.source_cov.dtype)
            assert torch.allclose(batch.source_cov[sel], expect.expand(int(sel.sum()), 2, 2),
                                  rtol=1e-6, atol=0)


def test_batch_source_per_example_sigma_and_score():
    """σ is one value per example: x̃ − x0 has variance σ_i² for each i; need_score gives the exact score."""
    mixture = GaussianMixture(MIX_WEIGHTS, MIX_MEANS, MIX_COVS)
    n = 40_000
    sigma = torch.where(torch.arange(n) % 2 == 0, torch.tensor(0.1), torch.tensor(2.0))
    batch = ToyBatches(mixture, "point", need_score=True).draw(n, sigma, _gen(12))
    for s in (0.1, 2.0):
        _assert_cov(batch.x_noisy[sigma == s] - batch.x0[sigma == s], s**2 * np.eye(2))
    torch.testing.assert_close(batch.score, mixture.score(batch.x_noisy, sigma), rtol=0, atol=0)


# ---- 2. ScoreMatchingLoss: σ²‖s_θ − s*‖² (§10, T13) ---------------------------------------------------

def test_score_matching_loss_is_sigma2_weighted_score_error():
    torch.manual_seed(3)
    den = toy_denoiser("none", width=16, hidden_layers=2).double()
    with torch.no_grad():
        den.net.gain.fill_(0.7)                       # make the network part of D non-trivial
    gm = tree("A")
    n = 8
    sigma = torch.tensor([0.1, 3.0] * (n // 2), dtype=F64)
    x, _ = gm.sample(n, sigma, generator=_gen(4), dtype=F64)
    s_star = gm.score(x, sigma)
    batch = NoisyBatch(x0=x, x_noisy=x, sigma=sigma, score=s_star)   # x0 is unused by this loss
    loss = ScoreMatchingLoss()(den, batch)
    assert loss.shape == (n,)

    with torch.no_grad():
        D = den(x, sigma)
    s2 = sigma[:, None] ** 2
    s_theta = (D - x) / s2                                            # T13
    expect = (s2 * (s_theta - s_star).square()).sum(1)
    expect_regression = (D - (x + s2 * s_star)).square().sum(1) / sigma**2
    torch.testing.assert_close(loss.detach(), expect, rtol=1e-10, atol=0)
    torch.testing.assert_close(loss.detach(), expect_regression, rtol=1e-10, atol=0)
    assert (expect > 0).all()


# ---- 3. churn (EDM Algorithm 2, lines 4–6) -------------------------------------------------------

def _noise_std_ok(v: torch.Tensor, expect: float, z: float = 5.0) -> bool:
    se = expect / math.sqrt(2 * v.numel())
    return (abs(v.double().std().item() - expect) <= z * se
            and abs(v.double().mean().item()) <= z * expect / math.sqrt(v.numel()))


@pytest.mark.parametrize("sigma,steps,churn,s_noise,s_tmin,s_tmax", [
    (1.0, 10, 2.0, 0.5, 0.0, math.inf),   # γ = churn/steps = 0.2 (the cap does not bind)
    (0.7, 10, 40.0, 1.0, 0.0, math.inf),  # γ capped at √2 − 1
    (2.0, 10, 2.0, 1.0, 2.0, 3.0),        # σ exactly at s_tmin: the gate is inclusive
    (3.0, 10, 2.0, 1.0, 2.0, 3.0),        # σ exactly at s_tmax: inclusive
])
def test_churn_gamma_noise_and_gate(sigma, steps, churn, s_noise, s_tmin, s_tmax):
    """σ̂ = σ(1 + γ), γ = min(churn/steps, √2 − 1), added noise std √(σ̂² − σ²)·s_noise; outside
    [s_tmin, s_tmax] nothing happens."""
    gamma = min(churn / steps, math.sqrt(2) - 1)
    n = 50_000
    x = torch.zeros(n, 2, dtype=F64)
    x_new, sigma_hat = _churn(x, sigma, steps, churn, s_tmin, s_tmax, s_noise, _gen(5))
    assert sigma_hat == pytest.approx(sigma * (1 + gamma), rel=1e-12)
    assert _noise_std_ok(x_new - x, math.sqrt((sigma * (1 + gamma)) ** 2 - sigma**2) * s_noise)

    # the gate: σ outside [s_tmin, s_tmax] gets no noise and keeps its σ
    for lo, hi in ((sigma * 1.5, sigma * 3), (sigma / 3, sigma / 1.5)):
        x_same, s_same = _churn(x, sigma, steps, churn, lo, hi, s_noise, _gen(5))
        assert torch.equal(x_same, x) and s_same == sigma


def test_heun_churn_noise_per_step():
    """With D(x) = x the ODE does not move x (d = 0), so each step's change is the churn noise alone:
    std √(σ̂² − σ²)·s_noise with σ̂ = σ(1 + γ), γ = min(churn/steps, √2 − 1) inside [s_tmin, s_tmax],
    and exactly zero outside; the denoiser is first called at σ̂."""
    sigmas = edm_sigmas(8, 0.002, 5.0)
    steps, churn, s_noise, s_tmin, s_tmax = 8, 1.6, 0.9, 0.05, 1.0
    gamma = min(churn / steps, math.sqrt(2) - 1)
    n = 20_000
    calls, xs = [], []

    def identity(x, s):
        calls.append(float(s))
        return x

    x_init = torch.zeros(n, 2, dtype=F64)
    sample_heun(identity, x_init, sigmas, churn=churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                generator=_gen(6), callback=lambda i, x, s, d: xs.append(x.clone()))
    assert len(xs) == steps
    prev, first_calls = x_init, []
    ci = 0
    churned = 0
    for i in range(steps):
        s = float(sigmas[i])
        inside = s_tmin <= s <= s_tmax
        s_hat = s * (1 + gamma) if inside else s
        first_calls.append(calls[ci])
        ci += 2 if float(sigmas[i + 1]) > 0 else 1
        delta = xs[i] - prev
        if inside:
            churned += 1
            assert _noise_std_ok(delta, math.sqrt(s_hat**2 - s**2) * s_noise), f"step {i}, σ = {s}"
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), f"step {i}, σ = {s}: noise outside the gate"
        prev = xs[i]
        assert first_calls[-1] == pytest.approx(s_hat, rel=1e-12)
    assert ci == len(calls)
    assert 0 < churned < steps                       # the grid has steps on both sides of the gate


# ---- 4, 5, 6. train(): EMA, lr decay, σ density ----------------------------------------------------

def _tiny_cfg(**kw):
    base = dict(iterations=3, batch=64, lr=0.05, lr_ref_iter=1000, betas=(0.9, 0.99), p_mean=-1.0, p_std=1.0,
                sigma_data=0.5, ema=0.9, snapshot_every=1000, width=8, hidden_layers=1)
    base.update(kw)
    return ToyTrainConfig(**base)


def _params(module):
    return [p.detach().clone().double() for p in module.parameters()]


def test_train_ema_follows_parameter_trajectory():
    """EMA recursion e_0 = θ_0, e_{i+1} = ema·e_i + (1 − ema)·θ_{i+1}, recomputed from the parameters the
    loss saw at each iteration (θ_i, before step i) and the final ones."""
    cfg = _tiny_cfg(iterations=3, ema=0.9)
    torch.manual_seed(7)
    den = toy_denoiser("none", width=cfg.width, hidden_layers=cfg.hidden_layers, precond=cfg.sigma_data)
    seen, edm = [], EDMLoss()

    def loss(d, batch):
        seen.append(_params(d))
        return edm(d, batch)

    res = train(den, loss, ToyBatches(tree("A"), "point"), cfg, seed=1, progress=False,
                outputs=Outputs(keep_snapshots=(1, 2)))
    traj = seen + [_params(den)]
    assert len(traj) == cfg.iterations + 1
    moved = max((a - b).abs().max().item() for a, b in zip(traj[-1], traj[0]))
    assert moved > 1e-2                              # the parameters really moved

    e = [p.clone() for p in traj[0]]
    expect_after = {}
    for i, theta in enumerate(traj[1:], start=1):
        e = [cfg.ema * a + (1 - cfg.ema) * b for a, b in zip(e, theta)]
        expect_after[i] = [t.clone() for t in e]
    for got, want in zip(_params(res.ema), expect_after[cfg.iterations]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the EMA is neither the final weights nor the initial ones
    assert max((a - b).abs().max().item() for a, b in zip(_params(res.ema), traj[-1])) > 1e-3
    # snapshots hold the EMA after 1 and 2 iterations
    names = [name for name, _ in res.ema.named_parameters()]
    for it in (1, 2):
        for name, want in zip(names, expect_after[it]):
            torch.testing.assert_close(res.snapshots[it][name].double(), want, rtol=1e-5, atol=1e-6)


def test_train_lr_inverse_sqrt_decay(monkeypatch):
    """lr_i = lr/√max(i/lr_ref_iter, 1), both as recorded (TrainResult.lrs) and as used by each Adam step."""
    used = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, *a, **kw):
            used.append([g["lr"] for g in self.param_groups])
            return super().step(*a, **kw)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    cfg = _tiny_cfg(iterations=8, lr_ref_iter=2, lr=1e-2, batch=16)
    torch.manual_seed(8)
    den = toy_denoiser("none", width=cfg.width, hidden_layers=cfg.hidden_layers, precond=cfg.sigma_data)
    res = train(den, EDMLoss(), ToyBatches(tree("A"), "point"), cfg, seed=2, progress=False)
    expect = [cfg.lr / math.sqrt(max(i / cfg.lr_ref_iter, 1)) for i in range(cfg.iterations)]
    assert expect[-1] < expect[0] / 1.8               # the decay is visible over the run
    assert len(used) == len(res.lrs) == cfg.iterations
    assert res.lrs == pytest.approx(expect, rel=1e-12, abs=0)
    for step_lrs, want in zip(used, expect):
        assert step_lrs == pytest.approx([want] * len(step_lrs), rel=1e-12, abs=0)


def test_lognormal_sigma_ks():
    """ln σ ~ N(p_mean, p_std²) (T18), checked by a Kolmogorov–Smirnov test, with power against the
    p_std² and −p_mean mistakes."""
    p_mean, p_std = -1.2, 1.5
    sigma = LogNormalSigma(p_mean, p_std).sample(20_000, _gen(9))
    assert sigma.shape == (20_000,) and (sigma > 0).all()
    z = sigma.double().log().numpy()
    assert stats.kstest(z, "norm", args=(p_mean, p_std)).pvalue > 1e-3
    assert stats.kstest(z, "norm", args=(p_mean, p_std**2)).pvalue < 1e-6   # the test can tell them apart
    assert stats.kstest(z, "norm", args=(-p_mean, p_std)).pvalue < 1e-6


def test_train_draws_sigma_from_cfg_density():
    """With no sigma_density, train draws one σ per example from ln σ ~ N(cfg.p_mean, cfg.p_std²)
    (values unlike the defaults, so a default-constructed density would fail)."""
    cfg = _tiny_cfg(iterations=4, batch=2048, p_mean=0.4, p_std=0.8)
    seen, edm = [], EDMLoss()

    def loss(d, batch):
        assert batch.sigma.shape == (cfg.batch,)
        seen.append(batch.sigma.detach().clone())
        return edm(d, batch)

    torch.manual_seed(10)
    den = toy_denoiser("none", width=cfg.width, hidden_layers=cfg.hidden_layers, precond=cfg.sigma_data)
    train(den, loss, ToyBatches(tree("A"), "point"), cfg, seed=3, progress=False)
    z = torch.cat(seen).double().log().numpy()
    assert len(z) == cfg.iterations * cfg.batch
    assert stats.kstest(z, "norm", args=(cfg.p_mean, cfg.p_std)).pvalue > 1e-3
    assert stats.kstest(z, "norm", args=(cfg.p_mean, cfg.p_std**2)).pvalue < 1e-6
    assert stats.kstest(z, "norm", args=(-cfg.p_mean, cfg.p_std)).pvalue < 1e-6
    assert stats.kstest(z, "norm", args=(-2.4, 1.5)).pvalue < 1e-6      # not the default density


def test_train_uses_given_sigma_density():
    """A given sigma_density is asked for cfg.batch σ per iteration with a torch.Generator, and the loss
    receives exactly those σ."""
    cfg = _tiny_cfg(iterations=3, batch=32)

    class Recording:
        def __init__(self):
            self.drawn = []

        def sample(self, n, generator=None):
            assert n == cfg.batch and isinstance(generator, torch.Generator)
            s = torch.rand(n, generator=generator) * 2 + 0.01
            self.drawn.append(s.clone())
            return s

    seen, edm, dens = [], EDMLoss(), Recording()

    def loss(d, batch):
        seen.append(batch.sigma.detach().clone())
        return edm(d, batch)

    torch.manual_seed(11)
    den = toy_denoiser("none", width=cfg.width, hidden_layers=cfg.hidden_layers, precond=cfg.sigma_data)
    train(den, loss, ToyBatches(tree("A"), "point"), cfg, seed=4, progress=False, sigma_density=dens)
    assert len(dens.drawn) == len(seen) == cfg.iterations
    for a, b in zip(dens.drawn, seen):
        assert torch.equal(a, b)


# ---- 7. guidance (T33, T34) ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def guided_setup(tree_a):
    main = tree_a.denoiser("point")
    guide = tree("AB").denoiser("point")
    x_init, _ = tree_a.sample(256, 5.0, generator=_gen(13), dtype=F64)
    return main, guide, x_init, edm_sigmas(12)


def test_guided_sampling_end_to_end(guided_setup):
    """w = 1 samples the main model, w = 0 the guide; w = 2 is the extrapolation D_g + 2(D_m − D_g)."""
    main, guide, x_init, sigmas = guided_setup
    ref_main = sample_heun(main, x_init, sigmas)
    ref_guide = sample_heun(guide, x_init, sigmas)
    torch.testing.assert_close(sample_heun(Guided(main, guide, 1.0), x_init, sigmas), ref_main,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(sample_heun(Guided(main, guide, 0.0), x_init, sigmas), ref_guide,
                               rtol=0, atol=1e-12)
    w2 = sample_heun(Guided(main, guide, 2.0), x_init, sigmas)
    oracle = sample_heun(lambda x, s: guide(x, s) + 2.0 * (main(x, s) - guide(x, s)), x_init, sigmas)
    torch.testing.assert_close(w2, oracle, rtol=0, atol=1e-9)
    assert (w2 - ref_main).norm(dim=1).max() > 1e-2 and (w2 - ref_guide).norm(dim=1).max() > 1e-2
    assert (ref_main - ref_guide).norm(dim=1).max() > 1e-2   # the two models really differ here


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 2.0])
def test_guided_predict_matches_forward(guided_setup, w):
    main, guide, x_init, _ = guided_setup
    x = x_init[:64] * 0.3
    for sigma in (0.05, torch.linspace(0.01, 1.0, 64, dtype=F64)):
        g = Guided(main, guide, w)
        p = g.predict(x, sigma)
        torch.testing.assert_close(p.mu, g(x, sigma), rtol=0, atol=1e-12)
        expect = guide(x, sigma) + w * (main(x, sigma) - guide(x, sigma))
        torch.testing.assert_close(p.mu, expect, rtol=0, atol=1e-10)
        conf = (guide if w == 0 else main).predict(x, sigma)
        torch.testing.assert_close(p.covariance(), conf.covariance(), rtol=0, atol=0)


# ---- 8. sampling through the T14 wrapper -----------------------------------------------------------

class _Sigma2Model(torch.nn.Module):
    """An analytic model: μ = the exact posterior mean, Σ_φ = factor·σ²I (factor = 1 makes T14 = T13)."""

    def __init__(self, mixture, factor=1.0):
        super().__init__()
        self.exact, self.factor = mixture.denoiser("point"), factor

    def forward(self, x, sigma):
        return self.exact(x, sigma)

    def predict(self, x, sigma):
        s = torch.as_tensor(sigma, dtype=x.dtype)
        s = s[:, None] if s.ndim == 1 else s
        return Prediction(x, self.exact(x, sigma), var=self.factor * s.square() * torch.ones_like(x))


def test_phi_score_sampling_equals_model_when_cov_is_sigma2(guided_setup, tree_a):
    _, _, x_init, sigmas = guided_setup
    model = _Sigma2Model(tree_a)
    ref = sample_heun(model, x_init, sigmas)
    for below in (math.inf, 0.05):
        out = sample_heun(PhiScoreDenoiser(model, below=below), x_init, sigmas)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


def test_phi_score_hybrid_switch_closed_form(tree_a):
    """With Σ_φ = 2σ²I, T14 gives D' = x̃ + σ²(μ − x̃)/(2σ²) = (x̃ + μ)/2 below the threshold, μ (T13)
    above."""
    model = _Sigma2Model(tree_a, factor=2.0)
    x, _ = tree_a.sample(64, 0.2, generator=_gen(14), dtype=F64)
    sigma = torch.linspace(0.01, 0.5, 64, dtype=F64)
    mu = model(x, sigma)
    half = (x + mu) / 2
    torch.testing.assert_close(PhiScoreDenoiser(model)(x, sigma), half, rtol=0, atol=1e-12)
    below = 0.2
    expect = torch.where((sigma < below)[:, None], half, mu)
    torch.testing.assert_close(PhiScoreDenoiser(model, below=below)(x, sigma), expect, rtol=0, atol=1e-12)
    assert 0 < int((sigma < below).sum()) < 64


def test_T14_beats_T13_for_source_optimum_at_small_sigma(tree_a):
    """The source-mode optimum has μ = E[m_k | x̃] and Σ_φ = σ²I + E[Σ_k | x̃] + Cov[m_k | x̃] (T12): at
    small σ, T14 (Σ_φ⁻¹(μ − x̃)) is about the component's exact score, while T13 ((μ − x̃)/σ²) is off by
    ~Σ_k^½ε/σ². Error measured as E σ²‖s − s*‖² (the score-matching loss)."""
    sigma = 0.005
    x, _ = tree_a.sample(1024, sigma, generator=_gen(15), dtype=F64)
    den = tree_a.denoiser("source")
    s_true = tree_a.score(x, sigma)
    s13 = (den(x, sigma) - x) / sigma**2
    s14 = (PhiScoreDenoiser(den)(x, sigma) - x) / sigma**2
    torch.testing.assert_close(s14, den.predict(x, sigma).phi_score(), rtol=1e-6, atol=1e-6)
    err13 = (sigma**2 * (s13 - s_true).square().sum(1)).mean().item()
    err14 = (sigma**2 * (s14 - s_true).square().sum(1)).mean().item()
    assert err14 < 0.05, err14
    assert err13 > 1.0, err13


# ---- 9. the autoguidance paper's tree (THEORY §10) ----------------------------------------------

ORIGIN = np.array([0.0030, 0.0325])
SCALE = np.array([1.3136, 1.3844])


def _branch(pos, angle, length, level):
    """One branch of the paper's construction: 8 means along the segment, its covariance, its raw weight."""
    u = np.array([np.cos(angle), np.sin(angle)])
    t = np.linspace(0.07, 0.93, 8)
    means = (pos[None] + u[None] * length * t[:, None]) * SCALE[None]
    thickness = 0.2 * 0.8**level / length
    size = SCALE * length * 0.06
    cov = (np.outer(u, u) + (np.eye(2) - np.outer(u, u)) * thickness**2) * np.outer(size, size)
    return means, cov, length * 0.5**level, u


def _rows(g: GaussianMixture, means: np.ndarray) -> list:
    """The row of g.means64 that matches each expected mean (order independent)."""
    m = g.means64.numpy()
    rows = []
    for mu in means:
        dist = np.linalg.norm(m - mu, axis=1)
        i = int(dist.argmin())
        assert dist[i] < 1e-12, f"no component at {mu}: nearest {m[i]} ({dist[i]:.3g} away)"
        rows.append(i)
    return rows


def test_tree_root_and_first_child_branches(tree_a):
    """Class A: the root branch from the origin at π/4 with length 0.292(1 + 0.2·r0), then (the paper's
    recursion order) the first child's angle π/4 + (1 + 0.2·r1) and length 0.292·0.8·(1 + 0.2·r2),
    from the tip of the root; r = RandomState(2).randn()."""
    r = np.random.RandomState(2).randn(3)
    len0 = 0.292 * (1 + 0.2 * r[0])
    m0, c0, w0, u0 = _branch(ORIGIN, np.pi / 4, len0, 0)
    angle1 = np.pi / 4 + 0.7**0 * (1 + 0.2 * r[1])
    len1 = 0.292 * 0.8 * (1 + 0.2 * r[2])
    m1, c1, w1, _ = _branch(ORIGIN + u0 * len0, angle1, len1, 1)

    rows0, rows1 = _rows(tree_a, m0), _rows(tree_a, m1)
    assert rows0 == list(range(8))                   # the root branch comes first, in t order
    assert len(set(rows1)) == 8
    covs, w = tree_a.covs64.numpy(), tree_a.weights64.numpy()
    for i in rows0:
        np.testing.assert_allclose(covs[i], c0, rtol=1e-12, atol=1e-15)
    for i in rows1:
        np.testing.assert_allclose(covs[i], c1, rtol=1e-12, atol=1e-15)
    # weights ∝ length·0.5^level, equal within a branch
    np.testing.assert_allclose(w[rows0], w[rows0[0]], rtol=1e-12)
    np.testing.assert_allclose(w[rows1], w[rows1[0]], rtol=1e-12)
    assert w[rows0[0]] / w[rows1[0]] == pytest.approx(w0 / w1, rel=1e-12)
    # the cov's principal axis is the branch direction, variance (size·1)² along u
    along = u0 @ (c0 / np.outer(SCALE, SCALE)) @ u0
    assert along == pytest.approx((len0 * 0.06) ** 2, rel=1e-12)


def test_tree_class_b_root_after_class_a_draws():
    """Every one of class A's 2^7 − 1 branches draws three numbers (its length, then its two children's
    angles, also at the last level), so class B's root length is draw number 3·127 of RandomState(2)."""
    r = np.random.RandomState(2).randn(3 * 127 + 1)
    len_b = 0.292 * (1 + 0.2 * r[3 * 127])
    m, c, _, _ = _branch(ORIGIN, 1.25 * np.pi, len_b, 0)
    b = tree("B")
    assert _rows(b, m) == list(range(8))
    np.testing.assert_allclose(b.covs64.numpy()[:8], np.broadcast_to(c, (8, 2, 2)), rtol=1e-12, atol=1e-15)
