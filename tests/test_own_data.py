"""A researcher's own data end to end, from the command line: an RGB image folder with class subfolders and a
grayscale .npz go through `train` (confidence recipe), SIGKILL + `--resume`, `sample --samples N --out`,
`eval`, `likelihood` and `report`; bad data is one line naming the file or the key; samples do not depend on
the batch split (toy and images); a resume after a corrupted checkpoint logs each step once.

Breakages tried (the test that catches each): sample_images seeding image i by its index within its batch
(test_image_samples_do_not_depend_on_the_batch_split); toy sample_points seeding a start by its index within
its batch
(test_toy_samples_do_not_depend_on_the_batch_split); RunLog cutting the log at the newest checkpoint instead
of the one resumed (test_a_resume_after_a_corrupt_checkpoint_logs_each_step_once); start_run before prepare
(the failed-start assertions); uncertainty_figure without its named heat maps
(test_uncertainty_figure_takes_bright_colour_images). Each was seen to fail.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from gendiff.cli import main
from gendiff.experiments.config import resolve
from gendiff.experiments.images import build_model, classifier_metrics, prepare, sample_images
from gendiff.experiments.kinds import load_run
from gendiff.experiments import toy
from gendiff.experiments.toy import sample_points

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "mnist-tiny", "--set", "model.attn_resolutions=[]", "--set", "recipe=confidence",
        "--set", "train.iterations=12", "--set", "checkpoint.every=4", "--set", "eval.samples=16",
        "--set", "eval.calibration_images=4", "--set", "eval.likelihood_images=2", "--set",
        "train.snapshot_every=4", "--set", "train.ema_posthoc=[0.05, 0.1]", "--threads", "1", "--no-progress"]


def _shapes(n: int, size: int, rgb: bool, seed: int = 0):
    """n 8-bit images: a bright square (class 0) or a bar (class 1) at a random place, on a dark
    background."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = np.full((n, size, size, 3), 20, np.uint8)
    for i, k in enumerate(y):
        r, c = rng.integers(0, size // 2, 2)
        h, w = (size // 3, size // 3) if k == 0 else (size // 6, size // 2)
        x[i, r:r + h, c:c + w] = rng.integers(150, 255, 3) if rgb else rng.integers(150, 255)
    return (x if rgb else x[..., :1]), y


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("own") / "shapes"
    x, y = _shapes(40, 16, rgb=True)
    for i, (img, k) in enumerate(zip(x, y)):
        d = root / ("squares" if k == 0 else "bars")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    return str(root)


@pytest.fixture(scope="module")
def gray_npz(tmp_path_factory):
    x, y = _shapes(40, 16, rgb=False, seed=1)
    path = tmp_path_factory.mktemp("own") / "shapes.npz"
    np.savez(path, images=x[..., 0], labels=y)                     # N×H×W, the documented grayscale layout
    return str(path)


def _cli(args):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    return subprocess.Popen([sys.executable, "-m", "gendiff.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("data", ["rgb_folder", "gray_npz"])
def test_own_data_through_every_command(data, request, tmp_path, capsys):
    path = request.getfixturevalue(data)
    name = "folder" if data == "rgb_folder" else "npz"
    channels = 3 if name == "folder" else 1
    sets = [*TINY, "--set", f"data.name={name}", "--set", f"data.path={path}"]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    p = _cli([*sets, "--out", ref])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert "40 images" in out and "36 train / 4 test" in out                      # the split, stated
    assert "36 train / 4 test" in open(os.path.join(ref, "data.txt")).read()
    # killed after its first checkpoint, resumed: bitwise the uninterrupted run
    p = _cli([*sets, "--out", run])
    t0, ck = time.time(), os.path.join(run, "checkpoints")
    while not (os.path.isdir(ck) and any(f.endswith(".json") for f in os.listdir(ck))):
        assert time.time() - t0 < 300 and p.poll() is None, "no checkpoint before the end"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    p = _cli(["--resume", run, "--threads", "1", "--no-progress"])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    from safetensors.torch import load_file
    a, b = (load_file(os.path.join(r, "model.safetensors")) for r in (ref, run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert {"fid", "precision", "recall"} <= set(m["samples"]) and "classifier_test_accuracy" in m
    assert "sample_metrics_unreliable" in m and set(m["calibration"]["bins"]) >= {"sigma=0.2"}
    assert os.path.exists(os.path.join(run, "uncertainty.png"))
    # sample: N PNG files, one npz, a grid; the same images whatever the batch
    dest = str(tmp_path / "samples")
    assert main(["sample", run, "--samples", "6", "--out", dest, "--steps", "3", "--batch", "4"]) == 0
    files = sorted(os.listdir(dest))
    assert [f for f in files if f[0].isdigit()] == [f"{i:06d}.png" for i in range(6)]
    assert {"samples.npz", "grid.png", "samples.json"} <= set(files)
    imgs = np.load(os.path.join(dest, "samples.npz"))["images"]
    assert imgs.shape == (6, channels, 16, 16) and imgs.dtype == np.uint8
    first = np.asarray(Image.open(os.path.join(dest, "000000.png")))
    assert np.array_equal(first if channels == 3 else first[None], imgs[0].transpose(1, 2, 0) if channels == 3
                          else imgs[0])
    assert main(["sample", run, "--samples", "6", "--out", dest + "-b6", "--steps", "3", "--batch", "6"]) == 0
    assert np.array_equal(np.load(os.path.join(dest + "-b6", "samples.npz"))["images"], imgs)
    # eval, likelihood, report
    capsys.readouterr()
    assert main(["eval", run, "--samples", "8", "--steps", "3"]) == 0
    said = capsys.readouterr().out
    assert "FID" in said and "classifier with test accuracy" in said
    assert main(["posthoc-ema", run, "--sigma-rel", "0.08"]) == 0                   # EDM2's post-hoc EMA
    name = "model-posthoc-0.080-12.safetensors"
    assert main(["eval", run, "--samples", "8", "--steps", "3", "--weights", name]) == 0
    assert os.path.exists(os.path.join(run, "eval-3-8-seed0-model-posthoc-0.080-12.json"))
    assert main(["likelihood", run, "--points", "2"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    assert np.isfinite(json.load(open(os.path.join(run, "likelihood.json")))["bpd_pf_ode"])
    assert main(["likelihood", run, "--method", "exact"]) == 2
    assert "--method='exact'" in capsys.readouterr().err
    assert main(["report", run]) == 0
    page = open(os.path.join(run, "index.html")).read()
    for part in ("Uncertainty of the confidence head: noised test images", "own samples, noised again",
                 "eval-3-8-seed0.json", "likelihood.json", "better", "bits/dim", "samples.png"):
        assert part in page, part
    cfg, model = load_run(run)                                       # the three documented lines
    assert cfg.data.path == path and model.net.img_channels == channels
    moved = path + ".moved"                                          # the model loads without its data
    os.rename(path, moved)
    try:
        assert load_run(run)[1].net.img_resolution == 16
    finally:
        os.rename(moved, path)


def _write_png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def test_bad_own_data_is_one_line_naming_it_and_creates_nothing(tmp_path, capsys, rgb_folder):
    def run(*sets):
        out = tmp_path / f"run{len(os.listdir(tmp_path))}"
        code = main(["train", *TINY, *(x for s in sets for x in ("--set", s)), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and not out.exists(), err
        assert err.count("\n") == 1, err                               # one line, no traceback
        return err
    corrupt = tmp_path / "corrupt"
    good = np.full((16, 16, 3), 100, np.uint8)
    for i in range(4):
        _write_png(str(corrupt / f"{i}.png"), good)
    data = open(corrupt / "3.png", "rb").read()
    (corrupt / "3.png").write_bytes(data[: len(data) // 2])
    assert "3.png" in run("data.name=folder", f"data.path={corrupt}")
    assert "data.path" in run("data.name=npz", f"data.path={tmp_path / 'missing.npz'}")
    mixed = tmp_path / "mixed"
    _write_png(str(mixed / "a.png"), good)
    _write_png(str(mixed / "b.png"), good[..., 0])
    assert "data.channels" in run("data.name=folder", f"data.path={mixed}")
    # the U-Net's attention at 14×14 does not fit 16×16 images: the error names the config keys that fix it
    err = main(["train", "--preset", "mnist-tiny", "--set", "data.name=folder", "--set",
                f"data.path={rgb_folder}", "--out", str(tmp_path / "attn")])
    msg = capsys.readouterr().err
    assert err == 2 and "model.attn_resolutions" in msg and "data.size" in msg
    assert not (tmp_path / "attn").exists()
    # with data.size the same folder fits the preset's U-Net
    cfg = resolve("mnist-tiny", sets=["data.name=folder", f"data.path={rgb_folder}", "data.size=28"])
    assert prepare(cfg).model.net.img_resolution == 28


def test_sample_metrics_near_chance_are_marked_unreliable():
    assert classifier_metrics(0.53, 2)["sample_metrics_unreliable"]
    assert not classifier_metrics(0.95, 2)["sample_metrics_unreliable"]
    assert classifier_metrics(0.25, 10)["sample_metrics_unreliable"]
    assert not classifier_metrics(0.99, 10)["sample_metrics_unreliable"]


def test_image_samples_do_not_depend_on_the_batch_split(gray_npz):
    """One seed per image (EDM2's StackedRandomGenerator): eval.batch 250 and 100 give the same 500 images,
    for the Heun sampler (EDM recipes) and DDPM's ancestral sampler (noise at every step)."""
    for recipe in ("edm", "eps"):
        cfg = resolve("mnist-tiny",
                      sets=["data.name=npz", f"data.path={gray_npz}", "model.attn_resolutions=[]",
                                          f"recipe={recipe}", "eval.sampler_steps=3", "train.sigma_data=0.5"])
        torch.manual_seed(0)
        model = build_model(cfg, (1, 16, 16), 2)
        for p in model.parameters():                 # a non-trivial network (the output layer starts at zero)
            torch.nn.init.normal_(p, std=0.05)
        a, _ = sample_images(model, cfg, 500, seed=7, batch=250)
        b, _ = sample_images(model, cfg, 500, seed=7, batch=100)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        c, _ = sample_images(model, cfg, 500, seed=8, batch=100)
        assert not torch.allclose(a, c)


def test_toy_samples_do_not_depend_on_the_batch_split():
    cfg = resolve("toy-quick")
    torch.manual_seed(0)
    model = toy.build_model(cfg)
    for sampler in ("heun", "euler_maruyama", "pc"):     # pc: batch-mean step sizes, so always one batch
        a, _, _ = sample_points(model, cfg, 300, seed=3, sampler=sampler, steps=4, batch=300)
        b, _, _ = sample_points(model, cfg, 300, seed=3, sampler=sampler, steps=4, batch=64)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_resume_after_a_corrupt_checkpoint_logs_each_step_once(tmp_path):
    """The newest checkpoint corrupted: the resume falls back to the previous one and the log is cut back to
    the step actually resumed from (the metrics.jsonl lines and the TensorBoard events), so every step is
    logged
    once."""
    out = str(tmp_path / "run")
    quick = ["--preset", "toy-quick", "--set", "train.iterations=64", "--set", "train.batch=64",
             "--set", "checkpoint.every=16", "--set", "eval.samples=64", "--set", "eval.eval_points=64",
             "--threads", "1", "--no-progress"]
    assert main(["train", *quick, "--out", out]) == 0
    ck = os.path.join(out, "checkpoints")
    newest = sorted(f for f in os.listdir(ck) if f.endswith(".safetensors"))[-1]     # the final step, 64
    with open(os.path.join(ck, newest), "r+b") as f:
        f.seek(200)
        f.write(b"\0" * 64)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert main(["train", "--resume", out, "--threads", "1", "--no-progress"]) == 0
    steps = [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [16, 32, 48, 64]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(os.path.join(out, "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == steps


def test_uncertainty_figure_takes_bright_colour_images(tmp_path):
    """Colour images with no negative value (bright RGB) are images, not heat maps: the figure's heat maps are
    named, not guessed from the values."""
    from gendiff.experiments.images import uncertainty_figure
    from gendiff.heads import Prediction

    class Known(torch.nn.Module):
        def predict(self, x, sigma):
            return Prediction(x, x.clamp(0.2, 1), var=torch.full_like(x, float(sigma) ** 2 + 0.01))
    x0 = 0.2 + 0.8 * torch.rand(2, 3, 8, 8)
    uncertainty_figure(Known(), x0, str(tmp_path / "u.png"))
    assert (tmp_path / "u.png").stat().st_size > 1000


def test_a_torn_log_line_does_not_stop_a_resume(tmp_path):
    from gendiff.experiments.runfolder import _cut_log
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 16, "loss": 1.0}\n{"step": 32, "loss": 0.9}\n{"step": 48, "lo')
    _cut_log(str(p), 40)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [16, 32]


def test_the_image_table_needs_an_image_preset_and_known_rows(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["ablate", "--suite", "images", "--preset", "toy-quick", "--out", str(out)]) == 2
    assert "needs an image preset" in capsys.readouterr().err and not out.exists()
    assert main(["ablate", "--suite", "images", "--preset", "mnist-tiny", "--rows", "eps,nope",
                 "--out", str(out)]) == 2
    assert "--rows='nope'" in capsys.readouterr().err and not out.exists()
