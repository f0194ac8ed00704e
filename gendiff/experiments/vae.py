"""VAE runs (issue 19; THEORY T3, T36): the VAE of nets/vae.py trained on an image dataset in a run folder,
its evaluation, and the encoded dataset that latent diffusion trains on.

Training goes through the one loop (train.train) like every run (checkpoints, EMA, exact resume): the batch
source is a `DataSource` that also draws the reparameterisation ε (`latent_eps_shape`) with the data, the loss
nets/vae.ELBOLoss. The loop draws a noise level σ and a noisy input for every batch; the ELBO ignores both
(the one diffusion-specific step of the loop a VAE pays for: one randn of the batch's images).

Evaluation (RUN/metrics.json, `evaluate`): the reconstruction error of test images (RMSE per pixel in [−1, 1],
decoding the posterior mean m and a posterior draw m + s·ε, beside the RMSE of the test set's mean image, the
reconstruction of a VAE that learned nothing), the test ELBO's two terms in nats per image, and the σ_vae
distribution: per latent channel the quantiles of the posterior std s over images and positions, the std of
m, and s/std(m) (the source noise against the data's spread: what is left of s after the normalisation).

Encoding (`gendiff encode RUN`, `encode_run`): the train and test splits once to (m, s) per image (EDM2's
dataset_tool stores mean and std likewise), in RUN/latents.safetensors beside the weights, with the sha256 of
the weights file in its metadata (`load_latents` refuses latents of other weights) and the per-channel affine
normalisation to σ_data (EDM2): z = (m − μ_c)·a_c with a_c = σ_data/std_c, and s' = a_c·s, so that
x̃ = z + s'ε₁ + σε₂ is the normalised image of m + sε₁ + (σ/a_c)ε₂. std_c is the std of m over the training
set (encode.normalise_by = "mean", as the issue asks) or of the posterior draw m + sε, √(Var m + E s²)
("sample"; what EDM2's fixed statistics of Stability's VAE approximate, and finite for a channel whose
posterior collapsed to the prior, where std(m) → 0).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from ..checks import check_choice
from ..data.sources import DataSource
from ..image_metrics import image_grid
from ..io import derive_seed, file_sha256, generator, save_json, save_state, save_text
from ..nets.vae import VAE, ELBOLoss, gaussian_kl, gaussian_nll
from ..schedules import LogNormalSigma
from .config import NORMALISE_BY, VAERunConfig
from .images import Setup, load_images, load_splits, resolve_device, training_data, training_metrics
from .runfolder import load_weights, read_json, refuse, train_in_folder, weights_path, weights_tag

LATENTS_FORMAT = "gendiff-latents-1"
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def build_model(cfg: VAERunConfig, shape: tuple) -> VAE:
    """The VAE of cfg.model for images of `shape` (C, H, W)."""
    c, h, w = shape
    m = cfg.model
    if h != w:
        raise ValueError(f"the images are {h}×{w}; the VAE takes square images: set data.size (e.g. "
                         f"data.size={min(h, w)}) to resize them")
    try:
        return VAE(img_channels=c, img_resolution=h, latent_channels=m.latent_channels, channels=m.channels,
                   blocks=m.blocks, pixel_std=m.pixel_std)
    except ValueError as e:
        raise ValueError(f"the VAE of this config does not fit {c}×{h}×{w} images ({e}); change "
                         "model.channels, or resize the images with data.size") from None


def load_model(cfg: VAERunConfig, out: str, weights: str = "model.safetensors"):
    """The VAE of a finished run folder with its weights, in eval mode (shape from RUN/data.json, else the
    data)."""
    info = read_json(os.path.join(out, "data.json"))
    shape = tuple(info["shape"]) if info else tuple(load_images(cfg.data, "test").images.shape[1:])
    return load_weights(build_model(cfg, shape), out, weights)


def prepare(cfg: VAERunConfig, device=None, log=print) -> Setup:
    """Everything that can reject a VAE run before its folder exists: the data (read, checked, split), the
    model (seeded initialisation, it must fit the images), the loss; the model and data on `device`."""
    dev = resolve_device(device)
    data, test, split = load_splits(cfg.data)
    data = training_data(cfg, data)
    x = data.to_tensor()
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = build_model(cfg, tuple(x.shape[1:])).to(dev)
    source = DataSource(x, shape=tuple(x.shape[1:]), name=f"data {data.name!r}", device=dev,
                        latent_eps_shape=model.latent_shape)
    density = LogNormalSigma(cfg.train.p_mean, cfg.train.p_std)      # drawn by the loop, unused by the ELBO
    return Setup(model, ELBOLoss(cfg.model.kl_weight), source, density, data, test, split, cfg)


def train_run(cfg: VAERunConfig, out: str, setup: Setup, *, progress: bool = True, log=print,
              primary: bool = True) -> dict:
    """Train (or continue) the VAE run in `out` through train.train; evaluate its EMA on eval.test_images test
    images (metrics.json, reconstructions.png); returns the metrics."""
    if primary:
        log(setup.split)
        save_text(setup.split + "\n", os.path.join(out, "data.txt"))
        save_json({"shape": list(setup.test.images.shape[1:])}, os.path.join(out, "data.json"))
    res = train_in_folder(setup.model, setup.loss, setup.source, cfg, out, density=setup.density, desc="vae",
                          progress=progress, log=log, primary=primary)
    if not primary:
        return {}
    x = setup.test.to_tensor()[:cfg.eval.test_images]
    metrics = evaluate(res.ema, x, batch=cfg.eval.batch, seed=cfg.seed)
    reconstruction_grid(res.ema, x[:16], os.path.join(out, "reconstructions.png"))
    metrics.update(kl_weight=cfg.model.kl_weight, **training_metrics(out, cfg, res))
    save_json(metrics, os.path.join(out, "metrics.json"))
    return metrics


def summary(cfg: VAERunConfig, m: dict) -> str:
    return "vae: " + _numbers(m)


def _numbers(m: dict) -> str:
    """One line of `evaluate`'s metrics: RMSE, KL, the median s and s/std(m) per channel."""
    med = [c["s_quantiles"][QUANTILES.index(0.5)] for c in m["sigma_vae"]["channels"]]
    rel = [c["s_over_m_std_quantiles"][QUANTILES.index(0.5)] for c in m["sigma_vae"]["channels"]]
    return (f"{m['test_images']} test images: RMSE {m['recon_rmse']:.4f} decoding m, "
            f"{m['recon_rmse_sample']:.4f} decoding m + sε (the mean image: "
            f"{m['recon_rmse_mean_image']:.4f}); "
            f"KL {m['test_kl']:.1f} nats/image; median s per channel {', '.join(f'{v:.3g}' for v in med)} "
            f"(s/std(m): {', '.join(f'{v:.3g}' for v in rel)})")


