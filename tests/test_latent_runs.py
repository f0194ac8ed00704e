"""Latent diffusion runs from the command line (issue 19; THEORY T3, T12, T36): `gendiff train --preset
vae-tiny`, `gendiff encode`, then `gendiff train --preset latent-tiny --set latent.vae_run=RUN` in T36's
modes a, b, c, `gendiff sample`, `gendiff eval`, `gendiff report`, an exact resume, the refusals (a changed
VAE, commands and options that do not apply, bad configs), and `gendiff ablate --suite latent`, on the tiny
synthetic blobs.

Oracles: σ_data against the latents' own statistics (T36 mode b: √(Var m + E s²)); the decoded images against
the VAE's decoder applied to the un-normalised latents by hand (z/a_c + μ_c from the raw latents file); the
sampling choice of mode c against samples drawn with precond.WithSourceSigma and s̄ recomputed here from the
raw std and the scale; the reconstruction ceiling against the decoder of the raw test means; train img/s
against the run's own log.

Breakages tried (the test that catches each):
- latent_sigma_data without E s² in mode b (test_latent_modes_a_and_b: σ_data of b);
- T36_MODES with a → "sample", or c → "mean" (test_each_mode_draws_T36s_batch);
- sample_decoded ignoring --sampling-sigma (always the model alone): test_latent_run_from_the_cli (total ≠
  diffusion, and total = the WithSourceSigma oracle);
- the typical s̄ from the raw s instead of s' = a_c·s (same test, the oracle);
- Decoder decoding z without Latents.to_vae (same test, the decoded images);
- reconstruction_metrics decoding the test std instead of the mean (same test, the ceiling's FID);
- train_img_per_s of metrics.json counted with batch 1 instead of train.batch (same test);
- Decoder without its sha256 check before load_latents (the hint then says "re-encode"), train_run without
  the check on --resume, encoding_changed without the normalisation check
  (test_a_changed_vae_makes_latent_runs_refuse).
- the suite: row c-total sampled with the diffusion σ's scalings; the pixel row on its preset's data instead
  of the VAE's; images.train_row retraining a finished row; Target 1's difference with its sign flipped;
  the HTML report without the latent folders' figures (all caught by test_latent_suite_from_the_cli).
All of them were run (each caught by its test, then restored).
"""
import json
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gendiff.cli import main
from gendiff.experiments import latent
from gendiff.experiments.config import resolve
from gendiff.experiments.images import feature_classifier, load_splits, logged_img_per_s, sample_images, \
    sample_metrics
