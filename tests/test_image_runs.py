"""Image runs end to end on tiny data the tests make: every objective of seed 004's table trains
through the one loop and its loss falls; runs write their folder and resume; CFG with the U-Net; the learned
variance is what the DDPM sampler uses; the table is resumable; bad data gives clear errors.

Breakages tried (the test that catches each): score-cfg without label dropout (null class never trained:
the CFG test's conditional/unconditional outputs coincide at init... caught by the dropout count); a v head
whose variance the sampler ignores (learned-variance sampler test); `_LastG` re-evaluating the network
(NFE test); run_table not reading finished rows (table resume test); DDPM rows with σ_data 0.5 (c_in test);
build_model dropping model.resample or model.emb_channels, or the config's int-or-list coercion of
model.num_blocks removed (layout test); calibrate reading σ_φ² instead of σ_φ² − σ², its σ per example tiled
instead of one σ per block of images (no bin keeps both splits: a clear error), or its fit/measured split
interleaved per σ instead of per image (calibration test).
Issue 18: pixel_std with divisor N − 1 (pixel_std test); σ_data measured on the whole split instead of the
data.subset, or measured even where a number is given (prepare test); the CLI saving the config before
prepare resolved it, or load_model measuring again (run-folder/CLI test); run_table not taking a row's
recorded σ_data (table resume test); DDPM rows' PF-ODE from σ̃_1 again, the DDPM bound's ± without the
draw of steps or with it in nats (likelihood-evaluation test).
"""
import json
import math
import os

import numpy as np
import pytest
import torch

from gendiff.experiments.config import resolve
from gendiff.experiments.images import build_model, run_table, sample_images
from gendiff.experiments.recipes import IMAGE_RECIPES
from gendiff.losses import NoisyBatch
from gendiff.data.sources import DataSource
from gendiff.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def density_and_loss(cfg):
    recipe = IMAGE_RECIPES[cfg.recipe]
    density = recipe.density(cfg.train)
    return density, recipe.loss_fn(density)


@pytest.fixture(scope="module")
def blobs(blobs_npz):
    """240 labelled 28×28 8-bit images: a bright square in one of four quadrants (the label); conftest's."""
    return blobs_npz


def tiny(blobs, objective, *sets):
    return resolve("mnist-tiny", sets=[f"data.path={blobs}", "data.name=npz", f"recipe={objective}", *sets])


@pytest.mark.parametrize("objective", sorted(IMAGE_RECIPES))
def test_every_objective_trains_and_its_loss_falls(blobs, objective):
    # T37's head starts at σ_φ ≥ σ, nearer its optimum on this data (measured σ_data): its loss falls by 18%
    # in 40 steps, by more than 20% in 120
    steps = 120 if objective in ("confidence-excess", "confidence-excess-loggrad") else 40
    cfg = tiny(blobs, objective, f"train.iterations={steps}", "train.batch=16", "train.precision=fp32",
               "train.lr=5e-3")
    from gendiff.experiments.images import load_images, with_sigma_data
    data = load_images(cfg.data, "train")
    cfg = with_sigma_data(cfg, data.pixel_std)                        # as prepare does
    x = data.to_tensor()
    labels = torch.from_numpy(data.labels) if IMAGE_RECIPES[objective].conditional else None
    torch.manual_seed(0)
    model = build_model(cfg, tuple(x.shape[1:]), data.num_classes)
    density, loss = density_and_loss(cfg)
    g = torch.Generator().manual_seed(1)
    sig = density.sample(64, g)
    xe = x[:64]
    probe = NoisyBatch(xe, xe + sig.view(-1, 1, 1, 1) * torch.randn(xe.shape, generator=g), sig,
                       labels=None if labels is None else labels[:64])

    def held_out():
        with torch.no_grad():
            return loss(model, probe).mean().item()
    before = held_out()
    train(model, loss, DataSource(x, labels, data.num_classes if labels is not None else 0,
                                  IMAGE_RECIPES[objective].label_dropout),
          cfg.train, seed=0, progress=False, sigma_density=density)
    after = held_out()
    assert after < 0.8 * before, (objective, before, after)