# ---- evaluation ---------------------------------------------------------------------------------------

@torch.no_grad()
def encode_images(vae: VAE, x: torch.Tensor, batch: int = 500):
    """(m, s) of images x [N, C, H, W] in [−1, 1], float32 on the CPU, in batches of `batch`."""
    dev = next(vae.parameters()).device
    ms, ss = [], []
    for i in range(0, len(x), batch):
        m, log_s = vae.encode(x[i:i + batch].to(dev))
        ms.append(m.float().cpu())
        ss.append(log_s.float().exp().cpu())
    return torch.cat(ms), torch.cat(ss)


def sigma_vae_stats(m: torch.Tensor, s: torch.Tensor, quantiles=QUANTILES) -> dict:
    """The distribution of the posterior std s per latent channel (m, s: [N, L, h, w]): the quantiles of s
    over images and positions, its mean and root mean square, the mean and std of m over the same, and the
    quantiles of s/std(m): the source noise against the channel's spread, i.e. s in units of σ_data after the
    normalisation to σ_data by the std of m."""
    q = torch.tensor(quantiles, dtype=torch.float64)
    channels = []
    for c in range(m.shape[1]):
        mc, sc = m[:, c].double().flatten(), s[:, c].double().flatten()
        sd = float(mc.std(correction=0))
        qs = torch.quantile(sc, q)
        channels.append({"channel": c, "s_quantiles": qs.tolist(), "s_mean": float(sc.mean()),
                         "s_rms": float(sc.square().mean().sqrt()), "m_mean": float(mc.mean()), "m_std": sd,
                         "s_over_m_std_quantiles": (qs / sd).tolist() if sd > 0 else [math.inf] * len(qs)})
    return {"quantiles": list(quantiles), "channels": channels}


