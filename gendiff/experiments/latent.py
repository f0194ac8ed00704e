"""Latent diffusion runs (issue 19; THEORY T3, T12, T36): an image recipe's denoiser trained on the encoded
dataset of a VAE run (`gendiff encode`, experiments/vae.py), sampled in latent space and decoded to images.

Training goes through the one loop (train.train) on a `LatentSource` in T36's mode latent.mode: (a) x0 = m;
(b) x0 = m + s·ε₁ drawn every batch (LDM, EDM2); (c) x0 = m, x̃ = m + s·ε₁ + σ·ε₂ with s handed to the loss
and the scalings of the total σ_t = √(σ² + s²) (losses.ConfidenceNLL: T9 at σ_t, nothing added; EDMLoss
alike). The latents are those of load_latents (normalised per channel to encode.sigma_data, refused when the
VAE's weights changed since `gendiff encode`); σ_data of the preconditioning is measured from them where
train.sigma_data = 0: the std of the mode's x0 over every training element (m; for mode b √(Var m + E s²),
the std of m + s·ε₁ in closed form). The run records the sha256 of the VAE weights it trained on
(RUN/data.json); sampling and evaluation decode with that VAE only, and refuse once its weights changed.

Sampling: EDM Heun in latent space (images.sample_images, one seed per sample, unclamped), through
precond.sampling_denoiser: T36 leaves open what a model of mode (c) should assume about the source std of a
new latent; "diffusion" uses the model as it is (scalings from σ), "total" WithSourceSigma with s̄ = the
per-channel mean of s' over the training set (scalings from √(σ² + s̄²)); c_noise is σ either way. The
latents are un-normalised (Latents.to_vae) and the posterior mean μ decoded by the VAE's decoder, then clamped
to [−1, 1] as pixels.

Evaluation (`evaluate`): the decoded samples in the image metrics of the VAE run's dataset, through
images.feature_classifier / sample_metrics / classifier_metrics (FID ± bootstrap sd against all test images,
precision, recall, class counts, the classifier's accuracy), beside the VAE's own ceiling: as many test images
(a seeded random subset), encoded and decoded from their posterior mean m, in the same metrics
(`reconstruction`). Those are reconstructions of the very images FID compares with, so their FID is a floor no
sampler in this latent space is expected to beat, not a sample of the same difficulty.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import replace
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..checks import check_choice
from ..data.sources import LatentSource
from ..image_metrics import image_grid
from ..io import derive_seed, file_sha256, generator, save_json, save_text
from ..precond import sampling_denoiser
from . import images
from . import vae as vae_kind
from .config import SIGMA_DATA_MEASURED, T36_MODES, LatentRunConfig, VAERunConfig, to_toml
from .images import classifier_metrics, feature_classifier, fid_text, load_splits, logged_img_per_s
from .images import eval_summary as image_eval_summary
from .images import (SIGMA_MIN, resolve_device, sample_images, sample_metrics, sampler_name, train_row,
                     with_sigma_data, write_samples)
from .recipes import IMAGE_RECIPES
from .runfolder import (load_weights, read_config, read_json, refuse, train_in_folder, weights_path,
                        weights_tag)


class Setup(NamedTuple):
    model: torch.nn.Module
    loss: object
    source: object
    density: object
    latents: object                # vae.Latents: the encoded dataset, normalised
    info: dict                     # what RUN/data.json records (latent_info)
    split: str                     # one line: the latents, the mode, σ_data
    cfg: LatentRunConfig           # the config resolved: σ_data measured where it said 0 (the run saves this)


# ---- the VAE run and its latents -----------------------------------------------------------------------

def vae_config(cfg: LatentRunConfig) -> VAERunConfig:
    """The config of the VAE run latent.vae_run; a ValueError when it is not a VAE run folder."""
    vcfg = read_config(cfg.latent.vae_run, "latent.vae_run")
    if vcfg.kind != "vae":
        raise ValueError(f"latent.vae_run={cfg.latent.vae_run!r} is a {vcfg.kind!r} run; it must be a VAE "
                         "run folder (gendiff train --preset vae-mnist, then gendiff encode RUN)")
    return vcfg


def latent_sigma_data(latents, mode: str) -> float:
    """The std over every training element of the x0 that T36's mode trains on: m (a, c), or m + s·ε₁ (b) in
    closed form √(Var m + E s²), float64."""
    var = latents.train_mean.double().var(correction=0)
    if mode == "b":
        var = var + latents.train_std.double().square().mean()
    return float(var.sqrt())


def latent_info(cfg: LatentRunConfig, latents, vae_sha256: str) -> dict:
    """RUN/data.json of a latent run: what load_model and the decoder need without the latents file."""
    return {"shape": list(latents.train_mean.shape[1:]), "num_classes": int(latents.meta["num_classes"]),
            "sigma_data": cfg.train.sigma_data, "latent_sigma_data": latents.sigma_data,
            "vae_run": cfg.latent.vae_run, "vae_weights": cfg.latent.vae_weights, "vae_sha256": vae_sha256,
            "channel_mean": latents.channel_mean.tolist(), "channel_scale": latents.channel_scale.tolist(),
            "typical_std": latents.typical_std().flatten().tolist(), "train_latents": len(latents.train_mean),
            "test_latents": len(latents.test_mean)}


def encoding_changed(saved: dict, now: dict) -> str | None:
    """What changed between the encoding a run recorded (`saved`, RUN/data.json) and latent.vae_run's now
    (`now`, latent_info's keys; without channel_mean only the weights are compared): None when nothing."""
    if now["vae_sha256"] != saved["vae_sha256"]:
        return (f"the VAE's weights changed (sha256 {saved['vae_sha256'][:16]}… then, "
                f"{now['vae_sha256'][:16]}… now)")
    if "channel_mean" in now and (now["channel_mean"], now["channel_scale"]) != (saved["channel_mean"],
                                                                                saved["channel_scale"]):
        return "the data was encoded again with another per-channel normalisation (encode.*)"
    return None


def build_model(cfg: LatentRunConfig, shape: tuple):
    """The recipe's denoiser (IMAGE_RECIPES[cfg.recipe].build_model) for latents of `shape` (L, h, w),
    unconditional; a U-Net that cannot take that shape is one error naming the keys that fix it."""
    if cfg.train.sigma_data == SIGMA_DATA_MEASURED:
        raise ValueError("train.sigma_data=0 means 'measured from the latents', which prepare (or "
                         "load_model, from the run folder) does; build_model needs the number")
    try:
        return IMAGE_RECIPES[cfg.recipe].build_model(cfg, tuple(shape), 0)
    except ValueError as e:
        raise ValueError(f"the U-Net of this config does not fit {'×'.join(map(str, shape))} latents ({e}); "
                         "for 7×7 latents use one level (model.channel_mult=[1]) and "
                         "model.attn_resolutions=[7] or []") from None


def prepare(cfg: LatentRunConfig, device=None, log=print) -> Setup:
    """Everything that can reject a latent run before its folder exists: the VAE run and its encoded dataset
    (load_latents: refused when missing or encoded by other weights than the VAE's file now holds), σ_data
    (measured where train.sigma_data = 0), the model (seeded; it must fit the latent shape), the loss and the
    density. Setup.cfg holds σ_data and is the config to save with the run."""
    dev = resolve_device(device)
    vae_config(cfg)
    latents = vae_kind.load_latents(cfg.latent.vae_run, cfg.latent.vae_weights)
    sha = file_sha256(weights_path(cfg.latent.vae_run, cfg.latent.vae_weights))
    cfg = with_sigma_data(cfg, lambda: latent_sigma_data(latents, cfg.latent.mode))
    recipe = IMAGE_RECIPES[cfg.recipe]
    shape = tuple(latents.train_mean.shape[1:])
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = build_model(cfg, shape).to(dev)
    source = LatentSource(latents.train_mean, latents.train_std, T36_MODES[cfg.latent.mode],
                          name=f"latents of {cfg.latent.vae_run!r}", device=dev)
    density = recipe.density(cfg.train)
    s = latents.typical_std().flatten()
    split = (f"latents of VAE run {cfg.latent.vae_run!r} ({cfg.latent.vae_weights}, sha256 {sha[:12]}…): "
             f"{len(latents.train_mean)} train / {len(latents.test_mean)} test, {'×'.join(map(str, shape))}, "
             f"normalised per channel to std {latents.sigma_data:g}; RMS s per channel "
             f"{', '.join(f'{v:.3g}' for v in s.tolist())}; T36 mode ({cfg.latent.mode}) "
             f"[{T36_MODES[cfg.latent.mode]}]; σ_data {cfg.train.sigma_data:.4f}")
    return Setup(model, recipe.loss_fn(density), source, density, latents, latent_info(cfg, latents, sha),
                 split, cfg)


def load_model(cfg: LatentRunConfig, out: str, weights: str = "model.safetensors"):
    """The denoiser of a finished latent run folder with its weights, in eval mode: shape and σ_data from
    RUN/data.json (the latents are not needed)."""
    info = _info(out)
    cfg = with_sigma_data(cfg, lambda: info["sigma_data"])
    return load_weights(build_model(cfg, tuple(info["shape"])), out, weights)


def _info(out: str) -> dict:
    info = read_json(os.path.join(out, "data.json"))
    if info is None:
        raise ValueError(f"run {out!r} has no data.json (a latent run writes it when training starts; "
                         f"`gendiff train --resume {out}`)")
    return info


class Decoder:
    """The VAE decoder of a latent run: normalised latents z → images in [−1, 1] (z/a_c + μ_c, decode, clamp).
    Refuses a VAE whose weights file no longer has the sha256 the run trained with."""

    def __init__(self, cfg: LatentRunConfig, info: dict, device):
        run, weights = cfg.latent.vae_run, cfg.latent.vae_weights
        vcfg = vae_config(cfg)
        sha = file_sha256(weights_path(run, weights))
        why = encoding_changed(info, {"vae_sha256": sha})   # first: load_latents would say "re-encode"
        if why is None:
            self.latents = vae_kind.load_latents(run, weights)
            why = encoding_changed(info, latent_info(cfg, self.latents, sha))
        if why:
            raise ValueError(f"latent.vae_run={run!r}: {why} since this latent run trained; decoding with it "
                             "would not invert the latents the model learned (restore that VAE and its "
                             "encoding, or train the latent run again)")
        self.vae = vae_kind.load_model(vcfg, run, weights).to(device)
        self.vae_cfg, self.batch = vcfg, vcfg.eval.batch

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        dev = next(self.vae.parameters()).device
        out = [self.vae.decode(self.latents.to_vae(z[i:i + self.batch].to(dev))).float().clamp(-1, 1).cpu()
               for i in range(0, len(z), self.batch)]
        return torch.cat(out)


# ---- training ------------------------------------------------------------------------------------------

def train_run(cfg: LatentRunConfig, out: str, setup: Setup, *, progress: bool = True, log=print,
              primary: bool = True) -> dict:
    """Train (or continue) the latent run in `out` through train.train; evaluate its EMA (decoded samples,
    the VAE's reconstruction ceiling); returns the metrics (metrics.json, samples.png)."""
    if with_sigma_data(cfg, lambda: setup.cfg.train.sigma_data) != setup.cfg:
        raise ValueError("train_run: `setup` was prepared from another config than `cfg`")
    if primary:
        log(setup.split)
        save_text(setup.split + "\n", os.path.join(out, "data.txt"))
        saved = read_json(os.path.join(out, "data.json"))
        why = None if saved is None else encoding_changed(saved, setup.info)
        if why:
            raise ValueError(f"run {out!r}: in latent.vae_run, {why} since the run started; start a new "
                             "latent run")
        save_json(setup.info, os.path.join(out, "data.json"))
    res = train_in_folder(setup.model, setup.loss, setup.source, setup.cfg, out, density=setup.density,
                          desc=f"latent-{setup.cfg.latent.mode} {cfg.recipe}", progress=progress, log=log,
                          primary=primary)
    if not primary:
        return {}
    cfg = setup.cfg
    metrics = evaluate(res.ema, cfg, setup.info, samples=cfg.eval.samples, seed=cfg.seed, log=log,
                       grid=os.path.join(out, "samples.png"))
    metrics.update(images.training_metrics(out, cfg, res))
    save_json(metrics, os.path.join(out, "metrics.json"))
    return metrics


def summary(cfg: LatentRunConfig, m: dict) -> str:
    s = m.get("samples", {})
    return (f"latent ({cfg.latent.mode}) {cfg.recipe}: FID {fid_text(s)}, precision "
            f"{s.get('precision', math.nan):.3f}, recall {s.get('recall', math.nan):.3f}; VAE reconstruction "
            f"FID {fid_text(m.get('reconstruction', {}))}; {m['train_img_per_s']:.1f} img/s")


# ---- sampling and evaluation ---------------------------------------------------------------------------

def _sampling_sigma(cfg: LatentRunConfig, sampling_sigma: str | None) -> str:
    ss = sampling_sigma or cfg.latent.sampling_sigma
    if ss == "total" and cfg.latent.mode != "c":
        raise ValueError(f"--sampling-sigma total applies to latent runs of T36 mode c; this run trained in "
                         f"mode {cfg.latent.mode!r} (scalings from the diffusion σ only)")
    return ss


def sample_decoded(model, cfg: LatentRunConfig, info: dict, decoder: Decoder, n: int, *, seed: int = 0,
                   steps: int = 0, batch: int = 0, sampling_sigma: str | None = None):
    """(images [n, C, H, W] in [−1, 1], latents [n, L, h, w] (normalised), info): Heun in latent space
    through precond.sampling_denoiser (module docstring), sample i from seed (seed, i), decoded."""
    ss = _sampling_sigma(cfg, sampling_sigma)
    typical = torch.tensor(info["typical_std"]).view(1, -1, 1, 1)
    z, sinfo = sample_images(model, cfg, n, seed=seed, steps=steps, batch=batch, clamp=False,
                             wrap=lambda den: sampling_denoiser(den, ss, typical))
    if ss == "total":   # the sampler ends with the source noise s̄ in z: decode E[m | z] (WithSourceSigma)
        final = sampling_denoiser(model, ss, typical)
        dev, b = next(model.parameters()).device, batch or cfg.eval.batch
        with torch.no_grad():
            z = torch.cat([final.final(z[i:i + b].to(dev), SIGMA_MIN).float().cpu() for i in range(0, n, b)])
    return decoder(z), z, {**sinfo, "sampling_sigma": ss}


def _metric_inputs(decoder: Decoder, cfg: LatentRunConfig):
    """(test split, feature classifier, features of the test images, classifier metrics) of the VAE run's
    dataset, or a ValueError when it has no labels."""
    vcfg = decoder.vae_cfg
    train, test, _ = load_splits(vcfg.data)
    if test.labels is None:
        raise ValueError(f"the VAE run's data {vcfg.data.name!r} has no labels: FID, precision and recall in "
                         "a classifier's features do not apply (decoded samples: gendiff sample)")
    clf, real, acc = feature_classifier(SimpleNamespace(data=vcfg.data, eval=cfg.eval), test, train)
    return test, clf, real, classifier_metrics(acc, test.num_classes)


def reconstruction_metrics(decoder: Decoder, clf, real, test, n: int, seed: int) -> dict:
    """The VAE's ceiling: n test images (a seeded random subset) decoded from their posterior mean m, in the
    image metrics (images.sample_metrics)."""
    lat = decoder.latents
    n = min(n, len(lat.test_mean))
    idx = torch.randperm(len(lat.test_mean), generator=generator(seed, "reconstruction-subset"))[:n]
    x = decoder(lat.test_mean[idx])
    return {"images": n, **sample_metrics(clf, real, x, test, test.num_classes, seed)}


def evaluate(model, cfg: LatentRunConfig, info: dict, *, samples: int, seed: int = 0, steps: int = 0,
             sampling_sigma: str | None = None, log=print, grid: str | None = None) -> dict:
    """Decoded samples of the latent model in the image metrics, beside the VAE's reconstruction ceiling
    (module docstring); `grid`: also a PNG of the first 64. The sample metrics under `samples`."""
    model = model.eval()
    dev = next(model.parameters()).device
    decoder = Decoder(cfg, info, dev)
    x, _, sinfo = sample_decoded(model, cfg, info, decoder, samples, seed=seed, steps=steps,
                                 sampling_sigma=sampling_sigma)
    if grid is not None:
        image_grid(grid, x[:64], nrow=8)
    test, clf, real, cm = _metric_inputs(decoder, cfg)
    if cm["sample_metrics_unreliable"]:
        log(f"the feature classifier's test accuracy is {cm['classifier_test_accuracy']:.3f}: FID, precision "
            "and recall of this run are UNRELIABLE (marked so)")
    row = {**sinfo, **sample_metrics(clf, real, x, test, test.num_classes, seed)}
    rec = reconstruction_metrics(decoder, clf, real, test, samples, seed)
    log(f"latent ({cfg.latent.mode}) {cfg.recipe}: FID {fid_text(row)} (VAE reconstructions {fid_text(rec)})")
    return {"recipe": cfg.recipe, "mode": cfg.latent.mode, "data": test.name,
            "sigma_data": cfg.train.sigma_data, **cm, "samples": row, "reconstruction": rec}


def sample_run(out: str, cfg: LatentRunConfig, model, *, samples: int, dest: str, seed: int = 0,
               steps: int = 0, batch: int = 0, sampling_sigma: str | None = None, **unused) -> dict:
    """`gendiff sample` on a latent run: the decoded images as an image run writes them (images.write_samples:
    one PNG each, samples.npz, grid.png, samples.json), plus the latents (normalised) in samples.npz."""
    _refuse(cfg, unused)
    info = _info(out)
    decoder = Decoder(cfg, info, next(model.parameters()).device)
    x, z, sinfo = sample_decoded(model, cfg, info, decoder, samples, seed=seed, steps=steps, batch=batch,
                                 sampling_sigma=sampling_sigma)
    sinfo = {"samples": samples, "seed": seed, **sinfo}
    write_samples(dest, x, sinfo, latents=z.numpy())
    return sinfo


def _refuse(cfg: LatentRunConfig, options: dict) -> None:
    refuse(options, "a latent", f" (it samples by {sampler_name(cfg)} in latent space; --steps changes its "
                                "steps, --sampling-sigma the scalings of a mode-c model)")


def eval_run(out: str, cfg: LatentRunConfig, model, *, samples: int = 0, steps: int = 0, seed: int = 0,
             weights: str = "model.safetensors", sampling_sigma: str | None = None, **unused) -> dict:
    """`gendiff eval` on a latent run: `evaluate` with `samples` decoded samples (default eval.samples) and
    sampling_sigma (default latent.sampling_sigma); writes RUN/eval-<steps>-<n>-seed<seed>[-total].json."""
    _refuse(cfg, unused)
    n = samples or cfg.eval.samples
    m = evaluate(model, cfg, _info(out), samples=n, seed=seed, steps=steps, sampling_sigma=sampling_sigma)
    m = {**m, **m["samples"], "samples": n, "seed": seed, "weights": weights}     # flat, as an image eval
    ss = m["sampling_sigma"]
    tag = f"eval-{(steps or cfg.eval.sampler_steps) or 'default'}-{n}-seed{seed}" + \
        ("" if ss == "diffusion" else f"-{ss}") + weights_tag(weights)
    save_json(m, os.path.join(out, tag + ".json"))
    return m


def eval_summary(out: str, m: dict) -> str:
    rec = m["reconstruction"]
    return (f"{image_eval_summary(out, m)}; scalings from the {m['sampling_sigma']} σ; the VAE's "
            f"reconstructions of {rec['images']} test images: FID {fid_text(rec)}")


def likelihood_run(out: str, cfg: LatentRunConfig, model, **options) -> dict:
    raise ValueError("gendiff likelihood does not apply to a latent run (the PF-ODE gives a density of the "
                     "latents, not bits/dim of images: the VAE's decoder is no bijection)")


def likelihood_summary(out: str, m: dict) -> str:
    raise ValueError("gendiff likelihood does not apply to a latent run")


# ---- the table: gendiff ablate --suite latent ----------------------------------------------------------

LATENT_ROWS = ("a", "b", "c-diffusion", "c-total", "pixel")
# the pixel-space reference of a latent preset, at (about) its training compute (config.py's latent-mnist)
PIXEL_PRESETS = {"latent-mnist": "mnist-cpu", "latent-tiny": "mnist-tiny"}


def pixel_reference(base: LatentRunConfig, pixel_base):
    """The pixel row of the table: the image config `pixel_base` on the VAE run's dataset (all of its training
    split, as the latents), with the latent rows' recipe, seed, sample count and feature classifier; no
    bits/dim and no calibration (the latent rows have neither)."""
    vcfg = vae_config(base)
    ev = replace(pixel_base.eval, samples=base.eval.samples, classifier_steps=base.eval.classifier_steps,
                 likelihood_images=0, calibration_images=0)
    return replace(pixel_base, recipe=base.recipe, seed=base.seed, data=replace(vcfg.data, subset=0),
                   eval=ev).validate()


def train_flops_per_image(model) -> float:
    """FLOPs of one training example through the denoiser, forward and backward at σ = 1, counted by
    torch.utils.flop_counter (the backbone's convolutions and matrix products) on a float32 CPU copy."""
    m = copy.deepcopy(model).float().cpu().train().requires_grad_(True)
    x = torch.randn(1, m.net.img_channels, m.net.img_resolution, m.net.img_resolution)
    with FlopCounterMode(display=False) as fc:
        p = m.predict(x, torch.ones(1))
        (p.mu.sum() + (0 if p.G is None else p.G.sum())).backward()
    return float(fc.get_total_flops())


def run_latent_table(base: LatentRunConfig, pixel_base, out: str, rows=LATENT_ROWS, *, progress: bool = True,
                     log=print, device: str | None = None) -> str:
    """`gendiff ablate --suite latent`: T36's ways to train on the latents of base.latent.vae_run at base's
    budget, and the pixel-space reference at pixel_base's (pixel_reference), each a run folder under `out`:
    out/a, out/b, out/c (modes a, b, c; each sampled with the diffusion σ's scalings), the row c-total (the
    model of out/c sampled with the total σ's, out/c/metrics-total.json and samples-total.png, no second
    training), out/pixel. Resumable as images.run_table (images.train_row). Writes out/latent.json and
    out/latent.md; returns the markdown."""
    for r in rows:
        check_choice("--rows", r, LATENT_ROWS)
    dev = resolve_device(device)
    results, folders, configs = {}, {}, {}
    for r in rows:
        mode = r[0] if r != "pixel" else None
        if r == "pixel":
            cfg, prep, train_fn = pixel_reference(base, pixel_base), images.prepare, images.train_run
        else:
            cfg = replace(base, latent=replace(base.latent, mode=mode, sampling_sigma="diffusion")).validate()
            prep, train_fn = prepare, train_run
        folder = os.path.join(out, "pixel" if r == "pixel" else mode)
        m = train_row(cfg, folder, prep, train_fn, progress=progress, log=log, device=device)
        cfg = read_config(folder, "--out")
        if r == "c-total":
            m = _total_row(cfg, folder, m, dev, log)
        model = (images.load_model if r == "pixel" else load_model)(cfg, folder)
        log_path = os.path.join(folder, "metrics.jsonl")   # every sitting of a resumed row, no evaluation
        results[r] = {**m, "train_flops_per_image": train_flops_per_image(model),
                      "train_img_per_s": logged_img_per_s(log_path, cfg.train.batch)}
        folders[r], configs[r] = os.path.relpath(folder, out), cfg
    save_json({"preset_config": to_toml(base), "pixel_config": to_toml(pixel_reference(base, pixel_base)),
               "rows": results, "folders": sorted(set(folders.values()))}, os.path.join(out, "latent.json"))
    md = latent_table_markdown(results, configs, base)
    save_text(md, os.path.join(out, "latent.md"))
    return md


def _total_row(cfg: LatentRunConfig, folder: str, trained: dict, dev, log) -> dict:
    """Row c-total: the mode-c model of `folder` sampled with the total σ's scalings (read when done)."""
    path = os.path.join(folder, "metrics-total.json")
    done = read_json(path)
    if done is not None:
        log(f"c-total: finished earlier, read {path}")
        return done
    model = load_model(cfg, folder).to(dev)
    m = evaluate(model, cfg, _info(folder), samples=cfg.eval.samples, seed=cfg.seed, sampling_sigma="total",
                 log=log, grid=os.path.join(folder, "samples-total.png"))
    m.update({k: trained[k] for k in ("train_seconds", "iterations", "batch", "bad_steps", "final_loss")})
    save_json(m, path)
    return m


def latent_table_markdown(results: dict, configs: dict, base: LatentRunConfig) -> str:
    """latent.md: the setting, one line per row, then the issue's two targets read off the rows present."""
    f = lambda v, p=3: ("–" if v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731
                        else f"{v:.{p}f}")
    t, mdl = base.train, base.model
    lines = [f"Latent diffusion (THEORY T36) on the latents of VAE run {base.latent.vae_run!r} "
             f"({base.latent.vae_weights}); recipe {base.recipe}; latent U-Net {mdl.model_channels}×"
             f"{list(mdl.channel_mult)}, {mdl.num_blocks} block(s), attention at "
             f"{list(mdl.attn_resolutions)}; {t.iterations} steps × batch {t.batch} ({t.precision}), EMA "
             f"{t.ema}, ln σ ~ N({t.p_mean}, {t.p_std}²). Rows a, b, c: T36's modes (a: x0 = m; b: x0 = m + "
             "s·ε₁ per batch; c: x0 = m, s in the noise and the scalings of √(σ² + s²)); c-diffusion and "
             "c-total are one model (out/c) sampled with the scalings of σ alone or of √(σ² + s̄²), s̄ the "
             "per-channel mean of s. pixel: the same recipe in pixel space at about the same training "
             "compute (train TFLOP: forward and backward FLOPs per image × images seen, counted by "
             "torch.utils.flop_counter). "
             f"FID against all test images ± its bootstrap sd, {base.eval.samples} samples per row, in our "
             "classifier's features (not Inception); VAE ceiling: as many test images decoded from their "
             "posterior mean, measured alike (reconstructions of the very images FID compares with: a floor, "
             "not a sample).", "",
             "| row | FID ↓ | precision | recall | classes hit | VAE ceiling FID | classifier acc. | "
             "train img/s | train TFLOP | σ_data | sampler | NFE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, m in results.items():
        s, cfg = m["samples"], configs[r]
        tflop = m["train_flops_per_image"] * cfg.train.iterations * cfg.train.batch / 1e12
        bad = " (UNRELIABLE)" if m.get("sample_metrics_unreliable") else ""
        rec = fid_text(m["reconstruction"]) if "reconstruction" in m else "–"
        lines.append(f"| {r} | {fid_text(s)}{bad} | {f(s.get('precision'))} | {f(s.get('recall'))} | "
                     f"{s.get('modes', {}).get('classes_hit', '–')} | {rec} | "
                     f"{f(m.get('classifier_test_accuracy'))} | {f(m.get('train_img_per_s'), 1)} | "
                     f"{tflop:.3g} | {f(cfg.train.sigma_data, 4)} | {s['sampler']} | {s['nfe']} |")
    fid = {r: m["samples"]["fid"] for r, m in results.items()}
    sd = {r: m["samples"].get("fid_sd") or 0.0 for r, m in results.items()}
    lines.append("")
    ab, cs = [r for r in ("a", "b") if r in fid], [r for r in ("c-diffusion", "c-total") if r in fid]
    if ab and cs:
        best_ab, best_c = min(ab, key=fid.get), min(cs, key=fid.get)
        gap = fid[best_c] - fid[best_ab]
        lines.append(f"Target 1, (c) no worse than the better of (a) and (b): {best_c} {fid[best_c]:.1f} "
                     f"against {best_ab} {fid[best_ab]:.1f}, a difference of {gap:+.1f} (bootstrap sds "
                     f"{sd[best_c]:.1f}, {sd[best_ab]:.1f}): " + ("met." if gap <= 0 else "not met."))
    lat = [r for r in LATENT_ROWS[:4] if r in fid]
    if lat and "pixel" in fid:
        best = min(lat, key=fid.get)
        speed = results[best]["train_img_per_s"] / results["pixel"]["train_img_per_s"]
        ratio = fid[best] / fid["pixel"]
        lines.append(f"Target 2, latent training at ≥ 3× the pixel model's img/s with a decoded FID within "
                     f"1.5× of its FID: {best} trains at {speed:.2f}× the img/s, FID ratio {ratio:.2f}: "
                     + ("met." if speed >= 3 and ratio <= 1.5 else "not met."))
    return "\n".join(lines) + "\n"