def test_ddpm_rows_feed_the_net_the_ddpm_latent(blobs):
    m = build_model(tiny(blobs, "eps"), (1, 28, 28), 4)
    sc = m.precond(torch.tensor(2.0))
    assert abs(sc.c_in.item() - 1 / 5 ** 0.5) < 1e-6     # c_in·x̃ = x̃/√(1 + σ̃²) = z (σ_data = 1, T2)


def test_cfg_weight_zero_is_the_conditional_unet(blobs):
    cfg = tiny(blobs, "score-cfg")
    torch.manual_seed(0)
    model = build_model(cfg, (1, 28, 28), 4)
    for p in model.parameters():                      # leave the zero-initialised output: make it non-trivial
        torch.nn.init.normal_(p, std=0.05)
    from gendiff.guidance import Conditioned, classifier_free
    x, s, y = torch.randn(4, 1, 28, 28), torch.tensor(0.8), torch.tensor([0, 1, 2, 3])
    cond = Conditioned(model, y)(x, s)
    assert torch.equal(classifier_free(model, y, 4, 0.0)(x, s), cond)
    assert not torch.allclose(cond, Conditioned(model, torch.full((4,), 4))(x, s))
    torch.testing.assert_close(classifier_free(model, y, 4, 5.0)(x, s),
                               6 * cond - 5 * Conditioned(model, torch.full((4,), 4))(x, s))


def test_learned_variance_is_what_the_sampler_uses(blobs):
    cfg = tiny(blobs, "learned-variance")
    torch.manual_seed(0)
    model = build_model(cfg, (1, 28, 28), 0)
    a, info = sample_images(model, cfg, 8, seed=3)
    assert info["nfe"] == cfg.eval.sampler_steps            # v comes from the same evaluation as μ
    with torch.no_grad():
        model.net.conv_out.weight[1:].zero_()
        model.net.conv_out.bias[1:] = 1.0                   # G = 1: v = 1, Σ = β_t (not the midpoint)
    b, _ = sample_images(model, cfg, 8, seed=3)
    assert not torch.allclose(a, b)


def test_image_run_folder_and_resume_from_the_cli(blobs, tmp_path, monkeypatch):
    from gendiff.cli import main
    out = str(tmp_path / "run")
    sets = ["--set", f"data.path={blobs}", "--set", "data.name=npz", "--set", "recipe=confidence"]
    assert main(["train", "--preset", "mnist-tiny", *sets, "--set", "train.iterations=16", "--out", out,
                 "--no-progress"]) == 0
    for f in ("config.toml", "metrics.json", "model.safetensors", "samples.png", "uncertainty.png",
              "metrics.jsonl"):
        assert os.path.exists(os.path.join(out, f)), f
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert {"fid", "precision", "recall", "class_counts", "nfe"} <= set(m["samples"])
    assert set(m["calibration"]["bins"]) == {f"sigma={s:g}" for s in (0.05, 0.1, 0.2, 0.5, 1, 2)}
    assert os.path.exists(os.path.join(out, "calibration.png"))
    assert m["bpd_pf_ode"] > 0 and m["classifier_test_accuracy"] > 0.9
    # σ_data measured once (the preset says 0) and recorded: config.toml, data.json, metrics.json
    from gendiff.data.images import ImageData
    from gendiff.experiments.images import load_splits
    train_split = load_splits(resolve(toml_path=os.path.join(out, "config.toml")).data)[0]
    want = float((train_split.images.astype(np.float64) / 127.5 - 1).std())      # numpy's own std
    recorded = resolve(toml_path=os.path.join(out, "config.toml")).train.sigma_data
    assert recorded == pytest.approx(want, rel=1e-12) and f"sigma_data = {recorded!r}" in open(
        os.path.join(out, "config.toml")).read()
    assert json.load(open(os.path.join(out, "data.json")))["sigma_data"] == recorded == m["sigma_data"]
    monkeypatch.setattr(ImageData, "pixel_std", lambda self: pytest.fail("σ_data measured again"))
    assert main(["train", "--resume", out, "--no-progress"]) == 0   # the final checkpoint: nothing to train
    assert json.load(open(os.path.join(out, "metrics.json")))["samples"]["fid"] == m["samples"]["fid"]
    from safetensors.torch import load_file
    from gendiff.experiments import load_run
    cfg, model = load_run(out)                                       # the run back: config and EMA weights
    assert cfg.recipe == "confidence" and model.head.__class__.__name__ == "DiagonalHead"
    assert cfg.train.sigma_data == model.precond.sigma_data == recorded   # the recorded one, not measured
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no config.toml"):
        load_run(str(tmp_path))