@torch.no_grad()
def evaluate(vae: VAE, x: torch.Tensor, *, batch: int = 500, seed: int = 0) -> dict:
    """The VAE on images x [n, C, H, W] in [−1, 1] (module docstring): reconstruction RMSE decoding m and
    m + s·ε (ε from the seed), the mean image's RMSE, the ELBO's terms in nats per image (reconstruction at a
    posterior draw, KL), σ_x, and the σ_vae distribution (`sigma_vae_stats`)."""
    if not len(x):
        raise ValueError("evaluate needs at least one image")
    vae = vae.eval()
    dev = next(vae.parameters()).device
    g = generator(seed, "vae-eval")
    log_sx = vae.pixel_log_std().float()
    sq_mean = sq_draw = rec = kl = 0.0
    ms, ss = [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(dev).float()
        m, log_s = (t.float() for t in vae.encode(xb))
        eps = torch.randn(m.shape, generator=g).to(dev)
        x_mean, x_draw = vae.decode(m).float(), vae.decode(m + log_s.exp() * eps).float()
        sq_mean += float((x_mean - xb).double().square().sum())
        sq_draw += float((x_draw - xb).double().square().sum())
        rec += float(gaussian_nll(xb, x_draw, log_sx).double().sum())
        kl += float(gaussian_kl(m, log_s).double().sum())
        ms.append(m.cpu())
        ss.append(log_s.exp().cpu())
    n, d = len(x), x[0].numel()
    xd = x.double()
    return {"test_images": n, "latent_shape": list(vae.latent_shape),
            "recon_rmse": math.sqrt(sq_mean / (n * d)), "recon_rmse_sample": math.sqrt(sq_draw / (n * d)),
            "recon_rmse_mean_image": float((xd - xd.mean(0)).square().mean().sqrt()),
            "test_recon_nll": rec / n, "test_kl": kl / n, "test_neg_elbo": (rec + kl) / n,
            "pixel_std": float(log_sx.exp()), "eval_seed": seed,
            "sigma_vae": sigma_vae_stats(torch.cat(ms), torch.cat(ss))}


@torch.no_grad()
def reconstruction_grid(vae: VAE, x: torch.Tensor, path: str) -> None:
    """A PNG: the images x (first row) above their reconstructions decode(m) (second row)."""
    dev = next(vae.parameters()).device
    rec = vae(x.to(dev)).float().clamp(-1, 1).cpu()
    image_grid(path, torch.cat([x, rec]), nrow=len(x))


# ---- commands on a finished run folder -----------------------------------------------------------------

def eval_run(out: str, cfg: VAERunConfig, model, *, samples: int = 0, seed: int = 0,
             weights: str = "model.safetensors", **unused) -> dict:
    """`gendiff eval` of a VAE run: `evaluate` on the first `samples` test images (default eval.test_images),
    posterior draws from `seed`; writes RUN/eval-recon-<n>-seed<seed>.json."""
    refuse(unused, "a VAE", " (gendiff eval of a VAE run measures its reconstructions: --samples test "
                            "images, --seed, --weights)")
    x = load_images(cfg.data, "test").to_tensor()[:samples or cfg.eval.test_images]
    m = {**evaluate(model, x, batch=cfg.eval.batch, seed=seed), "weights": weights}
    save_json(m, os.path.join(out, f"eval-recon-{len(x)}-seed{seed}{weights_tag(weights)}.json"))
    return m


def eval_summary(out: str, m: dict) -> str:
    return f"{out}: " + _numbers(m)


def sample_run(out: str, cfg: VAERunConfig, model, **options) -> dict:
    raise ValueError("gendiff sample does not apply to a VAE run (it is the autoencoder of latent diffusion; "
                     f"encode its data with `gendiff encode {out}`)")


def likelihood_run(out: str, cfg: VAERunConfig, model, **options) -> dict:
    raise ValueError("gendiff likelihood does not apply to a VAE run (its test ELBO is in metrics.json and "
                     f"`gendiff eval {out}`)")


# ---- the encoded dataset ------------------------------------------------------------------------------

def latents_name(weights: str = "model.safetensors") -> str:
    """RUN/latents.safetensors for the final EMA, latents-<stem>.safetensors for other weights."""
    return f"latents{weights_tag(weights)}.safetensors"


def channel_normalisation(m: torch.Tensor, s: torch.Tensor, sigma_data: float, by: str = "mean"):
    """(μ_c, a_c) per latent channel, [L] each, float64 statistics over images and positions: μ_c the mean of
    m, a_c = σ_data/std_c with std_c the std of m (by="mean") or of the posterior draw m + sε, √(Var m + E s²)
    (by="sample"). A channel with std_c = 0 is a ValueError (its s would be scaled by ∞)."""
    check_choice("encode.normalise_by", by, NORMALISE_BY)
    md = m.transpose(0, 1).flatten(1).double()                     # [L, N·h·w]
    mu, var = md.mean(1), md.var(1, correction=0)
    if by == "sample":
        var = var + s.transpose(0, 1).flatten(1).double().square().mean(1)
    if not bool((var > 0).all()):
        c = int((var <= 0).nonzero()[0])
        raise ValueError(f"latent channel {c} has std 0 over the training set (normalise_by={by!r}); it "
                         "cannot be scaled to σ_data (a collapsed channel: try "
                         "encode.normalise_by=\"sample\")")
    return mu.float(), (sigma_data / var.sqrt()).float()


@dataclass
class Latents:
    """An encoded dataset, normalised: per split the mean z = (m − μ_c)·a_c and std s' = a_c·s of each image's
    latent ([N, L, h, w] each), its labels ([N] or None), and the normalisation (μ_c, a_c) [L]."""
    train_mean: torch.Tensor
    train_std: torch.Tensor
    test_mean: torch.Tensor
    test_std: torch.Tensor
    train_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    channel_mean: torch.Tensor
    channel_scale: torch.Tensor
    sigma_data: float
    meta: dict

    def _view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.device, like.dtype).view(1, -1, *([1] * (like.ndim - 2)))

    def to_vae(self, z: torch.Tensor) -> torch.Tensor:
        """A normalised latent back in the VAE's latent space (to decode): z/a_c + μ_c."""
        return z / self._view(self.channel_scale, z) + self._view(self.channel_mean, z)

    def typical_std(self) -> torch.Tensor:
        """The per-channel root mean square of s' over the training set, √E[s'²], [1, L, 1, 1]: a typical
        source std for sampling with the scalings of the total σ (precond.sampling_denoiser, T36). RMS, not
        the mean: variances add (T3: τ² = σ² + s²), so the s̄ whose s̄² is the average source variance is
        √E[s²]."""
        ms = self.train_std.double().square().transpose(0, 1).flatten(1).mean(1)
        return ms.sqrt().float().view(1, -1, 1, 1)


