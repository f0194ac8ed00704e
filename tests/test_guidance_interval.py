"""The guidance interval (Kynkäänniemi et al. 2024) on `Guided` (autoguidance, T34) and `classifier_free`
(T33): guidance only for σ_lo ≤ σ ≤ σ_hi, the main model alone elsewhere.

Breakages tried (each fails here): the interval ignored (the outside tests); main and guided swapped in the
per-example choice (the mixed batch); σ_hi excluded (`<` instead of `<=`, the boundary test); w applied
outside the interval as well; the guide called for a batch wholly outside (the call count).
"""
import math

import pytest
import torch

from gendiff.guidance import Conditioned, Guided, check_interval, classifier_free
from gendiff.nets.mlp import toy_denoiser
from gendiff.precond import Denoiser
from gendiff.scores import CountCalls

F64 = torch.float64
SIGMA = torch.tensor([0.003, 0.01, 0.1, 0.3, 1.0, 2.0, 5.0, 80.0], dtype=F64)


def model(seed, head="diag"):
    torch.manual_seed(seed)
    m = toy_denoiser(head, width=16, hidden_layers=1).double()
    with torch.no_grad():
        m.net.gain.fill_(1.0)                          # F and G not 0: main and guide differ
    return m.eval()


def points(n=8):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)


def guided_formula(main, guide, w, x, s):
    return guide(x, s) + w * (main(x, s) - guide(x, s))


@pytest.mark.parametrize("interval", [None, (0.1, 2.0), (100.0, 200.0)])
def test_weight_one_autoguidance_is_the_main_model(interval):
    main, guide = model(0), model(1)
    x = points()
    g = Guided(main, guide, 1.0, interval)
    assert torch.equal(g(x, SIGMA), main(x, SIGMA))
    assert torch.equal(g.predict(x, SIGMA).mu, main(x, SIGMA))


def test_an_interval_outside_every_sigma_is_the_main_model_and_never_calls_the_guide():
    main, guide = model(0), model(1)
    counted = CountCalls(guide)
    x = points()
    for interval in ((100.0, math.inf), (0.0, 0.001)):
        for w in (0.0, 0.5, 3.0):
            g = Guided(main, counted, w, interval)
            assert torch.equal(g(x, SIGMA), main(x, SIGMA))
            p, pm = g.predict(x, SIGMA), main.predict(x, SIGMA)
            assert torch.equal(p.mu, pm.mu) and torch.equal(p.variance(), pm.variance())
            assert torch.equal(g(x, 5.0), main(x, 5.0))                 # a scalar σ, as the samplers pass it
    assert counted.calls == 0


def test_inside_the_interval_is_the_guided_formula_and_a_mixed_batch_is_decided_per_example():
    """Every σ inside: D_guide + w·(D_main − D_guide) (T34); a batch partly inside: that per example, the
    main model elsewhere, with the interval's ends inside; predict keeps the main model's confidence."""
    main, guide = model(0), model(1)
    x = points()
    w = 2.5
    everywhere = Guided(main, guide, w, (0.0, math.inf))
    torch.testing.assert_close(everywhere(x, SIGMA), guided_formula(main, guide, w, x, SIGMA), rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(everywhere(x, SIGMA), Guided(main, guide, w)(x, SIGMA), rtol=0, atol=0)
    mixed = Guided(main, guide, w, (0.1, 2.0))
    inside = (SIGMA >= 0.1) & (SIGMA <= 2.0)
    assert inside.tolist() == [False, False, True, True, True, True, False, False]   # both ends inside
    expect = torch.where(inside[:, None], guided_formula(main, guide, w, x, SIGMA), main(x, SIGMA))
    torch.testing.assert_close(mixed(x, SIGMA), expect, rtol=1e-12, atol=1e-14)
    p = mixed.predict(x, SIGMA)
    torch.testing.assert_close(p.mu, expect, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.variance(), main.predict(x, SIGMA).variance(), rtol=0, atol=0)
    for s in (0.1, 2.0, 0.05, 3.0):                                      # scalar σ: the ends inside
        want = guided_formula(main, guide, w, x, s) if 0.1 <= s <= 2.0 else main(x, s)
        torch.testing.assert_close(mixed(x, s), want, rtol=1e-12, atol=1e-14)


class LabelNet(torch.nn.Module):
    """F depends on the class label (num_classes = 3, ∅ = 3)."""

    def forward(self, x, c_noise, class_labels):
        return x * (1 + class_labels[:, None].to(x.dtype)) * 0.1 + c_noise[:, None] * 0.01


def test_classifier_free_guidance_with_an_interval():
    """CFG (T33) w = 0 is the conditional model at every σ; with an interval, (1 + w)·D(y) − w·D(∅) inside and
    the conditional model outside."""
    den = Denoiser(LabelNet(), 0.5)
    x, y = points(), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    cond = Conditioned(den, y)(x, SIGMA)
    uncond = Conditioned(den, torch.full_like(y, 3))(x, SIGMA)
    assert torch.equal(classifier_free(den, y, 3, 0.0, (0.1, 2.0))(x, SIGMA), cond)
    inside = ((SIGMA >= 0.1) & (SIGMA <= 2.0))[:, None]
    w = 4.0
    torch.testing.assert_close(classifier_free(den, y, 3, w, (0.1, 2.0))(x, SIGMA),
                               torch.where(inside, (1 + w) * cond - w * uncond, cond), rtol=1e-12, atol=1e-14)
    assert torch.equal(classifier_free(den, y, 3, w, (90.0, 100.0))(x, SIGMA), cond)


@pytest.mark.parametrize("bad", [(1.0, 0.5), (-0.1, 1.0), (0.2, 0.2), (0.0, math.nan), (1.0,), "0.1,2",
                                 (True, 2.0)])
def test_bad_intervals(bad):
    with pytest.raises(ValueError, match="guidance interval"):
        check_interval(bad)
    with pytest.raises(ValueError, match="guidance interval"):
        Guided(model(0), model(1), 2.0, bad)
