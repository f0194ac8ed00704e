"""Contract tests for the core objects: preconditionings, heads, σ shapes, the Denoiser's wiring, the
wrappers, the exact mixture denoiser, the calibration metric and the multi-seed summary.

Every expected value comes from an analytic oracle: a THEORY equation (T4–T14), a closed-form Gaussian
expectation, or the exact mixture posterior recomputed here component by component (never a number copied
from a previous run). Float64 unless a path is float32 by design (the Evaluator runs models in float32).

Breakages verified: each was made in a scratch copy of the repository (one at a time) and made at least
one test below fail; the test that caught it first is in brackets.

precond.py
- EDM c_skip = σ_d/(σ² + σ_d²), seed 000's typo [test_edm_precond_is_T4_T5]
- EDM closed-form k = σ_d²/(σ² + σ_d²); EDM closed-form c_var with 2σ_d² inside the root [same]
- c_noise = ½ log σ [same]
- base Precond: c_var² = σ² + ½c_out²; k = c_out²/(σ² + 2c_out²) [test_precond_scalings[eps]]
- v-prediction c_out not negated; ε-prediction D = x̃ + σF; x0-prediction c_out = 1 [test_precond_scalings]
- backbone fed x̃ instead of c_in·x̃ [test_denoiser_mean_is_the_parameterisation]
- scalings from the per-example RMS σ instead of per element
  [test_conv_per_element_sigma_scalings_and_c_noise; alone also
  test_confidence_nll_with_per_element_sigma_is_T7_summed]
- source_sigma ignored in the scalings; c_noise from the total σ instead of the diffusion σ
  [test_conv_source_sigma_uses_total_for_scalings_and_diffusion_sigma_for_c_noise; c_noise alone also
  test_conv_noise_map_is_quarter_log_total_sigma]
- noise_map from the diffusion σ instead of the total [test_conv_noise_map_is_quarter_log_total_sigma]
heads.py
- T9: source term without /c_var² [test_head_nll_is_the_gaussian_expectation[none-diagonal]]; T9 without the
  −1 in k(‖F − F*‖² − 1) [test_T9_equals_T7_for_every_precond[edm]]
- S with diagonal e^(+g/2); S upper- instead of lower-triangular; precision SᵀS; covariance S⁻¹S⁻ᵀ
  [test_head_confidence_is_consistent[full]]
- T12 quadratic term S(F − F*) instead of Sᵀ(F − F*) [test_head_nll_is_the_gaussian_expectation[full-none]];
  T12 tr(SSᵀΣ_src) without /c_var² [...[full-diagonal]]
- NoHead silently dropping a returned G; no G-shape check; no error for F only with a head needing G
  [test_backbone_head_mismatch_raises]
- Diag σ_φ² = c_var²e^(−G) [test_head_confidence_is_consistent[diag]]; NoHead variance c_var unsquared
  [...[none]]
- Full T14 score with marginal variances only [test_phi_score_is_T14[full]]; T14 ignoring G [...[diag]]
- diag/no-head NLL ignoring Σ_src [test_head_nll_is_the_gaussian_expectation[none-diagonal]]
- per-example NLL averaged instead of summed [test_head_nll_is_the_gaussian_expectation[none-none]]
- FullHead.confidence (with_mean) keeping only marginal variances [test_guided_predict_and_forward[full]]
- FullHead asking for d² outputs instead of d(d+1)/2 [test_head_outputs]
checks.py
- a [N] σ with N = d read per element [test_as_sigma_accepted_forms; alone
  test_sigma_of_length_N_is_per_example_even_when_N_equals_d]
- a σ with ndim = x.ndim + 1 accepted (e.g. [4, 1, 1] for x [4, 2], which broadcasts)
  [test_as_sigma_rejects_other_shapes_naming_them]
- no 1-D length check (σ [2] for x [4, 2] then fails later with a message naming (2, 1), not (2,)) [same]
- per-example σ as the mean, or the first element, instead of the RMS [test_conv_per_element_sigma_...]
guidance.py
- Guided.predict as D_main + w(D_guide − D_main); predict at w = 0 returning the main model; predict carrying
  the guide's confidence; forward at w = 0 returning the main model [test_guided_predict_and_forward]
scores.py
- hybrid T14 above the threshold; at σ == below too; finite `below` ignored
  [test_phi_score_denoiser_hybrid_switches_per_example[diag]]
- D = x̃ + σ·s instead of σ²·s; PhiScoreDenoiser.forward bypassing T14
  [test_phi_score_denoiser_everywhere[none]]
data/toy.py
- point-cov without E[Σ_k | x̃] [test_exact_denoiser_point_cov_mode]; Σ_φ* without σ²I; within-component
  posterior covariance Σ_k(Σ_k + σ²)⁻¹Σ_k instead of σ²Σ_k(Σ_k + σ²)⁻¹ [test_exact_denoiser_point_mode]
- source mode with the point posterior; source posterior without Cov[m_k | x̃]
  [test_exact_denoiser_source_mode]
- a σ differing within an example accepted [test_exact_denoiser_sigma_forms[point]]
- exact forward x̃ + σ·score [test_exact_denoiser_forward_is_predict_mean[point]]
metrics.py / evaluate.py
- ratio tr(T⁻¹Σ_φ); excess error without subtracting σ²I from the learned Σ_φ
  [test_calibration_metric_synthetic; alone also
  test_calibration_of_the_exact_oracle_and_of_twice_its_variance]
- p90 computed as the median [test_calibration_of_the_no_head_model_is_its_closed_form]
- point-mode target including Σ_k; learned Σ_φ reduced to its diagonal; comparison against another mode's
  optimum [test_calibration_of_the_exact_oracle_and_of_twice_its_variance]
- by_sigma (calibration_by_sigma wired in Evaluator.calibration): var_x0 = diag Σ_φ without − σ², or
  − σ instead of − σ²; x0 of other held-out points (flipped); the fit and measured halves swapped; the readout
  also in source mode [test_by_sigma_readout_of_the_exact_oracle]
report.py
- the per-σ-bin table not appended to calibration_markdown; its gain cell without the summary branch (a
  {"mean", "std"} leaf formatted as a number); _merge keeping seed 0's verdict when the seeds' verdicts differ
  [test_by_sigma_readouts_render_for_one_seed_and_over_seeds]
- an entry None in some seed dropped; population instead of sample std; n counting seeds with None; only the
  first seed used [test_summarize_seeds_keeps_seeds_with_missing_values]
"""
from __future__ import annotations

import math
import re
import statistics

import pytest
import torch
from torch import nn

from gendiff.checks import as_sigma, per_example
from gendiff.data.toy import tree
from gendiff.mixture_eval import Evaluator, SamplerConfig
from gendiff.guidance import Guided
from gendiff.heads import HEADS as HEAD_REGISTRY
from gendiff.heads import (DiagonalHead, FullHead, LearnedVarianceHead, NoHead, Prediction,
                           f_target, make_head, nll_direct, nll_full, nll_stable)
from gendiff.losses import ConfidenceNLL, NoisyBatch
from gendiff.mixture_metrics import calibration
from gendiff.nets.mlp import toy_denoiser
from gendiff.precond import PRECONDS as PRECOND_REGISTRY
from gendiff.precond import Denoiser, EDMPrecond, EpsPrecond, VPrecond, X0Precond
from gendiff.experiments.report import summarize_seeds, write_metrics
from gendiff.schedules import LogNormalSigma
from gendiff.scores import PhiScoreDenoiser, phi_score

F64 = torch.float64
SD = 0.5                                           # σ_data
SIGMAS = torch.logspace(-4, 4, 33, dtype=F64)      # 1e-4 … 1e4, a quarter decade apart
PRECONDS = (EDMPrecond, EpsPrecond, X0Precond, VPrecond)
HEADS = (NoHead, DiagonalHead, FullHead)
LOG_2PI = math.log(2 * math.pi)


@pytest.fixture(scope="module", autouse=True)
def _flush_denormals():
    """The mixture's responsibilities underflow to denormals (100× slower on CPU unless flushed; runtime.py).
    Flushing changes nothing the oracles compare at their tolerances; the previous mode is restored."""
    prev = bool(torch.tensor(1e-40, dtype=torch.float32) * 1 == 0)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(prev)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def re_shape(shape) -> str:
    return re.escape(str(tuple(shape)))


# ---- oracles ------------------------------------------------------------------------------------

def edm_T4_T5(sigma, sd=SD) -> dict:
    """THEORY T4, T5 written out."""
    s2, d2 = sigma ** 2, sd ** 2
    return {"c_skip": d2 / (s2 + d2), "c_out": sigma * sd / torch.sqrt(s2 + d2),
            "c_in": 1 / torch.sqrt(s2 + d2), "c_noise": torch.log(sigma) / 4,
            "c_var": sigma * torch.sqrt(1 + d2 / (s2 + d2)), "k": d2 / (s2 + 2 * d2)}


