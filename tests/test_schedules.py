"""Training densities p(λ) (T18), weightings w(λ) (T19) and the weighted loss (T17), against analytic oracles.

Deliberate breakages tried (each fails a test here):
- Cosine pdf without the shift; t_of_lam with exp(+λ/2): pdf ≠ −dt/dλ, KS fails.
- LogNormalSigma.lam with F⁻¹(t) instead of F⁻¹(1 − t) (seed 003's sign slip): the mean of λ is −2.4.
- EDMSampling pdf with e^(+λ/(2ρ)): integral ≠ 1.
- FlowMatching pdf sech²(λ/2)/8: integral ≠ 1.
- WeightedLoss without the 1/p(λ) importance weight: estimates under different densities disagree.
- EDMWeighting with σ_d instead of σ_d²: WeightedLoss ≠ EDMLoss.
"""
import math

import pytest
import torch
from scipy.stats import kstest

from gendiff.losses import EDMLoss, NoisyBatch, WeightedLoss
from gendiff.nets.mlp import toy_denoiser
from gendiff.schedules import (SCHEDULES, WEIGHTINGS, Cosine, EDMSampling, EDMWeighting, FlowMatchingSchedule,
                               LogNormalSigma, LogUniform, SigmoidWeighting, make_schedule, make_weighting)

F64 = torch.float64
ALL = [Cosine(), Cosine(shift=1.5), Cosine(shift=-1.0), LogNormalSigma(), LogNormalSigma(-1.2, 1.2),
       EDMSampling(), EDMSampling(0.01, 10.0, 3.0), FlowMatchingSchedule(), LogUniform(0.01, 20.0)]


def _grid(sch, n=400001):
    lo = max(sch.lam_min, -80.0)
    hi = min(sch.lam_max, 80.0)
    return torch.linspace(lo, hi, n, dtype=F64)


