"""T38 on image runs: the DDPM reverse variance chosen from the CLI for sampling (`gendiff eval RUN --sampler
ddpm --variance V --steps K`) and for the DDPM bound (`gendiff likelihood RUN --method ddpm-bound --variance
V --steps K`), refused where the run's head cannot give it; on the tiny `blobs` data of test_image_runs.

Breakages tried (each seen to fail, then reverted; the test that caught it): sample_images ignoring
--variance (phi-is-wired test: phi and β̃ coincide); phi reading σ_φ² without subtracting σ̃² (phi-is-wired:
G = −30 no longer gives β̃); ddpm_bound on the T = 1000 process whatever --steps says (CLI test:
ddpm_process_steps); ddpm_variance allowing phi for a head without a learned confidence, or v without the v
head (refusal test); the analytic table's evaluations counted as sampling NFE (CLI test: NFE = steps).
"""
import json
import math
import os

import pytest
import torch

from gendiff.experiments.ddpm_variance import ddpm_bound, ddpm_variance
from gendiff.experiments.images import build_model, sample_images
from test_image_runs import blobs, tiny  # noqa: F401  (the tiny labelled images and their config)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("recipe,variance,ok", [
    ("confidence", "phi", True), ("confidence-excess", "phi", True), ("confidence-sigma-only", "phi", True),
    ("eps", "phi", False), ("edm", "phi", False), ("learned-variance", "phi", False),
    ("learned-variance", "v", True), ("confidence", "v", False), ("eps", "v", False),
    ("eps", "analytic", True), ("edm", "analytic", True), ("confidence", "beta", True),
])
def test_each_variance_needs_the_head_that_gives_it(blobs, recipe, variance, ok):  # noqa: F811
    """phi needs a learned confidence (`has_confidence`), v IDDPM's v head; beta, beta_tilde, analytic any
    run. The default is the run's own: v for the v head, else β̃."""
    cfg = tiny(blobs, recipe)
    if ok:
        assert ddpm_variance(cfg, variance) == variance
    else:
        with pytest.raises(ValueError, match=f"--variance {variance}"):
            ddpm_variance(cfg, variance)
    assert ddpm_variance(cfg) == ("v" if recipe == "learned-variance" else "beta_tilde")


def test_phi_is_wired_to_the_heads_excess_variance(blobs):  # noqa: F811
    """A confidence model whose G is −30 everywhere has σ_φ² ≈ 0 < σ̃², so Var[x0 | x_t] = (σ_φ² − σ̃²)⁺ = 0
    and phi is β̃ exactly, in sampling (same seeds: the same images) and in the bound; with G = 0
    (σ_φ = c_var > σ̃) phi differs from β̃ in both."""
    cfg = tiny(blobs, "confidence", "train.sigma_data=0.5")
    torch.manual_seed(0)
    model = build_model(cfg, (1, 28, 28), 4)
    for p in model.parameters():                              # leave the zero-initialised output: a real mean
        torch.nn.init.normal_(p, std=0.02)
    x8 = torch.randint(0, 256, (2, 1, 28, 28), generator=torch.Generator().manual_seed(0)) / 127.5 - 1

    def both(name):
        x, info = sample_images(model, cfg, 3, seed=1, sampler="ddpm", variance=name, steps=5)
        b = ddpm_bound(model, cfg, x8, 4, variance=name, steps=5)["bpd_ddpm_bound"]
        return x, b, info
    with torch.no_grad():
        model.net.conv_out.weight[1:].zero_()
        model.net.conv_out.bias[1:] = 0.0                      # G = 0: σ_φ = c_var, Var = c_out² > 0
    phi, b_phi, info = both("phi")
    bt, b_bt, _ = both("beta_tilde")
    assert info["nfe"] == 5 and "phi" in info["sampler"]      # σ_φ from the same evaluation as μ
    assert not torch.allclose(phi, bt) and b_phi != b_bt
    with torch.no_grad():
        model.net.conv_out.bias[1:] = -30.0                    # G = −30: σ_φ² ≪ σ̃², Var clamped to 0
    phi, b_phi, _ = both("phi")
    bt, b_bt, _ = both("beta_tilde")
    torch.testing.assert_close(phi, bt, rtol=0, atol=0)
    assert b_phi == pytest.approx(b_bt, rel=1e-12)