@torch.no_grad()
def encode_run(out: str, cfg: VAERunConfig, model, *, weights: str = "model.safetensors", batch: int = 0,
               log=print) -> dict:
    """Encode the train and test splits of the run's dataset (all of each; data.subset limits only the VAE's
    training) with the weights file `weights` of the run folder `out` (`model`: the VAE loaded from it) into
    RUN/latents_name(weights): tensors train.mean, train.std, test.mean, test.std [N, L, h, w] float32 (raw:
    the VAE's m and s), train.labels, test.labels (when labelled), channel_mean, channel_scale [L]; metadata:
    format, vae_weights, vae_sha256 (of the weights file), sigma_data, normalise_by (encode.*), the data's
    description.
    Returns a summary (counts, shape, normalisation, the σ_vae distribution of the training split)."""
    sha = file_sha256(weights_path(out, weights))
    train, test, split = load_splits(cfg.data)
    tensors = {}
    for name, part in (("train", train), ("test", test)):
        tensors[f"{name}.mean"], tensors[f"{name}.std"] = encode_images(model, part.to_tensor(),
                                                                        batch or cfg.encode.batch)
        if part.labels is not None:
            tensors[f"{name}.labels"] = torch.from_numpy(part.labels).long()
    normalise_by = cfg.encode.normalise_by
    mu, scale = channel_normalisation(tensors["train.mean"], tensors["train.std"], cfg.encode.sigma_data,
                                      normalise_by)
    tensors["channel_mean"], tensors["channel_scale"] = mu, scale
    meta = {"format": LATENTS_FORMAT, "vae_weights": weights, "vae_sha256": sha,
            "sigma_data": repr(float(cfg.encode.sigma_data)), "normalise_by": normalise_by,
            "num_classes": str(test.num_classes), "data": split,
            "normalisation": "z = (m - channel_mean) * channel_scale; s' = s * channel_scale"}
    path = os.path.join(out, latents_name(weights))
    save_state(tensors, path, metadata=meta)
    info = {"path": path, "train": len(train), "test": len(test),
            "latent_shape": list(tensors["train.mean"].shape[1:]), "sigma_data": cfg.encode.sigma_data,
            "normalise_by": normalise_by, "channel_mean": mu.tolist(), "channel_scale": scale.tolist(),
            "sigma_vae_train": sigma_vae_stats(tensors["train.mean"], tensors["train.std"])}
    save_json(info, os.path.join(out, os.path.splitext(latents_name(weights))[0] + ".json"))
    return info


