"""Autoguidance on images (THEORY T34, EDM2) and the guidance interval (Kynkäänniemi et al. 2024) for it and
for CFG (T33), through the image sampler (`sample_images(autoguide=, interval=)`) and the CLI (`gendiff eval
/ sample RUN --autoguide GUIDE_RUN --guidance W --guidance-interval LO,HI`).

Oracle: with one sampler step the sample is D̃(x_T, σ_max) itself, linear in w (T34: D̃ = D_g + w·(D_m −
D_g)), so the w = 3 sample is the w = 0 sample (the guide alone) plus 3 × (w = 1 sample − w = 0 sample).

Breakages tried (the test that catches each): main and guide swapped in `sample_images` (the linearity test:
w = 0 is then the main model); the weight ignored (w = 3 equals w = 1); the guide's labels not bound for a
conditional run (the conditional test: the guide then samples ∅); the interval not handed to the CFG wrapper
(the CFG interval test); guide calls left out of NFE (the NFE assertion); the results file named without the
guidance (the CLI test finds no -ag…-i… file); a guide of other data accepted (the CLI refusal).
"""
import json
import os

import pytest
import torch

from gendiff.experiments.config import resolve
from gendiff.experiments.images import Autoguide, build_model, sample_images

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(blobs, recipe="confidence-excess", *sets):
    return resolve("mnist-tiny", sets=[f"data.path={blobs}", "data.name=npz", f"recipe={recipe}",
                                       "train.precision=fp32", "train.sigma_data=0.5",
                                       "model.attn_resolutions=[]", *sets])


def random_model(cfg, seed, classes=0):
    torch.manual_seed(seed)
    m = build_model(cfg, (1, 28, 28), classes)
    for p in m.parameters():                  # leave the zero-initialised output: make the models differ
        torch.nn.init.normal_(p, std=0.05)
    return m.eval().requires_grad_(False)


def draw(model, cfg, **kw):
    return sample_images(model, cfg, 6, seed=1, steps=1, clamp=False, **kw)


def test_one_step_sample_is_linear_in_the_autoguidance_weight(blobs_npz):
    cfg = tiny(blobs_npz)
    main, guide = random_model(cfg, 0), random_model(cfg, 1)
    plain, info = draw(main, cfg)
    by_w = {w: draw(main, cfg, autoguide=Autoguide(guide, w, "g")) for w in (0.0, 1.0, 3.0)}
    assert torch.equal(by_w[1.0][0], plain)                        # w = 1: the main model, bit for bit
    assert by_w[1.0][1]["nfe"] == info["nfe"] == 1                 # ... and the guide never called
    torch.testing.assert_close(by_w[0.0][0], draw(guide, cfg)[0])  # w = 0: the guide
    assert by_w[3.0][1]["nfe"] == 2                                # main + guide per step
    expect = by_w[0.0][0] + 3 * (by_w[1.0][0] - by_w[0.0][0])
    torch.testing.assert_close(by_w[3.0][0], expect, rtol=1e-4, atol=1e-4)
    assert (by_w[3.0][0] - plain).abs().max() > 1e-3


def test_an_interval_outside_every_sigma_is_the_unguided_sampler(blobs_npz):
    cfg = tiny(blobs_npz)
    main, guide = random_model(cfg, 0), random_model(cfg, 1)
    plain, info = sample_images(main, cfg, 4, seed=2, steps=3)
    for interval in ((100.0, float("inf")), (0.0, 1e-4)):
        x, i2 = sample_images(main, cfg, 4, seed=2, steps=3, autoguide=Autoguide(guide, 2.5, "g"),
                              interval=interval)
        assert torch.equal(x, plain) and i2["nfe"] == info["nfe"]
    full, _ = sample_images(main, cfg, 4, seed=2, steps=3, autoguide=Autoguide(guide, 2.5, "g"),
                            interval=(0.0, float("inf")))
    assert not torch.equal(full, plain)
    # an interval holding σ_max only: guided on the first step, unguided after (neither of the two above)
    part, i3 = sample_images(main, cfg, 4, seed=2, steps=3, autoguide=Autoguide(guide, 2.5, "g"),
                             interval=(10.0, float("inf")))
    assert not torch.equal(part, plain) and not torch.equal(part, full)
    assert info["nfe"] < i3["nfe"] < 2 * info["nfe"]