def skip_out(precond, sigma, sd=SD):
    """(c_skip, c_out) of each parameterisation, from its definition: EDM T4; ε: D = x̃ − σF;
    x0: D = σ_d·F; v: EDM with c_out negated (T21)."""
    e = edm_T4_T5(sigma, sd)
    one = torch.ones_like(sigma)
    return {EDMPrecond: (e["c_skip"], e["c_out"]), EpsPrecond: (one, -sigma), X0Precond: (0 * one, sd * one),
            VPrecond: (e["c_skip"], -e["c_out"])}[precond]


def c_var2(precond, sigma, sd=SD):
    """c_var² = σ² + c_out² (T5 generalised)."""
    return sigma ** 2 + skip_out(precond, sigma, sd)[1] ** 2


def factor_oracle(G: torch.Tensor, d: int) -> torch.Tensor:
    """T12's S written out: diagonal e^(−g_i/2), then the free entries row by row below the diagonal."""
    S = torch.zeros(G.shape[0], d, d, dtype=G.dtype)
    for i in range(d):
        S[:, i, i] = torch.exp(-G[:, i] / 2)
    j = d
    for r in range(d):
        for c in range(r):
            S[:, r, c] = G[:, j]
            j += 1
    return S


def gaussian_expected_nll(mu, cov_phi, x0, sigma, source_cov=None):
    """E_x[−log N(x; μ, Σ_φ)] for x ~ N(x0, σ²I + Σ_src), closed form:
    ½[log det(2πΣ_φ) + tr(Σ_φ⁻¹(σ²I + Σ_src)) + (μ − x0)ᵀΣ_φ⁻¹(μ − x0)]. σ: [N]."""
    N, d = mu.shape
    noise = sigma.view(-1, 1, 1) ** 2 * torch.eye(d, dtype=F64)
    if source_cov is not None:
        noise = noise + source_cov
    e = mu - x0
    trace = torch.linalg.solve(cov_phi, noise).diagonal(0, -2, -1).sum(-1)
    return 0.5 * (torch.logdet(2 * math.pi * cov_phi) + trace + (e * torch.linalg.solve(cov_phi, e)).sum(-1))


# ---- backbones ----------------------------------------------------------------------------------

class FixedNet(nn.Module):
    """A parameter-free backbone for points [N, d]: F and G fixed smooth functions of (c_in·x̃, c_noise).
    g: None (F only), "like" (G shaped like x) or an int (G features per example). Records what it saw."""

    def __init__(self, g=None):
        super().__init__()
        self.g = g

    def forward(self, x_in, c_noise):
        self.seen = (x_in, c_noise)
        c = c_noise.reshape(-1, *([1] * (x_in.ndim - 1)))
        F = torch.sin(2 * x_in + c) + 0.3 * torch.cos(x_in.sum(1, keepdim=True))
        if self.g is None:
            return F
        if self.g == "like":
            return F, 0.9 * torch.cos(3 * x_in - c)
        t = x_in.sum(1, keepdim=True) + c
        return F, 0.8 * torch.cos(torch.arange(1, self.g + 1, dtype=x_in.dtype) * t + 0.5)


def head_net(head, d):
    """The FixedNet whose G matches the head (its declared `outputs`)."""
    return FixedNet({NoHead: None, DiagonalHead: "like", FullHead: head.outputs(d)}[type(head)])


def points(n=6, d=3, seed=0):
    """x0, x̃ and a per-example σ spanning 1e-2 … 10."""
    g = gen(seed)
    x0 = SD * torch.randn(n, d, generator=g, dtype=F64)
    sigma = torch.logspace(-2, 1, n, dtype=F64)
    return x0, x0 + sigma[:, None] * torch.randn(n, d, generator=g, dtype=F64), sigma


def cov_oracle(head, pred, sigma, d):
    """Σ_φ from the head's definition: NoHead c_var²I, Diag diag(c_var²e^G), Full c_var²(SSᵀ)⁻¹ (T6, T12)."""
    cv2 = edm_T4_T5(sigma)["c_var"].view(-1, 1) ** 2
    if isinstance(head, NoHead):
        return torch.diag_embed(cv2.expand(-1, d))
    if isinstance(head, DiagonalHead):
        return torch.diag_embed(cv2 * torch.exp(pred.G))
    S = factor_oracle(pred.G, d)
    return cv2[:, :, None] * torch.linalg.inv(S @ S.transpose(1, 2))


# ---- 1. preconditionings ------------------------------------------------------------------------