def test_cli_chooses_the_ddpm_variance_for_eval_and_likelihood(blobs, tmp_path, capsys):  # noqa: F811
    """On a tiny confidence run (an EDM recipe, read at the DDPM σ̃_t): the DDPM bound with phi, analytic and
    β̃ on 5 respaced steps (4 KL terms, all summed), eval with DDPM sampling, phi and analytic, 4 steps
    (NFE 4: analytic's table is measured once, not per sample); each writes its own JSON. Refused, one line
    each: v (no v head), --variance with the recipe's Heun sampler, --variance with the PF-ODE likelihood,
    another --sampler."""
    from gendiff.cli import main
    out = str(tmp_path / "run")
    assert main(["train", "--preset", "mnist-tiny", "--set", f"data.path={blobs}", "--set", "data.name=npz",
                 "--set", "recipe=confidence", "--set", "train.iterations=4",
                 "--set", "eval.likelihood_images=0", "--out", out, "--no-progress"]) == 0
    for v in ("phi", "analytic", "beta_tilde"):
        assert main(["likelihood", out, "--method", "ddpm-bound", "--variance", v, "--steps", "5",
                     "--points", "2"]) == 0
        m = json.load(open(os.path.join(out, f"likelihood-ddpm-{v}-5-seed0.json")))
        assert m["ddpm_variance"] == v and m["ddpm_process_steps"] == 5 and m["bpd_ddpm_bound_steps"] == 4
        assert m["bpd_images"] == 2 and m["bpd_ddpm_bound_se_steps"] == 0
        assert 0 < m["bpd_ddpm_bound"] < math.inf        # β̃ at 5 steps: ~4000 for this untrained model
    assert main(["eval", out, "--sampler", "dpmpp_2m", "--steps", "3", "--samples", "8"]) == 0   # σ grid
    m = json.load(open(os.path.join(out, "eval-dpmpp_2m-3-8-seed0.json")))
    assert m["nfe"] == 3 and m["sampler"] == "DPM-Solver++(2M) 3" and "ddpm_variance" not in m
    for v in ("phi", "analytic"):
        assert main(["eval", out, "--sampler", "ddpm", "--variance", v, "--steps", "4",
                     "--samples", "8"]) == 0
        m = json.load(open(os.path.join(out, f"eval-ddpm-{v}-4-8-seed0.json")))
        assert m["nfe"] == 4 and m["ddpm_variance"] == v and m["fid"] > 0
    capsys.readouterr()
    for argv, msg in ((["eval", out, "--sampler", "ddpm", "--variance", "v"], "--variance v"),
                      (["eval", out, "--variance", "phi", "--samples", "8"], "--sampler ddpm"),
                      (["likelihood", out, "--variance", "phi"], "--method ddpm-bound")):
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err, argv


@pytest.mark.parametrize("name, label", [("euler", "Euler 3"), ("dpmpp_2m", "DPM-Solver++(2M) 3"),
                                         ("euler_maruyama", "Euler–Maruyama 3")])
def test_a_grid_sampler_on_an_image_run_is_the_librarys_on_edms_grid(blobs, name, label):  # noqa: F811
    """`--sampler euler|dpmpp_2m|euler_maruyama` on an image run (a recipe sampled on σ) is that library
    sampler (tested against k-diffusion in tests/test_samplers*.py) on EDM's ρ = 7 grid from each image's own
    noise × σ_max and its own generator, with NFE = steps; an image does not depend on the batch split; the
    recipe's own (None, or "heun") is Heun, differs, and shares its results file, another sampler has its own.
    Refused: pc (its step size pools the batch), a σ-grid sampler on a DDPM recipe (eps), and on a distilled
    student anything but its own Euler.
    Breakage tried: sample_images ignoring `sampler` (always Heun): this test failed."""
    from dataclasses import replace
    from gendiff.experiments.ddpm_variance import ddpm_choice
    from gendiff.experiments.images import RHO, SIGMA_MAX, SIGMA_MIN, eval_file
    from gendiff.io import StackedGenerator
    from gendiff.samplers import GRID_SAMPLERS
    from gendiff.schedules import edm_sigmas
    cfg = tiny(blobs, "confidence", "train.sigma_data=0.5", "train.precision=fp32")
    torch.manual_seed(0)
    model = build_model(cfg, (1, 28, 28), 4)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x, info = sample_images(model, cfg, 3, seed=1, sampler=name, steps=3, clamp=False)
    assert info["nfe"] == 3 and info["sampler"] == label
    g = StackedGenerator(1, range(3))          # the start, then the sampler's own noise, from one generator
    z = g.randn((3, 1, 28, 28))
    with torch.no_grad():
        want = GRID_SAMPLERS[name](model, z * SIGMA_MAX, edm_sigmas(3, SIGMA_MIN, SIGMA_MAX, RHO),
                                   generator=g)
    torch.testing.assert_close(x, want)
    split, _ = sample_images(model, cfg, 3, seed=1, sampler=name, steps=3, clamp=False, batch=2)
    torch.testing.assert_close(split, x)
    heun, info = sample_images(model, cfg, 3, seed=1, steps=3, clamp=False)
    assert not torch.allclose(heun, x) and info["sampler"] == "Heun 3"
    assert eval_file(cfg, 8, steps=3, sampler="heun") == eval_file(cfg, 8, steps=3) == "eval-3-8-seed0.json"
    assert eval_file(cfg, 8, steps=3, sampler=name) == f"eval-{name}-3-8-seed0.json"
    for bad, match in (("pc", "batches are split"), ("nope", "not a sampler")):
        with pytest.raises(ValueError, match=match):
            ddpm_choice(cfg, bad)
    with pytest.raises(ValueError, match="DDPM's discrete steps"):
        ddpm_choice(replace(cfg, recipe="eps"), name)
    with pytest.raises(ValueError, match=f"got --sampler='{name}'"):
        ddpm_choice(cfg, name, "phi")
    student = replace(cfg, distill=replace(cfg.distill, steps=4))
    if name == "euler":
        assert ddpm_choice(student, name) == (False, None)
        assert eval_file(student, 8, sampler="euler") == eval_file(student, 8)
    else:
        with pytest.raises(ValueError, match="distilled student"):
            ddpm_choice(student, name)
