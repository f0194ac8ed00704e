"""Sampler and guidance against the exact mixture (THEORY T13, T15, T34; EDM Algorithm 2)."""
import itertools
import math

import pytest
import torch

from gendiff.data.toy import GaussianMixture, tree
from gendiff.guidance import Guided, classifier_free
from gendiff.mixture_metrics import mmd, sample_nll
from gendiff.nets.mlp import toy_denoiser
from gendiff.samplers import heun_nfe, sample_euler, sample_heun
from gendiff.schedules import edm_sigmas
from gendiff.scores import CountCalls, with_score_mode


@pytest.fixture(scope="module")
def gt():
    return tree("A")


def test_edm_sigmas_endpoints_and_trailing_zero():
    s = edm_sigmas(32, 0.002, 5.0, 7.0)
    assert s.shape == (33,) and s[-1] == 0
    assert math.isclose(s[0], 5.0, rel_tol=1e-12) and math.isclose(s[-2], 0.002, rel_tol=1e-12)
    assert torch.all(s[:-1] > s[1:])
    # EDM eq. 5: σ^(1/ρ) is linear in the step index
    r = s[:-1] ** (1 / 7)
    assert torch.allclose(r.diff(), r.diff()[0].expand(31), rtol=1e-9)


def test_heun_with_exact_denoiser_reproduces_ground_truth(gt):
    """The exact posterior-mean denoiser + Heun (32 steps) matches the ground truth: sample NLL within
    0.05 nats, MMD² no larger than between independent ground-truth sets (empirical null)."""
    n = 4096
    g = torch.Generator().manual_seed(0)
    x_init, _ = gt.sample(n, 5.0, generator=g, dtype=torch.float64)
    x = sample_heun(gt.denoiser(), x_init, edm_sigmas(32))
    ref, _ = gt.sample(n, generator=g, dtype=torch.float64)
    null = []
    for _ in range(4):
        a, _ = gt.sample(n, generator=g, dtype=torch.float64)
        null.append(mmd(a, ref))
    null = torch.tensor(null)
    other, _ = gt.sample(n, generator=g, dtype=torch.float64)
    assert abs(sample_nll(x, gt) - sample_nll(other, gt)) < 0.05
    assert mmd(x, ref) < null.mean() + 4 * null.std() + 1e-4


def test_heun_converges_at_second_order_for_a_gaussian():
    """For p = N(0, s²I) the PF-ODE (T15) solution is x(σ) = x·√(s² + σ²)/√(s² + σ_max²). Heun's error
    shrinks ~4× per doubling of the steps (2nd order) and Euler's ~2× (1st order). The grid runs down
    to σ_min = 1e-6 so that the final jump to σ = 0 adds nothing measurable."""
    s = 0.7
    gm = GaussianMixture([1.0], [[0.0, 0.0]], [[[s * s, 0.0], [0.0, s * s]]])
    x_init = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 5
    expect = x_init * s / math.sqrt(s * s + 25)

    def err(steps, second_order):
        out = sample_heun(gm.denoiser(), x_init, edm_sigmas(steps, 1e-6, 5.0), second_order=second_order)
        return float((out - expect).abs().max())

    heun = [err(n, True) for n in (16, 32, 64)]
    euler = [err(n, False) for n in (16, 32, 64)]
    assert heun[-1] < 2e-3 * float(expect.abs().max())
    assert all(3.0 < a / b < 5.0 for a, b in itertools.pairwise(heun))
    assert all(1.6 < a / b < 2.4 for a, b in itertools.pairwise(euler))


def test_euler_and_heun_nfe_and_callback():
    calls = []
    D = lambda x, s: x * 0
    x = torch.ones(3, 2, dtype=torch.float64)
    sig = edm_sigmas(4, 0.1, 1.0)
    counting = lambda x, s: (calls.append(s), D(x, s))[1]
    out = sample_heun(counting, x, sig, callback=lambda i, x, s, d: None)
    assert len(calls) == heun_nfe(4) and torch.allclose(out, torch.zeros_like(out))
    calls.clear()
    sample_heun(counting, x, sig, second_order=False)
    assert len(calls) == heun_nfe(4, second_order=False)