def test_edm_precond_is_T4_T5():
    sc = EDMPrecond(SD)(SIGMAS)
    for name, want in edm_T4_T5(SIGMAS).items():
        torch.testing.assert_close(getattr(sc, name), want, rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("precond", PRECONDS, ids=lambda p: p.name)
def test_precond_scalings(precond):
    """c_skip, c_out from the parameterisation's definition; c_var² = σ² + c_out²; k = c_out²/c_var²;
    the unit-variance input scaling c_in = 1/√(σ² + σ_d²) and c_noise = ¼ log σ for all."""
    sc = precond(SD)(SIGMAS)
    c_skip, c_out = skip_out(precond, SIGMAS)
    torch.testing.assert_close(sc.c_skip, c_skip, rtol=1e-12, atol=0)
    torch.testing.assert_close(sc.c_out, c_out, rtol=1e-12, atol=0)
    torch.testing.assert_close(sc.c_var ** 2, SIGMAS ** 2 + sc.c_out ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(sc.k, sc.c_out ** 2 / sc.c_var ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(sc.c_in, 1 / torch.sqrt(SIGMAS ** 2 + SD ** 2), rtol=1e-12, atol=0)
    torch.testing.assert_close(sc.c_noise, SIGMAS.log() / 4, rtol=1e-12, atol=0)


@pytest.mark.parametrize("precond", PRECONDS, ids=lambda p: p.name)
def test_T9_equals_T7_for_every_precond(precond):
    """nll_stable (T9) == nll_direct (T7) with μ = c_skip·x̃ + c_out·F, σ_φ = c_var·e^(G/2), F* = f_target."""
    g = gen(1)
    s = SIGMAS[:, None]
    x0 = SD * torch.randn(len(SIGMAS), 8, generator=g, dtype=F64)
    x_noisy = x0 + s * torch.randn(x0.shape, generator=g, dtype=F64)
    F = torch.randn(x0.shape, generator=g, dtype=F64)
    G = 1.5 * torch.randn(x0.shape, generator=g, dtype=F64)
    sc = precond(SD)(s)
    mu = sc.c_skip * x_noisy + sc.c_out * F
    stable = nll_stable(F, G, f_target(x0, x_noisy, sc), sc)
    direct = nll_direct(mu, sc.c_var * torch.exp(G / 2), x0, s)
    torch.testing.assert_close(stable, direct, rtol=1e-9, atol=1e-9)
    # G = None is G ≡ 0: σ_φ = c_var (T11)
    torch.testing.assert_close(nll_stable(F, None, f_target(x0, x_noisy, sc), sc),
                               nll_direct(mu, sc.c_var.expand_as(mu), x0, s), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("precond", PRECONDS, ids=lambda p: p.name)
def test_denoiser_mean_is_the_parameterisation(precond):
    """Denoiser wiring: the backbone sees c_in·x̃ and c_noise [N]; μ = the parameterisation's formula."""
    x0, _, _ = points(n=9, d=3)
    sigma = torch.logspace(-4, 4, 9, dtype=F64)
    x_noisy = x0 + sigma[:, None] * torch.randn(x0.shape, generator=gen(2), dtype=F64)
    net = FixedNet()
    mu = Denoiser(net, precond(SD))(x_noisy, sigma)
    x_in, c_noise = net.seen
    torch.testing.assert_close(x_in, x_noisy / torch.sqrt(sigma[:, None] ** 2 + SD ** 2), rtol=1e-12, atol=0)
    assert c_noise.shape == (9,)
    torch.testing.assert_close(c_noise, sigma.log() / 4, rtol=1e-12, atol=0)
    F = net(x_in, c_noise)
    s = sigma[:, None]
    r = torch.sqrt(s ** 2 + SD ** 2)
    want = {EDMPrecond: (SD ** 2 * x_noisy + s * SD * r * F) / r ** 2,        # T4: c_skip·x̃ + c_out·F
            EpsPrecond: x_noisy - s * F,
            X0Precond: SD * F,
            VPrecond: (SD ** 2 * x_noisy - s * SD * r * F) / r ** 2}[precond]
    torch.testing.assert_close(mu, want, rtol=1e-10, atol=1e-12)


# ---- 2. heads -----------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_head_outputs(d):
    assert NoHead().outputs(d) == 0
    assert DiagonalHead().outputs(d) == d
    assert FullHead().outputs(d) == d * (d + 1) // 2


def test_backbone_head_mismatch_raises():
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="takes no G"):          # G must not be dropped silently
        Denoiser(FixedNet("like"), head=NoHead())(x, 0.3)
    with pytest.raises(ValueError, match="F only"):
        Denoiser(FixedNet(), head=DiagonalHead()).predict(x, 0.3)
    with pytest.raises(ValueError, match=r"\(4, 6\)"):            # Diag needs G like x, not d(d+1)/2
        Denoiser(FixedNet(6), head=DiagonalHead()).predict(x, 0.3)
    with pytest.raises(ValueError, match=r"\(4, 3\)"):            # Full needs d(d+1)/2 = 6, not d
        Denoiser(FixedNet("like"), head=FullHead()).predict(x, 0.3)
    with pytest.raises(ValueError):
        Denoiser(FixedNet(), head=FullHead()).predict(x, 0.3)
    with pytest.raises(ValueError, match="points"):               # Full is for [N, d] only
        Denoiser(FixedNet("like"), head=FullHead()).predict(torch.randn(2, 3, 4, 4, dtype=F64), 0.3)

    class WrongF(nn.Module):
        def forward(self, x, c):
            return x[:, :2]
    with pytest.raises(ValueError, match="F has shape"):
        Denoiser(WrongF())(x, 0.3)


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.name)
def test_head_confidence_is_consistent(head):
    """variance / covariance / precision / factor / σ_φ of one prediction agree with each other and with
    the head's definition (NoHead c_var², Diag c_var²e^G, Full Σ_φ⁻¹ = SSᵀ/c_var², T12)."""
    head, d = head(), 3
    x0, x_noisy, sigma = points(d=d)
    pred = Denoiser(head_net(head, d), EDMPrecond(SD), head).predict(x_noisy, sigma)
    cov, prec, var = pred.covariance(), pred.precision(), pred.variance()
    eye = torch.eye(d, dtype=F64).expand(len(sigma), d, d)
    torch.testing.assert_close(prec @ cov, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(var, cov.diagonal(0, -2, -1), rtol=1e-12, atol=0)
    torch.testing.assert_close(pred.sigma_phi, var.sqrt(), rtol=1e-12, atol=0)
    want = cov_oracle(head, pred, sigma, d)
    torch.testing.assert_close(cov, want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(prec, torch.linalg.inv(want), rtol=1e-9, atol=1e-12)
    cv2 = edm_T4_T5(sigma)["c_var"].view(-1, 1, 1) ** 2
    S = pred.factor()
    torch.testing.assert_close(S @ S.transpose(1, 2) / cv2, prec, rtol=1e-10, atol=1e-12)
    if isinstance(head, NoHead):
        torch.testing.assert_close(var, cv2.view(-1, 1).expand(-1, d), rtol=1e-12, atol=0)
    if isinstance(head, DiagonalHead):
        torch.testing.assert_close(var, cv2.view(-1, 1) * torch.exp(pred.G), rtol=1e-12, atol=0)
    if isinstance(head, FullHead):
        torch.testing.assert_close(S, factor_oracle(pred.G, d), rtol=0, atol=0)
        So = factor_oracle(pred.G, d)
        torch.testing.assert_close(prec, So @ So.transpose(1, 2) / cv2, rtol=1e-12, atol=0)
        assert not torch.allclose(cov, torch.diag_embed(var))     # a genuinely full covariance


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.name)
def test_phi_score_is_T14(head):
    head, d = head(), 3
    _, x_noisy, sigma = points(d=d)
    pred = Denoiser(head_net(head, d), EDMPrecond(SD), head).predict(x_noisy, sigma)
    want = torch.linalg.solve(cov_oracle(head, pred, sigma, d), pred.mu - x_noisy)
    torch.testing.assert_close(pred.phi_score(), want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(phi_score(pred), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("source", ["none", "diagonal", "full"])
@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.name)
def test_head_nll_is_the_gaussian_expectation(head, source):
    """head.nll(pred, x0, Σ_src) == E_x[−log N(x; μ, Σ_φ)], x ~ N(x0, σ²I + Σ_src), in closed form.
    (Σ_φ diagonal: only Σ_src's diagonal enters the trace, so a full Σ_src is exact for NoHead/Diag too.)"""
    head, d = head(), 3
    x0, x_noisy, sigma = points(d=d)
    g = gen(3)
    A = 0.3 * torch.randn(len(sigma), d, d, generator=g, dtype=F64)
    src = {"none": None, "full": A @ A.transpose(1, 2) + 0.01 * torch.eye(d, dtype=F64)}.get(source)
    if source == "diagonal":
        src = torch.diag_embed(0.1 * torch.rand(len(sigma), d, generator=g, dtype=F64) + 0.01)
    pred = Denoiser(head_net(head, d), EDMPrecond(SD), head).predict(x_noisy, sigma)
    want = gaussian_expected_nll(pred.mu, cov_oracle(head, pred, sigma, d), x0, sigma, src)
    got = head.nll(pred, x0, src)
    assert got.shape == (len(sigma),)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_full_nll_with_diagonal_factor_is_T9_summed():
    """T12 with S = diag(e^(−G/2)) and Σ_src = 0 is T9 summed over elements."""
    d = 3
    x0, x_noisy, sigma = points(d=d)
    sc = EDMPrecond(SD)(sigma[:, None])
    F = torch.randn(x0.shape, generator=gen(4), dtype=F64)
    Gd = torch.randn(x0.shape, generator=gen(5), dtype=F64)
    Gfull = torch.cat([Gd, torch.zeros(len(sigma), d * (d - 1) // 2, dtype=F64)], 1)
    Fs = f_target(x0, x_noisy, sc)
    torch.testing.assert_close(nll_full(F, Gfull, Fs, sc), nll_stable(F, Gd, Fs, sc).sum(1),
                               rtol=1e-12, atol=1e-12)


# ---- 2b. the registry harness: every precond.PRECONDS and every heads.make_head name meets its oracle ----
# (diffusers' SchedulerCommonTest with analytic references: a new entry without an oracle fails the
# `test_every_registered_*` key check and its parametrised case.)

PRECOND_ORACLES = {  # precond.PRECONDS name -> (c_skip, c_out)(σ) from the parameterisation's definition
    "edm": lambda s: skip_out(EDMPrecond, s),
    "eps": lambda s: skip_out(EpsPrecond, s),
    "x0": lambda s: skip_out(X0Precond, s),
    "v": lambda s: skip_out(VPrecond, s),
    # score of the VP latent z = αx̃ (α = 1/√(1 + σ²)): D = x̃ + σ²·∇_x̃ log p = x̃ + σ²·α·F (T13, T21)
    "score-vp": lambda s: (torch.ones_like(s), s ** 2 / torch.sqrt(1 + s ** 2)),
}


def test_every_registered_precond_has_an_oracle():
    """Breakage tried: ScoreVPPrecond with c_out = σ²/√(σ² + σ_d²) (the input scaling's root):
    test_registered_precond_meets_its_oracle[score-vp] failed (the older tests do not list score-vp)."""
    assert set(PRECOND_ORACLES) == set(PRECOND_REGISTRY)


@pytest.mark.parametrize("name", sorted(PRECOND_REGISTRY))
def test_registered_precond_meets_its_oracle(name):
    """c_skip, c_out from the definition; c_var² = σ² + c_out², k = c_out²/c_var², c_in = 1/√(σ² + σ_d²),
    c_noise = ¼ log σ (T5 generalised); the Denoiser's mean is c_skip·x̃ + c_out·F(c_in·x̃, c_noise);
    T9 = T7."""
    pre = PRECOND_REGISTRY[name](SD)
    assert pre.name == name
    sc = pre(SIGMAS)
    c_skip, c_out = PRECOND_ORACLES[name](SIGMAS)
    torch.testing.assert_close(sc.c_skip, c_skip, rtol=1e-12, atol=0)
    torch.testing.assert_close(sc.c_out, c_out, rtol=1e-12, atol=0)
    torch.testing.assert_close(sc.c_var ** 2, SIGMAS ** 2 + c_out ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(sc.k, c_out ** 2 / (SIGMAS ** 2 + c_out ** 2), rtol=1e-12, atol=0)
    torch.testing.assert_close(sc.c_in, 1 / torch.sqrt(SIGMAS ** 2 + SD ** 2), rtol=1e-12, atol=0)
    torch.testing.assert_close(sc.c_noise, SIGMAS.log() / 4, rtol=1e-12, atol=0)
    x0, _, _ = points(n=9, d=3)
    sigma = torch.logspace(-4, 4, 9, dtype=F64)
    x_noisy = x0 + sigma[:, None] * torch.randn(x0.shape, generator=gen(2), dtype=F64)
    net = FixedNet()
    mu = Denoiser(net, pre)(x_noisy, sigma)
    F = net(x_noisy / torch.sqrt(sigma[:, None] ** 2 + SD ** 2), sigma.log() / 4)
    c_skip, c_out = PRECOND_ORACLES[name](sigma[:, None])
    torch.testing.assert_close(mu, c_skip * x_noisy + c_out * F, rtol=1e-10, atol=1e-12)
    s = sigma[:, None]
    G = 1.5 * torch.randn(x0.shape, generator=gen(1), dtype=F64)
    sc = pre(s)
    torch.testing.assert_close(nll_stable(F, G, f_target(x0, x_noisy, sc), sc),
                               nll_direct(mu, torch.sqrt(s ** 2 + c_out ** 2) * torch.exp(G / 2), x0, s),
                               rtol=1e-9, atol=1e-9)


def _cov_none(pred, sigma, d, den):
    return torch.diag_embed((edm_T4_T5(sigma)["c_var"].view(-1, 1) ** 2).expand(-1, d))


def _cov_sigma_only(pred, sigma, d, den):
    """EDM2's u(σ) (networks_edm2.Precond: logvar_linear(logvar_fourier(c_noise))) written out from the
    module's features and weights: u = Σ_j w_j·√2·cos(f_j·ln(σ)/4 + φ_j) + b; σ_φ² = c_var²·e^u per
    element."""
    m = den.head_net
    feats = math.sqrt(2) * torch.cos(torch.outer(sigma.log() / 4, m.freqs) + m.phases)
    u = feats @ m.weight + m.bias
    return torch.diag_embed((edm_T4_T5(sigma)["c_var"] ** 2 * torch.exp(u)).view(-1, 1).expand(-1, d))


# heads.make_head name -> (backbone G, Σ_φ oracle (pred, σ, d, denoiser), has a Gaussian NLL)
HEAD_ORACLES = {
    "none": (None, _cov_none, True),                                          # σ_φ = c_var (T11)
    "diag": ("like",
             lambda p, s, d, _: torch.diag_embed(edm_T4_T5(s)["c_var"].view(-1, 1) ** 2 * torch.exp(p.G)),
             True),                                                           # c_var²·e^G (T6)
    "full": ("full", lambda p, s, d, _: edm_T4_T5(s)["c_var"].view(-1, 1, 1) ** 2
             * torch.linalg.inv(factor_oracle(p.G, d) @ factor_oracle(p.G, d).transpose(1, 2)), True),  # T12
    "excess": ("like", lambda p, s, d, _: torch.diag_embed(                  # σ² + c_out²·e^G (T37)
        s.view(-1, 1) ** 2 + edm_T4_T5(s)["c_out"].view(-1, 1) ** 2 * torch.exp(p.G)), True),
    "sigma-only": (None, _cov_sigma_only, True),                              # c_var²·e^(u(σ)) (EDM2's u)
    "v": ("like", _cov_none, False),   # IDDPM's v (T26): σ_φ = c_var, v = (G + 1)/2, no confidence NLL
}


def test_every_registered_head_has_an_oracle():
    """Breakage tried: LearnedVarianceHead.variance = c_var (unsquared):
    test_registered_head_meets_its_oracle[v] failed (the older head tests do not list 'v');
    ExcessHead.variance = c_var² + c_out²·e^G and SigmaOnlyHead with u = weight·features (bias dropped):
    [excess] and [sigma-only] failed."""
    assert set(HEAD_ORACLES) == set(HEAD_REGISTRY)


@pytest.mark.parametrize("name", sorted(HEAD_REGISTRY))
def test_registered_head_meets_its_oracle(name):
    """Σ_φ, Σ_φ⁻¹, σ_φ and the T14 score of make_head(name) against the head's definition; its NLL against the
    closed-form Gaussian expectation (or a ValueError for a head without one). A head with its own module
    (head.module()) gets random parameters first, so that its G is not the zero of its initialisation."""
    g, cov_fn, has_nll = HEAD_ORACLES[name]
    head, d = make_head(name), 3
    assert head.name == name
    x0, x_noisy, sigma = points(d=d)
    net = FixedNet(head.outputs(d) if g == "full" else g)
    den = Denoiser(net, EDMPrecond(SD), head).double()
    if den.head_net is not None:
        for p in den.head_net.parameters():
            p.data = 0.3 * torch.randn(p.shape, generator=gen(7), dtype=F64)
    pred = den.predict(x_noisy, sigma)
    want = cov_fn(pred, sigma, d, den)
    torch.testing.assert_close(pred.covariance(), want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(pred.precision(), torch.linalg.inv(want), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pred.sigma_phi, want.diagonal(0, -2, -1).sqrt(), rtol=1e-10, atol=0)
    torch.testing.assert_close(pred.phi_score(), torch.linalg.solve(want, pred.mu - x_noisy),
                               rtol=1e-9, atol=1e-12)
    if has_nll:
        torch.testing.assert_close(head.nll(pred, x0), gaussian_expected_nll(pred.mu, want, x0, sigma),
                                   rtol=1e-10, atol=1e-10)
    else:
        with pytest.raises(ValueError, match="no confidence NLL"):
            head.nll(pred, x0)
    if isinstance(head, LearnedVarianceHead):
        torch.testing.assert_close(head.interpolation(pred), (pred.G + 1) / 2, rtol=0, atol=0)


# ---- 3. σ shapes --------------------------------------------------------------------------------

def test_as_sigma_accepted_forms():
    x = torch.randn(4, 2, dtype=F64)
    assert as_sigma(0.3, x).shape == ()
    assert as_sigma(torch.tensor(0.3), x).shape == ()
    s = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.testing.assert_close(as_sigma(s, x), s.double().view(4, 1))
    assert as_sigma(torch.full((4, 2), 0.3), x).shape == (4, 2)
    assert as_sigma(torch.full((4, 1), 0.3), x).shape == (4, 1)
    assert as_sigma(torch.full((1, 2), 0.3), x).shape == (1, 2)
    assert as_sigma(torch.full((2,), 0.3), torch.randn(2, 2)).shape == (2, 1)   # [N] with N = d: per example
    img = torch.randn(3, 2, 4, 4)
    assert as_sigma(torch.ones(3), img).shape == (3, 1, 1, 1)


@pytest.mark.parametrize("shape, x_shape", [
    ((2,), (4, 2)), ((4, 2, 1), (4, 2)), ((3, 2), (4, 2)), ((4, 4), (4, 2)),
    ((4, 1, 1), (4, 2)), ((1, 4, 2), (4, 2)),                       # these two would broadcast to x
    ((3,), (2, 3, 4, 4)), ((2, 3), (2, 3, 4, 4)), ((2, 1, 1), (2, 3, 4, 4))])
def test_as_sigma_rejects_other_shapes_naming_them(shape, x_shape):
    with pytest.raises(ValueError, match=re_shape(shape)):
        as_sigma(torch.full(shape, 0.3), torch.randn(x_shape))
    if len(x_shape) == 2:   # the Denoiser too: no silently broadcast [N, N, d] output
        with pytest.raises(ValueError, match=re_shape(shape)):
            Denoiser(FixedNet("like"), head=DiagonalHead())(torch.randn(x_shape, dtype=F64),
                                                           torch.full(shape, 0.3, dtype=F64))


@pytest.mark.parametrize("bad", [0.0, -0.1, math.inf, math.nan])
def test_as_sigma_rejects_non_positive(bad):
    with pytest.raises(ValueError):
        as_sigma(torch.tensor([0.3, bad]), torch.randn(2, 2))


@pytest.mark.parametrize("head", [NoHead, DiagonalHead], ids=lambda h: h.name)
def test_sigma_of_length_N_is_per_example_even_when_N_equals_d(head):
    """x: [2, 2], σ: [2] is one σ per EXAMPLE: the output equals evaluating each example at its own σ."""
    head = head()
    x = torch.tensor([[0.3, -0.7], [1.1, 0.4]], dtype=F64)
    sigma = torch.tensor([0.05, 2.0], dtype=F64)
    den = Denoiser(head_net(head, 2), EDMPrecond(SD), head)
    pred = den.predict(x, sigma)
    rows = [den.predict(x[i:i + 1], float(sigma[i])) for i in range(2)]
    torch.testing.assert_close(pred.mu, torch.cat([r.mu for r in rows]), rtol=1e-12, atol=0)
    torch.testing.assert_close(pred.variance(), torch.cat([r.variance() for r in rows]), rtol=1e-12, atol=0)
    torch.testing.assert_close(den(x, sigma), pred.mu, rtol=0, atol=0)
    # ... and not the per-element reading (σ along the element dimension), which differs here
    assert not torch.allclose(den(x, sigma.view(1, 2)), pred.mu)


# ---- 4. per-element σ and a conv backbone -------------------------------------------------------

class ConvNet(nn.Module):
    """A small conv backbone for images [N, C, H, W]: c_noise [N] enters by FiLM; F and G have C channels
    each (DiagonalHead: G shaped like x). Records its inputs and outputs."""
    takes_noise_map = False

    def __init__(self, channels=2, hidden=8):
        super().__init__()
        extra = channels if self.takes_noise_map else 0
        self.inp = nn.Conv2d(channels + extra, hidden, 3, padding=1)
        self.film = nn.Linear(1, 2 * hidden)
        self.out = nn.Conv2d(hidden, 2 * channels, 3, padding=1)
        self.channels = channels

    def forward(self, x, c_noise, noise_map=None):
        self.seen = {"x": x, "c_noise": c_noise, "noise_map": noise_map}
        if not (c_noise.ndim == 1 and c_noise.shape[0] == x.shape[0]):
            raise AssertionError(f"c_noise must be [N]; got {tuple(c_noise.shape)}")
        h = self.inp(x if noise_map is None else torch.cat([x, noise_map], 1))
        scale, shift = self.film(c_noise[:, None]).chunk(2, 1)
        h = torch.nn.functional.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        F, G = self.out(h).split(self.channels, 1)
        self.made = (F, G)
        return F, G


class ConvNetNoiseMap(ConvNet):
    takes_noise_map = True


def conv_setup(cls=ConvNet, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = cls().double()
    den = Denoiser(net, EDMPrecond(SD), DiagonalHead())
    g = gen(seed + 10)
    x0 = SD * torch.randn(3, 2, 4, 5, generator=g, dtype=F64)
    sigma = torch.exp(1.5 * torch.randn(3, 2, 4, 5, generator=g, dtype=F64) - 1)   # per element
    x_noisy = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=F64)
    return net, den, x0, x_noisy, sigma


def rms(sigma, n):
    return torch.broadcast_to(sigma, (n, *sigma.shape[1:])).reshape(n, -1).square().mean(1).sqrt()


def test_conv_per_element_sigma_scalings_and_c_noise():
    net, den, _, x_noisy, sigma = conv_setup()
    with torch.no_grad():
        pred = den.predict(x_noisy, sigma)
    e = edm_T4_T5(sigma)
    torch.testing.assert_close(net.seen["x"], e["c_in"] * x_noisy, rtol=1e-12, atol=0)
    assert net.seen["noise_map"] is None
    c_noise = net.seen["c_noise"]
    assert c_noise.shape == (3,)
    torch.testing.assert_close(c_noise, torch.log(rms(sigma, 3)) / 4, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(per_example(sigma, 3), rms(sigma, 3), rtol=1e-12, atol=0)
    F, G = net.made
    torch.testing.assert_close(pred.mu, e["c_skip"] * x_noisy + e["c_out"] * F, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pred.variance(), e["c_var"] ** 2 * torch.exp(G), rtol=1e-12, atol=0)


def test_conv_source_sigma_uses_total_for_scalings_and_diffusion_sigma_for_c_noise():
    net, den, _, x_noisy, src = conv_setup()
    sigma = torch.tensor([0.02, 0.5, 3.0], dtype=F64)                 # diffusion σ, per example
    with torch.no_grad():
        pred = den.predict(x_noisy, sigma, source_sigma=src)
    total = torch.sqrt(sigma.view(-1, 1, 1, 1) ** 2 + src ** 2)
    e = edm_T4_T5(total)
    torch.testing.assert_close(net.seen["x"], e["c_in"] * x_noisy, rtol=1e-12, atol=0)
    torch.testing.assert_close(net.seen["c_noise"], sigma.log() / 4, rtol=1e-12, atol=0)
    F, G = net.made
    torch.testing.assert_close(pred.mu, e["c_skip"] * x_noisy + e["c_out"] * F, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pred.variance(), e["c_var"] ** 2 * torch.exp(G), rtol=1e-12, atol=0)


def test_conv_noise_map_is_quarter_log_total_sigma():
    net, den, _, x_noisy, src = conv_setup(ConvNetNoiseMap)
    sigma = torch.tensor([0.02, 0.5, 3.0], dtype=F64)
    with torch.no_grad():
        den.predict(x_noisy, sigma, source_sigma=src)
        nm = net.seen["noise_map"]
        assert nm.shape == x_noisy.shape
        total = torch.sqrt(sigma.view(-1, 1, 1, 1) ** 2 + src ** 2)
        torch.testing.assert_close(nm, torch.log(total) / 4, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(net.seen["c_noise"], sigma.log() / 4, rtol=1e-12, atol=0)
        den.predict(x_noisy, sigma)                                    # no source: ¼ log σ, broadcast
        nm = net.seen["noise_map"]
        assert nm.shape == x_noisy.shape
        torch.testing.assert_close(nm, (sigma.log() / 4).view(-1, 1, 1, 1).expand_as(x_noisy),
                                   rtol=1e-12, atol=0)


def test_confidence_nll_with_per_element_sigma_is_T7_summed():
    net, den, x0, x_noisy, sigma = conv_setup()
    with torch.no_grad():
        loss = ConfidenceNLL()(den, NoisyBatch(x0, x_noisy, sigma))
    F, G = net.made
    e = edm_T4_T5(sigma)
    mu = e["c_skip"] * x_noisy + e["c_out"] * F
    var = e["c_var"] ** 2 * torch.exp(G)
    t7 = 0.5 * (torch.log(var) + (sigma ** 2 + (mu - x0) ** 2) / var + LOG_2PI)    # THEORY T7 per element
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, t7.sum((1, 2, 3)), rtol=1e-10, atol=1e-10)


# ---- 5. wrappers --------------------------------------------------------------------------------

def trained_looking(head, seed):
    """A toy_denoiser with random weights and unit output gains (not the zero-initialised μ = c_skip·x̃)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        den = toy_denoiser(head).double()
    with torch.no_grad():
        den.net.gain.fill_(1.0)
    return den.eval().requires_grad_(False)


def wrapper_points(n=8):
    g = gen(20)
    x = torch.randn(n, 2, generator=g, dtype=F64)
    sigma = torch.tensor([0.003, 0.01, 0.03, 0.0999, 0.1, 0.3, 1.0, 5.0], dtype=F64)[:n]
    return x, sigma


@pytest.mark.parametrize("head", ["none", "diag", "full"])
def test_guided_predict_and_forward(head):
    main, guide = trained_looking(head, 0), trained_looking(head, 1)
    x, sigma = wrapper_points()
    pm, pg = main.predict(x, sigma), guide.predict(x, sigma)
    for w in (0.0, 1.0, 0.5, 3.0):
        gd = Guided(main, guide, w)
        p = gd.predict(x, sigma)
        torch.testing.assert_close(gd(x, sigma), p.mu, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p.mu, pg.mu + w * (pm.mu - pg.mu), rtol=1e-12, atol=1e-14)
        conf = pg if w == 0 else pm                 # guidance moves the mean; w = 0 is the guide itself
        torch.testing.assert_close(p.covariance(), conf.covariance(), rtol=1e-12, atol=0)
        torch.testing.assert_close(p.variance(), conf.variance(), rtol=1e-12, atol=0)
    torch.testing.assert_close(Guided(main, guide, 1).predict(x, sigma).mu, pm.mu, rtol=0, atol=0)
    torch.testing.assert_close(Guided(main, guide, 0).predict(x, sigma).mu, pg.mu, rtol=0, atol=0)


def phi_denoised(pred, x, sigma):
    """D' = x̃ + σ²·Σ_φ⁻¹(μ − x̃), with Σ_φ from the prediction's covariance."""
    return x + sigma.view(-1, 1) ** 2 * torch.linalg.solve(pred.covariance(), pred.mu - x)


@pytest.mark.parametrize("head", ["none", "diag", "full"])
def test_phi_score_denoiser_everywhere(head):
    den = trained_looking(head, 2)
    x, sigma = wrapper_points()
    p = den.predict(x, sigma)
    wrapped = PhiScoreDenoiser(den)
    q = wrapped.predict(x, sigma)
    torch.testing.assert_close(q.mu, phi_denoised(p, x, sigma), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(wrapped(x, sigma), q.mu, rtol=0, atol=0)
    torch.testing.assert_close(q.covariance(), p.covariance(), rtol=1e-12, atol=0)
    if head == "none":   # σ_φ = c_var > σ: T14 shrinks the step towards μ
        assert not torch.allclose(q.mu, p.mu)


@pytest.mark.parametrize("head", ["diag", "full"])
def test_phi_score_denoiser_hybrid_switches_per_example(head):
    den = trained_looking(head, 3)
    x, sigma = wrapper_points()
    below = 0.1                                         # σ straddles it; σ == below is on the Tweedie side
    p = den.predict(x, sigma)
    wrapped = PhiScoreDenoiser(den, below=below)
    q = wrapped.predict(x, sigma)
    low = (sigma < below)[:, None]
    assert low.any() and (~low).any()
    want = torch.where(low, phi_denoised(p, x, sigma), p.mu)
    torch.testing.assert_close(q.mu, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(wrapped(x, sigma), q.mu, rtol=0, atol=0)
    torch.testing.assert_close(q.covariance(), p.covariance(), rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def gt():
    return tree("A")


def mixture_oracle(gt, x, sigma):
    """The exact posterior of x̃ = x0 + σε under Σ_k φ_k N(m_k, Σ_k), written per component (float64):
    r_k ∝ φ_k N(x̃; m_k, Σ_k + σ²I), E[x0|x̃,k] = m_k + Σ_k P_k⁻¹(x̃ − m_k), Cov[x0|x̃,k] = σ²Σ_k P_k⁻¹."""
    m, C, w = gt.means64, gt.covs64, gt.weights64
    d = m.shape[1]
    P = C[None] + sigma.view(-1, 1, 1, 1) ** 2 * torch.eye(d, dtype=F64)              # [N, K, d, d]
    diff = x[:, None, :] - m[None]
    sol = torch.linalg.solve(P, diff)                                                    # P⁻¹(x̃ − m_k)
    logits = w.log() - 0.5 * (diff * sol).sum(-1) - 0.5 * torch.logdet(P) - 0.5 * d * LOG_2PI
    r = torch.softmax(logits, -1)
    mean_k = m[None] + (C[None] @ sol[..., None]).squeeze(-1)
    cov_k = sigma.view(-1, 1, 1, 1) ** 2 * C[None] @ torch.linalg.inv(P)
    mean = torch.einsum("nk,nkd->nd", r, mean_k)
    dm = mean_k - mean[:, None]
    cov = torch.einsum("nk,nkab->nab", r, cov_k + dm[..., :, None] * dm[..., None, :])
    src_mean = r @ m
    ds = m[None] - src_mean[:, None]
    e_cov = torch.einsum("nk,kab->nab", r, C)
    src_cov = e_cov + torch.einsum("nk,nka,nkb->nab", r, ds, ds)
    return {"r": r, "mean": mean, "cov": cov, "score": -torch.einsum("nk,nkd->nd", r, sol),
            "src_mean": src_mean, "src_cov": src_cov, "e_cov": e_cov}


@pytest.fixture(scope="module")
def exact_case(gt):
    g = gen(30)
    n = 48
    x0, _ = gt.sample(n, generator=g, dtype=F64)
    sigma = torch.logspace(-2.5, 0.5, n, dtype=F64)
    x = x0 + sigma[:, None] * torch.randn(n, 2, generator=g, dtype=F64)
    return x, sigma, mixture_oracle(gt, x, sigma)


def assert_cov_close(a, b, tol):
    """Covariances compared relative to their own scale (σ² at small σ)."""
    scale = torch.linalg.matrix_norm(b).view(-1, 1, 1)
    torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=tol)


@pytest.mark.parametrize("mode", ["point", "source", "point-cov"])
def test_exact_denoiser_forward_is_predict_mean(gt, exact_case, mode):
    x, sigma, _ = exact_case
    den = gt.denoiser(mode)
    torch.testing.assert_close(den(x, sigma), den.predict(x, sigma).mu, rtol=0, atol=1e-10)


def test_exact_denoiser_point_mode(gt, exact_case):
    x, sigma, o = exact_case
    p = gt.denoiser("point").predict(x, sigma)
    s2 = sigma.view(-1, 1) ** 2
    torch.testing.assert_close(p.mu, x + s2 * gt.score(x, sigma), rtol=0, atol=1e-10)       # Tweedie T13
    torch.testing.assert_close(p.mu, o["mean"], rtol=0, atol=1e-10)
    torch.testing.assert_close(o["mean"], x + s2 * o["score"], rtol=0, atol=1e-10)
    eye = torch.eye(2, dtype=F64)
    post = gt.posterior(x, sigma)
    assert_cov_close(p.covariance(), s2[:, :, None] * eye + post.cov, 1e-12)
    assert_cov_close(p.covariance(), s2[:, :, None] * eye + o["cov"], 1e-8)


def test_exact_denoiser_source_mode(gt, exact_case):
    x, sigma, o = exact_case
    p = gt.denoiser("source").predict(x, sigma)
    torch.testing.assert_close(p.mu, gt.source_posterior(x, sigma).mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.mu, o["src_mean"], rtol=0, atol=1e-10)
    eye = torch.eye(2, dtype=F64)
    assert_cov_close(p.covariance(), sigma.view(-1, 1, 1) ** 2 * eye + o["src_cov"], 1e-8)


def test_exact_denoiser_point_cov_mode(gt, exact_case):
    x, sigma, o = exact_case
    p = gt.denoiser("point-cov").predict(x, sigma)
    point = gt.denoiser("point").predict(x, sigma)
    torch.testing.assert_close(p.mu, point.mu, rtol=0, atol=1e-12)
    r = gt.responsibilities(x, sigma)
    extra = torch.einsum("nk,kab->nab", r, gt.covs64)
    assert_cov_close(p.covariance(), point.covariance() + extra, 1e-12)
    assert_cov_close(p.covariance(), point.covariance() + o["e_cov"], 1e-8)


@pytest.mark.parametrize("mode", ["point", "source", "point-cov"])
def test_exact_denoiser_sigma_forms(gt, exact_case, mode):
    x, _, _ = exact_case
    den = gt.denoiser(mode)
    ref = den.predict(x, 0.2)
    for s in (torch.tensor(0.2, dtype=F64), torch.full((len(x),), 0.2, dtype=F64),
              torch.full((len(x), 1), 0.2, dtype=F64), torch.full((len(x), 2), 0.2, dtype=F64)):
        p = den.predict(x, s)
        torch.testing.assert_close(p.mu, ref.mu, rtol=0, atol=1e-12)
        torch.testing.assert_close(p.covariance(), ref.covariance(), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(den(x, s), ref.mu, rtol=0, atol=1e-10)
    bad = torch.full((len(x), 2), 0.2, dtype=F64)
    bad[:, 1] = 0.3
    with pytest.raises(ValueError):
        den.predict(x, bad)
    with pytest.raises(ValueError):
        den(x, bad)


# ---- 6. calibration -----------------------------------------------------------------------------

def test_calibration_metric_synthetic():
    """metrics.calibration on hand-made matrices: identical → errors 0, Spearman 1; target = learned →
    ratio 1; the excess part subtracts σ²I."""
    g = gen(40)
    n, d = 1000, 2
    sigma = torch.exp(torch.randn(n, generator=g, dtype=F64) - 2)
    A = torch.randn(n, d, d, generator=g, dtype=F64)
    B = 0.1 * A @ A.transpose(1, 2) + 0.01 * torch.eye(d, dtype=F64)
    floor = sigma.view(-1, 1, 1) ** 2 * torch.eye(d, dtype=F64)
    out = calibration(floor + B, floor + B, sigma, floor + B, min_points=50)
    for k in ("median_rel_error", "p90_rel_error", "median_rel_error_excess", "p90_rel_error_excess"):
        assert out[k] == 0
    assert out["spearman"] == pytest.approx(1) and out["spearman_excess"] == pytest.approx(1)
    assert out["ratio"] == pytest.approx(1, abs=1e-12)
    out = calibration(floor + 2 * B, floor + B, sigma, 2 * (floor + 2 * B), min_points=50)
    assert out["median_rel_error_excess"] == pytest.approx(1, abs=1e-12)        # ‖2B − B‖/‖B‖
    assert out["ratio"] == pytest.approx(2, abs=1e-12)
    assert out["spearman_excess"] == pytest.approx(1)


@pytest.fixture(scope="module")
def evaluator(gt):
    return Evaluator(gt, seed=0, samples=256, eval_points=4096, sigma_density=LogNormalSigma(-2.4, 1.5),
                     sampler=SamplerConfig(steps=4))


def ratio_terms(ev, mu, cov_phi):
    """tr(Σ_φ⁻¹(σ²I + (μ − x0)(μ − x0)ᵀ))/d per held-out point (T8, point mode)."""
    d = ev.gt.dim
    e = mu.double() - ev.x0
    t = ev.sigma.view(-1, 1, 1) ** 2 * torch.eye(d, dtype=F64) + e[:, :, None] * e[:, None, :]
    return torch.linalg.solve(cov_phi, t).diagonal(0, -2, -1).sum(-1) / d


class ScaledVariance(nn.Module):
    """Another model's mean with its covariance multiplied by `factor`."""

    def __init__(self, den, factor):
        super().__init__()
        self.den, self.factor = den, factor

    def predict(self, x, sigma):
        p = self.den.predict(x, sigma)
        return Prediction(x, p.mu, cov=self.factor * p.covariance())

    def forward(self, x, sigma):
        return self.predict(x, sigma).mu


def test_calibration_of_the_exact_oracle_and_of_twice_its_variance(evaluator, gt):
    ev = evaluator
    oracle = gt.denoiser("point")
    out = ev.calibration(oracle, "point")
    # learned = exact up to the float32 of the held-out pass
    for k in ("median_rel_error", "p90_rel_error", "median_rel_error_excess", "p90_rel_error_excess"):
        assert out[k] < 1e-4, (k, out[k])
    assert out["spearman"] > 0.9999
    assert out["spearman_excess"] > 0.9999 and len(out["spearman_excess_by_bin"]) >= 4
    # ratio: E[tr(Σ*⁻¹(σ²I + eeᵀ))]/d = 1 (E[eeᵀ | x̃] = Cov[x0 | x̃]); within Monte Carlo error
    terms = ratio_terms(ev, oracle(ev.x_noisy, ev.sigma), ev.optimum("point"))
    se = float(terms.std() / math.sqrt(len(terms)))
    assert 0 < se < 0.05
    assert abs(out["ratio"] - float(terms.mean())) < 0.1 * se
    assert abs(out["ratio"] - 1) < 4 * se, (out["ratio"], se)
    for label, v in out["ratio_by_sigma"].items():
        lo, hi = (float(t) for t in label.strip("[)").split(","))
        m = (ev.sigma >= lo) & (ev.sigma < hi)
        if int(m.sum()) > 100:
            assert abs(v - 1) < 4 * float(terms[m].std() / math.sqrt(int(m.sum()))), (label, v)
    twice = ev.calibration(ScaledVariance(oracle, 2.0), "point")
    assert twice["ratio"] == pytest.approx(out["ratio"] / 2, rel=1e-6)
    assert abs(twice["ratio"] - 0.5) < 4 * se / 2
    assert twice["median_rel_error"] == pytest.approx(1, abs=1e-3)               # ‖2Σ − Σ‖/‖Σ‖


def test_calibration_of_the_no_head_model_is_its_closed_form(evaluator, gt):
    """σ_φ = c_var: excess Σ_φ − σ²I = c_out²I against Cov[x0 | x̃]; ratio = E[tr(σ²I + eeᵀ)]/(d·c_var²)."""
    ev = evaluator
    model = trained_looking("none", 5).float()
    out = ev.calibration(model, "point")
    s = ev.sigma
    e = edm_T4_T5(s)
    c_out2, c_var2_ = e["c_out"] ** 2, e["c_var"] ** 2
    torch.testing.assert_close(c_out2, s ** 2 * SD ** 2 / (s ** 2 + SD ** 2), rtol=1e-12, atol=0)
    post = gt.posterior(ev.x_noisy, s).cov
    eye = torch.eye(2, dtype=F64)
    rel_ex = torch.linalg.matrix_norm(c_out2.view(-1, 1, 1) * eye - post) / torch.linalg.matrix_norm(post)
    exact = s.view(-1, 1, 1) ** 2 * eye + post
    rel = torch.linalg.matrix_norm(c_var2_.view(-1, 1, 1) * eye - exact) / torch.linalg.matrix_norm(exact)
    assert out["median_rel_error_excess"] == pytest.approx(float(rel_ex.median()), rel=1e-3)
    assert out["p90_rel_error_excess"] == pytest.approx(float(torch.quantile(rel_ex, 0.9)), rel=1e-3)
    assert out["median_rel_error"] == pytest.approx(float(rel.median()), rel=1e-3)
    assert out["p90_rel_error"] == pytest.approx(float(torch.quantile(rel, 0.9)), rel=1e-3)
    with torch.no_grad():
        mu = model(ev.x_noisy.float(), ev.sigma.float()[:, None]).double()
    ratio = (2 * s ** 2 + (mu - ev.x0).square().sum(1)) / (2 * c_var2_)
    assert out["ratio"] == pytest.approx(float(ratio.mean()), rel=1e-4)
    assert out["median_rel_error_excess"] > 0.1                                  # σ alone is not the optimum
    # σ alone still ranks the excess within quarter-decade bins, but scores exactly 0 once σ is partialled out
    assert out["spearman_excess"] > 0.2
    assert out["partial_spearman_excess"] == 0.0
    assert all(v == 0.0 for v in out["partial_spearman_excess_by_bin"].values())


def test_by_sigma_readout_of_the_exact_oracle(evaluator, gt):
    """Evaluator.calibration's per-σ-bin readout of Var[x0 | x̃] (calibration.calibration_by_sigma) on the
    exact posterior: E[(μ − x0)²/V | x̃] = 1 for μ = E[x0 | x̃], V = Var[x0 | x̃] per element, whatever the
    (non-Gaussian) posterior, so z2_mean is 1 within its sampling error; V is the best Gaussian variance of
    any function of x̃, so the constant never wins; nothing is floored in float32. Checked against the readout
    recomputed here in float64 on the odd-indexed held-out points of each bin."""
    ev = evaluator
    out = ev.calibration(gt.denoiser("point"), "point")["by_sigma"]
    assert out["examples_fit"] == out["examples_eval"] == len(ev.sigma) // 2 and len(out["bins"]) >= 4
    post = gt.posterior(ev.x_noisy, ev.sigma)
    V = torch.diagonal(post.cov, dim1=-2, dim2=-1)
    z2 = (post.mean - ev.x0).square() / V
    measured = torch.arange(len(ev.sigma)) % 2 == 1
    resolved = 0
    for label, row in out["bins"].items():
        m = measured & (ev.sigma >= row["sigma_lo"]) & (ev.sigma < row["sigma_hi"])
        assert row["examples"] == int(m.sum()) >= 100 and row["head"]["floored_share"] == 0, label
        z = z2[m].flatten()
        assert row["head"]["z2_mean"] == pytest.approx(float(z.mean()), rel=1e-3), label
        assert abs(float(z.mean()) - 1) < 4 * float(z.std()) / math.sqrt(len(z)), label
        g = row["gain"]["constant"]
        assert g["nll"] > -4 * g["nll_sd"], (label, g)
        resolved += g["verdict"] == "head better"
    assert resolved >= 2
    assert "by_sigma" not in ev.calibration(gt.denoiser("source"), "source")  # its excess is not Var[x0 | x̃]


# ---- 7. multi-seed summary ----------------------------------------------------------------------

BINS = ("[0, 0.01)", "[0.01, 0.1)", "[0.1, 1)", "[1, inf)")


def fake_seed(seed, se_bins, spearman_excess, ratio_bins, mmd_ratio):
    """A result shaped like run_ablation's, with the given per-bin values (None: missing in this seed)."""
    def cal(scale):
        return {"median_rel_error": 0.1 * scale, "p90_rel_error": 0.2 * scale,
                "median_rel_error_excess": 0.3 * scale, "p90_rel_error_excess": 0.4 * scale,
                "spearman": 0.9, "spearman_excess": spearman_excess,
                "spearman_excess_by_bin": {"[0.01, 0.0178)": 0.5 + seed / 10},
                "ratio": 1.0 + seed / 10, "ratio_by_sigma": dict(zip(BINS, ratio_bins))}

    def sample_metrics(base):
        return {"sample_nll": base, "median_nll": base - 1, "outlier_rate": 0.01 * (seed + 1), "mmd": 1e-3,
                "nonfinite": 0.0, "score_error": 0.5 + seed, "score_error_by_sigma": dict(zip(BINS, se_bins))}

    unguided = {**sample_metrics(-1.0 - seed), "nfe": 7, "calibration": cal(1 + seed)}
    autoguided = {**sample_metrics(-2.0 - seed), "nfe": 14}
    return {
        "runs": {"confidence": {"unguided": unguided, "autoguided": autoguided}},
        "reference": {"ground-truth": {"sample_nll": -3.0 + seed, "median_nll": -2.0, "outlier_rate": 0.01,
                                       "mmd": 0.0, "nonfinite": 0.0, "nfe": 0},
                      "exact-denoiser": {**sample_metrics(-3.0), "nfe": 7, "calibration": cal(0.0)}},
        "guidance_effect": {"confidence": {"mmd_ratio": mmd_ratio, "outlier_change": 0.1,
                                           "sample_nll_change": -1.0, "median_nll_change": -1.0}},
        "config": {"seed": seed, "classes": "A", "samples": 16, "guidance": 3.0, "guide": "snapshot",
                   "train": {"iterations": 1, "batch": 2}, "sampler": {"steps": 4, "init": "exact"}},
        "timings": {"total_s": 1.0 + seed, "runs": {}},
    }


def test_summarize_seeds_keeps_seeds_with_missing_values(tmp_path):
    a = fake_seed(0, [None, 0.2, 0.3, 0.4], 0.8, [None, 1.1, 0.9, 1.0], None)
    b = fake_seed(1, [0.15, 0.25, None, 0.45], None, [1.2, 1.3, 0.8, None], 2.0)
    out = summarize_seeds([a, b])

    def check(v, values):
        present = [x for x in values if x is not None]
        assert v["n"] == len(present) and v["values"] == values, v
        assert v["mean"] == pytest.approx(statistics.mean(present))
        assert v["std"] == pytest.approx(statistics.stdev(present) if len(present) > 1 else 0.0)

    ung = out["runs"]["confidence"]["unguided"]
    assert set(ung["score_error_by_sigma"]) == set(BINS)
    for i, b_ in enumerate(BINS):
        check(ung["score_error_by_sigma"][b_], [[None, 0.2, 0.3, 0.4][i], [0.15, 0.25, None, 0.45][i]])
        check(ung["calibration"]["ratio_by_sigma"][b_], [[None, 1.1, 0.9, 1.0][i], [1.2, 1.3, 0.8, None][i]])
    check(ung["calibration"]["spearman_excess"], [0.8, None])
    check(ung["calibration"]["ratio"], [1.0, 1.1])
    check(ung["calibration"]["spearman_excess_by_bin"]["[0.01, 0.0178)"], [0.5, 0.6])
    check(ung["score_error"], [0.5, 1.5])
    check(out["runs"]["confidence"]["autoguided"]["sample_nll"], [-2.0, -3.0])
    check(out["reference"]["exact-denoiser"]["calibration"]["median_rel_error"], [0.0, 0.0])
    check(out["reference"]["ground-truth"]["sample_nll"], [-3.0, -2.0])
    # the guidance effect is recomputed per seed from the runs, then summarised
    check(out["guidance_effect"]["confidence"]["mmd_change"], [0.0, 0.0])
    check(out["guidance_effect"]["confidence"]["sample_nll_change"], [-1.0, -1.0])
    assert ung["nfe"] == 7 and out["runs"]["confidence"]["autoguided"]["nfe"] == 14
    assert out["reference"]["ground-truth"]["nfe"] == 0
    assert out["config"]["seed"] == [0, 1]
    assert len(out["timings"]["seeds"]) == 2 and out["timings"]["total_s"] == pytest.approx(3.0)
    # a value missing in every seed stays missing, and the summary can be written
    c = fake_seed(2, [None, 0.2, 0.3, 0.4], None, [None, 1.0, 1.0, 1.0], None)
    out2 = summarize_seeds([a, c])
    assert out2["runs"]["confidence"]["unguided"]["score_error_by_sigma"]["[0, 0.01)"] is None
    assert out2["runs"]["confidence"]["unguided"]["calibration"]["spearman_excess"]["n"] == 1
    write_metrics(out, str(tmp_path))
    (tmp_path / "two").mkdir()
    write_metrics(out2, str(tmp_path / "two"))
    assert (tmp_path / "metrics.md").read_text().count("±") > 10


def test_by_sigma_readouts_render_for_one_seed_and_over_seeds(tmp_path):
    """calibration_markdown renders the per-σ-bin readout of one seed (gain ± bootstrap sd and its verdict)
    and of a two-seed summary (mean ± std over seeds); a verdict that differs by seed keeps each seed's."""
    from gendiff.calibration import calibration_by_sigma
    from gendiff.experiments.report import calibration_markdown

    def res(seed, scale):
        g = torch.Generator().manual_seed(seed)
        v = torch.linspace(0.05, 1, 30, dtype=F64).repeat(40, 1)
        x0 = torch.randn(40, 30, generator=g, dtype=F64) * v.sqrt()
        cal = {"ratio": 1.0, "ratio_by_sigma": {"[0, inf)": 1.0},
               "by_sigma": calibration_by_sigma(torch.zeros_like(x0), scale * v, x0, torch.full((40,), 0.5),
                                                (0.1, 1.0), fit=torch.arange(40) % 2 == 0)}
        return {"runs": {"r": {"unguided": {"calibration": cal, "nfe": 7}}}, "reference": {},
                "guidance_effect": {}, "config": {"seed": seed}, "timings": {"total_s": 1.0}}
    one, other = res(0, 1.0), res(1, 30.0)
    verdicts = [r["runs"]["r"]["unguided"]["calibration"]["by_sigma"]["bins"]["[0.1, 1)"]["gain"]["constant"]
                ["verdict"] for r in (one, other)]
    assert verdicts == ["head better", "baseline better"]
    md = calibration_markdown(one)
    assert "gain over const." in md and "(head)" in md and "| r | [0.1, 1) | 0.00% |" in md
    out = summarize_seeds([one, other])
    row = out["runs"]["r"]["unguided"]["calibration"]["by_sigma"]["bins"]["[0.1, 1)"]
    assert row["gain"]["constant"]["verdict"]["values"] == verdicts
    assert row["gain"]["constant"]["nll"]["n"] == 2 and row["head"]["reliability"]["mse"]["n"] == 2
    md = calibration_markdown(out)
    assert "(seeds)" in md and md.count("| r | [0.1, 1) |") == 1


def test_summarize_seeds_keeps_bins_that_differ_between_seeds():
    """Within-bin Spearman bins depend on the held-out σ of each seed: the summary keeps the union."""
    from gendiff.experiments.report import summarize_seeds

    def res(s, bins):
        return {"runs": {"r": {"unguided": {"calibration": {"spearman_excess_by_bin": bins}, "nfe": 7}}},
                "reference": {}, "guidance_effect": {}, "config": {"seed": s}, "timings": {"total_s": 1.0}}
    out = summarize_seeds([res(0, {"[0.01, 0.0178)": .5, "[0.0178, 0.0316)": .6}),
                           res(1, {"[0.0178, 0.0316)": .7, "[0.0316, 0.0562)": .8})])
    bins = out["runs"]["r"]["unguided"]["calibration"]["spearman_excess_by_bin"]
    assert set(bins) == {"[0.01, 0.0178)", "[0.0178, 0.0316)", "[0.0316, 0.0562)"}
    assert bins["[0.0178, 0.0316)"]["n"] == 2 and bins["[0.01, 0.0178)"]["n"] == 1
    assert bins["[0.0178, 0.0316)"]["mean"] == pytest.approx(0.65)


def test_exact_denoiser_accepts_constant_per_element_sigma_in_any_dimension():
    import numpy as np
    from gendiff.data.toy import GaussianMixture
    gm = GaussianMixture([1.0], np.zeros((1, 3)), np.eye(3)[None])
    x = torch.zeros(1, 3, dtype=torch.float64)
    a = gm.denoiser("point").predict(x, torch.full((1, 3), 0.3, dtype=torch.float64))
    b = gm.denoiser("point").predict(x, 0.3)
    torch.testing.assert_close(a.cov, b.cov)


def test_guidance_effect_survives_missing_values():
    """A diverged run's MMD² is written as null (strict JSON): the guidance effect reports None, no crash."""
    from gendiff.experiments.report import guidance_effect, guidance_markdown
    runs = {"r": {"unguided": {"mmd": None, "outlier_rate": 0.1, "sample_nll": 1.0, "median_nll": -1.0},
                  "autoguided": {"mmd": 2e-3, "outlier_rate": 0.05, "sample_nll": 0.5, "median_nll": -1.2}}}
    eff = guidance_effect(runs)["r"]
    assert eff["mmd_change"] is None and eff["outlier_change"] == pytest.approx(-0.5)
    assert eff["median_nll_change"] == pytest.approx(-0.2)
    md = guidance_markdown({"runs": runs, "guidance_effect": {"r": eff}})
    # an all-missing column is hidden
    assert "| r | autoguided vs unguided |" in md and "MMD² change" not in md


def test_run_registry_and_option_errors():
    from dataclasses import replace as dc_replace

    from gendiff.experiments import ablate
    from gendiff.samplers import sample_heun
    from gendiff.schedules import edm_sigmas
    bad = dc_replace(ablate.TOY_RECIPES["confidence-full-hybrid"], head="diag")
    old = ablate.TOY_RECIPES["confidence-full-hybrid"]
    ablate.TOY_RECIPES["confidence-full-hybrid"] = bad
    try:
        with pytest.raises(ValueError, match="reuses model 'confidence-full'"):
            ablate.AblateConfig(runs=("confidence-full-hybrid",)).validate()
    finally:
        ablate.TOY_RECIPES["confidence-full-hybrid"] = old
    assert isinstance(Denoiser(torch.nn.Identity(), "eps").precond, EpsPrecond)
    with pytest.raises(ValueError, match="precond='bogus' is not allowed"):
        Denoiser(torch.nn.Identity(), "bogus")
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="s_tmax"):
        sample_heun(lambda x, s: x, x, edm_sigmas(4), churn=1.0, s_tmin=1.0, s_tmax=0.5)
    with pytest.raises(ValueError, match="below=True"):
        PhiScoreDenoiser(torch.nn.Identity(), below=True)
