"""Progressive distillation (THEORY T35; gendiff/distill.py, schedules.distill_sigmas / GridSteps) and
`gendiff distill` (experiments/distill.py): the target against the closed form on a Gaussian, the
truncated-SNR weight, the confidence head's NLL of D*, a tiny student trained through the one loop, and the
command's round folders.

The oracle: for data N(m, s²) the exact denoiser is D(x; σ) = m + a(σ)(x − m), a = s²/(s² + σ²), so one DDIM
step σ_t → σ_s multiplies x − m by r + (1 − r)·a(σ_t), r = σ_s/σ_t, and everything in T35 is affine in
x_t − m.
"""
import copy
import json
import math
import os
import re

import pytest
import torch
from torch import nn

from gendiff.cli import main
from gendiff.data.sources import DataSource, ToyBatches
from gendiff.data.toy import GaussianMixture, tree
from gendiff.distill import DistillationLoss, ddim_step, snr_weight, two_step_target
from gendiff.experiments import distill as distill_cmd
from gendiff.experiments import runfolder
from gendiff.experiments.config import resolve, to_toml
from gendiff.experiments.kinds import load_run
from gendiff.heads import nll_direct
from gendiff.io import generator
from gendiff.losses import NoisyBatch
from gendiff.nets.mlp import toy_denoiser
from gendiff.precond import Denoiser
from gendiff.schedules import GridSteps, distill_sigmas
from gendiff.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
M, S = 0.3, 0.7                      # the 1-D Gaussian N(M, S²) of the closed-form tests


def gaussian_teacher(dim=1):
    """The exact denoiser of N(M, S²·I) in `dim` dimensions."""
    cov = (S * S * torch.eye(dim, dtype=F64)).tolist()
    return GaussianMixture([1.0], [[M] * dim], [cov]).denoiser("point")


def a(sigma):
    return S * S / (S * S + sigma * sigma)


def grid_batch(loss, n=256, seed=0, dim=1):
    """x_t = x0 + σ_t·ε at σ_t drawn from the student's grid (float64 points; σ as the loop draws it)."""
    g = torch.Generator().manual_seed(seed)
    sigma = loss.density.sample(n, g).to(F64)
    x0 = M + S * torch.randn(n, dim, generator=g, dtype=F64)
    return NoisyBatch(x0, x0 + sigma[:, None] * torch.randn(n, dim, generator=g, dtype=F64), sigma)


def closed_form(sigma_t, sigma_m, sigma_s):
    """(c, d*): x_s^T − m = c·(x_t − m) after the exact model's two Euler steps, D* − m = d*·(x_t − m)."""
    r1, r2, r = sigma_m / sigma_t, sigma_s / sigma_m, sigma_s / sigma_t
    c = (r1 + (1 - r1) * a(sigma_t)) * (r2 + (1 - r2) * a(sigma_m))
    return c, (c - r) / (1 - r)


