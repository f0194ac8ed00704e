"""The VAE of latent diffusion (issue 19; THEORY T3, T36): its ELBO against closed forms, its training through
the one loop, the VAE run folder from the CLI (train, resume, eval, refusals) and the encoded dataset (sha256
of the weights, the per-channel normalisation to σ_data).

Breakages tried (the test that catches each):
- gaussian_kl without its −1, or with log s² for log s (test_kl_and_reconstruction_are_the_closed_forms);
- gaussian_nll with σ_x instead of σ_x² in the quadratic term, ELBOLoss weighting the reconstruction
  instead of the KL by β, or VAE.pixel_log_std ignoring the learned σ_x (same test);
- ELBOLoss decoding s·ε without m (test_the_vae_round_trips_the_test_blobs: RMSE 0.53, the mean image's);
- DataSource drawing latent_eps before ε instead of last (test_latent_eps_is_drawn_last_and_seeded);
- load_latents not comparing the sha256 (the changed-VAE refusal in test_vae_run_from_the_cli);
- the normalisation scaling m but not s, or s by a_c² (test_vae_run_from_the_cli: s'/s = a_c);
  normalise_by="sample" using Var m alone (test_channel_normalisation_by_mean_and_by_sample);
- `gendiff eval RUN --steps 3` accepted on a VAE run, `gendiff sample` on one writing nothing and returning 0
  (test_vae_run_from_the_cli).
All of them were run (each caught by its test, then restored).
"""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from torch.distributions import Normal, kl_divergence