from gendiff.experiments.kinds import load_run
from gendiff.experiments.vae import load_latents
from gendiff.experiments.vae import load_model as load_vae
from gendiff.io import file_sha256, generator, save_state
from gendiff.precond import WithSourceSigma

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
QUIET = ["--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def vae_run(blobs_npz, tmp_path_factory):
    """A vae-tiny run on the blobs, encoded (its latents.safetensors)."""
    run = str(tmp_path_factory.mktemp("latent") / "vae")
    assert main(["train", "--preset", "vae-tiny", "--set", "data.name=npz", "--set", f"data.path={blobs_npz}",
                 "--out", run, *QUIET]) == 0
    assert main(["encode", run, "--threads", "1"]) == 0
    return run


def _train(vae: str, out: str, *sets) -> int:
    args = ["--set", f"latent.vae_run={vae}"] + [a for s in sets for a in ("--set", s)]
    return main(["train", "--preset", "latent-tiny", *args, "--out", out, *QUIET])


@pytest.fixture(scope="module")
def run_c(vae_run, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("latent") / "c")
    assert _train(vae_run, run, "latent.mode=c") == 0
    return run


def test_latent_run_from_the_cli(vae_run, run_c, tmp_path, capsys):
    """Mode c end to end: metrics.json (decoded-sample FID ± sd, precision, recall, class counts, the VAE's
    reconstruction ceiling, the classifier, train img/s from the log), data.json (the VAE's sha256, s̄);
    a resume from the step-16 checkpoint ends on the same bytes; `gendiff sample` writes decoded PNGs, whose
    pixels are the VAE decoder of the un-normalised latents; --sampling-sigma total is WithSourceSigma with
    s̄ = the per-channel mean of s' and differs from diffusion; eval, report; refusals in one line."""
    m = json.load(open(os.path.join(run_c, "metrics.json")))
    s, rec = m["samples"], m["reconstruction"]
    assert m["mode"] == "c" and s["sampling_sigma"] == "diffusion" and s["sampler"] == "Heun 4"
    for row in (s, rec):
        assert math.isfinite(row["fid"]) and row["fid_sd"] >= 0 and 0 <= row["precision"] <= 1
        assert sum(row["class_counts"]) == 16 and 0 <= row["recall"] <= 1
    assert rec["images"] == 16 and 0 < m["classifier_test_accuracy"] <= 1
    assert m["train_img_per_s"] > 0
    assert m["train_img_per_s"] == logged_img_per_s(os.path.join(run_c, "metrics.jsonl"), 8)
    raw = load_file(os.path.join(vae_run, "latents.safetensors"))
    a, mu = raw["channel_scale"].view(1, -1, 1, 1), raw["channel_mean"].view(1, -1, 1, 1)
    info = json.load(open(os.path.join(run_c, "data.json")))
    assert info["vae_sha256"] == file_sha256(os.path.join(vae_run, "model.safetensors"))
    s_bar = (raw["train.std"].double() * a.double()).square().mean((0, 2, 3)).sqrt()     # RMS (T3)
    torch.testing.assert_close(torch.tensor(info["typical_std"], dtype=F64), s_bar, rtol=1e-5, atol=0)
    m_train = (raw["train.mean"].double() - mu.double()) * a.double()
    assert resolve(toml_path=os.path.join(run_c, "config.toml")).train.sigma_data == \
        pytest.approx(float(m_train.std(correction=0)), rel=1e-5)

    # the reconstruction ceiling: the decoder of the raw test means of a seeded subset, in the same metrics
    vcfg = resolve(toml_path=os.path.join(vae_run, "config.toml"))
    vae = load_vae(vcfg, vae_run)
    train, test, _ = load_splits(vcfg.data)
    clf, real, _ = feature_classifier(SimpleNamespace(data=vcfg.data, eval=resolve(
        toml_path=os.path.join(run_c, "config.toml")).eval), test, train)
    idx = torch.randperm(24, generator=generator(0, "reconstruction-subset"))[:16]
    with torch.no_grad():
        x_rec = vae.decode(raw["test.mean"][idx]).clamp(-1, 1)
    want = sample_metrics(clf, real, x_rec, test, 4, 0)
    assert rec["fid"] == pytest.approx(want["fid"], rel=1e-6) and rec["class_counts"] == want["class_counts"]

    # exact resume: back to the step-16 checkpoint
    weights = os.path.join(run_c, "model.safetensors")
    first = open(weights, "rb").read()
    run = str(tmp_path / "c")
    shutil.copytree(run_c, run)
    for f in os.listdir(os.path.join(run, "checkpoints")):
        if f.startswith("ckpt-00000032"):
            os.remove(os.path.join(run, "checkpoints", f))
    os.remove(os.path.join(run, "model.safetensors"))
    assert main(["train", "--resume", run, *QUIET]) == 0
    assert open(os.path.join(run, "model.safetensors"), "rb").read() == first

    # sample: decoded PNGs; the pixels are the decoder of z/a + μ; total ≠ diffusion, each its oracle
    cfg, model = load_run(run_c)
    dests = {}
    for ss in ("diffusion", "total"):
        dests[ss] = str(tmp_path / ss)
        assert main(["sample", run_c, "--samples", "5", "--steps", "3", "--batch", "2", "--out", dests[ss],
                     "--sampling-sigma", ss]) == 0
    files = sorted(os.listdir(dests["total"]))
    assert [f for f in files if f[0].isdigit()] == [f"{i:06d}.png" for i in range(5)]
    assert {"samples.npz", "grid.png", "samples.json"} <= set(files)
    got = {k: np.load(os.path.join(d, "samples.npz")) for k, d in dests.items()}
    total = lambda d: WithSourceSigma(d, s_bar.float().view(1, -1, 1, 1))      # noqa: E731
    for ss, wrap in (("diffusion", None), ("total", total)):
        z, _ = sample_images(model, cfg, 5, seed=0, steps=3, batch=5, clamp=False, wrap=wrap)
        if ss == "total":                          # the source noise s̄ is left in z: decode E[m | z]
            with torch.no_grad():
                z = total(model).final(z, 0.002)
        # the CLI sampled in batches of 2, this in one batch of 5: equal up to float reassociation
        torch.testing.assert_close(torch.from_numpy(got[ss]["latents"]), z, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            x = vae.decode(z / a + mu).clamp(-1, 1)
        assert x.shape == (5, 1, 28, 28) == got[ss]["images"].shape
        u8 = ((x + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.abs(u8.astype(int) - got[ss]["images"].astype(int)).max() <= 1
    assert not np.allclose(got["total"]["latents"], got["diffusion"]["latents"], atol=1e-3)

    capsys.readouterr()
    assert main(["eval", run_c, "--samples", "8", "--steps", "3", "--sampling-sigma", "total"]) == 0
    said = capsys.readouterr().out
    assert "FID" in said and "scalings from the total σ" in said
    assert "reconstructions of 8 test images" in said
    ev = json.load(open(os.path.join(run_c, "eval-3-8-seed0-total.json")))
    assert ev["samples"] == 8 and ev["sampling_sigma"] == "total" and math.isfinite(ev["fid"])
    assert main(["report", run_c]) == 0
    page = open(os.path.join(run_c, "index.html")).read()
    for part in ("samples.png", "train_img_per_s", "eval-3-8-seed0-total.json", "reconstruction.fid"):
        assert part in page, part
    for argv, what in ((["likelihood", run_c], "gendiff likelihood does not apply to a latent run"),
                       (["sample", run_c, "--label", "1"], "--label does not apply to a latent run"),
                       (["eval", run_c, "--cfg-weight", "2"], "--cfg-weight does not apply to a latent run"),
                       (["eval", run_c, "--filter", "0.1"], "--filter does not apply to a latent run"),
                       (["encode", run_c], "gendiff encode applies to VAE runs")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert what in err and err.count("\n") == 1, err


@pytest.mark.parametrize("mode", ["a", "b"])
def test_latent_modes_a_and_b(vae_run, tmp_path, capsys, mode):
    """Modes a and b from the CLI: σ_data is the std of the mode's x0 (a: m; b: √(Var m + E s'²), the std of
    m + s'ε₁); the source draws T36's x0 (a: exactly the normalised m of the example; b: m + s'ε₁, not m)
    with no source σ; --sampling-sigma total is refused for them (it needs a mode-c model)."""
    run = str(tmp_path / mode)
    assert _train(vae_run, run, f"latent.mode={mode}") == 0
    cfg = resolve(toml_path=os.path.join(run, "config.toml"))
    lat = load_latents(vae_run)
    var = lat.train_mean.double().var(correction=0) + (lat.train_std.double().square().mean() if mode == "b"
                                                        else 0)
    assert cfg.train.sigma_data == pytest.approx(float(var.sqrt()), rel=1e-6)
    assert json.load(open(os.path.join(run, "metrics.json")))["mode"] == mode
    capsys.readouterr()
    assert main(["sample", run, "--samples", "2", "--steps", "2", "--sampling-sigma", "total"]) == 2
    assert "--sampling-sigma total applies to latent runs of T36 mode c" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["a", "b", "c"])
def test_each_mode_draws_T36s_batch(vae_run, mode):
    """The source of a latent run draws T36's batch of its mode from the normalised latents: (a) x0 = m of
    the example, no source σ; (b) x0 = m + s'ε₁, not any m; (c) x0 = m, source σ = s' of that example, and
    x̃ − x0 of standardised variance 1 under σ² + s'² (T3)."""
    cfg = resolve("latent-tiny", sets=[f"latent.vae_run={vae_run}", f"latent.mode={mode}"])
    setup = latent.prepare(cfg, "cpu", log=lambda *a: None)
    lat = load_latents(vae_run)
    batch = setup.source.draw(200, torch.full((200,), 0.3), torch.Generator().manual_seed(0))
    diff = (batch.x0[:, None] - lat.train_mean[None]).flatten(2).abs().amax(2)          # [200, 216]
    nearest, idx = diff.min(1)
    assert bool((nearest == 0).all()) == (mode != "b")
    assert (batch.source_sigma is None) == (mode != "c")
    if mode == "c":
        torch.testing.assert_close(batch.source_sigma, lat.train_std[idx], rtol=0, atol=0)
        z = (batch.x_noisy - batch.x0) / (0.09 + batch.source_sigma.square()).sqrt()
        assert abs(float(z.double().var()) - 1) < 0.05


def test_a_changed_vae_makes_latent_runs_refuse(vae_run, run_c, tmp_path, capsys):
    """Changed VAE weights: a new latent run refuses to start (the latents were encoded by other weights) and
    creates nothing; once re-encoded, a latent run trained on the old latents refuses to sample (its decoder
    would not invert what the model learned) and to resume; so it does when the VAE is restored but its data
    encoded again with another normalisation (encode.sigma_data)."""
    vae, run = str(tmp_path / "vae"), str(tmp_path / "c")
    shutil.copytree(vae_run, vae)
    shutil.copytree(run_c, run)
    cfg_path = os.path.join(run, "config.toml")
    text = open(cfg_path).read()
    open(cfg_path, "w").write(text.replace(f'vae_run = "{vae_run}"', f'vae_run = "{vae}"'))
    assert main(["sample", run, "--samples", "2", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    weights = os.path.join(vae, "model.safetensors")
    state = load_file(weights)
    state_before = dict(state)
    key = next(k for k in state if k.endswith("weight"))
    state[key] = state[key] + 1e-3
    save_state(state, weights)
    capsys.readouterr()
    new = str(tmp_path / "new")
    assert _train(vae, new, "latent.mode=c") == 2
    assert "the VAE changed; re-encode" in capsys.readouterr().err and not os.path.exists(new)
    for when in ("before", "after"):                      # encoding the data again does not help this run
        if when == "after":
            assert main(["encode", vae, "--threads", "1"]) == 0
            capsys.readouterr()
        assert main(["sample", run, "--samples", "2", "--steps", "2", "--out", str(tmp_path / "s2")]) == 2
        err = capsys.readouterr().err
        assert "the VAE's weights changed" in err and "decoding with it would not invert" in err, err
        assert err.count("\n") == 1
    assert main(["train", "--resume", run, *QUIET]) == 2
    err = capsys.readouterr().err
    assert "the VAE's weights changed" in err and "start a new latent run" in err
    # the VAE restored, its data encoded again with another normalisation: refused alike
    save_state(state_before, weights)
    cfg_vae = os.path.join(vae, "config.toml")
    text = open(cfg_vae).read()
    open(cfg_vae, "w").write(text.replace("[encode]\nsigma_data = 0.5", "[encode]\nsigma_data = 0.7"))
    assert main(["encode", vae, "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["sample", run, "--samples", "2", "--steps", "2", "--out", str(tmp_path / "s3")]) == 2
    assert "encoded again with another per-channel normalisation" in capsys.readouterr().err
    assert main(["train", "--resume", run, *QUIET]) == 2
    assert "encoded again with another per-channel normalisation" in capsys.readouterr().err


@pytest.mark.parametrize("sets, match", [
    ([], "latent.vae_run='' must name a VAE run folder"),
    (["latent.vae_run=x", "latent.mode=d"], "latent.mode='d' is not allowed"),
    (["latent.vae_run=x", "latent.mode=a", "latent.sampling_sigma=total"],
     "latent.sampling_sigma='total' applies to latent.mode='c'"),
    (["latent.vae_run=x", "latent.sampling_sigma=half"], "latent.sampling_sigma='half' is not allowed"),
    (["latent.vae_run=x", "recipe=eps"], "recipe='eps' is not allowed"),
    (["latent.vae_run=x", "data.name=npz"], "unknown key 'data'"),
])
def test_bad_latent_config_is_one_clear_error(sets, match):
    with pytest.raises(ValueError, match=match):
        resolve("latent-tiny", sets=sets)


def test_bad_latent_runs_are_refused_before_the_folder_exists(vae_run, tmp_path, capsys):
    """A U-Net that cannot take 7×7 latents, a vae_run that is no run folder or is not a VAE run, a VAE run
    not encoded yet: one line each (exit 2), no run folder."""
    unencoded = str(tmp_path / "unencoded")
    shutil.copytree(vae_run, unencoded)
    os.remove(os.path.join(unencoded, "latents.safetensors"))
    image_run = str(tmp_path / "img")
    os.makedirs(image_run)
    open(os.path.join(image_run, "config.toml"), "w").write('kind = "images"\n')
    for sets, what in (([f"latent.vae_run={vae_run}", "model.channel_mult=[1, 2]"],
                        "does not fit 4×7×7 latents"),
                       (["latent.vae_run=" + str(tmp_path / "none")], "is not a run folder"),
                       ([f"latent.vae_run={image_run}"], "is a 'images' run; it must be a VAE run folder"),
                       ([f"latent.vae_run={unencoded}"], "encode its data first")):
        out = str(tmp_path / "run")
        capsys.readouterr()
        assert main(["train", "--preset", "latent-tiny", *sum((["--set", s] for s in sets), []),
                     "--out", out, *QUIET]) == 2
        err = capsys.readouterr().err
        assert what in err and err.count("\n") == 1, err
        assert not os.path.exists(out)


def test_latent_suite_from_the_cli(vae_run, blobs_npz, tmp_path, capsys):
    """`gendiff ablate --suite latent` at latent-tiny: one run folder per trained row (a, c, the pixel
    reference on the VAE's data with the same recipe, samples and classifier), c-total the model of c sampled
    with the total σ's scalings (no second training); latent.json / latent.md with the targets computed from
    the rows; resumable (a deleted row result is recomputed to the same FID, finished rows are read); another
    config in the folder is one line; `gendiff report` renders it."""
    out = str(tmp_path / "suite")
    argv = ["ablate", "--suite", "latent", "--preset", "latent-tiny", "--set", f"latent.vae_run={vae_run}",
            "--set", "pixel.train.iterations=32", "--set", "pixel.checkpoint.every=16",
            "--rows", "a,c-diffusion,c-total,pixel", "--out", out, "--no-progress"]
    assert main(argv) == 0
    res = json.load(open(os.path.join(out, "latent.json")))
    rows = res["rows"]
    assert list(rows) == ["a", "c-diffusion", "c-total", "pixel"] and res["folders"] == ["a", "c", "pixel"]
    assert rows["c-diffusion"]["samples"]["sampling_sigma"] == "diffusion"
    assert rows["c-total"]["samples"]["sampling_sigma"] == "total"
    assert os.path.exists(os.path.join(out, "c", "samples-total.png")) and not os.path.exists(
        os.path.join(out, "c-total"))
    pix = resolve(toml_path=os.path.join(out, "pixel", "config.toml"))
    assert pix.kind == "images" and pix.recipe == "confidence" and pix.data.path == blobs_npz
    assert pix.eval.samples == 16 and pix.eval.classifier_steps == 30 and pix.train.iterations == 32
    for r in rows:
        assert rows[r]["train_img_per_s"] > 0 and math.isfinite(rows[r]["samples"]["fid"])
    assert rows["pixel"]["train_flops_per_image"] > rows["a"]["train_flops_per_image"] > 0
    md = open(os.path.join(out, "latent.md")).read()
    fid = {r: rows[r]["samples"]["fid"] for r in rows}
    best_c = min(("c-diffusion", "c-total"), key=fid.get)
    assert f"{best_c} {fid[best_c]:.1f} against a {fid['a']:.1f}, a difference of " \
           f"{fid[best_c] - fid['a']:+.1f}" in md
    assert ("met." if fid[best_c] <= fid["a"] else "not met.") in md.split("Target 1")[1].split("\n")[0]
    assert "Target 2" in md and md.count("\n| ") == 5

    # resumable: finished rows read, a deleted result recomputed alike
    os.remove(os.path.join(out, "c", "metrics-total.json"))
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "a: finished earlier" in said and "pixel: finished earlier" in said
    again = json.load(open(os.path.join(out, "latent.json")))["rows"]
    assert {r: again[r]["samples"]["fid"] for r in again} == fid
    assert main([*argv[:-3], "--set", "train.lr=0.001", "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with another config" in err and err.count("\n") == 1
    assert main(["report", out]) == 0
    page = open(os.path.join(out, "index.html")).read()
    assert "Target 1" in page and "c/samples-total.png" in page and "pixel/samples.png" in page