def test_pixel_std_is_numpys_std_of_the_scaled_pixels():
    """σ_data of any uint8 data is numpy's float64 std (divisor N) of every value k/127.5 − 1, channels and
    positions pooled; here bytes with a known std too: half 0 (−1), half 255 (+1) has std exactly 1."""
    from gendiff.data.images import ImageData
    x = np.random.default_rng(3).integers(0, 256, (37, 3, 5, 4)).astype(np.uint8)
    want = (x.astype(np.float64) / 127.5 - 1).std()
    assert ImageData(x).pixel_std() == pytest.approx(want, rel=1e-13, abs=0)
    two = np.array([0, 255] * 8, np.uint8).reshape(4, 1, 2, 2)
    assert ImageData(two).pixel_std() == 1.0


def test_sigma_data_is_measured_at_prepare_unless_given(blobs, monkeypatch):
    """train.sigma_data = 0 (the image presets): prepare measures the std of the images the run trains on
    (the data.subset if one is set) and builds the EDM rows with it; Setup.cfg holds it; a number given
    wins and nothing is measured; a toy run keeps 0.5 and refuses 0."""
    from gendiff.data.images import ImageData
    from gendiff.experiments import toy
    from gendiff.experiments.images import load_splits, prepare, training_data
    for preset in ("mnist-cpu", "mnist-gpu", "mnist-tiny"):
        assert resolve(preset).train.sigma_data == 0.0
    cfg = tiny(blobs, "confidence")
    full = load_splits(cfg.data)[0].images.astype(np.float64) / 127.5 - 1
    setup = prepare(cfg)
    assert setup.cfg.train.sigma_data == pytest.approx(full.std(), rel=1e-12)
    assert setup.model.precond.sigma_data == setup.cfg.train.sigma_data and cfg.train.sigma_data == 0.0
    assert "σ_data" in setup.split
    sub = tiny(blobs, "edm", "data.subset=20")
    part = training_data(sub, load_splits(sub.data)[0]).images.astype(np.float64) / 127.5 - 1
    assert len(part) == 20 and prepare(sub).cfg.train.sigma_data == pytest.approx(part.std(), rel=1e-12)
    assert abs(part.std() - full.std()) > 1e-3                       # the subset's own value, not the split's
    monkeypatch.setattr(ImageData, "pixel_std", lambda self: pytest.fail("σ_data measured though given"))
    given = prepare(tiny(blobs, "edm", "train.sigma_data=0.3"))
    assert given.cfg.train.sigma_data == given.model.precond.sigma_data == 0.3
    assert resolve("toy-reference").train.sigma_data == 0.5
    assert toy.prepare(resolve("toy-quick")).model.precond.sigma_data == 0.5
    with pytest.raises(ValueError, match="sigma_data=0.0 must be > 0"):
        resolve("toy-quick", sets=["train.sigma_data=0"])
    with pytest.raises(ValueError, match="train.sigma_data=-0.1"):
        tiny(blobs, "edm", "train.sigma_data=-0.1")
    with pytest.raises(ValueError, match="measured from the training"):
        build_model(tiny(blobs, "edm"), (1, 28, 28), 4)             # unmeasured: build_model cannot guess


def test_table_is_resumable(blobs, tmp_path, monkeypatch):
    import gendiff.experiments.images as ir
    base = tiny(blobs, "eps", "eval.likelihood_images=0")
    out = str(tmp_path / "table")
    md = run_table(base, ("eps", "edm"), out, progress=False, log=lambda *a: None)
    assert "| eps |" in md and "| edm |" in md and os.path.exists(os.path.join(out, "images.json"))
    monkeypatch.setattr(ir, "train_run", lambda *a, **k: pytest.fail("a finished row was retrained"))
    assert run_table(base, ("eps", "edm"), out, progress=False, log=lambda *a: None) == md
    with pytest.raises(ValueError, match="another config"):
        run_table(tiny(blobs, "eps", "train.lr=0.1", "eval.likelihood_images=0"), ("eps",), out,
                  progress=False)
    from gendiff.cli import main
    assert main(["report", out]) == 0                                # the table's results folder has a report
    page = open(os.path.join(out, "index.html")).read()
    assert "classifier acc." in page and "eps/samples.png" in page