def encode_summary(out: str, info: dict) -> str:
    rel = [c["s_over_m_std_quantiles"][QUANTILES.index(0.5)] for c in info["sigma_vae_train"]["channels"]]
    return (f"{out}: encoded {info['train']} train / {info['test']} test images to "
            f"{'×'.join(map(str, info['latent_shape']))} latents (mean and std) in {info['path']}; "
            f"per-channel normalisation to σ_data = {info['sigma_data']:g} by the std of the "
            f"{info['normalise_by']}; median s/std(m) per channel {', '.join(f'{v:.3g}' for v in rel)}")


def load_latents(out: str, weights: str = "model.safetensors") -> Latents:
    """The encoded dataset of the VAE run `out` (encode_run), normalised; a ValueError when it is missing,
    unreadable, or was encoded by other weights than the run's `weights` file now holds (sha256)."""
    path = os.path.join(out, latents_name(weights))
    if not os.path.exists(path):
        raise ValueError(f"run {out!r} has no {latents_name(weights)}: encode its data first "
                         f"(`gendiff encode {out}`)")
    try:
        with safe_open(path, "pt") as f:
            meta, t = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-encode with `gendiff encode "
                         f"{out}`") from None
    if meta.get("format") != LATENTS_FORMAT:
        raise ValueError(f"{path} is not a gendiff encoded dataset (format {meta.get('format')!r}, expected "
                         f"{LATENTS_FORMAT!r})")
    now = file_sha256(weights_path(out, weights))
    if meta.get("vae_sha256") != now:
        raise ValueError(f"{path} was encoded by VAE weights with sha256 "
                         f"{str(meta.get('vae_sha256'))[:16]}…, but {weights} of {out!r} now has sha256 "
                         f"{now[:16]}…: the VAE changed; re-encode "
                         f"with `gendiff encode {out}`")
    mu, a = t["channel_mean"], t["channel_scale"]
    z = lambda m: (m - mu.view(1, -1, 1, 1)) * a.view(1, -1, 1, 1)       # noqa: E731
    return Latents(z(t["train.mean"]), t["train.std"] * a.view(1, -1, 1, 1), z(t["test.mean"]),
                   t["test.std"] * a.view(1, -1, 1, 1), t.get("train.labels"), t.get("test.labels"), mu, a,
                   float(meta["sigma_data"]), meta)
