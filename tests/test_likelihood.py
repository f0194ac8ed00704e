"""The continuous-time ELBO (VDM, THEORY T17/T22) against closed forms on a Gaussian.

Breakages tried (each fails here): diffusion term without the ½; λ'(t) sign flipped; prior KL with
α₁ instead of α₁²; reconstruction with +λ_0; LearnedSchedule without the (ĝ − ĝ(0))/(ĝ(1) − ĝ(0)) rescaling
(endpoints drift).
"""
import math

import pytest
import torch

from gendiff.likelihood import continuous_elbo
from gendiff.process import VP
from gendiff.schedules import LearnedSchedule

F64 = torch.float64
S, D = 0.7, 2


class ExactGaussian(torch.nn.Module):
    """D*(x̃, σ) = x̃·s²/(s² + σ²) for data N(0, s²I)."""

    def forward(self, x, sigma):
        return x * S**2 / (S**2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2)


def closed_form_bound(lam_min, lam_max):
    """E_x of the three terms with the exact denoiser: ½∫ d·s²/(s² + e^(−λ)) dλ, the prior KL, the decoder."""
    lam = torch.linspace(lam_min, lam_max, 400001, dtype=F64)
    diffusion = 0.5 * float(torch.trapezoid(D * S**2 / (S**2 + torch.exp(-lam)), lam))
    a2, s2 = 1 / (1 + math.exp(-lam_min)), 1 / (1 + math.exp(lam_min))
    prior = 0.5 * D * (s2 + a2 * S**2 - 1 - math.log(s2))
    recon = 0.5 * D * (1 + math.log(2 * math.pi) - lam_max)
    return diffusion + prior + recon


def test_bound_is_tight_for_the_exact_model_on_a_gaussian():
    true_nll = 0.5 * D * (math.log(2 * math.pi * S**2) + 1)          # E[−log N(x; 0, s²I)]
    b = closed_form_bound(-12.0, 12.0)
    assert true_nll <= b < true_nll + 1e-4
    assert closed_form_bound(-4.0, 4.0) > b + 0.01                    # narrower endpoints: a looser bound


@pytest.mark.parametrize("schedule", [VP(-12.0, 12.0), LearnedSchedule(-12.0, 12.0),
                                      LearnedSchedule(-12.0, 12.0, hidden=8)], ids=["vp-linear", "learned", "learned-8"])
def test_monte_carlo_elbo_matches_the_closed_form_whatever_the_shape(schedule):
    """Only the endpoints matter (VDM++ §2): linear-λ VP and two random monotone shapes, same endpoints."""
    g = torch.Generator().manual_seed(1)
    n = 100000
    x = S * torch.randn(n, D, generator=g, dtype=F64)
    r = continuous_elbo(ExactGaussian(), x, schedule, generator=g)
    se = float(r["total"].std()) / math.sqrt(n)
    assert abs(float(r["total"].mean()) - closed_form_bound(-12.0, 12.0)) < 4 * se
    torch.testing.assert_close(r["bits_per_dim"], r["total"] / (D * math.log(2)))
    torch.testing.assert_close(r["total"], r["diffusion"] + r["prior"] + r["reconstruction"])


def test_learned_schedule_is_monotone_with_fixed_endpoints():
    sch = LearnedSchedule(-7.0, 9.0)
    t = torch.linspace(0, 1, 1001, dtype=F64)
    gam = sch.gamma(t).detach()
    assert float(gam[0]) == pytest.approx(-9.0) and float(gam[-1]) == pytest.approx(7.0)
    assert bool((gam[1:] > gam[:-1]).all())
    torch.testing.assert_close(sch.lam(t), -gam)
    assert not sch.ends.requires_grad and LearnedSchedule(learn_endpoints=True).ends.requires_grad
    with pytest.raises(ValueError, match="lam_min < lam_max"):
        LearnedSchedule(3.0, 1.0)