@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_pdf_integrates_to_one_and_is_minus_dt_dlam(sch):
    lam = _grid(sch)
    assert float(torch.trapezoid(sch.pdf(lam), lam)) == pytest.approx(1.0, abs=2e-5)
    # p(λ) = −dt/dλ by autograd through t_of_lam (STYLE 5: derivatives from autograd)
    inner = lam[(lam > lam[0] + 0.5) & (lam < lam[-1] - 0.5)][::997].clone().requires_grad_(True)
    dt = torch.autograd.grad(sch.t_of_lam(inner).sum(), inner)[0]
    torch.testing.assert_close(-dt, sch.pdf(inner.detach()), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_lam_and_t_of_lam_are_inverse_and_decreasing(sch):
    t = torch.linspace(0.01, 0.99, 99, dtype=F64)
    lam = sch.lam(t)
    torch.testing.assert_close(sch.t_of_lam(lam), t, rtol=1e-9, atol=1e-9)
    assert bool((lam[1:] < lam[:-1]).all())


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_samples_follow_the_density(sch, stratified):
    g = torch.Generator().manual_seed(3)
    lam = -2 * sch.sample(20000, g, F64, stratified=stratified).log()
    p = kstest(lam.numpy(), lambda v: sch.cdf(torch.as_tensor(v, dtype=F64)).numpy()).pvalue
    assert p > 1e-3


def test_edm_training_density_is_T18():
    """ln σ ~ N(−1.2, 1.2²) ⇔ λ ~ N(2.4, 2.4²): the mean of λ is +2.4, not seed 003's −2.4."""
    d = LogNormalSigma(-1.2, 1.2)
    t = torch.rand(200000, generator=torch.Generator().manual_seed(0), dtype=F64)
    lam = d.lam(t)
    assert float(lam.mean()) == pytest.approx(2.4, abs=0.03)
    assert float(lam.std()) == pytest.approx(2.4, abs=0.03)


def test_cosine_matches_its_closed_form():
    t = torch.tensor([0.1, 0.25, 0.5, 0.8], dtype=F64)
    torch.testing.assert_close(Cosine().lam(t), -2 * torch.log(torch.tan(math.pi * t / 2)))
    torch.testing.assert_close(Cosine(1.0).lam(t), -2 * torch.log(torch.tan(math.pi * t / 2)) + 2)
    lam = torch.linspace(-5, 5, 11, dtype=F64)
    torch.testing.assert_close(FlowMatchingSchedule().pdf(lam), 1 / torch.cosh(lam / 4) ** 2 / 8)


def test_weightings_monotonic_flags_are_true():
    lam = torch.linspace(-15, 15, 3001, dtype=F64)
    for name, cls in WEIGHTINGS.items():
        w = cls()(lam)
        non_increasing = bool((w[1:] <= w[:-1] + 1e-15).all())
        assert non_increasing == cls.monotonic, name


def test_edm_monotonic_is_edm_above_its_peak_and_flat_below():
    """T19 EDM-monotonic: w = w_EDM(max(λ, λ*)), λ* = argmax w_EDM (checked on an independent grid)."""
    from gendiff.schedules import EDMMonotonicWeighting
    for dens in (LogNormalSigma(-1.2, 1.2), LogNormalSigma(-2.4, 1.5)):
        edm, mono = EDMWeighting(0.5, dens), EDMMonotonicWeighting(0.5, dens)
        lam = torch.linspace(-30, 30, 600001, dtype=F64)
        w = edm(lam)
        assert abs(mono.lam_peak - lam[w.argmax()].item()) < 2e-4
        above, below = lam > mono.lam_peak, lam < mono.lam_peak
        torch.testing.assert_close(mono(lam[above]), w[above], rtol=0, atol=0)
        torch.testing.assert_close(mono(lam[below]), torch.full_like(lam[below], w.max().item()),
                                   rtol=1e-9, atol=0)


def _gaussian_loss(lam, s=0.7, d=2):
    """E‖D* − x0‖²/σ² for data N(0, s²I) and the exact denoiser D* = x̃·s²/(s² + σ²): d·s²/(s² + σ²)."""
    sigma2 = torch.exp(-lam)
    return d * s**2 / (s**2 + sigma2)


def test_weighted_loss_is_unbiased_under_any_density():
    """T17: E_{λ~p}[w/p·ℓ(λ)] = ∫ w(λ)ℓ(λ) dλ for every p; checked against quadrature on a Gaussian whose
    exact denoiser is known, with three densities, within 4 standard errors each."""
    s, d, n = 0.7, 2, 40000

    class Exact(torch.nn.Module):
        def forward(self, x, sigma):
            return x * s**2 / (s**2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2)
    w = SigmoidWeighting(2.0)
    lam = torch.linspace(-60, 60, 600001, dtype=F64)
    truth = 0.5 * float(torch.trapezoid(w(lam) * _gaussian_loss(lam, s, d), lam))
    variances = {}
    for sch in (Cosine(), Cosine(shift=1.0), FlowMatchingSchedule()):
        g = torch.Generator().manual_seed(11)
        sigma = sch.sample(n, g, F64)
        x0 = s * torch.randn(n, d, generator=g, dtype=F64)
        xn = x0 + sigma[:, None] * torch.randn(n, d, generator=g, dtype=F64)
        est = WeightedLoss(w, sch)(Exact(), NoisyBatch(x0, xn, sigma))
        se = float(est.std()) / math.sqrt(n)
        assert abs(float(est.mean()) - truth) < 4 * se, (sch, float(est.mean()), truth, se)
        variances[repr(sch)] = float(est.var())
    assert len(set(round(v, 6) for v in variances.values())) == 3       # same objective, different variance


def test_edm_loss_is_the_weighted_loss_with_edm_weighting():
    """EDMLoss = ½‖F − F*‖² = T17 with w = p_EDM(λ)(e^(−λ) + σ_d²)/σ_d² and p = p_EDM (T19)."""
    torch.manual_seed(0)
    den = toy_denoiser("none").double()
    with torch.no_grad():
        for p in den.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    dens = LogNormalSigma(-1.2, 1.2)
    sigma = dens.sample(64, g, F64)
    x0 = 0.5 * torch.randn(64, 2, generator=g, dtype=F64)
    batch = NoisyBatch(x0, x0 + sigma[:, None] * torch.randn(64, 2, generator=g, dtype=F64), sigma)
    torch.testing.assert_close(WeightedLoss(EDMWeighting(0.5, dens), dens)(den, batch), EDMLoss()(den, batch),
                               rtol=1e-10, atol=1e-12)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="rho"):
        EDMSampling(rho=0.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDMSampling(sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        LogUniform(1.0, 1.0)
    with pytest.raises(ValueError, match="shift"):
        Cosine(shift=float("nan"))
    with pytest.raises(ValueError, match="schedule='bogus'.*cosine"):
        make_schedule("bogus")
    with pytest.raises(ValueError, match="weighting='bogus'.*elbo"):
        make_weighting("bogus")
    with pytest.raises(ValueError, match="one σ per example"):
        WeightedLoss(SigmoidWeighting(), Cosine())(lambda x, s: x,
                                                   NoisyBatch(torch.zeros(2, 2), torch.zeros(2, 2),
                                                              torch.tensor([[0.1, 0.2], [0.1, 0.1]])))
    assert set(SCHEDULES) >= {"cosine", "edm-training", "edm-sampling", "flow-matching", "log-uniform"}


@pytest.mark.parametrize("base",
                         [Cosine(), Cosine(shift=1.0), FlowMatchingSchedule(), LogNormalSigma(-1.2, 1.2)],
                         ids=repr)
def test_truncated_density_is_the_renormalised_restriction(base):
    from gendiff.schedules import Truncated
    sch = Truncated(base, 0.002, 80.0)
    lam = torch.linspace(sch.lam_min, sch.lam_max, 200001, dtype=F64)
    assert float(torch.trapezoid(sch.pdf(lam), lam)) == pytest.approx(1.0, abs=1e-6)
    z = float(torch.trapezoid(base.pdf(lam), lam))
    torch.testing.assert_close(sch.pdf(lam[::1000]), base.pdf(lam[::1000]) / z, rtol=1e-5, atol=0)
    sig = sch.sample(5000, torch.Generator().manual_seed(0), F64)
    assert float(sig.min()) >= 0.002 * (1 - 1e-9) and float(sig.max()) <= 80.0 * (1 + 1e-9)
    lam_s = -2 * sig.log()
    assert kstest(lam_s.numpy(), lambda v: sch.cdf(torch.as_tensor(v, dtype=F64)).numpy()).pvalue > 1e-3
    assert float(sch.pdf(torch.tensor(sch.lam_max + 1.0, dtype=F64))) == 0.0


def test_adaptive_schedule_is_a_density_and_fits_w_times_loss():
    """T20: after updates with a known per-λ loss ℓ(λ), p(λ) ∝ w(λ)·ℓ(λ) (plus the uniform floor), and the
    importance-weighted estimator of ∫ w·ℓ dλ has lower variance than under the cosine density."""
    from gendiff.schedules import AdaptiveSchedule, Truncated
    w = SigmoidWeighting(2.0)
    ad = AdaptiveSchedule(w, 0.002, 80.0, bins=32, ema=0.0, mix=0.05)
    lam = torch.linspace(ad.lam_min, ad.lam_max, 200001, dtype=F64)
    assert float(torch.trapezoid(ad.pdf(lam), lam)) == pytest.approx(1.0, abs=1e-4)
    t = torch.linspace(0.001, 0.999, 999, dtype=F64)
    torch.testing.assert_close(ad.t_of_lam(ad.lam(t)), t, rtol=1e-9, atol=1e-9)
    # feed ℓ(λ) of the Gaussian example at every bin's centre (ema = 0: the last value is the mean)
    mid = (ad.edges[1:] + ad.edges[:-1]) / 2
    ad.update(torch.exp(-mid / 2), _gaussian_loss(mid))
    mass = w(mid) * _gaussian_loss(mid)
    torch.testing.assert_close(ad.mass, 0.95 * mass / mass.sum() + 0.05 / 32, rtol=1e-10, atol=0)
    # samples follow the fitted density (KS), and the estimator's variance is lower than the cosine's
    g = torch.Generator().manual_seed(2)
    lam_s = -2 * ad.sample(20000, g, F64).log()
    assert kstest(lam_s.numpy(), lambda v: ad.cdf(torch.as_tensor(v, dtype=F64)).numpy()).pvalue > 1e-3
    def variance(dens):
        ls = -2 * dens.sample(200000, torch.Generator().manual_seed(4), F64).log()
        return float((w(ls) / dens.pdf(ls) * _gaussian_loss(ls)).var())
    assert variance(ad) < 0.5 * variance(Truncated(Cosine(), 0.002, 80.0))
    with pytest.raises(ValueError, match="mix"):
        AdaptiveSchedule(w, mix=0.0)


class _GaussianDenoiser(torch.nn.Module):
    """a·D* for data N(0, s²I): D* = x̃·s²/(s² + σ²), the exact posterior mean at a = 1."""

    def __init__(self, s=0.7):
        super().__init__()
        self.s, self.a = s, torch.nn.Parameter(torch.ones(()))

    def forward(self, x, sigma):
        return self.a * x * self.s**2 / (self.s**2 + sigma[:, None] ** 2)


def test_learned_density_is_a_density_with_the_fixed_t_derivative():
    """T22 as a density: ∫p = 1, λ(t(λ)) = λ, KS; the importance weight w/p = w·|λ'_η(t)| differentiates in η
    at fixed t (checked against central differences in both t and η)."""
    from gendiff.schedules import LearnedDensity
    ld = LearnedDensity(0.002, 80.0, hidden=16)
    lam = torch.linspace(ld.lam_min, ld.lam_max, 200001, dtype=F64)
    with torch.no_grad():
        assert float(torch.trapezoid(ld.pdf(lam), lam)) == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(ld.lam(ld.t_of_lam(lam[::1000])).detach(), lam[::1000], rtol=0, atol=1e-5)
    lam_s = -2 * ld.sample(20000, torch.Generator().manual_seed(3), F64).log()
    assert kstest(lam_s.detach().numpy(),
                  lambda v: ld.cdf(torch.as_tensor(v, dtype=F64)).numpy()).pvalue > 1e-3
    w, t = SigmoidWeighting(2.0), torch.tensor([0.13, 0.5, 0.91], dtype=F64)

    def estimator(lam_t):      # ½·w/p·ℓ at the sampled λ, p through the density object
        return (0.5 * w(lam_t) / ld.pdf(lam_t) * _gaussian_loss(lam_t)).sum()
    p = ld.schedule.w2
    (auto,) = torch.autograd.grad(estimator(ld.lam(t)), p)

    def oracle():              # the same with λ'(t) by central differences in t
        h = 1e-4
        dl = (ld.lam(t + h) - ld.lam(t - h)) / (2 * h)
        lt = ld.lam(t)
        return float((0.5 * w(lt) * dl.abs() * _gaussian_loss(lt)).sum())
    i, eps = 3, 1e-3
    with torch.no_grad():
        p[i] += eps
        up = oracle()
        p[i] -= 2 * eps
        down = oracle()
        p[i] += eps
    assert float(auto[i]) == pytest.approx((up - down) / (2 * eps), rel=1e-5)


def test_one_step_gives_the_denoiser_the_mean_gradient_and_the_density_the_second_moment():
    from gendiff.train import backward
    a, b = torch.nn.Parameter(torch.tensor(1.3)), torch.nn.Parameter(torch.tensor(-0.4))
    x = torch.linspace(0.1, 2.0, 7)
    per_example = (a * x + b * x.square()) ** 2 + a * b
    ga_mean, gb_sq = torch.autograd.grad(per_example.mean(), a, retain_graph=True), \
        torch.autograd.grad(per_example.square().mean(), b, retain_graph=True)
    backward(per_example, [a], [b])
    torch.testing.assert_close(a.grad, ga_mean[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(b.grad, gb_sq[0], rtol=1e-6, atol=0)


def test_training_the_learned_density_lowers_the_loss_variance():
    """train() with a LearnedDensity: η descends E[L²], so the T17 estimator's variance falls while its mean
    stays the shape-free ∫½wℓ dλ (VDM: only the endpoints enter the objective)."""
    from gendiff.data.toy import GaussianMixture
    from gendiff.schedules import LearnedDensity
    from gendiff.data.sources import ToyBatches
    from gendiff.experiments.config import ToyTrainConfig
    from gendiff.train import train
    s = 0.7
    mix = GaussianMixture([1.0], [[0.0, 0.0]], [[[s * s, 0.0], [0.0, s * s]]])
    w = SigmoidWeighting(2.0)
    lam = torch.linspace(-2 * math.log(80), -2 * math.log(0.002), 200001, dtype=F64)
    target = float(torch.trapezoid(0.5 * w(lam) * _gaussian_loss(lam, s), lam))

    def run(iterations, trainable=True, lr=0.1):
        ld = LearnedDensity(0.002, 80.0, hidden=16)
        if not trainable:
            ld.schedule.requires_grad_(False)
        den = _GaussianDenoiser(s)
        cfg = ToyTrainConfig(iterations=iterations, batch=2048, lr=lr, ema=0.0, snapshot_every=10**6)
        res = train(den, WeightedLoss(w, ld), ToyBatches(mix, "point"), cfg, seed=1, progress=False,
                    sigma_density=ld)
        return den, ld, res
    _, ld, res = run(200, trainable=False)   # γ_η frozen at its initial shape: the baseline variance
    _, ld2, res2 = run(200)
    first, last = sum(res.loss_vars[-50:]) / 50, sum(res2.loss_vars[-50:]) / 50
    assert last < 0.5 * first, (first, last)
    mean_last = sum(res2.losses[-50:]) / 50
    assert mean_last == pytest.approx(target, rel=0.05)