@pytest.mark.parametrize("images, labels, match", [
    (np.arange(10 * 27 * 27).astype(np.uint8).reshape(10, 1, 27, 27), None, "img_resolution"),
    (np.zeros((10, 1, 28, 28), np.uint8), None, "pixel std is 0.0"),     # σ_data cannot be measured
    (np.zeros((10, 1, 28, 28), np.uint8), -np.ones(10, np.int64), "labels"),
])
def test_bad_image_data_is_a_clear_error(tmp_path, images, labels, match):
    from gendiff.cli import main
    path = tmp_path / "bad.npz"
    np.savez(path, images=images, **({} if labels is None else {"labels": labels}))
    from gendiff.experiments.images import prepare
    with pytest.raises(ValueError, match=match):
        prepare(resolve("mnist-tiny", sets=[f"data.path={path}", "data.name=npz", "recipe=edm"]))
    assert main(["train", "--preset", "mnist-tiny", "--set", f"data.path={path}", "--set", "data.name=npz",
                 "--out", str(tmp_path / "run2"), "--no-progress"]) == 2
    assert not (tmp_path / "run2").exists()                             # a failed start creates nothing


def test_every_row_gets_the_same_likelihood_evaluation(blobs, monkeypatch):
    """One σ_min for the PF-ODE of every recipe, DDPM rows and EDM rows alike, read off the call the code
    makes (not a constant copied here), and recorded as it was used; the images the ODE starts from are the
    test images dequantised around their own grid values (centred bins: within Δ/2 = 1/255). The DDPM
    bound's ± is √(se over images² + se of the draw of steps²): a ddpm_vlb stub with known per-image bits/dim
    and step_var gives it in closed form."""
    import gendiff.experiments.images as lk
    from gendiff.experiments.images import bits_per_dim
    seen = {}

    def fake(den, y, *, sigma_min, **kw):
        seen[recipe] = (sigma_min, (y.double() - x8.double()).abs().max().item())
        return -torch.ones(len(y), dtype=torch.float64), {"nfe": 0}
    per_image, step_var = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), 0.3     # bits/dim; nats²
    monkeypatch.setattr(lk, "log_likelihood", fake)
    import gendiff.experiments.ddpm_variance as dv                   # where the DDPM bound is taken
    monkeypatch.setattr(dv, "ddpm_vlb", lambda *a, **k: {"bits_per_dim": per_image,
                                                         "step_var": torch.tensor(step_var)})
    x8 = torch.randint(0, 256, (3, 1, 28, 28), generator=torch.Generator().manual_seed(0)) / 127.5 - 1
    for recipe in IMAGE_RECIPES:
        cfg = tiny(blobs, recipe, "train.sigma_data=0.5")
        out = bits_per_dim(build_model(cfg, (1, 28, 28), 4), cfg, x8, 4)
        assert out["bpd_pf_ode_sigma_min"] == seen[recipe][0]
        assert 0 < seen[recipe][1] <= 1 / 255 + 1e-6, recipe          # centred: |y − x_k| ≤ Δ/2
        if IMAGE_RECIPES[recipe].density_name == "ddpm":
            d = 28 * 28
            want = math.sqrt(float(per_image.var()) / 3 + step_var / (d * math.log(2)) ** 2)
            assert out["bpd_ddpm_bound_se"] == pytest.approx(want, rel=1e-12)
    assert len({v[0] for v in seen.values()}) == 1 and len(seen) == len(IMAGE_RECIPES)
    assert {IMAGE_RECIPES[r].density_name for r in seen} == {"ddpm", "edm"}