# ---- grids --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 32])
def test_distill_sigmas_nest_and_follow_edm_rho_spacing(n):
    """distill_sigmas(2N)[::2] is distill_sigmas(N) exactly (each teacher lands on its student's points),
    σ_0 = σ_max, a trailing 0, σ^(1/ρ) linear in i/N with σ(1) = σ_min (never reached).
    Breakage tried: i/(steps − 1) as in edm_sigmas (the grids do not nest)."""
    s, t = distill_sigmas(n, 0.002, 5.0, 7.0), distill_sigmas(2 * n, 0.002, 5.0, 7.0)
    assert torch.equal(t[::2], s)
    assert s.shape == (n + 1,) and s[-1] == 0 and abs(float(s[0]) - 5.0) < 1e-12
    u = torch.arange(n + 1, dtype=F64) / n
    expect = (5.0 ** (1 / 7) + u * (0.002 ** (1 / 7) - 5.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(s[:-1], expect[:-1], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="steps"):
        distill_sigmas(0)


def test_grid_steps_draws_the_student_points_and_maps_them_back():
    """GridSteps draws only the grid's points (each of them, never the trailing 0), uniformly, and `index`
    maps a draw back to its position; σ off the grid and a bad grid are ValueErrors.
    Breakages tried: drawing from the whole grid including 0 (the zero count fails)."""
    grid = distill_sigmas(4)
    d = GridSteps(grid)
    s = d.sample(4000, torch.Generator().manual_seed(0))
    counts = torch.stack([(s == v).sum() for v in grid[:-1].float()])
    assert int(counts.sum()) == 4000 and int(counts.min()) > 850          # ≈ 1000 each, binomial sd ≈ 27
    assert torch.equal(grid[:-1].float()[d.index(s)], s)
    with pytest.raises(ValueError, match="not a point of GridSteps"):
        d.index(torch.tensor([0.123]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        GridSteps([1.0, 2.0, 0.0])


# ---- T35 against the closed form --------------------------------------------------------------------------

def test_target_is_two_euler_steps_of_the_exact_gaussian_ode():
    """(a) With the exact denoiser of N(m, s²) as the teacher (teacher 8 steps, student 4), the target D* is
    m + (c − r)/(1 − r)·(x_t − m), c the product of the two exact Euler steps' factors (closed_form), at every
    σ_t of the student's grid; two_step_target's landing point is m + c·(x_t − m).
    Breakages tried: ddim_step with x and D swapped; the second teacher step taken from x_t instead of x_m;
    σ_m read one grid point too far (t[i + 2]); D* divided by (1 + r): each fails here."""
    loss = DistillationLoss(gaussian_teacher(), distill_sigmas(8, 0.002, 5.0, 7.0), head_loss="none")
    b = grid_batch(loss)
    s_t, s_m, s_s = (v.to(F64) for v in loss.steps(b.sigma))
    c, d_star = closed_form(s_t, s_m, s_s)
    assert len(torch.unique(s_t)) == 4 and torch.equal(s_t, b.sigma)
    torch.testing.assert_close(loss.target(b.x_noisy, b.sigma), M + d_star[:, None] * (b.x_noisy - M),
                               rtol=1e-12, atol=1e-12)
    _, x_s = two_step_target(gaussian_teacher(), b.x_noisy, s_t, s_m, s_s)
    torch.testing.assert_close(x_s, M + c[:, None] * (b.x_noisy - M), rtol=1e-12, atol=1e-12)


def test_a_student_that_is_its_teacher_pays_the_two_step_discretisation_error():
    """(a) Student = teacher = the exact Gaussian denoiser: the loss is not zero but the two-step
    discretisation error in closed form, max(1/σ_t², 1)·(a(σ_t) − d*)²·(x_t − m)² per example, > 0 at every
    grid point.
    Breakages tried: the weight dropped; 1/σ_t instead of 1/σ_t²: each fails."""
    teacher = gaussian_teacher()
    loss = DistillationLoss(teacher, distill_sigmas(8, 0.002, 5.0, 7.0), head_loss="nll")
    b = grid_batch(loss, seed=1)
    s_t, s_m, s_s = (v.to(F64) for v in loss.steps(b.sigma))
    _, d_star = closed_form(s_t, s_m, s_s)
    expect = torch.clamp(1 / s_t**2, min=1) * (a(s_t) - d_star) ** 2 * (b.x_noisy[:, 0] - M) ** 2
    got = loss(teacher, b)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=0)
    per_point = (a(s_t) - d_star).abs()
    assert float(per_point.min()) > 1e-4          # every step of the student's grid has an error to learn


def test_target_is_the_landing_point_when_sigma_s_is_zero():
    """(b) At the student's last step (σ_s = 0) D* is the teacher's landing point x_s^T, for any teacher (a
    random MLP here) and in the loss at the last grid point.
    Breakage tried: r = σ_m/σ_t in D* (then D* ≠ x_s^T at σ_s = 0)."""
    torch.manual_seed(0)
    net = toy_denoiser("none", dim=2, width=16, hidden_layers=2)
    with torch.no_grad():
        net.net.gain.fill_(1.0)                     # a teacher whose F is not 0
    x = torch.randn(16, 2)
    d_star, x_s = two_step_target(net, x, 0.5, 0.1, 0.0)
    torch.testing.assert_close(d_star, x_s, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(x_s, net(net(x, 0.5) * 0.8 + 0.2 * x, 0.1), rtol=1e-6, atol=1e-6)
    grid = distill_sigmas(4)
    loss = DistillationLoss(net, grid)
    last = torch.full((16,), float(grid[2]), dtype=torch.float32)
    _, x_last = two_step_target(net, x, last, float(grid[3]), 0.0)
    torch.testing.assert_close(loss.target(x, last), x_last, rtol=0, atol=0)


def test_truncated_snr_weight():
    """(c) max(1/σ², 1) (SNR = 1/σ² in VE): 1/σ² below σ = 1, 1 above; in the loss the per-example ratio
    loss/‖D − D*‖² is that weight, on a grid spanning both sides of σ = 1.
    Breakages tried: min instead of max; 1/σ (wrong power); the weight dropped from the loss: each fails."""
    s = torch.tensor([0.01, 0.5, 1.0, 2.0, 80.0], dtype=F64)
    torch.testing.assert_close(snr_weight(s), torch.tensor([1e4, 4.0, 1.0, 1.0, 1.0], dtype=F64))
    teacher = gaussian_teacher()
    loss = DistillationLoss(teacher, distill_sigmas(16, 0.002, 5.0, 7.0), head_loss="none")
    b = grid_batch(loss, n=512, seed=2)
    err = (teacher(b.x_noisy, b.sigma) - loss.target(b.x_noisy, b.sigma)).square().sum(1)
    ratio = loss(teacher, b) / err
    assert float(b.sigma.min()) < 0.01 and float(b.sigma.max()) > 1
    torch.testing.assert_close(ratio, torch.clamp(b.sigma**-2, min=1), rtol=1e-10, atol=0)


class ConstNet(nn.Module):
    """F and G as learnable constants per element: the head's gradient can be read off exactly."""

    def __init__(self, d, with_g=True):
        super().__init__()
        self.F = nn.Parameter(torch.full((d,), 0.2, dtype=F64))
        self.G = nn.Parameter(torch.zeros(d, dtype=F64)) if with_g else None

    def forward(self, x, c_noise):
        return (self.F.expand_as(x), self.G.expand_as(x)) if self.G is not None else self.F.expand_as(x)


def test_the_head_learns_its_nll_of_d_star_with_the_mean_held():
    """head_loss="nll": the loss adds T7 of x0 := D* at σ_t, ½[log σ_φ² + (σ_t² + (μ − D*)²)/σ_φ² + log 2π]
    per element (nll_direct, the oracle), whose gradient reaches G only (∂/∂F = 0: the mean learns from T35
    alone) and is ½ − ½(σ_t² + (μ − D*)²)/σ_φ² per element: zero at σ_φ² = σ_t² + (μ − D*)², the student's own
    squared error on top of σ_t² (T8 with D* for x0). A student without a confidence head gets T35 alone.
    Breakages tried: the NLL taken on the undetached prediction (∂/∂F ≠ 0); the head term dropped; the NLL of
    x0 instead of D*: each fails."""
    student = Denoiser(ConstNet(2), 0.5, "diag")
    loss = DistillationLoss(gaussian_teacher(2), distill_sigmas(8, 0.002, 5.0, 7.0))
    b = grid_batch(loss, n=64, seed=3, dim=2)
    extra = loss(student, b) - DistillationLoss(loss.teacher, loss.sigmas, "none")(student, b)
    p = student.predict(b.x_noisy, b.sigma)
    target = loss.target(b.x_noisy, b.sigma)
    sig = b.sigma[:, None].expand(-1, 2)
    oracle = nll_direct(p.mu, p.sigma_phi, target, sig).sum(1)
    torch.testing.assert_close(extra, oracle, rtol=1e-10, atol=1e-10)
    g_f, g_g = torch.autograd.grad(extra.sum(), [student.net.F, student.net.G])
    assert torch.equal(g_f, torch.zeros_like(g_f))
    expect = (0.5 - 0.5 * (sig.square() + (p.mu - target).square()) / p.variance()).sum(0)
    torch.testing.assert_close(g_g, expect.detach(), rtol=1e-10, atol=1e-10)
    no_head = Denoiser(ConstNet(2, with_g=False), 0.5, "none")
    mean_only = DistillationLoss(loss.teacher, loss.sigmas, "none")
    torch.testing.assert_close(loss(no_head, b), mean_only(no_head, b), rtol=0, atol=0)


def test_posterior_head_loss_is_the_readout_nll_of_d_star():
    """head_loss="posterior" (T37's head): the loss adds ½[log 2π·v + (μ − D*)²/v] per element, v = c_out²(e^G
    + ε) (the head's own readout, no σ_t² term; the direct formula is the oracle), with ∂/∂F = 0, and its G
    gradient ½·e^G/(e^G + ε)·(1 − (μ − D*)²/v) vanishes where v = (μ − D*)²: the student's squared error.
    T6's head is refused. Breakages tried: σ_t² added to v (the oracle); F not held (∂/∂F ≠ 0); "posterior"
    routed to Head.nll (the oracle)."""
    from gendiff.losses import ExcessPosteriorNLL
    student = Denoiser(ConstNet(2), 0.5, "excess")
    loss = DistillationLoss(gaussian_teacher(2), distill_sigmas(8, 0.002, 5.0, 7.0), head_loss="posterior")
    b = grid_batch(loss, n=64, seed=3, dim=2)
    extra = loss(student, b) - DistillationLoss(loss.teacher, loss.sigmas, "none")(student, b)
    p = student.predict(b.x_noisy, b.sigma)
    target = loss.target(b.x_noisy, b.sigma)
    v = p.scalings.c_out.square() * (torch.exp(p.G) + ExcessPosteriorNLL.VAR_FLOOR)
    oracle = (0.5 * (torch.log(2 * math.pi * v) + (p.mu - target).square() / v)).sum(1)
    torch.testing.assert_close(extra, oracle, rtol=1e-10, atol=1e-10)
    g_f, g_g = torch.autograd.grad(extra.sum(), [student.net.F, student.net.G])
    assert torch.equal(g_f, torch.zeros_like(g_f))
    e = torch.exp(p.G)
    expect = (0.5 * e / (e + ExcessPosteriorNLL.VAR_FLOOR) * (1 - (p.mu - target).square() / v)).sum(0)
    torch.testing.assert_close(g_g, expect.detach(), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="excess-variance head"):
        loss(Denoiser(ConstNet(2), 0.5, "diag"), b)


def test_tiny_student_reproduces_its_teachers_two_steps():
    """(d) A tiny MLP (width 16, 2 hidden layers; F switched on) as the teacher, its copy as the student,
    300 steps of train.train on 64 training points (2-D), teacher 8 steps → student 4: on fresh draws of those
    points at every grid σ the student's one DDIM step lands where the teacher's two land, with mean squared
    landing error at most 2% of the error before training (measured: 0.14%). The landing points are
    computed here by ddim_step, not by the loss.
    Breakages tried: DistillationLoss.steps with σ_s := σ_m (the target is one teacher step, which the
    student already takes: the ratio stays ≈ 1); σ_m read one grid point too far (σ_m = 0 at the last step:
    an error): each fails."""
    torch.manual_seed(0)
    teacher = toy_denoiser("diag", dim=2, width=16, hidden_layers=2)
    with torch.no_grad():
        teacher.net.gain.fill_(1.0)
    teacher = teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    grid = distill_sigmas(8, 0.002, 5.0, 7.0)
    loss = DistillationLoss(teacher, grid)
    data = 0.5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    g = generator(5, "eval")
    i = torch.randint(0, 4, (2048,), generator=g)
    s_t, s_m, s_s = grid[2 * i].float(), grid[2 * i + 1].float(), grid[2 * i + 2].float()
    x_t = data[torch.randint(0, 64, (2048,), generator=g)] + s_t[:, None] * torch.randn(2048, 2, generator=g)
    with torch.no_grad():
        x_s = ddim_step(teacher, ddim_step(teacher, x_t, s_t, s_m), s_m, s_s)

    def landing_error(model):
        with torch.no_grad():
            return float((ddim_step(model, x_t, s_t, s_s) - x_s).square().sum(1).mean())

    before = landing_error(student)
    cfg = TrainConfig(iterations=300, batch=256, lr=2e-2, lr_ref_iter=100, ema=0.9, snapshot_every=1000)
    res = train(student, loss, DataSource(data), cfg, sigma_density=loss.density, progress=False)
    assert before > 1e-4 and landing_error(res.ema) <= 0.02 * before


@pytest.mark.parametrize("make, match", [
    (lambda t: DistillationLoss(t, distill_sigmas(3)), "even number"),
    (lambda t: DistillationLoss(t, distill_sigmas(4), head_loss="mse"), "head_loss='mse'"),
    (lambda t: DistillationLoss(t, [2.0, 3.0, 1.0, 0.0, 0.0]), "strictly decreasing"),
])
def test_bad_distillation_options(make, match):
    with pytest.raises(ValueError, match=match):
        make(gaussian_teacher())


def test_bad_batches_are_refused():
    loss = DistillationLoss(gaussian_teacher(), distill_sigmas(4))
    x = torch.zeros(3, 1, dtype=F64)
    with pytest.raises(ValueError, match="not a point of GridSteps"):
        loss(gaussian_teacher(), NoisyBatch(x, x, torch.tensor([0.5, 0.5, 0.5], dtype=F64)))
    ok = loss.density.sample(3)
    with pytest.raises(ValueError, match="source std"):
        loss(gaussian_teacher(), NoisyBatch(x, x, ok, source_sigma=torch.ones_like(x)))


def test_toy_source_batches_reach_the_loss_at_grid_sigmas():
    """The toy's own source (ToyBatches, point mode) with the loss's density: every σ_t is a student point."""
    loss = DistillationLoss(tree("A").denoiser(), distill_sigmas(4))
    g = torch.Generator().manual_seed(0)
    b = ToyBatches(tree("A"), "point").draw(64, loss.density.sample(64, g), g)
    teacher_net = toy_denoiser("none", width=8, hidden_layers=1)
    assert torch.isfinite(loss(teacher_net, b)).all()


# ---- gendiff distill --------------------------------------------------------------------------------------

QUICK = ["--preset", "toy-quick", "--set", "train.iterations=64", "--set", "train.batch=128",
         "--set", "eval.samples=256", "--set", "eval.eval_points=256", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distill") / "run")
    assert main(["train", *QUICK, "--out", out]) == 0
    return out


def test_cli_distils_a_toy_run_in_round_folders_and_samples_the_last(toy_run, capsys):
    """(e) `gendiff distill RUN --rounds 2 --iterations 32`: RUN-distill/round-1 (64 → 32 steps) and round-2
    (32 → 16), each a run folder whose config.toml is RUN's with a [distill] table naming its teacher, and
    whose student started from its teacher's EMA; `gendiff sample` on round 2 uses Euler at 16 steps (NFE 16);
    running the command again reads both rounds; a round folder is itself a teacher (round 3 at 8 steps).
    Breakages tried: round 2's teacher = RUN (its config names the wrong teacher); toy.sampling_defaults
    ignoring distill.steps (Heun 32, NFE 63): each fails."""
    assert main(["distill", toy_run, "--rounds", "2", "--iterations", "32", "--threads", "1",
                 "--no-progress"]) == 0
    out = toy_run + "-distill"
    cfg1, cfg2 = (runfolder.read_config(os.path.join(out, f"round-{k}")) for k in (1, 2))
    assert (cfg1.distill.teacher, cfg1.distill.teacher_steps, cfg1.distill.steps, cfg1.distill.round) == \
        (os.path.abspath(toy_run), 64, 32, 1)
    assert (cfg2.distill.teacher, cfg2.distill.teacher_steps, cfg2.distill.steps, cfg2.distill.round) == \
        (os.path.abspath(os.path.join(out, "round-1")), 32, 16, 2)
    assert cfg2.train.iterations == 32 and cfg2.recipe == "confidence"
    assert cfg1.train.ema_sigma_rel == cfg2.train.ema_sigma_rel == distill_cmd.DISTILL_EMA_SIGMA_REL
    for k in (1, 2):
        assert os.path.exists(os.path.join(out, f"round-{k}", "model.safetensors"))
        with open(os.path.join(out, f"round-{k}", "metrics.jsonl")) as f:
            assert [json.loads(line)["step"] for line in f] == [16, 32]
    assert main(["sample", os.path.join(out, "round-2"), "--samples", "8", "--threads", "1"]) == 0
    with open(os.path.join(out, "round-2", "samples-seed0", "samples.json")) as f:
        info = json.load(f)
    assert (info["sampler"], info["steps"], info["nfe"]) == ("euler", 16, 16)
    capsys.readouterr()
    assert main(["distill", toy_run, "--rounds", "2", "--iterations", "32", "--threads", "1",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 2
    assert main(["distill", os.path.join(out, "round-2"), "--rounds", "1", "--iterations", "16",
                 "--threads", "1", "--no-progress"]) == 0
    cfg3 = runfolder.read_config(os.path.join(out, "round-2-distill", "round-3"))
    assert (cfg3.distill.teacher_steps, cfg3.distill.steps, cfg3.distill.round) == (16, 8, 3)


def test_a_round_starts_from_its_teacher_and_resumes_bit_for_bit(toy_run, tmp_path, monkeypatch):
    """A round's student starts as its teacher (at step 0 the student's weights are the teacher's EMA); a
    round stopped after step 20 (checkpoint at 16) and run again resumes from step 16 and ends with the
    weights of an uninterrupted round, bit for bit (CPU).
    Breakages tried: the student not loaded from the teacher (its fresh initialisation: the step-0 check
    fails); distill_round treating an existing round folder as fresh (start_run refuses it): each fails."""
    _, teacher = load_run(toy_run)
    seen = {}
    real_train = distill_cmd.DistillationLoss.__call__

    def spy(self, student, batch):
        seen.setdefault("start", {k: v.detach().clone() for k, v in student.state_dict().items()})
        return real_train(self, student, batch)

    monkeypatch.setattr(distill_cmd.DistillationLoss, "__call__", spy)
    sets = ["checkpoint.every=16"]
    whole = distill_cmd.distill(toy_run, 1, out=str(tmp_path / "whole"), iterations=32, sets=sets,
                                progress=False, log=lambda *a: None)
    assert all(torch.equal(seen["start"][k], v) for k, v in teacher.state_dict().items())
    monkeypatch.setattr(distill_cmd.DistillationLoss, "__call__", real_train)

    real_on_step = runfolder.RunLog.on_step

    def stop_at_20(self, done, result):
        real_on_step(self, done, result)
        if done == 20:
            raise KeyboardInterrupt("stopped on purpose")

    monkeypatch.setattr(runfolder.RunLog, "on_step", stop_at_20)
    with pytest.raises(KeyboardInterrupt):
        distill_cmd.distill(toy_run, 1, out=str(tmp_path / "cut"), iterations=32, sets=sets, progress=False,
                            log=lambda *a: None)
    assert not os.path.exists(tmp_path / "cut" / "round-1" / "metrics.json")
    monkeypatch.setattr(runfolder.RunLog, "on_step", real_on_step)
    logged = []
    distill_cmd.distill(toy_run, 1, out=str(tmp_path / "cut"), iterations=32, sets=sets, progress=False,
                        log=logged.append)
    assert "resumed from step 16" in logged
    a_ = load_run(whole[0][0])[1].state_dict()
    b_ = load_run(str(tmp_path / "cut" / "round-1"))[1].state_dict()
    assert all(torch.equal(a_[k], b_[k]) for k in a_)


@pytest.mark.parametrize("teacher_sets, sets, ema, sigma_rel", [
    ([], [], 0.999, distill_cmd.DISTILL_EMA_SIGMA_REL),          # classic teacher EMA: the round's power EMA
    ([], ["train.ema=0.9"], 0.9, 0.0),                            # the user's classic EMA is kept
    ([], ["train.ema_sigma_rel=0"], 0.999, 0.0),                  # ... or the teacher's, asked for by name
    (["train.ema_sigma_rel=0.1"], [], 0.999, 0.1),                # a teacher's power EMA is kept
])
def test_a_round_averages_its_weights_with_a_power_ema(teacher_sets, sets, ema, sigma_rel):
    """A round's student starts at its teacher: a classic EMA of a short round would still hold the teacher
    (0.999^500 = 61% of it after 500 steps), so the round's config switches to EDM2's power EMA
    (DISTILL_EMA_SIGMA_REL) unless the teacher has one or --set chooses the EMA (that the loop trains with
    the config's power EMA: tests/test_run.py; a CLI round's config: the round-folder test above).
    Breakages tried: the default dropped (row 1 fails); any --set key counted as an EMA choice (row 1 with
    sets would still pass; row 2's check of ema_sigma_rel = 0 fails when the default overrides --set)."""
    teacher = resolve("toy-quick", sets=["train.ema=0.999", *teacher_sets])
    cfg = distill_cmd.round_config(teacher, "t", 64, sets=sets)
    assert (cfg.train.ema, cfg.train.ema_sigma_rel) == (ema, sigma_rel)
    other = distill_cmd.round_config(teacher, "t", 64, sets=["train.lr=0.01"])
    assert other.train.ema_sigma_rel == (teacher.train.ema_sigma_rel or distill_cmd.DISTILL_EMA_SIGMA_REL)


def test_refusals(toy_run, tmp_path, capsys):
    """A VAE run, steps that cannot be halved so often, a round folder holding another config, distill.* in
    --set, and `gendiff train --resume` on a round: each one error (exit 2) naming what is allowed; nothing is
    created for a refused run."""
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.toml").write_text(to_toml(resolve("vae-tiny")))
    cases = [
        (["distill", str(vae), "--rounds", "1"], r"applies to diffusion runs \(toy, images\); .* 'vae' run"),
        (["distill", toy_run, "--rounds", "3", "--steps", "12", "--out", str(tmp_path / "x")],
         r"--steps=12 cannot be halved --rounds=3 times; allowed: a multiple of 2\^3 = 8"),
        (["distill", toy_run, "--rounds", "1", "--set", "distill.steps=4", "--out", str(tmp_path / "x")],
         "written by gendiff distill"),
        (["distill", str(tmp_path / "nowhere"), "--rounds", "1"], "is not a run folder"),
    ]
    for argv, match in cases:
        assert main(argv) == 2
        assert re.search(match, capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "x")
    out = str(tmp_path / "d")
    assert main(["distill", toy_run, "--rounds", "1", "--iterations", "8", "--out", out, "--threads", "1",
                 "--no-progress"]) == 0
    assert main(["distill", toy_run, "--rounds", "1", "--iterations", "16", "--out", out]) == 2
    assert "another config" in capsys.readouterr().err
    assert main(["train", "--resume", os.path.join(out, "round-1")]) == 2
    assert "gendiff distill trains and resumes rounds" in capsys.readouterr().err


def test_image_runs_distil_through_the_same_path(blobs_npz, tmp_path):
    """An image run (mnist-tiny, confidence recipe, npz data) distils through the same code: round 1 samples
    with Euler on its grid at half the first teacher's steps (mnist-tiny: Heun 4, NFE 7 → 8 → student 4).
    Breakage tried: sample_images ignoring distill.steps (Heun on EDM's grid): fails."""
    run = str(tmp_path / "img")
    base = ["--preset", "mnist-tiny", "--set", "data.name=npz", "--set", f"data.path={blobs_npz}",
            "--set", "eval.likelihood_images=0", "--set", "eval.calibration_images=0", "--threads", "1",
            "--no-progress"]
    assert main(["train", *base, "--out", run]) == 0
    assert main(["distill", run, "--rounds", "1", "--iterations", "2", "--threads", "1",
                 "--no-progress"]) == 0
    with open(os.path.join(run + "-distill", "round-1", "metrics.json")) as f:
        m = json.load(f)
    assert (m["samples"]["sampler"], m["samples"]["nfe"]) == ("Euler 4 (distilled grid)", 4)
    # benchmarks/checkpoint_weights.py: a checkpoint's training weights as a weights file that gendiff eval
    # reads (how the rounds' EMA was found to hold the teacher, BENCHMARKS); the EMA stays model.safetensors
    import importlib.util
    from safetensors.torch import load_file
    spec = importlib.util.spec_from_file_location(
        "checkpoint_weights", os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                           "checkpoint_weights.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([run]) == 0
    raw = load_file(os.path.join(run, "model-raw-8.safetensors"))
    ema = load_file(os.path.join(run, "model.safetensors"))
    ckpt = load_file(os.path.join(run, "checkpoints", "ckpt-00000008.safetensors"))
    assert raw.keys() == ema.keys() and all(torch.equal(raw[k], ckpt["model." + k]) for k in raw)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert main(["eval", run, "--weights", "model-raw-8.safetensors", "--samples", "4",
                 "--threads", "1"]) == 0
    assert os.path.exists(os.path.join(run, "eval-4-4-seed0-model-raw-8.json"))
    with pytest.raises(SystemExit, match="checkpoints at steps"):
        bench.main([run, "--step", "3"])


def test_distill_calibration_scores_the_student_against_d_star(toy_run, tmp_path):
    """benchmarks/distill_calibration.py: per σ_t of the student's grid, its σ_φ² − σ_t² against its error to
    D* (its teacher's two DDIM steps), not to x0. Oracle: the best constant of each bin is the mean of
    (μ − D*)² over the fit half, and the head's NLL the mean Gaussian NLL of (μ − D*) under σ_φ² − σ_t² on the
    evaluation half's unfloored elements, recomputed here from the same draws. Breakages tried: the readout
    scored against x0 (the constants differ by orders of magnitude at small σ); σ_φ² read instead of the
    excess (the head's NLL)."""
    import importlib.util
    import numpy as np
    from gendiff.experiments.kinds import kind_of
    spec = importlib.util.spec_from_file_location(
        "distill_calibration", os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                            "distill_calibration.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = str(tmp_path / "d")
    assert main(["distill", toy_run, "--rounds", "1", "--iterations", "8", "--out", out, "--threads", "1",
                 "--no-progress"]) == 0
    folder = os.path.join(out, "round-1")
    r = bench.round_readout(folder, 64, seed=3)
    assert r["steps"] == 32 and len(r["readout"]["bins"]) == 32
    # recompute the constants from the same draws
    cfg, student = load_run(folder)
    _, teacher = load_run(cfg.distill.teacher)
    loss = DistillationLoss(teacher, kind_of(cfg).distill_grid(cfg, cfg.distill.teacher_steps))
    g, data = torch.Generator().manual_seed(3), tree(cfg.classes)
    for s in loss.table[::2][:-1]:
        x0 = data.sample(64, generator=g)[0]
        sig = torch.full((64,), float(s))
        x_t = x0 + sig[:, None] * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            p = student.predict(x_t, sig)
            err2 = (p.mu - loss.target(x_t, sig)).square().double()
            var = p.excess_variance(sig).double()
        b = r["readout"]["bins"][f"sigma={float(s):.4g}"]
        np.testing.assert_allclose(b["constant"]["var"], err2[::2].mean().item(), rtol=1e-4)   # fit: even
        e2, v = err2[1::2], var[1::2]                                   # the evaluation half
        rest = v > (1e-3 * float(s)) ** 2                               # calibration.FLOOR
        if rest.any():
            nll = 0.5 * (torch.log(2 * math.pi * v[rest]) + e2[rest] / v[rest])
            np.testing.assert_allclose(b["head"]["nll"], nll.mean().item(), rtol=1e-4, atol=1e-6)
    assert "| 1 | 32 |" in bench.markdown([r])


def test_distill_figure_draws_the_recorded_results(tmp_path):
    """benchmarks/distill_figure.py (README's figure of quality against steps) draws from the committed
    results files."""
    import importlib.util
    root = os.path.join(os.path.dirname(__file__), "..")
    spec = importlib.util.spec_from_file_location("distill_figure",
                                                  os.path.join(root, "benchmarks", "distill_figure.py"))
    fig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig)
    res = os.path.join(root, "docs", "results")
    out = str(tmp_path / "steps.png")
    assert fig.main(["--tree", os.path.join(res, "distill-tree-128", "summary.json"), "--mnist",
                     os.path.join(res, "distill-mnist"), "--teacher",
                     os.path.join(res, "guidance-mnist", "eval-default-2000-seed0.json"), "--out", out]) == 0
    assert os.path.getsize(out) > 10_000