from gendiff.cli import main
from gendiff.data.images import load_npz
from gendiff.data.sources import DataSource
from gendiff.experiments.config import resolve
from gendiff.experiments.vae import QUANTILES, channel_normalisation, evaluate, load_latents, sigma_vae_stats
from gendiff.io import save_state
from gendiff.losses import NoisyBatch
from gendiff.nets.vae import VAE, ELBOLoss, gaussian_kl, gaussian_nll
from gendiff.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def test_kl_and_reconstruction_are_the_closed_forms():
    """KL(N(m, s²) ‖ N(0, 1)) and −log N(x | x̂, σ_x²) per element against torch.distributions; ELBOLoss per
    example = Σ(reconstruction at z = m + s·ε) + β·ΣKL, with σ_x fixed or learned (pixel_std = 0)."""
    g = torch.Generator().manual_seed(0)
    m, log_s = (torch.randn(5, 4, 3, 3, generator=g, dtype=F64) for _ in range(2))
    want = kl_divergence(Normal(m, log_s.exp()), Normal(torch.zeros_like(m), torch.ones_like(m)))
    torch.testing.assert_close(gaussian_kl(m, log_s), want, rtol=1e-12, atol=1e-12)
    x, xh, ls = (torch.randn(5, 1, 4, 4, generator=g, dtype=F64) for _ in range(3))
    torch.testing.assert_close(gaussian_nll(x, xh, ls), -Normal(xh, ls.exp()).log_prob(x), rtol=1e-12,
                               atol=1e-12)
    for pixel_std, beta in ((0.1, 1.0), (0.0, 0.25)):
        torch.manual_seed(1)
        vae = VAE(1, 8, 2, (4, 4), 1, pixel_std).double()
        if vae.log_pixel_std is not None:
            with torch.no_grad():
                vae.log_pixel_std.fill_(-0.7)                   # learned σ_x, away from its start at 1
        xb = torch.rand(3, 1, 8, 8, generator=g, dtype=F64) * 2 - 1
        eps = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
        loss = ELBOLoss(beta)(vae, NoisyBatch(xb, xb, torch.ones(3, dtype=F64), latent_eps=eps))
        mm, ll = vae.encode(xb)
        sx = 0.1 if pixel_std else math.exp(-0.7)
        rec = -Normal(vae.decode(mm + ll.exp() * eps), sx).log_prob(xb).flatten(1).sum(1)
        kl = kl_divergence(Normal(mm, ll.exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
        torch.testing.assert_close(loss, rec + beta * kl, rtol=1e-10, atol=1e-10)
        if vae.log_pixel_std is not None:                       # the learned σ_x is trained by the loss
            loss.sum().backward()
            assert vae.log_pixel_std.grad is not None and vae.log_pixel_std.grad.abs() > 0


def test_vae_shapes_and_refusals():
    vae = VAE(1, 28, 4, (8, 8, 8), 1)
    assert vae.latent_shape == (4, 7, 7)
    m, log_s = vae.encode(torch.zeros(2, 1, 28, 28))
    assert m.shape == log_s.shape == (2, 4, 7, 7) and vae.decode(m).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="not divisible by 2\\^3 = 8"):
        VAE(1, 28, 4, (8, 8, 8, 8))
    with pytest.raises(ValueError, match="takes images \\[N, 1, 28, 28\\]"):
        vae.encode(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="pixel_std=-1"):
        VAE(pixel_std=-1.0)
    with pytest.raises(ValueError, match="latent_eps"):
        ELBOLoss()(vae, NoisyBatch(torch.zeros(2, 1, 28, 28), torch.zeros(2, 1, 28, 28), torch.ones(2)))
    with pytest.raises(ValueError, match="kl_weight"):
        ELBOLoss(-1.0)


def test_latent_eps_is_drawn_last_and_seeded():
    """DataSource(latent_eps_shape) adds ε of that shape per example, from the training generator, after
    every other draw: x0, x̃ and labels are those of a source without it (existing runs are unchanged)."""
    x, y = torch.randn(10, 1, 4, 4), torch.arange(10) % 3
    a = DataSource(x, y, 3, 0.2).draw(6, torch.full((6,), 0.5), torch.Generator().manual_seed(4))
    src = DataSource(x, y, 3, 0.2, latent_eps_shape=(2, 2, 2))
    b = src.draw(6, torch.full((6,), 0.5), torch.Generator().manual_seed(4))
    assert a.latent_eps is None and b.latent_eps.shape == (6, 2, 2, 2)
    for k in ("x0", "x_noisy", "labels"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    c = DataSource(x, y, 3, 0.2, latent_eps_shape=(2, 2, 2)).draw(6, torch.full((6,), 0.5),
                                                                  torch.Generator().manual_seed(4))
    assert torch.equal(b.latent_eps, c.latent_eps)
    with pytest.raises(ValueError, match="latent_eps_shape\\[1\\]"):
        DataSource(x, latent_eps_shape=(2, 0))


def test_the_vae_round_trips_the_test_blobs(blobs_npz):
    """Trained through the one loop (train.train) for 100 steps of 16 on the 216 training blobs, the VAE
    reconstructs the 24 held-out test blobs at a per-pixel RMSE (in [−1, 1]) below a quarter of that of the
    test set's mean image (a VAE that learned nothing), decoding the posterior mean and a posterior draw
    alike; every posterior std is finite and > 0."""
    train_split, test_split = load_npz(blobs_npz).split(0.1, seed=0)
    x = train_split.to_tensor()
    torch.manual_seed(0)
    vae = VAE(1, 28, 4, (8, 16, 16), 1, 0.1)
    cfg = TrainConfig(iterations=100, batch=16, lr=3e-3, lr_ref_iter=100, ema=0.9, snapshot_every=100)
    res = train(vae, ELBOLoss(1.0), DataSource(x, latent_eps_shape=vae.latent_shape), cfg, progress=False)
    m = evaluate(res.ema, test_split.to_tensor(), seed=0)
    assert m["test_images"] == 24
    assert m["recon_rmse"] < 0.25 * m["recon_rmse_mean_image"], m
    assert m["recon_rmse_sample"] < 0.25 * m["recon_rmse_mean_image"], m
    for c in m["sigma_vae"]["channels"]:
        assert all(0 < v < math.inf for v in c["s_quantiles"])


def test_sigma_vae_stats_are_the_quantiles_per_channel():
    """sigma_vae_stats against numpy-free references: torch.quantile of each channel's s, std of m with
    divisor N, and s/std(m)."""
    g = torch.Generator().manual_seed(2)
    m = torch.randn(50, 3, 2, 2, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    s = torch.rand(50, 3, 2, 2, generator=g) * torch.tensor([0.1, 0.5, 1.0]).view(1, 3, 1, 1)
    st = sigma_vae_stats(m, s)
    assert st["quantiles"] == list(QUANTILES)
    for c in range(3):
        sc, mc = s[:, c].double().flatten(), m[:, c].double().flatten()
        q = torch.quantile(sc, torch.tensor(QUANTILES, dtype=F64))
        ch = st["channels"][c]
        assert ch["s_quantiles"] == pytest.approx(q.tolist(), rel=1e-12)
        assert ch["m_std"] == pytest.approx(float(((mc - mc.mean()) ** 2).mean().sqrt()), rel=1e-12)
        assert ch["s_over_m_std_quantiles"] == pytest.approx((q / ch["m_std"]).tolist(), rel=1e-12)


def test_channel_normalisation_by_mean_and_by_sample():
    """(μ_c, a_c): the normalised m has per-channel mean 0 and std σ_data (by="mean"); by="sample", the
    normalised draw m + sε has std σ_data, in closed form √(Var z + E s'²). A channel without spread is
    refused."""
    g = torch.Generator().manual_seed(3)
    spread = torch.tensor([3.0, 0.2], dtype=F64).view(1, 2, 1, 1)
    m = torch.randn(400, 2, 3, 3, generator=g, dtype=F64) * spread + 1
    s = torch.rand(400, 2, 3, 3, generator=g, dtype=F64) * 0.5
    for by in ("mean", "sample"):
        mu, a = channel_normalisation(m, s, 0.5, by)
        av = a.double().view(1, 2, 1, 1)
        z, sz = (m - mu.double().view(1, 2, 1, 1)) * av, s * av
        zc, sc = z.transpose(0, 1).flatten(1), sz.transpose(0, 1).flatten(1)
        torch.testing.assert_close(zc.mean(1), torch.zeros(2, dtype=F64), rtol=0, atol=1e-6)
        spread = zc.var(1, correction=0) + (sc.square().mean(1) if by == "sample" else 0)
        torch.testing.assert_close(spread.sqrt(), torch.full((2,), 0.5, dtype=F64), rtol=1e-6, atol=0)
    flat = m.clone()
    flat[:, 1] = 2.0
    with pytest.raises(ValueError, match="latent channel 1 has std 0"):
        channel_normalisation(flat, s, 0.5, "mean")
    channel_normalisation(flat, s, 0.5, "sample")            # s > 0: the draw still has spread
    with pytest.raises(ValueError, match="encode.normalise_by"):
        channel_normalisation(m, s, 0.5, "median")


@pytest.mark.parametrize("sets, match", [
    (["model.channels=[]"], "model.channels=\\[\\] must list at least one level"),
    (["model.kl_weight=-1"], "model.kl_weight=-1.0 must be >= 0"),
    (["encode.normalise_by=median"], "encode.normalise_by='median' is not allowed"),
    (["encode.sigma_data=0"], "encode.sigma_data=0.0 must be > 0"),
    (["kind=images"], "kind='images' does not match"),
    (["recipe=edm"], "unknown key 'recipe'"),
    (["train.compile=true"], "a VAE run trains uncompiled"),
])
def test_bad_vae_config_is_one_clear_error(sets, match):
    with pytest.raises(ValueError, match=match):
        resolve("vae-tiny", sets=sets)


def test_a_vae_config_file_picks_the_vae_default_preset(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('kind = "vae"\n[train]\nbatch = 32\n')
    cfg = resolve(toml_path=str(path))
    assert cfg.kind == "vae" and cfg.train.batch == 32 and cfg.model == resolve("vae-mnist").model


def test_vae_run_from_the_cli(blobs_npz, tmp_path, capsys):
    """`gendiff train --preset vae-tiny` makes a VAE run folder (config.toml, checkpoints, metrics.json with
    the reconstruction error and σ_vae quantiles per channel, reconstructions.png); a resume from the step-4
    checkpoint ends bit for bit on the same weights; `gendiff encode RUN` writes latents.safetensors whose
    normalised m has per-channel mean 0 and std σ_data on the training split, s scaled by the same a_c, the
    normalisation inverted by to_vae; changed VAE weights make it refuse to load; commands that do not apply
    are one-line errors (exit 2); `gendiff eval` and `gendiff report` work on it."""
    run = str(tmp_path / "run")
    sets = ["--set", "data.name=npz", "--set", f"data.path={blobs_npz}"]
    assert main(["train", "--preset", "vae-tiny", *sets, "--out", run, "--no-progress"]) == 0
    cfg = resolve(toml_path=os.path.join(run, "config.toml"))
    assert cfg.kind == "vae" and cfg.train.iterations == 8
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert m["test_images"] == 16 and m["latent_shape"] == [4, 7, 7]
    for c in m["sigma_vae"]["channels"]:
        assert len(c["s_quantiles"]) == len(QUANTILES) and c["s_quantiles"] == sorted(c["s_quantiles"])
    assert os.path.exists(os.path.join(run, "reconstructions.png"))
    weights = os.path.join(run, "model.safetensors")
    first = open(weights, "rb").read()
    for f in os.listdir(os.path.join(run, "checkpoints")):               # back to step 4, then resume
        if f.startswith("ckpt-00000008"):
            os.remove(os.path.join(run, "checkpoints", f))
    os.remove(weights)
    assert main(["train", "--resume", run, "--no-progress"]) == 0
    assert open(weights, "rb").read() == first

    capsys.readouterr()
    assert main(["encode", run]) == 0
    assert "216 train / 24 test" in capsys.readouterr().out
    lat = load_latents(run)
    assert lat.train_mean.shape == lat.train_std.shape == (216, 4, 7, 7) and lat.test_mean.shape[0] == 24
    assert lat.train_labels.shape == (216,) and lat.sigma_data == 0.5
    zc = lat.train_mean.double().transpose(0, 1).flatten(1)
    torch.testing.assert_close(zc.mean(1), torch.zeros(4, dtype=F64), rtol=0, atol=1e-5)
    torch.testing.assert_close(zc.var(1, correction=0).sqrt(), torch.full((4,), 0.5, dtype=F64),
                               rtol=1e-4, atol=0)
    raw = load_file(os.path.join(run, "latents.safetensors"))
    a = lat.channel_scale.view(1, 4, 1, 1)
    torch.testing.assert_close(lat.train_std, raw["train.std"] * a, rtol=1e-6, atol=0)
    torch.testing.assert_close(lat.to_vae(lat.test_mean), raw["test.mean"], rtol=1e-5, atol=1e-5)
    assert lat.typical_std().shape == (1, 4, 1, 1)
    # √E[s²] per channel, not E[s] (variances add, T3; breakage tried: the mean fails both checks)
    rms = lat.train_std.double().square().mean((0, 2, 3)).sqrt()
    torch.testing.assert_close(lat.typical_std().flatten().double(), rms, rtol=1e-5, atol=0)
    assert bool((lat.typical_std().flatten().double() > lat.train_std.double().mean((0, 2, 3))).all())

    state = load_file(weights)                                            # the VAE changes: refuse
    key = next(k for k in state if k.endswith("weight"))
    state[key] = state[key] + 1e-3
    save_state(state, weights)
    with pytest.raises(ValueError, match="the VAE changed; re-encode"):
        load_latents(run)
    assert main(["encode", run]) == 0
    assert load_latents(run).train_mean.shape == (216, 4, 7, 7)        # re-encoded: loads again

    capsys.readouterr()
    for argv, what in ((["sample", run], "gendiff sample does not apply to a VAE run"),
                       (["likelihood", run], "gendiff likelihood does not apply to a VAE run"),
                       (["eval", run, "--steps", "3"], "--steps does not apply to a VAE run")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert what in err and err.count("\n") == 1, err
    assert main(["eval", run, "--samples", "8"]) == 0
    assert json.load(open(os.path.join(run, "eval-recon-8-seed0.json")))["test_images"] == 8
    assert main(["report", run]) == 0
    assert "Reconstructions" in open(os.path.join(run, "index.html")).read()