def test_logged_throughput_spans_sittings(tmp_path):
    """Images/s over consecutive lines of each sitting, and the training's wall seconds as the sum of each
    sitting's last `seconds` (5.0 + 2.5): a run resumed to be evaluated (one more sitting logging nothing)
    keeps its training time. Breakage tried: the last line's seconds alone (2.5) fails."""
    from gendiff.experiments.images import logged_img_per_s, logged_train_seconds
    p = tmp_path / "metrics.jsonl"
    rows = [(16, 1.0), (32, 3.0), (48, 5.0), (48, 0.5), (64, 2.5)]     # a resume at step 48: seconds restart
    p.write_text("".join(json.dumps({"step": s, "seconds": t}) + "\n" for s, t in rows))
    assert logged_img_per_s(str(p), 4) == pytest.approx((16 * 3) * 4 / (2.0 * 3))
    assert logged_train_seconds(str(p)) == pytest.approx(7.5)
    # a sitting killed after step 48 at 5 s, resumed from the checkpoint at step 32 whose first line (step 48)
    # comes at 30 s: the step not advancing marks the new sitting (breakage tried: seconds alone, 30 s)
    q = tmp_path / "killed.jsonl"
    q.write_text("".join(json.dumps({"step": s, "seconds": t}) + "\n"
                         for s, t in [(16, 1.0), (32, 3.0), (48, 5.0), (48, 30.0), (64, 32.0)]))
    assert logged_train_seconds(str(q)) == pytest.approx(37.0)
    assert np.isnan(logged_img_per_s(str(tmp_path / "none.jsonl"), 4))
    assert np.isnan(logged_train_seconds(str(tmp_path / "none.jsonl")))