def test_count_calls_counts_every_evaluation(gt):
    """CountCalls: a Heun run costs heun_nfe(steps) evaluations (EDM Algorithm 2: 2 per step, 1 on the last),
    Euler `steps`; predict counts too, so a T14 sampler (which evaluates through predict) costs the same; a
    classifier-free step costs 2 (conditional and null-class evaluations), 1 at guidance weight 0 (T33)."""
    x = gt.sample(16, 5.0, generator=torch.Generator().manual_seed(0))[0].double()
    for steps in (1, 2, 7):
        den = CountCalls(gt.denoiser())
        sample_heun(den, x, edm_sigmas(steps))
        assert den.calls == heun_nfe(steps)
        den.calls = 0
        sample_euler(den, x, edm_sigmas(steps))
        assert den.calls == heun_nfe(steps, second_order=False) == steps
    den = CountCalls(gt.denoiser("point"))
    plain = sample_heun(gt.denoiser("point"), x, edm_sigmas(5))
    assert torch.equal(sample_heun(den, x, edm_sigmas(5)), plain)           # counting changes nothing
    phi = CountCalls(gt.denoiser("point"))
    sample_heun(with_score_mode(phi, "phi"), x, edm_sigmas(5))             # T14: every call is a predict
    assert phi.calls == heun_nfe(5)
    p = phi.predict(x, 0.3)
    assert phi.calls == heun_nfe(5) + 1 and torch.equal(p.mu, gt.denoiser("point").predict(x, 0.3).mu)

    class LabelNet(torch.nn.Module):                     # a class-conditional D(x, σ, y) = x/(1 + σ²) + y
        def forward(self, x, sigma, class_labels=None):
            return x / (1 + sigma ** 2) + class_labels.to(x.dtype)[:, None]

    labels = torch.arange(len(x)) % 3
    counted = CountCalls(LabelNet())
    sample_euler(classifier_free(counted, labels, 3, 0.5), x, edm_sigmas(1))   # one step
    assert counted.calls == 2
    counted.calls = 0
    out = sample_euler(classifier_free(counted, labels, 3, 0.0), x, edm_sigmas(1))
    assert counted.calls == 1                     # w = 0: the conditional model alone; one step to σ = 0 is D
    torch.testing.assert_close(out, LabelNet()(x, 5.0, class_labels=labels), rtol=1e-12, atol=1e-12)


def test_count_calls_passes_the_denoiser_through():
    den = toy_denoiser("diag")
    c = CountCalls(den)
    assert c.head is den.head and c.net is den.net and c.precond is den.precond
    assert c.calls == 0
    assert set(dict(c.named_parameters())) == {"denoiser." + k for k, _ in den.named_parameters()}
    with pytest.raises(AttributeError):
        CountCalls(lambda x, s: x).head


def test_churn_is_reproducible_with_generator(gt):
    x = gt.sample(64, 5.0, generator=torch.Generator().manual_seed(0))[0].double()
    D = gt.denoiser()
    a = sample_heun(D, x, edm_sigmas(8), churn=10, generator=torch.Generator().manual_seed(3))
    b = sample_heun(D, x, edm_sigmas(8), churn=10, generator=torch.Generator().manual_seed(3))
    c = sample_heun(D, x, edm_sigmas(8), churn=10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="churn"):
        sample_heun(D, x, edm_sigmas(8), churn=-1)


def test_guidance_w1_is_main_w0_is_guide_and_linear():
    main = lambda x, s: x * 2.0 + s
    guide = lambda x, s: x - 1.0
    x = torch.randn(5, 2)
    assert torch.equal(Guided(main, guide, 1)(x, 0.3), main(x, 0.3))
    assert torch.equal(Guided(main, guide, 0)(x, 0.3), guide(x, 0.3))
    w = 3.0  # T34: D_bad + w·(D_good − D_bad)
    assert torch.allclose(Guided(main, guide, w)(x, 0.3), guide(x, 0.3) + w * (main(x, 0.3) - guide(x, 0.3)))


@pytest.mark.parametrize("w", [-1, -0.5, float("nan"), float("inf"), "3", True])
def test_guidance_rejects_bad_weight(w):
    with pytest.raises(ValueError, match="guidance weight"):
        Guided(lambda x, s: x, lambda x, s: x, w)


def test_bad_sampler_options():
    with pytest.raises(ValueError, match="steps"):
        edm_sigmas(0)
    with pytest.raises(ValueError, match="sigma_min"):
        edm_sigmas(8, 1.0, 0.5)
    x = torch.zeros(2, 2)
    for grid in ([1.0, 0.0, 0.0], [1.0, 2.0, 0.0], [1.0, 0.5], [float("nan"), 0.0], [1.0]):
        with pytest.raises(ValueError, match="sigmas"):
            sample_heun(lambda x, s: x, x, torch.tensor(grid))
    for kw in ({"churn": float("nan")}, {"s_noise": -1.0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            sample_heun(lambda x, s: x, x, edm_sigmas(4), **kw)


def test_stochastic_sampler_with_exact_denoiser_matches_ground_truth(gt):
    """EDM Algorithm 2 with churn adds noise √(σ̂² − σ²)·ε and still samples p: sample NLL within 0.1
    nats of the ground truth (a wrong noise scale blurs or sharpens the branches)."""
    n = 4096
    g = torch.Generator().manual_seed(7)
    x_init, _ = gt.sample(n, 5.0, generator=g, dtype=torch.float64)
    x = sample_heun(gt.denoiser(), x_init, edm_sigmas(32), churn=40, s_tmin=0.01, s_tmax=1.0, generator=g)
    other, _ = gt.sample(n, generator=g, dtype=torch.float64)
    assert abs(sample_nll(x, gt) - sample_nll(other, gt)) < 0.1
    # with the noise scale doubled the result is measurably off
    bad = sample_heun(gt.denoiser(), x_init, edm_sigmas(32), churn=40, s_tmin=0.01, s_tmax=1.0,
                      s_noise=2.0, generator=torch.Generator().manual_seed(7))
    assert sample_nll(bad, gt) - sample_nll(other, gt) > 0.1