@pytest.mark.parametrize("recipe", ["score-cfg", "confidence-excess-cfg"])
def test_conditional_autoguidance_and_cfg_with_an_interval(blobs_npz, recipe):
    cfg = tiny(blobs_npz, recipe)
    main, guide = random_model(cfg, 0, 4), random_model(cfg, 1, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    cond, _ = draw(main, cfg, labels=labels)
    # the guide sees the same labels: w = 0 is the conditional guide, not its null class
    g0, _ = draw(main, cfg, labels=labels, autoguide=Autoguide(guide, 0.0, "g"))
    torch.testing.assert_close(g0, draw(guide, cfg, labels=labels)[0])
    assert not torch.allclose(g0, draw(guide, cfg)[0])           # labels=None: ∅ throughout
    # CFG limited to an interval that holds no σ of the run's sampler is the conditional model
    for interval, same in (((1e3, 1e4), True), ((0.0, float("inf")), False)):
        x, _ = draw(main, cfg, labels=labels, w=2.0, interval=interval)
        assert torch.equal(x, cond) is same
    with pytest.raises(ValueError, match="--cfg-weight and --autoguide"):
        draw(main, cfg, labels=labels, w=1.0, autoguide=Autoguide(guide, 2.0, "g"))
    with pytest.raises(ValueError, match="--guidance-interval"):
        draw(main, cfg, labels=labels, interval=(0.1, 1.0))


def test_autoguidance_from_the_cli(blobs_npz, tmp_path, capsys, monkeypatch):
    """`gendiff eval/sample RUN --autoguide GUIDE --guidance W --guidance-interval LO,HI` on image runs: the
    results file says how sampling was guided; wrong combinations and a guide of other data are one line."""
    from gendiff.cli import main
    import numpy as np
    def base():
        return ["--preset", "mnist-tiny", "--set", f"data.path={blobs_npz}", "--set", "data.name=npz",
                "--set", "eval.likelihood_images=0", "--set", "eval.calibration_images=0",
                "--set", "model.attn_resolutions=[]", "--no-progress"]
    run, guide = str(tmp_path / "main"), str(tmp_path / "guide")
    assert main(["train", *base(), "--out", run, "--set", "train.iterations=8"]) == 0
    assert main(["train", *base(), "--out", guide, "--set", "train.iterations=2"]) == 0
    assert main(["eval", run, "--samples", "8", "--autoguide", guide, "--guidance", "2",
                 "--guidance-interval", "0.3,inf"]) == 0
    m = json.load(open(os.path.join(run, "eval-4-8-seed0-ag2-guide-i0.3-inf.json")))   # mnist-tiny: Heun 4
    assert m["autoguide"] == "guide" and m["guidance"] == 2 and m["guidance_interval"] == "0.3,inf"
    assert m["autoguide_run"] == os.path.abspath(guide)
    assert "autoguided by guide w 2" in capsys.readouterr().out
    dest = str(tmp_path / "s")
    assert main(["sample", run, "--samples", "3", "--autoguide", guide, "--out", dest]) == 0
    assert np.load(os.path.join(dest, "samples.npz"))["images"].shape == (3, 1, 28, 28)
    assert json.load(open(os.path.join(dest, "samples.json")))["guidance"] == 2.0   # the default w
    # benchmarks/guidance_images.py: its cells are the CLI's files, read back on a rerun (resumable)
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "guidance_images", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "guidance_images.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = [run, "--guide", guide, "--weights", "2", "--interval", "0.3,inf", "--samples", "8"]
    assert bench.main(argv) == 0                   # the guided cell with the interval is the file above
    assert os.path.exists(os.path.join(run, "eval-4-8-seed0-ag2-guide.json"))
    monkeypatch.setattr(bench, "eval_run", lambda *a, **k: pytest.fail("a finished cell was measured again"))
    assert bench.main([*argv, "--figure", str(tmp_path / "g.png")]) == 0
    assert os.path.getsize(tmp_path / "g.png") > 0              # FID against w, from the cells read back
    assert "| autoguidance | 2 | [0.3, inf] | 12 |" in capsys.readouterr().out
    # a guide of other data, options without --autoguide, a bad interval, guidance with --filter
    odd = str(tmp_path / "odd")
    assert main(["train", *base(), "--out", odd, "--set", "data.subset=200", "--set",
                 "train.iterations=1"]) == 0
    capsys.readouterr()
    for argv, words in ((["--autoguide", odd], "the guide must model the same data"),
                        (["--guidance", "2"], "--guidance goes with --autoguide"),
                        (["--autoguide", guide, "--guidance-interval", "5,1"], "0 <= LO < HI"),
                        (["--autoguide", guide, "--guidance-interval", "x"], "two numbers LO,HI"),
                        (["--autoguide", guide, "--filter", "0.1"], "not with --filter"),
                        (["--cfg-weight", "1"], "class-conditional")):
        assert main(["eval", run, "--samples", "4", *argv]) == 2, argv
        assert words in capsys.readouterr().err, argv


def test_cfg_against_autoguidance_on_a_conditional_run_from_the_cli(blobs_npz, tmp_path, capsys):
    """The issue-20 comparison on a class-conditional confidence run (confidence-excess-cfg): a conditional
    guide, CFG and autoguidance rows of benchmarks/guidance_images.py with another σ-grid sampler for every
    cell; each cell is the CLI's results file, named by sampler and guidance, and records them. CFG at w = 0
    is the conditional model and autoguidance at w = 1 the main model: the unguided row's FID.
    Breakage tried: --sampler not handed to eval_run (the cells are the run's Heun: the file names fail)."""
    from gendiff.cli import main
    import importlib.util
    base = ["--preset", "mnist-tiny", "--set", f"data.path={blobs_npz}", "--set", "data.name=npz",
            "--set", "recipe=confidence-excess-cfg", "--set", "eval.likelihood_images=0",
            "--set", "eval.calibration_images=0", "--set", "model.attn_resolutions=[]", "--no-progress"]
    run, guide = str(tmp_path / "main"), str(tmp_path / "guide")
    assert main(["train", *base, "--out", run, "--set", "train.iterations=4"]) == 0
    assert main(["train", *base, "--out", guide, "--set", "train.iterations=2"]) == 0
    spec = importlib.util.spec_from_file_location(
        "guidance_images", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "guidance_images.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    capsys.readouterr()
    assert bench.main([run, "--guide", guide, "--weights", "1,2", "--cfg-weights", "0,1", "--interval",
                       "0.3,5", "--samples", "8", "--sampler", "dpmpp_2m", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "sampler DPM-Solver++(2M)" in out and "| CFG | 1 | [0.3, 5] |" in out
    cells = {k: json.load(open(os.path.join(run, f"eval-dpmpp_2m-3-8-seed0{k}.json"))) for k in
              ("", "-w0", "-w1", "-w1-i0.3-5", "-ag1-guide", "-ag2-guide", "-ag2-guide-i0.3-5")}
    assert cells["-w1"]["nfe"] == 2 * cells[""]["nfe"] == 6 and cells["-ag2-guide"]["nfe"] == 6
    assert cells["-w0"]["fid"] == cells[""]["fid"] == cells["-ag1-guide"]["fid"]
    assert cells["-w1"]["fid"] != cells[""]["fid"]
    assert all(c["sampler"].startswith("DPM-Solver++(2M)") for c in cells.values())