def test_device_choice(blobs, tmp_path):
    from gendiff.cli import main
    from gendiff.experiments.images import resolve_device
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available()
                                                                                   else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
        assert main(["train", "--preset", "mnist-tiny", "--set", f"data.path={blobs}", "--set",
                     "data.name=npz", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert main(["train", "--preset", "toy-quick", "--device", "cuda", "--out", str(tmp_path / "t")]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device path)")
def test_an_image_run_trains_and_samples_on_the_gpu(blobs, tmp_path):
    from gendiff.experiments.images import prepare, train_run
    from gendiff.experiments.runfolder import start_run
    cfg = tiny(blobs, "learned-variance")
    start_run(cfg, str(tmp_path / "gpu"))
    m = train_run(cfg, str(tmp_path / "gpu"), prepare(cfg, "cuda"), progress=False)
    assert np.isfinite(m["samples"]["fid"]) and np.isfinite(m["bpd_ddpm_bound"])


def test_calibration_uses_the_excess_over_the_noise(blobs, tmp_path):
    """A head with σ_φ² = σ² + s² exactly (T8) predicts Var[x0 | x̃] = s² for the error of μ: calibrate reads
    s², not σ_φ². Where s² varies over the pixels (0.3² on one half, 0.05² on the other) it beats the best
    constant per σ; its floored pixels (σ_φ ≤ σ in two columns, with errors of std 1) are counted apart and
    left out of the rest: σ_φ = σ in float32 stays below the floor (1e-3·σ)² after − σ² in float64. Images 0,
    2, … fit the constant, 1, 3, … are measured (at each of the 6 σ: 6 × 32 examples per split)."""
    from gendiff.calibration import GAUSS_COVERAGE_1, GAUSS_COVERAGE_2
    from gendiff.heads import Prediction
    from gendiff.experiments.images import calibrate

    sd = torch.where(torch.arange(28) < 14, 0.3, 0.05).view(1, 1, 28, 1).expand(1, 1, 28, 28)

    class Known(torch.nn.Module):
        def predict(self, x, sigma):
            s2 = (sd ** 2).expand_as(x).clone()
            s2[..., 26], s2[..., 27] = -0.1 * sigma ** 2, 0.0           # floored columns: σ_φ < σ, σ_φ = σ
            err = torch.where(s2 > 0, sd, 1.0) * torch.randn(x.shape, generator=g)
            return Prediction(x, x0[:len(x)] + err, var=sigma ** 2 + s2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(64, 1, 28, 28)
    res = calibrate(Known(), tiny(blobs, "confidence"), x0, str(tmp_path))
    assert res["examples_fit"] == res["examples_eval"] == 6 * 32
    assert list(res["bins"]) == [f"sigma={s:g}" for s in (0.05, 0.1, 0.2, 0.5, 1, 2)]
    for v in res["bins"].values():
        h, n = v["head"], v["rest"]
        assert v["examples"] == 32 and h["floored_share"] == pytest.approx(2 / 28) and n == 32 * 28 * 26
        for p, got in ((GAUSS_COVERAGE_1, h["coverage_1s"]), (GAUSS_COVERAGE_2, h["coverage_2s"])):
            assert abs(got - p) < 4 * (p * (1 - p) / n) ** 0.5
        assert v["gain"]["constant"]["verdict"] == "head better"
        assert h["nll_floored_all"] > h["nll"] + 1e3                # the floored column, error 1 at std 1e-3σ
    assert os.path.exists(tmp_path / "uncertainty.png") and os.path.exists(tmp_path / "calibration.png")
    with pytest.raises(ValueError, match="calibration_images"):
        calibrate(Known(), tiny(blobs, "confidence"), x0[:1], str(tmp_path))


def test_unet_layout_options_reach_the_model(tmp_path):
    """model.num_blocks (one integer or one per level), model.resample and model.emb_channels go from --set
    and TOML through build_model into the UNet; an old config without them (num_blocks an integer) still loads
    as before; bad values are one clear error naming the key."""
    from gendiff.experiments.config import to_toml
    from gendiff.nets.unet import UNet
    cfg = resolve("mnist-cpu", sets=["recipe=edm", "model.num_blocks=[2, 1, 3]", "model.resample=plain",
                                     "model.emb_channels=40", "train.sigma_data=0.6"])
    assert cfg.model.num_blocks == (2, 1, 3)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert "num_blocks = [2, 1, 3]" in path.read_text() and resolve(toml_path=str(path)) == cfg
    net = build_model(cfg, (1, 28, 28), 10).net
    want = UNet(num_blocks=(2, 1, 3), resample="plain", emb_channels=40)
    assert (net.num_blocks, net.resample, net.emb1.out_features) == ((2, 1, 3), "plain", 40)
    assert [tuple(p.shape) for p in net.parameters()] == [tuple(p.shape) for p in want.parameters()]
    # a session-4 config (its σ_data was 0.5, written out as every resolved config is)
    path.write_text('kind = "images"\nrecipe = "edm"\n[model]\nnum_blocks = 1\n[train]\nsigma_data = 0.5\n')
    old = build_model(resolve(toml_path=str(path)), (1, 28, 28), 10).net
    assert (old.num_blocks, old.resample, old.emb1.out_features) == ((1, 1, 1), "conv", 4 * 32)
    for sets, match in ((["model.num_blocks=[1, 2]"],
                         r"model.num_blocks=\[1, 2\] must be one integer or one per "
                                                      r"level \(3 levels"),
                        (["model.num_blocks=[1, 0, 1]"], r"model.num_blocks\[1\]=0 must be > 0"),
                        (["model.num_blocks=1.5"], r"model.num_blocks=1.5 is not an integer or a list"),
                        (["model.num_blocks=[1, true, 1]"], r"model.num_blocks\[1\]=True is not an integer"),
                        (["model.resample=linear"], r"model.resample='linear' is not allowed"),
                        (["model.emb_channels=-8"], r"model.emb_channels=-8 must be >= 0")):
        with pytest.raises(ValueError, match=match):
            resolve("mnist-cpu", sets=["recipe=edm", *sets])


def test_another_backbone_trains_through_the_same_recipe(blobs):
    """build_model's backbone hook: the callable gets (shape, num_classes, g_channels) as the row needs them
    and its network goes inside the row's Denoiser (precond and head)."""
    from gendiff.nets.unet import UNet
    calls = []

    def backbone(shape, num_classes, g_channels):
        calls.append((shape, num_classes, g_channels))
        return UNet(img_resolution=shape[1], img_channels=shape[0], model_channels=12, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(), num_classes=num_classes, g_channels=g_channels)
    for objective, want in (("confidence", ((1, 28, 28), 0, 1)), ("score-cfg", ((1, 28, 28), 4, 0))):
        cfg = tiny(blobs, objective, "train.sigma_data=0.6")
        model, ref = build_model(cfg, (1, 28, 28), 4, backbone), build_model(cfg, (1, 28, 28), 4)
        assert calls[-1] == want and model.net.model_channels == 12 != ref.net.model_channels
        assert type(model.head) is type(ref.head) and type(model.precond) is type(ref.precond)
        assert model.precond.sigma_data == ref.precond.sigma_data


@pytest.mark.parametrize("objective", ["confidence", "learned-variance", "score-cfg"])
def test_every_image_preset_builds_and_takes_a_step(objective):
    """The presets (mnist-gpu included, which no session has run on a GPU yet) resolve, build their U-Net and
    take one finite training step on two images."""
    from gendiff.experiments.config import IMAGE_PRESETS
    for preset in IMAGE_PRESETS:
        cfg = resolve(preset, sets=[f"recipe={objective}", "train.sigma_data=0.6"])
        torch.manual_seed(0)
        model = build_model(cfg, (1, 28, 28), 10)
        density, loss = density_and_loss(cfg)
        g = torch.Generator().manual_seed(0)
        # 8-bit (the hybrid loss's decoder)
        x0 = torch.randint(0, 256, (2, 1, 28, 28), generator=g) * (2 / 255) - 1
        sigma = density.sample(2, g)
        batch = NoisyBatch(x0, x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g), sigma,
                           labels=torch.tensor([3, 10]) if IMAGE_RECIPES[objective].conditional else None)
        value = loss(model, batch).mean()
        value.backward()
        assert torch.isfinite(value), preset
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), preset


def test_classifier_guidance_on_images(blobs):
    """A NoisyClassifier (the U-Net's trunk + pooled read-out) trained by train_noisy_classifier on the blobs
    beats chance at small σ; sample_images(guide=ClassifierGuided) at w = 0 gives the unguided samples
    exactly, at w = 4 other samples, with the classifier's gradient in x's shape; guide without labels is an
    error."""
    from gendiff.guidance import ClassifierGuided, train_noisy_classifier
    from gendiff.nets.unet import NoisyClassifier
    from gendiff.schedules import LogNormalSigma
    cfg = tiny(blobs, "edm", "eval.batch=8", "train.sigma_data=0.5")
    # shapes at random places (the pooled read-out sees what, not where): 0 horizontal bar, 1 vertical bar,
    # 2 square, 3 nothing
    g = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 4
    x = -torch.ones(240, 1, 28, 28)
    for i, k in enumerate(y.tolist()):
        r, c = torch.randint(2, 16, (2,), generator=g).tolist()
        h, w = {0: (3, 10), 1: (10, 3), 2: (8, 8), 3: (0, 0)}[k]
        x[i, 0, r:r + h, c:c + w] = 1.0
    torch.manual_seed(0)
    clf = NoisyClassifier(classes=4, model_channels=8, channel_mult=(1, 2), attn_resolutions=())
    losses = train_noisy_classifier(clf, x, y, LogNormalSigma(-1.2, 1.2), steps=100, batch=32, lr=3e-3)
    assert sum(losses[-10:]) < 0.65 * sum(losses[:10])          # large σ stays unclassifiable
    with torch.no_grad():
        acc = float((clf(x + 0.1 * torch.randn_like(x), 0.1).argmax(1) == y).double().mean())
    assert acc > 0.6, acc                                                 # chance: ~0.25
    # one σ per image: each image's shift is the one it gets alone at its σ (σ² broadcast over [C, H, W])
    model = build_model(cfg, (1, 28, 28), 4)
    sig = torch.tensor([0.1, 1.0, 5.0])
    guided = ClassifierGuided(model, clf, y[:3], 2.0)
    both = guided.shift(x[:3], sig)
    for i in range(3):
        alone = ClassifierGuided(model, clf, y[i:i + 1], 2.0).shift(x[i:i + 1], float(sig[i]))
        torch.testing.assert_close(both[i:i + 1], alone, rtol=1e-5, atol=1e-7)
        assert both[i].abs().max() > 0
    # under the samplers' bf16 autocast the classifier still runs in float32: the same shift
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(guided.shift(x[:3], sig), both)

    labels = torch.arange(16) % 4
    plain, _ = sample_images(model, cfg, 16, seed=1)
    sampled = lambda w: sample_images(model, cfg, 16, seed=1, labels=labels,  # noqa: E731
                                      guide=lambda d, lab: ClassifierGuided(d, clf, lab, w))[0]
    assert torch.equal(sampled(0.0), plain)

    assert not torch.allclose(sampled(4.0), plain)
    # the shift points uphill in log p_σ(y | x) for every image (a sign error or a wrong log-probability would
    # not)
    with torch.no_grad():
        xs = x[:8] + torch.randn(x[:8].shape, generator=g)
        logp = lambda z: torch.log_softmax(clf(z, 1.0), 1)[torch.arange(8), y[:8]]  # noqa: E731
        step = ClassifierGuided(model, clf, y[:8], 1.0).shift(xs, 1.0)
        step = step / step.flatten(1).norm(dim=1).view(-1, 1, 1, 1)            # a unit step per image
        assert (logp(xs + 0.5 * step) > logp(xs) + 1e-4).all(), logp(xs + 0.5 * step) - logp(xs)
    with pytest.raises(ValueError, match="needs labels"):
        sample_images(model, cfg, 8, guide=lambda d, lab: d)
    with pytest.raises(ValueError, match=r"NoisyClassifier expects x of shape \[N, 1, 28, 28\]"):
        clf(torch.zeros(2, 1, 14, 14), 0.5)


def test_sample_command_on_a_conditional_run(blobs, tmp_path, capsys):
    """`gendiff sample --cfg-weight w --label k` on a class-conditional run: every image asks for class k, CFG
    (T33) counts its two network evaluations per step as the training-end evaluation does; a class the run
    does not have is one line."""
    from gendiff.cli import main
    out, dest = str(tmp_path / "run"), str(tmp_path / "s")
    assert main(["train", "--preset", "mnist-tiny", "--set", f"data.path={blobs}", "--set", "data.name=npz",
                 "--set", "recipe=score-cfg", "--set", "eval.likelihood_images=0",
                 "--set", "cfg_weights=[1.0]", "--out", out, "--no-progress"]) == 0
    assert main(["sample", out, "--samples", "5", "--cfg-weight", "1", "--label", "2", "--out", dest]) == 0
    z = np.load(os.path.join(dest, "samples.npz"))
    assert z["labels"].tolist() == [2] * 5 and z["images"].shape == (5, 1, 28, 28)
    info = json.load(open(os.path.join(dest, "samples.json")))
    plain = json.load(open(os.path.join(out, "metrics.json")))["samples@w=1"]
    assert info["nfe"] == plain["nfe"] and info["cfg_weight"] == 1.0
    assert main(["sample", out, "--samples", "2", "--label", "4", "--out", dest]) == 2      # 4 classes: 0..3
    assert "--label=4" in capsys.readouterr().err


def test_confidence_images_suite_from_the_cli(blobs, tmp_path):
    """`gendiff ablate --suite confidence-images` runs the confidence heads' rows (default rows: the three
    heads and T37 with the log-variance gradient; here two, on tiny data) and its table carries the per-σ
    calibration of each, against the best constant. Breakage tried: only --suite images dispatched to the
    image tables (the suite then fails as a
    toy suite)."""
    from gendiff.cli import main
    from gendiff.experiments.recipes import IMAGE_SUITES
    assert IMAGE_SUITES["confidence-images"][0] == ("confidence", "confidence-excess",
                                                    "confidence-sigma-only", "confidence-excess-loggrad")
    out = tmp_path / "conf"
    sets = ["--set", f"data.path={blobs}", "--set", "data.name=npz", "--set", "eval.likelihood_images=0",
            "--set", "model.attn_resolutions=[]", "--set", "train.iterations=4"]
    assert main(["ablate", "--suite", "confidence-images", "--preset", "mnist-tiny", "--rows",
                 "confidence,confidence-excess", "--out", str(out), "--no-progress", *sets]) == 0
    res = json.load(open(out / "images.json"))
    assert list(res["rows"]) == ["confidence", "confidence-excess"]
    for r in res["rows"].values():
        assert set(r["calibration"]["bins"]) == {f"sigma={s:g}" for s in (0.05, 0.1, 0.2, 0.5, 1, 2)}
    md = open(out / "images.md").read()
    assert "| confidence-excess | 0.05 |" in md
    # without --preset the suite's own budget: the fast layout of mnist-conf
    from gendiff.experiments.config import resolve as resolve_cfg
    assert resolve_cfg(IMAGE_SUITES["confidence-images"][1]).model.resample == "plain"
    assert main(["ablate", "--suite", "confidence-images", "--rows", "edm,nope", "--out",
                 str(tmp_path / "x")]) == 2
