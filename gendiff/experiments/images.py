"""Image runs: a recipe of seed 004's table (recipes.IMAGE_RECIPES) trained on an image dataset (MNIST,
Fashion-MNIST, or a researcher's own folder or .npz) in a run folder, and the commands on such a folder.

Training goes through the one loop (train.py) on a `DataSource`; sampling through the library's samplers
(respaced DDPM ancestral for the DDPM recipes, EDM Heun for the EDM recipes, CFG through
guidance.classifier_free), one seed per image; measurement through image_metrics: FID, precision/recall and
per-class counts in the features of our own classifier (nets/classifier.py, cached beside the data; its test
accuracy is reported with them, and near chance the sample metrics are marked unreliable), bits/dim
(PF-ODE with Hutchinson on dequantised test images; DDPM's bound for DDPM recipes), and for confidence recipes
the calibration of σ_φ per pixel with an uncertainty figure.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ..calibration import FLOOR, VarianceScale, calibration_by_sigma, reliability_figure
from ..checks import check_choice
from ..data import images as im
from ..data.sources import DataSource
from ..guidance import Conditioned, Guided, check_interval, check_weight, classifier_free
from ..heads import make_head
from ..image_metrics import (FID_BOOTSTRAP, class_counts, fid_with_sd, image_grid, mode_coverage,
                             precision_recall, uncertainty_grid)
from ..io import StackedGenerator, atomic_path, derive_seed, generator, save_json, save_text
from ..likelihood import dequantize, log_likelihood, nll_8bit_to_bits_per_dim
from ..nets.classifier import batched, load_or_train_classifier
from ..samplers import GRID_SAMPLERS, sample_ddpm, sample_euler
from ..schedules import distill_sigmas, edm_sigmas
from ..scores import CountCalls
from .config import SIGMA_DATA_MEASURED, ImageRunConfig, to_toml
from .ddpm_variance import (ANALYTIC_IMAGES, VLB_STEPS, analytic_table, ddpm_bound, ddpm_choice,
                            ddpm_keywords, grid_choice, sampler_steps)
from .recipes import DDPM_T, IMAGE_RECIPES, ddpm
from .report import BY_SIGMA_TEXT, by_sigma_markdown
from .runfolder import load_weights, read_config, read_json, refuse, start_run, train_in_folder, weights_tag

CALIBRATION_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0   # the EDM recipes' sampling range and grid (EDM eq. 5)
VAL_FRACTION = 0.1         # folder/npz data: the share held out as the test split (seed 0)
UNRELIABLE_MARGIN = 0.2    # classifier accuracy below chance + this share of (1 − chance): metrics unreliable


# ---- data, model ---------------------------------------------------------------------------------------

def load_splits(dcfg):
    """(train, test, description) of the run's dataset, decoded once. Folder/npz data is resized/converted as
    data.size/data.channels say and split 90/10 into train/test, deterministically (seed 0); the description
    (one line: the images, their labels and the split) is printed at the start of training and kept in the
    run folder."""
    if dcfg.name in ("mnist", "fashion-mnist"):
        train, test = (im.load_mnist(dcfg.name, s, root=dcfg.path or None) for s in ("train", "test"))
        c, h, w = train.images.shape[1:]
        return train, test, (f"data {dcfg.name!r}: {len(train)} train / {len(test)} test images {c}×{h}×{w}, "
                             f"{train.num_classes} classes (the dataset's own split)")
    kw = {"size": dcfg.size or None, "channels": dcfg.channels or None}
    data = im.load_folder(dcfg.path, **kw) if dcfg.name == "folder" else im.load_npz(dcfg.path, **kw)
    if round(len(data) * VAL_FRACTION) < 1 or round(len(data) * VAL_FRACTION) >= len(data):
        raise ValueError(f"data.path={dcfg.path!r} holds {len(data)} images; the fixed {VAL_FRACTION:.0%} "
                         f"test split needs at least {math.ceil(0.5 / VAL_FRACTION)} images")
    train, test = data.split(VAL_FRACTION, seed=0)
    line = f"data {dcfg.name!r} at {dcfg.path}: {data.describe(VAL_FRACTION, seed=0)}"
    return train, test, line


def load_images(dcfg, split: str):
    """The train or test split of the run's dataset (load_splits)."""
    train, test, _ = load_splits(dcfg)
    return train if split == "train" else test


class Setup(NamedTuple):
    model: torch.nn.Module
    loss: object
    source: object
    density: object
    data: object                   # the training split (ImageData)
    test: object                   # the test split (ImageData)
    split: str                     # load_splits' description
    cfg: ImageRunConfig            # the config resolved: σ_data measured where it said 0 (the run saves this)


def training_data(cfg: ImageRunConfig, data):
    """The images a run trains on: the training split `data`, or its fixed data.subset (seed cfg.seed)."""
    return data.subset(min(cfg.data.subset, len(data)), seed=cfg.seed) if cfg.data.subset else data


def with_sigma_data(cfg: ImageRunConfig, measure) -> ImageRunConfig:
    """cfg itself where train.sigma_data is a number; where it is SIGMA_DATA_MEASURED (0, the image presets'
    default) a copy holding `measure()`: in `prepare` the std of every training pixel (ImageData.pixel_std,
    float64), in `load_model` the value the run recorded."""
    if cfg.train.sigma_data != SIGMA_DATA_MEASURED:
        return cfg
    value = float(measure())
    if not value > 0:
        raise ValueError(f"train.sigma_data=0 asks for σ_data measured from the training images, but their "
                         f"pixel std is {value!r} (every pixel the same value?); set train.sigma_data > 0")
    return replace(cfg, train=replace(cfg.train, sigma_data=value))


def build_model(cfg: ImageRunConfig, shape: tuple, num_classes: int, backbone=None):
    """The recipe's denoiser for images of `shape` (C, H, W); images the U-Net of cfg.model cannot take are
    one error naming the config keys that fix it."""
    c, h, w = shape
    if h != w:
        raise ValueError(f"the images are {h}×{w}; the U-Net takes square images: set data.size (e.g. "
                         f"data.size={min(h, w)}) to resize them")
    if cfg.train.sigma_data == SIGMA_DATA_MEASURED and IMAGE_RECIPES[cfg.recipe].density_name != "ddpm":
        raise ValueError(f"train.sigma_data={cfg.train.sigma_data!r} means 'measured from the training "
                         "split', which prepare (or load_model, from the run folder) does; build_model "
                         "needs the number: call prepare, or set train.sigma_data > 0")
    try:
        return IMAGE_RECIPES[cfg.recipe].build_model(cfg, shape, num_classes, backbone)
    except ValueError as e:
        raise ValueError(f"the U-Net of this config does not fit {c}×{h}×{w} images ({e}); change "
                         f"model.attn_resolutions or model.channel_mult, or resize the images with data.size"
                         ) from None


def load_model(cfg: ImageRunConfig, out: str, weights: str = "model.safetensors"):
    """The model of a finished image run folder with its weights (safetensors only), in eval mode. The image
    shape and class count come from RUN/data.json (the data itself is not needed), else from the data. σ_data
    is the config's (a run's config.toml holds the measured number); a config that still says 0 takes the
    one RUN/data.json recorded, and only without it is measured again from the training images."""
    info = read_json(os.path.join(out, "data.json"))
    if info is None:
        train, test, _ = load_splits(cfg.data)
        info = {"shape": test.images.shape[1:], "num_classes": test.num_classes,
                "sigma_data": training_data(cfg, train).pixel_std()}
    cfg = with_sigma_data(cfg, lambda: info.get("sigma_data") or
                          training_data(cfg, load_images(cfg.data, "train")).pixel_std())
    return load_weights(build_model(cfg, tuple(info["shape"]), info["num_classes"]), out, weights)


# ---- training ------------------------------------------------------------------------------------------

def resolve_device(device: str | None = None) -> torch.device:
    """auto (None): this rank's GPU when CUDA is there (cuda:$LOCAL_RANK under torchrun), else the CPU."""
    device = device or "auto"
    check_choice("device", device, ("auto", "cpu", "cuda"))
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def prepare(cfg: ImageRunConfig, device=None, backbone=None, log=print) -> Setup:
    """Everything that can reject an image run, before its folder exists: the data (read, checked, split), the
    model (seeded initialisation; it must fit the images), the loss and the training density. The data, the
    model and the EMA live on `device` (resolve_device); random draws come from the CPU training generator, so
    a seed fixes the run on any device. σ_data: where train.sigma_data is 0 (the image presets), measured
    here once from the training images (`with_sigma_data`); Setup.cfg holds the number, and is the config to
    save with the run (`start_run(setup.cfg, …)`), so that a resumed run reads it back unmeasured.
    backbone: see recipes.ImageRecipe.build_model."""
    dev = resolve_device(device)
    recipe = IMAGE_RECIPES[cfg.recipe]
    data, test, split = load_splits(cfg.data)
    data = training_data(cfg, data)
    if cfg.train.sigma_data == SIGMA_DATA_MEASURED:
        cfg = with_sigma_data(cfg, data.pixel_std)
        split += f"; σ_data {cfg.train.sigma_data:.4f}, measured from the {len(data)} training images"
    if recipe.conditional and data.labels is None:
        raise ValueError(f"recipe={cfg.recipe!r} is class-conditional; data {data.name!r} has no labels")
    x = data.to_tensor()
    labels = torch.from_numpy(data.labels) if recipe.conditional else None
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = build_model(cfg, tuple(x.shape[1:]), data.num_classes, backbone).to(dev)
    source = DataSource(x, labels, data.num_classes if recipe.conditional else 0, recipe.label_dropout,
                        shape=tuple(x.shape[1:]), name=f"data {data.name!r}", device=dev)
    density = recipe.density(cfg.train)
    return Setup(model, recipe.loss_fn(density), source, density, data, test, split, cfg)


def train_run(cfg: ImageRunConfig, out: str, setup: Setup, *, progress: bool = True, log=print,
              primary: bool = True) -> dict:
    """Train (or continue) the image run in `out` through train.train; evaluate its EMA; returns the
    metrics. cfg: the config given to prepare, or setup.cfg; the run uses setup.cfg (σ_data measured)."""
    if with_sigma_data(cfg, lambda: setup.cfg.train.sigma_data) != setup.cfg:
        raise ValueError("train_run: `setup` was prepared from another config than `cfg`")
    cfg = setup.cfg
    if primary:
        log(setup.split)
        save_text(setup.split + "\n", os.path.join(out, "data.txt"))
        save_json({"shape": list(setup.test.images.shape[1:]), "num_classes": setup.test.num_classes,
                   "sigma_data": cfg.train.sigma_data},
                  os.path.join(out, "data.json"))   # what load_model needs to rebuild the network
    res = train_in_folder(setup.model, setup.loss, setup.source, cfg, out, density=setup.density,
                          desc=cfg.recipe, progress=progress, log=log, primary=primary)
    if not primary:
        return {}
    metrics = evaluate_image_model(res.ema, cfg, out, num_classes=setup.data.num_classes, log=log,
                                   train=setup.data, test=setup.test)
    metrics.update(sigma_data=cfg.train.sigma_data, **training_metrics(out, cfg, res))
    save_json(metrics, os.path.join(out, "metrics.json"))
    return metrics


def summary(cfg: ImageRunConfig, metrics: dict) -> str:
    return f"{cfg.recipe}: " + ", ".join(f"{k} {v:.4g}" for k, v in _flat_numbers(metrics).items())


def _flat_numbers(m: dict, prefix: str = "") -> dict:
    """The headline numbers of an image run's metrics (FID, precision, recall, bits/dim) for one line."""
    out = {}
    for k, v in m.items():
        if isinstance(v, dict) and k.startswith("samples"):
            out.update(_flat_numbers({kk: vv for kk, vv in v.items()
                                      if kk in ("fid", "fid_sd", "precision", "recall")}, f"{k}."))
        elif k.startswith("bpd_") and isinstance(v, float) and not k.endswith("seconds"):
            out[prefix + k] = v
        elif k in ("fid", "fid_sd", "precision", "recall") and isinstance(v, float):
            out[prefix + k] = v
    if "classifier_test_accuracy" in m:
        flag = " (near chance: FID/precision/recall UNRELIABLE)" if m["sample_metrics_unreliable"] else ""
        out[f"classifier_test_accuracy{flag}"] = m["classifier_test_accuracy"]
    return out


def _tail_mean(v, k=50):
    return float(sum(v[-k:]) / len(v[-k:])) if v else float("nan")


def training_metrics(out: str, cfg, res) -> dict:
    """What a run folder's metrics.json says of its training (image, latent and VAE runs): images per
    second and wall seconds from metrics.jsonl over every sitting, iterations, batch, bad steps, the mean
    of the last 50 losses (of this sitting)."""
    log = os.path.join(out, "metrics.jsonl")
    return {"train_img_per_s": logged_img_per_s(log, cfg.train.batch),
            "train_seconds": logged_train_seconds(log), "iterations": cfg.train.iterations,
            "batch": cfg.train.batch, "bad_steps": res.bad_steps, "final_loss": _tail_mean(res.losses)}


# ---- sampling: one seed per image ----------------------------------------------------------------------

def distill_grid(cfg: ImageRunConfig, steps: int):
    """The distillation grid (T35, schedules.distill_sigmas) at `steps` over the EDM recipes' range."""
    return distill_sigmas(steps, SIGMA_MIN, SIGMA_MAX, RHO)


GRID_LABELS = {"heun": "Heun", "euler": "Euler", "dpmpp_2m": "DPM-Solver++(2M)",
               "euler_maruyama": "Euler–Maruyama"}   # the σ-grid samplers image runs take (pc is refused)


def sampler_name(cfg: ImageRunConfig, steps: int = 0, sampler=None, variance=None) -> str:
    use_ddpm, _ = ddpm_choice(cfg, sampler, variance)
    steps = sampler_steps(cfg, steps, use_ddpm)
    if not use_ddpm:
        return (f"Euler {steps} (distilled grid)" if cfg.distill.steps
                else f"{GRID_LABELS[grid_choice(cfg, sampler) or 'heun']} {steps}")
    return f"DDPM ancestral, respaced {min(steps, DDPM_T)}" + ("" if variance is None else f", Σ {variance}")


AUTOGUIDE_W = 2.0          # `--autoguide`'s default weight (EDM2's best guided FIDs are near w ≈ 2)


class Autoguide(NamedTuple):
    """Autoguidance on images (THEORY T34, EDM2): D̃ = D_guide + w·(D_main − D_guide) with `model`, a weaker
    denoiser of the same data (the same U-Net smaller and/or trained shorter) as the guide; w = 1 is the main
    model alone. `name` labels the results files (the guide folder's name, '@<weights stem>' for other
    weights); `run` is the guide's run folder, recorded in full in the results."""
    model: torch.nn.Module
    w: float
    name: str
    run: str = ""


def load_guide(cfg: ImageRunConfig, run: str, w: float, weights: str = "model.safetensors") -> Autoguide:
    """The guide of `--autoguide RUN`: image run folder `run` (its weights file `weights`), refused unless it
    models the same data as the main run (cfg) with the same conditioning, so that D_guide and D_main are two
    estimates of the same E[x0 | x̃]."""
    gcfg = read_config(run, "--autoguide")
    if gcfg.kind != "images":
        raise ValueError(f"--autoguide={run!r} is a {gcfg.kind!r} run; the guide must be an image run folder "
                         "(gendiff train --preset …) of the same data as the main run")
    if gcfg.data != cfg.data:
        raise ValueError(f"--autoguide={run!r} was trained on data {gcfg.data.path!r} (subset "
                         f"{gcfg.data.subset}); the main run on {cfg.data.path!r} (subset "
                         f"{cfg.data.subset}): the guide must model the same data")
    main_c, guide_c = IMAGE_RECIPES[cfg.recipe].conditional, IMAGE_RECIPES[gcfg.recipe].conditional
    if main_c != guide_c:
        raise ValueError(f"--autoguide={run!r}: recipe {gcfg.recipe!r} is "
                         f"{'class-conditional' if guide_c else 'unconditional'}, the main run's "
                         f"{cfg.recipe!r} is {'class-conditional' if main_c else 'unconditional'}; guide and "
                         "main must be conditioned alike")
    w = check_weight(w, "1 = the main model alone, 0 = the guide", "--guidance")
    name = os.path.basename(os.path.normpath(run)) + weights_tag(weights).replace("-", "@", 1)
    try:
        model = load_model(gcfg, run, weights)
    except ValueError as e:
        raise ValueError(f"--autoguide={run!r} --autoguide-weights={weights!r}: {e}") from None
    return Autoguide(model, w, name, os.path.abspath(run))


def guidance_tag(cfg_weight=None, autoguide: Autoguide | None = None, interval=None) -> str:
    """The part of a results file name that says how sampling was guided: '-w<CFG w>', '-ag<w>-<guide>',
    '-i<σ_lo>-<σ_hi>'; '' unguided."""
    return (("" if cfg_weight is None else f"-w{cfg_weight:g}")
            + ("" if autoguide is None else f"-ag{autoguide.w:g}-{autoguide.name}")
            + ("" if interval is None else f"-i{interval[0]:g}-{interval[1]:g}"))


def guidance_info(autoguide: Autoguide | None = None, interval=None) -> dict:
    """What a results JSON records of autoguidance and the guidance interval (nothing when unused)."""
    interval = check_interval(interval)
    return ({} if autoguide is None else {"autoguide": autoguide.name, "autoguide_run": autoguide.run,
                                          "guidance": autoguide.w}) | \
        ({} if interval is None else {"guidance_interval": "{:g},{:g}".format(*interval)})   # σ_hi may be inf


def check_guidance(cfg: ImageRunConfig, cfg_weight=None, autoguide: Autoguide | None = None, interval=None):
    """The guidance options of sampling an image run, checked together; returns the interval as floats."""
    if cfg_weight is not None and autoguide is not None:
        raise ValueError("--cfg-weight and --autoguide are two guidances; give one (classifier-free guidance "
                         "of a conditional run, or autoguidance by a weaker run)")
    if interval is not None and cfg_weight is None and autoguide is None:
        raise ValueError(f"--guidance-interval={interval!r} limits a guidance to a σ range: give it with "
                         "--cfg-weight W or --autoguide RUN")
    if cfg_weight is not None and not IMAGE_RECIPES[cfg.recipe].conditional:
        raise ValueError(f"--cfg-weight needs a class-conditional recipe; recipe={cfg.recipe!r} is "
                         "unconditional")
    return check_interval(interval)


def sample_images(model, cfg: ImageRunConfig, n: int, *, labels=None, w: float | None = None, seed: int = 0,
                  num_classes: int = 0, guide=None, steps: int = 0, batch: int = 0, wrap=None, sampler=None,
                  variance=None, analytic_images: int = ANALYTIC_IMAGES, clamp: bool = True,
                  autoguide: Autoguide | None = None, interval=None):
    """n images in [−1, 1] from the run's sampler (`steps`: default eval.sampler_steps, else the recipe's), in
    batches of `batch` (default eval.batch). Image i draws its start and all its noise
    from its own generator (seed, i), so an image does not depend on how the batches are split. Returns
    (images, info: sampler, NFE, seconds).
    labels: the class of each image for a conditional recipe (default: the null class ∅, unconditional), with
    CFG weight `w` (T33; None: the conditional model alone). guide: None, or a callable
    (denoiser, labels of the batch) -> denoiser wrapping the model for each batch (e.g.
    guidance.ClassifierGuided; needs `labels`); NFE counts the model's calls. wrap: None, or a callable
    denoiser -> denoiser applied last to each batch's denoiser (e.g. uncertainty.ExcessVarianceScore).
    autoguide: None, or autoguidance (T34) by a weaker model of the same data (`load_guide`), conditioned on
    the same labels; not with CFG. interval: None, or (σ_lo, σ_hi): CFG or autoguidance only for σ in it, the
    main (conditional) model alone elsewhere (guidance.Guided). NFE counts the guide's calls too.
    sampler: None (the recipe's) or "ddpm": DDPM ancestral sampling for any run, with the reverse variance
    `variance` (ddpm_variance.py: beta, beta_tilde, v, T38's phi and analytic); or a σ-grid sampler
    (samplers.GRID_SAMPLERS: euler, dpmpp_2m, …) on EDM's grid for a recipe sampled on σ (ddpm_choice).
    clamp: False returns the sampler's output as it is (latents, which are not pixels in [−1, 1])."""
    recipe = IMAGE_RECIPES[cfg.recipe]
    use_ddpm, name = ddpm_choice(cfg, sampler, variance)
    batch = batch or cfg.eval.batch
    interval = check_guidance(cfg, w, autoguide, interval)
    if guide is not None and (labels is None or len(labels) < n):
        raise ValueError(f"sample_images(guide=...) needs labels, one class per sample ({n}); got "
                         f"{'none' if labels is None else len(labels)}")
    shape = (model.net.img_channels, model.net.img_resolution, model.net.img_resolution)
    dev = next(model.parameters()).device
    counted, outs, start = CountCalls(model), [], time.perf_counter()
    guide_counted = None if autoguide is None else CountCalls(autoguide.model.to(dev))
    if autoguide is not None and name in ("v", "phi") and type(autoguide.model.head) is not type(model.head):
        raise ValueError(f"--variance={name!r} reads the reverse variance from the head of the guided model, "
                         "and at w = 0 from the guide's: the guide's head "
                         f"({type(autoguide.model.head).__name__}) must be the main run's "
                         f"({type(model.head).__name__})")
    steps = sampler_steps(cfg, steps, use_ddpm)
    process = ddpm().respaced(min(steps, DDPM_T)) if use_ddpm else None
    x0_var = (analytic_table(model, cfg, process, load_images(cfg.data, "train").to_tensor(),
                             num_classes=num_classes, images=analytic_images, seed=seed)
              if name == "analytic" else None)
    for i in range(0, n, batch):
        k = min(batch, n - i)
        g = StackedGenerator(seed, range(i, i + k))
        den, gden = counted, guide_counted
        if recipe.conditional:
            y = (labels[i:i + k] if labels is not None else torch.full((k,), num_classes)).to(dev)
            den = classifier_free(den, y, num_classes, w, interval) if w is not None else Conditioned(den, y)
            gden = None if gden is None else Conditioned(gden, y)
        if gden is not None:
            den = Guided(den, gden, autoguide.w, interval)
        if guide is not None:
            den = guide(den, labels[i:i + k].to(dev))
        if wrap is not None:
            den = wrap(den)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                             enabled=cfg.train.precision == "bf16"):
            z = g.randn((k, *shape)).to(dev)
            if use_ddpm:
                den, kw = ddpm_keywords(model, den, process, name, x0_var)
                x = sample_ddpm(den, z, process, rule=recipe.rule, generator=g, **kw)
            elif cfg.distill.steps:   # a distilled student: Euler (= DDIM, T35) on its own grid
                x = sample_euler(den, z * SIGMA_MAX, distill_grid(cfg, steps), generator=g)
            else:       # the recipe's Heun, or the σ-grid sampler chosen, on EDM's grid
                grid = edm_sigmas(steps, SIGMA_MIN, SIGMA_MAX, RHO)
                x = GRID_SAMPLERS[grid_choice(cfg, sampler) or "heun"](den, z * SIGMA_MAX, grid, generator=g)
        outs.append((x.float().clamp(-1, 1) if clamp else x.float()).cpu())
    nfe = (counted.calls + (guide_counted.calls if guide_counted else 0)) // math.ceil(n / batch)
    return torch.cat(outs), {"sampler": sampler_name(cfg, steps, sampler, variance), "nfe": nfe,
                             "sample_seconds": time.perf_counter() - start}


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def sample_run(out: str, cfg: ImageRunConfig, model, *, samples: int, dest: str, seed: int = 0,
               steps: int = 0,
               batch: int = 0, cfg_weight: float | None = None, label: int | None = None, sampler=None,
               score_mode=None, variance=None, autoguide: Autoguide | None = None, interval=None,
               **unused) -> dict:
    """`gendiff sample` on an image run: dest/000000.png … (one PNG per image), dest/samples.npz (uint8 images
    [N, C, H, W], the seed, each image's index i and labels) and dest/grid.png (the first 64). A conditional
    run samples classes 0, 1, … in turn (or only `label`), with CFG weight `cfg_weight`
    (default: the conditional model alone). sampler="ddpm", variance, autoguide, interval: as
    `sample_images`."""
    _refuse_sampler(cfg, {"score_mode": score_mode, **unused})
    ddpm_choice(cfg, sampler, variance)
    recipe = IMAGE_RECIPES[cfg.recipe]
    num_classes = _num_classes(model)
    if not recipe.conditional and (cfg_weight is not None or label is not None):
        raise ValueError(f"--cfg-weight / --label need a class-conditional recipe; recipe={cfg.recipe!r} is "
                         "unconditional")
    if label is not None and not 0 <= label < num_classes:
        raise ValueError(f"--label={label} must be a class in 0..{num_classes - 1}")
    labels = None
    if recipe.conditional:
        labels = torch.full((samples,), label) if label is not None else torch.arange(samples) % num_classes
    x, info = sample_images(model, cfg, samples, labels=labels, w=cfg_weight, seed=seed,
                            num_classes=num_classes, steps=steps, batch=batch, sampler=sampler,
                            variance=variance, autoguide=autoguide, interval=interval)
    info = {"samples": samples, "seed": seed, "cfg_weight": cfg_weight, "label": label,
            **guidance_info(autoguide, interval), **info}
    write_samples(dest, x, info, **({"labels": labels.numpy()} if labels is not None else {}))
    return info


def write_samples(dest: str, x: torch.Tensor, info: dict, **arrays) -> None:
    """The files of `gendiff sample` for images x [N, C, H, W] in [−1, 1]: dest/000000.png … (one PNG per
    image), dest/samples.npz (uint8 images, the seed info['seed'], each image's index i, and `arrays`, e.g.
    labels), dest/grid.png (the first 64) and dest/samples.json (`info`)."""
    os.makedirs(dest, exist_ok=True)
    u8 = _to_uint8(x)
    for i, img in enumerate(u8):
        with atomic_path(os.path.join(dest, f"{i:06d}.png")) as tmp:
            Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(tmp, format="PNG")
    with atomic_path(os.path.join(dest, "samples.npz")) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=u8, seed=np.int64(info["seed"]), index=np.arange(len(x)), **arrays)
    image_grid(os.path.join(dest, "grid.png"), x[:64], nrow=8)
    save_json(info, os.path.join(dest, "samples.json"))


def _refuse_sampler(cfg: ImageRunConfig, options: dict) -> None:
    refuse(options, "an image", f" (it samples with {sampler_name(cfg)}; --steps changes its steps)")


def _num_classes(model) -> int:
    """Classes of a conditional model (its class embedding has num_classes + 1 rows, ∅ last); 0 otherwise."""
    return getattr(model.net, "num_classes", 0) or 0


# ---- evaluation ----------------------------------------------------------------------------------------

def evaluate_image_model(model, cfg, out: str, *, num_classes: int = 10, log=print, train=None,
                         test=None) -> dict:
    """FID / precision / recall / class counts of generated images (our classifier's features), bits/dim,
    σ_φ calibration for confidence models; writes samples*.png and uncertainty.png into `out`."""
    obj, ev = IMAGE_RECIPES[cfg.recipe], cfg.eval
    model = model.eval()
    test = load_images(cfg.data, "test") if test is None else test
    xt = test.to_tensor()
    metrics: dict = {"recipe": cfg.recipe, "data": test.name}
    clf, real = None, None
    if test.labels is not None:
        clf, real, acc = feature_classifier(cfg, test, train)
        metrics.update(classifier_metrics(acc, test.num_classes))
        if metrics["sample_metrics_unreliable"]:
            log(f"the feature classifier's test accuracy is {acc:.3f} against chance "
                f"{1 / test.num_classes:.3f}: FID, precision and recall of this run are UNRELIABLE (marked "
                "so in metrics.json)")
    ws = list(cfg.cfg_weights) if obj.conditional else [None]
    labels = torch.arange(ev.samples) % num_classes if obj.conditional else None
    for w in ws:
        x, info = sample_images(model, cfg, ev.samples, labels=labels, w=w, seed=cfg.seed,
                                num_classes=num_classes)
        key = "" if w is None else f"@w={w:g}"
        row = dict(info)
        if clf is not None:
            row.update(sample_metrics(clf, real, x, test, num_classes, cfg.seed))
        metrics[f"samples{key}"] = row
        image_grid(os.path.join(out, f"samples{key.replace('@', '-')}.png"), x[:64], nrow=8)
        log(f"{cfg.recipe}{key}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                    if isinstance(v, float)))
    dev = next(model.parameters()).device
    metrics.update(bits_per_dim(model, cfg, xt[:ev.likelihood_images].to(dev), num_classes))
    if make_head(obj.head).has_confidence and ev.calibration_images:
        metrics["calibration"] = calibrate(model, cfg, xt[:ev.calibration_images].to(dev), out)
        uncertainty_figure(model, x[:4].to(dev), os.path.join(out, "uncertainty-generated.png"),
                           seed=cfg.seed)
    return metrics


def classifier_metrics(accuracy: float, num_classes: int) -> dict:
    """The feature classifier's test accuracy beside chance; below chance + UNRELIABLE_MARGIN·(1 − chance) the
    sample metrics (FID, precision, recall, class counts) measure nothing and are marked unreliable."""
    chance = 1.0 / num_classes
    return {"classifier_test_accuracy": accuracy, "classifier_chance": chance,
            "sample_metrics_unreliable": bool(accuracy < chance + UNRELIABLE_MARGIN * (1 - chance))}


def feature_classifier(cfg, test, train=None):
    """(classifier, features of the test images, its test accuracy): the FID feature classifier of the run's
    dataset (nets/classifier.py), trained on the training split once and cached in the data folder."""
    train = load_images(cfg.data, "train") if train is None or cfg.data.subset else train
    if cfg.data.name in ("mnist", "fashion-mnist"):
        cache, key = im.data_dir(cfg.data.name), cfg.data.name
    else:   # beside the data when that folder takes writes, else in gendiff's own data folder
        key = "".join(ch if ch.isalnum() or ch in "-_." else "_"
                      for ch in os.path.basename(cfg.data.path.rstrip("/")))
        cache = os.path.join(os.path.dirname(os.path.abspath(cfg.data.path)), ".gendiff-classifier")
        if not os.access(os.path.dirname(cache), os.W_OK):
            cache = os.path.join(os.path.dirname(im.data_dir("mnist")), "own-data-classifiers")
    xt = test.to_tensor()
    clf, info = load_or_train_classifier(key, train.to_tensor(), torch.from_numpy(train.labels), cache, xt,
                                         torch.from_numpy(test.labels), steps=cfg.eval.classifier_steps)
    clf.eval()
    with torch.no_grad():
        return clf, batched(clf.features, xt), info.get("test_accuracy")


def sample_metrics(clf, real: torch.Tensor, x: torch.Tensor, test, num_classes: int, seed: int,
                   labels: torch.Tensor | None = None) -> dict:
    """FID against all the test images with its bootstrap sd (`fid_sd`, image_metrics.fid_with_sd: the
    noise of one set of len(x) samples), precision/recall (against as many real test images as samples, a
    fixed random subset of the test split: 1000 of MNIST's 10 000 at eval.samples = 1000), per-class counts
    and mode coverage of generated images x in the feature classifier's space; with `labels` (the class each
    sample was asked for) also label_accuracy, the share the classifier assigns to the asked class."""
    with torch.no_grad():
        fake = batched(clf.features, x)
        g = torch.Generator().manual_seed(derive_seed(seed, "real-subset"))
        ref = real[torch.randperm(len(real), generator=g)[:len(fake)]]
        p, r = precision_recall(ref, fake)
        counts = class_counts(clf, x, num_classes)
        value, sd = fid_with_sd(real, fake, seed=derive_seed(seed, "fid-bootstrap"))
        row = dict(fid=value, fid_sd=sd, precision=p, recall=r, class_counts=counts.tolist(),
                   modes=mode_coverage(counts, torch.bincount(torch.from_numpy(test.labels),
                                                              minlength=num_classes).numpy()))
        if labels is not None:
            pred = batched(clf, x).argmax(1)
            row["label_accuracy"] = float((pred == labels.to(pred.device)).double().mean())
    return row


PF_ODE_SIGMA_MIN = 0.002   # the PF-ODE likelihood's σ_min, one for every row (bits_per_dim)


def bits_per_dim(model, cfg, x8: torch.Tensor, num_classes: int) -> dict:
    """Bits/dim of 8-bit test images (± the standard error over images): PF-ODE (T31, Hutchinson) of the
    dequantised images, plus DDPM's discretised bound (T27) for DDPM rows. A conditional model is measured
    unconditionally (the null class ∅: p(x)).

    PF-ODE, the same evaluation for every row: centred dequantisation (`likelihood.dequantize`: y uniform in
    [x_k − Δ/2, x_k + Δ/2), Δ = 2/255, around the grid value the model was trained on; the bin's log-volume
    d·log 127.5 in `nll_8bit_to_bits_per_dim`) and one σ_min = PF_ODE_SIGMA_MIN = 0.002 for EDM and DDPM
    rows alike (EDM's sampling σ_min). Why 0.002 and not DDPM's σ̃_1 ≈ 0.01: the model density is
    p_σmin = p ∗ N(0, σ_min²), and only a σ_min below the dequantisation noise (Δ/√12 = 0.0023) lets it
    concentrate within one bin; at 0.01 every row pays for smearing each byte over ±1.3 bins, most on MNIST's
    constant background. The price: DDPM rows are evaluated below the lowest σ̃ they were trained at (σ̃_1);
    for ε-, score- and EDM-parameterised rows the network's share c_out → 0 there (D ≈ x̃), the x0 row
    (c_skip = 0) is the exposed one.
    DDPM bound: `likelihood.ddpm_vlb` with the discretised decoder (Σ_1 = β̃_2 for the fixed-variance rows,
    the learned Σ_θ for the v head), VLB_STEPS of the T − 1 diffusion steps drawn at random (unbiased); its
    ± `bpd_ddpm_bound_se` = √(se over images² + se of the draw of steps²), the latter also alone
    (`bpd_ddpm_bound_se_steps`, from ddpm_vlb's `step_var`)."""
    obj = IMAGE_RECIPES[cfg.recipe]
    if not len(x8):
        return {}
    den = (Conditioned(model, torch.full((len(x8),), num_classes, device=x8.device)) if obj.conditional
           else model)
    n, d = len(x8), x8[0].numel()
    se = lambda v: float(v.std() / math.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
    g = generator(cfg.seed, "likelihood")
    y = dequantize(x8.double(), generator=g).float()
    sigma_min = PF_ODE_SIGMA_MIN
    start = time.perf_counter()
    logp, info = log_likelihood(den, y, sigma_min=sigma_min, method="hutchinson", rtol=1e-4, atol=1e-4,
                                generator=g)
    bpd = nll_8bit_to_bits_per_dim(-logp.double(), d)
    out = {"bpd_pf_ode": float(bpd.mean()), "bpd_pf_ode_se": se(bpd), "bpd_pf_ode_nfe": info["nfe"],
           "bpd_pf_ode_sigma_min": sigma_min, "bpd_pf_ode_seconds": time.perf_counter() - start,
           "bpd_images": n}
    if obj.density_name == "ddpm":
        out.update(ddpm_bound(model, cfg, x8, num_classes, generator_=g))
    return out


def sigma_edges(sigmas) -> list[float]:
    """Bin edges around each σ of an increasing list: geometric midpoints between neighbours, and a factor
    2 beyond the ends, so that bin k holds exactly σ_k."""
    s = [float(v) for v in sigmas]
    return [s[0] / 2] + [math.sqrt(a * b) for a, b in zip(s, s[1:])] + [s[-1] * 2]


@torch.no_grad()
def calibrate(model, cfg, x0: torch.Tensor, out: str, sigmas=CALIBRATION_SIGMAS) -> dict:
    """The confidence head's claim about x0 against the actual error, on held-out images at each σ of
    `sigmas`.

    q(x | x̃) = N(μ, σ_φ²) models a noisy sample x ~ N(x0, σ²) (T7), so its optimum is
    σ_φ² = σ² + Var[x0 | x̃] (T8): the variance it predicts for the error of μ itself is the excess
    var_x0 = σ_φ² − σ², which can be ≤ 0 for a trained head. calibration.calibration_by_sigma reads it per σ:
    the share of pixels at or below the floor (1e-3·σ)² apart, NLL / coverage / Spearman / reliability on the
    rest, against the best constant per σ fitted on the other half of the images (images 0, 2, 4, … fit the
    constant; 1, 3, 5, … are measured), with a bootstrap sd over images. Writes calibration.png (the
    reliability diagrams) and uncertainty.png (uncertainty_figure)."""
    if len(x0) < 2:
        raise ValueError(f"eval.calibration_images={len(x0)}; allowed: 0 (off) or at least 2 (one half fits "
                         "the constant, the other is measured)")
    noisy = _calibration_inputs(x0, sigmas, cfg.seed)
    res = _calibration_readout(x0, sigmas, cfg.seed, _excess_readout(model, noisy, sigmas))
    n = len(x0)
    reliability_figure(os.path.join(out, "calibration.png"), res,
                       title=f"{cfg.recipe}: reliability of Var[x0 | x̃] = σ_φ² − σ², measured on {n // 2} "
                       f"test images ({n - n // 2} more fit the constant)")
    uncertainty_figure(model, x0[:4], os.path.join(out, "uncertainty.png"), seed=cfg.seed)
    return res


def _calibration_inputs(x0: torch.Tensor, sigmas, seed: int) -> list:
    """x0 + σε at each σ, from the seeded stream every calibration readout of this seed shares."""
    g = generator(seed, "calibration")
    return [x0 + s * torch.randn(x0.shape, generator=g).to(x0.device) for s in sigmas]


def _excess_readout(model, noisy: list, sigmas) -> tuple:
    """(μ, Var[x0 | x̃] = σ_φ² − σ² from the head) of `model` at every noisy input, concatenated over σ."""
    mu, var = [], []
    for xn, s in zip(noisy, sigmas):
        p = model.predict(xn, torch.tensor(s, device=xn.device))
        mu.append(p.mu.cpu())
        var.append(p.excess_variance(s).cpu().double())
    return torch.cat(mu), torch.cat(var)


def _calibration_readout(x0, sigmas, seed: int, head: tuple, **kw) -> dict:
    n, k = len(x0), len(sigmas)
    return calibration_by_sigma(*head, x0.cpu().repeat(k, *([1] * (x0.ndim - 1))),
                                torch.tensor(sigmas, dtype=torch.float64).repeat_interleave(n),
                                sigma_edges(sigmas), fit=(torch.arange(n) % 2 == 0).repeat(k),
                                labels=[f"sigma={s:g}" for s in sigmas],
                                seed=derive_seed(seed, "calibration"), **kw)


def _recalibrated(x0, sigmas, read: tuple, how: str, groups: int = 1, fit=None) -> tuple[tuple, list]:
    """(μ, recalibrated var) and the maps: per σ a calibration.VarianceScale (one scalar per `groups`
    quantile group of var), fitted on the images of `fit` (bool [n]; default the even indices, the ones that
    fit the constant), so on none of those measured."""
    mu, var = read
    n, var, maps = len(x0), var.clone(), []
    fit = torch.arange(n) % 2 == 0 if fit is None else torch.as_tensor(fit)
    for k, s in enumerate(sigmas):
        rows = slice(k * n, (k + 1) * n)
        err2 = (mu[rows][fit].double() - x0[fit].cpu().double()).square()
        f = VarianceScale.fit(err2.numpy(), var[rows][fit].numpy(), how, (FLOOR * s) ** 2, groups)
        var[rows] = torch.from_numpy(f(var[rows].numpy()))
        maps.append({"edges": list(f.edges), "scales": list(f.scales)})
    return (mu, var), maps


@torch.no_grad()
def calibrate_paired(models: dict, cfg, x0: torch.Tensor, sigmas=CALIBRATION_SIGMAS,
                     recalibrate: str | None = None, groups: int = 1) -> dict:
    """Confidence heads of several models of the same data, compared pixel for pixel: each model predicts
    from the same noisy test images (`calibrate`'s seeded noise), the first is the "head" and the others
    baselines with their own mean, every one scored on its own error and on the elements that none of them
    floors (calibration_by_sigma with rest="common"), so the NLL gains are paired differences between
    models with a bootstrap sd over images. models: {name: model}, the first the reference.
    recalibrate ("nll" / "coverage", calibration.fit_variance_scale): every model's variance is first
    scaled by one scalar per σ (per σ and each of `groups` quantile groups of its variance), fitted on its
    own error on the images that fit the constant (post-hoc σ scaling; the measured half is never seen); the
    maps are in the result's "recalibration"."""
    if len(models) < 2:
        raise ValueError("calibrate_paired compares at least two models")
    if len(x0) < 2:
        raise ValueError(f"{len(x0)} calibration images; allowed: at least 2 (one half fits the constant)")
    noisy = _calibration_inputs(x0, sigmas, cfg.seed)
    reads = {name: _excess_readout(m, noisy, sigmas) for name, m in models.items()}
    scales = None
    if recalibrate is not None:
        fitted = {name: _recalibrated(x0, sigmas, r, recalibrate, groups) for name, r in reads.items()}
        reads = {name: f[0] for name, f in fitted.items()}
        scales = {"how": recalibrate, "groups": groups, "sigmas": list(sigmas),
                  "maps": {k: f[1] for k, f in fitted.items()}}
    head, *others = reads
    res = _calibration_readout(x0, sigmas, cfg.seed, reads[head], rest="common",
                               baselines={k: reads[k] for k in others})
    if scales is not None:
        res["recalibration"] = scales
    return res


@torch.no_grad()
def uncertainty_figure(model, x0: torch.Tensor, path: str, seed: int = 0, sigmas=(0.2, 0.5, 1.0)) -> None:
    """Per image and σ one row: the noisy input x0 + σε, the denoised μ, the std the head predicts for the
    error of μ, √(σ_φ² − σ²) (T8), the actual error |μ − x0| and x0; the two maps share one colour scale per
    row and are the root mean square over channels (any channel count). x0: test images, or generated ones
    (then |μ − x0| is the error of re-denoising the model's own sample)."""
    g = generator(seed, "uncertainty-figure")
    names, panels = [], {k: [] for k in ("noisy x̃", "denoised μ", "predicted std of x0", "|μ − x0|", "x0")}
    rms = lambda v: v.square().mean(1, keepdim=True).sqrt()  # noqa: E731  (one map per image, any channels)
    for s in sigmas:
        xn = x0 + s * torch.randn(x0.shape, generator=g).to(x0.device)
        p = model.predict(xn, torch.tensor(s, device=x0.device))
        s_x0 = p.excess_variance(s).float().clamp_min(1e-8).sqrt()
        for k, v in zip(panels, (xn.clamp(-1, 1), p.mu, rms(s_x0), rms(p.mu - x0), x0)):
            panels[k].append(v.float())
        names += [f"σ={s:g}"] * len(x0)
    uncertainty_grid(path, {k: torch.cat(v).cpu() for k, v in panels.items()}, row_labels=names,
                     heat=("predicted std of x0", "|μ − x0|"))


# ---- commands on a finished run folder ---------------------------------------------------------------

def eval_inputs(cfg: ImageRunConfig, samples: int, cfg_weight, what: str):
    """What measuring samples of a run needs, checked: (n, the test split, feature_classifier's (classifier,
    real features, its test accuracy), the labels to sample: one per class in turn for a conditional recipe,
    else None). `what` names the command in the errors."""
    recipe = IMAGE_RECIPES[cfg.recipe]
    if cfg_weight is not None and not recipe.conditional:
        raise ValueError(f"--cfg-weight needs a class-conditional recipe; recipe={cfg.recipe!r} is "
                         "unconditional")
    n = samples or cfg.eval.samples
    train, test, _ = load_splits(cfg.data)
    if test.labels is None:
        raise ValueError(f"{what} measures samples in the features of a classifier of the data's "
                         f"classes; data {cfg.data.path!r} has no labels (class subfolders or an npz "
                         "'labels' key): FID, precision and recall do not apply (samples: gendiff sample; "
                         "bits/dim: gendiff likelihood)")
    labels = torch.arange(n) % test.num_classes if recipe.conditional else None
    return n, test, feature_classifier(cfg, test, train), labels


def eval_run(out: str, cfg: ImageRunConfig, model, *, samples: int = 0, steps: int = 0, seed: int = 0,
             cfg_weight: float | None = None, weights: str = "model.safetensors", sampler=None,
             score_mode=None, variance=None, autoguide: Autoguide | None = None, interval=None,
             **unused) -> dict:
    """FID / precision / recall / class counts of `samples` images (default eval.samples) of the run's model
    against the test split, with the feature classifier's accuracy; writes
    RUN/eval-<steps>-<n>-<seed>.json (RUN/eval-ddpm-<variance>-<steps>-… with --sampler ddpm or --variance:
    DDPM ancestral sampling with that reverse variance, `sample_images`; RUN/eval-<sampler>-<steps>-… with
    another σ-grid sampler than the run's own; guided sampling adds guidance_tag's '-w…', '-ag…', '-i…')."""
    _refuse_sampler(cfg, {"score_mode": score_mode, **unused})
    use_ddpm, name = ddpm_choice(cfg, sampler, variance)
    chosen = use_ddpm and (sampler is not None or variance is not None)
    n, test, (clf, real, acc), labels = eval_inputs(cfg, samples, cfg_weight, "gendiff eval")
    x, info = sample_images(model, cfg, n, labels=labels, w=cfg_weight, seed=seed,
                            num_classes=test.num_classes, steps=steps, sampler=sampler, variance=variance,
                            autoguide=autoguide, interval=interval)
    m = {**info, "samples": n, "seed": seed, "cfg_weight": cfg_weight, "weights": weights,
         **guidance_info(autoguide, interval),
         **({"ddpm_variance": name} if chosen else {}),
         **classifier_metrics(acc, test.num_classes),
         **sample_metrics(clf, real, x, test, test.num_classes, seed)}
    save_json(m, os.path.join(out, eval_file(cfg, n, seed, steps=steps, sampler=sampler, variance=variance,
                                             cfg_weight=cfg_weight, autoguide=autoguide, interval=interval,
                                             weights=weights)))
    return m


def eval_file(cfg: ImageRunConfig, n: int, seed: int = 0, *, steps: int = 0, sampler=None, variance=None,
              cfg_weight=None, autoguide: Autoguide | None = None, interval=None,
              weights: str = "model.safetensors") -> str:
    """The name of the JSON `eval_run` writes into the run folder for these options (benchmarks read a
    finished cell back by it): eval-<steps>-<n>-seed<seed>, or eval-ddpm-<variance>-<steps>-… when a DDPM
    sampler or variance was chosen, or eval-<σ-grid sampler>-<steps>-… for another sampler than the run's
    own, then guidance_tag's '-w…', '-ag…', '-i…' and weights_tag's suffix."""
    use_ddpm, name = ddpm_choice(cfg, sampler, variance)
    if use_ddpm and (sampler is not None or variance is not None):
        tag = f"eval-ddpm-{name}-{sampler_steps(cfg, steps, True)}-{n}-seed{seed}"
    elif grid_choice(cfg, sampler) is not None:
        tag = f"eval-{sampler}-{sampler_steps(cfg, steps, False)}-{n}-seed{seed}"
    else:
        tag = f"eval-{(steps or cfg.eval.sampler_steps) or 'default'}-{n}-seed{seed}"
    return f"{tag}{guidance_tag(cfg_weight, autoguide, check_interval(interval))}{weights_tag(weights)}.json"


def eval_summary(out: str, m: dict) -> str:
    flag = " (UNRELIABLE: the classifier is near chance)" if m["sample_metrics_unreliable"] else ""
    guided = ("" if m.get("cfg_weight") is None else f", CFG w {m['cfg_weight']:g}") + \
        ("" if m.get("autoguide") is None else f", autoguided by {m['autoguide']} w {m['guidance']:g}") + \
        ("" if m.get("guidance_interval") is None else f", guided for σ in [{m['guidance_interval']}]")
    return (f"{out}: {m['sampler']}{guided} NFE {m['nfe']}, {m['samples']} samples: FID {fid_text(m)} ↓, "
            f"precision {m['precision']:.3f} ↑, recall {m['recall']:.3f} ↑ in the features of a classifier "
            f"with test accuracy {m['classifier_test_accuracy']:.3f} (chance "
            f"{m['classifier_chance']:.3f}){flag}")


def fid_text(m: dict, digits: int = 1) -> str:
    """'FID ± its bootstrap sd' of a samples row ('48.2 ± 4.9'); the FID alone where no sd was recorded (rows
    measured before fid_sd existed), '–' without a FID."""
    if m.get("fid") is None or (isinstance(m["fid"], float) and math.isnan(m["fid"])):
        return "–"
    sd = m.get("fid_sd")
    return f"{m['fid']:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


def likelihood_run(out: str, cfg: ImageRunConfig, model, *, points: int = 0, method: str = "hutchinson",
                   seed: int = 0, variance: str | None = None, steps: int | None = None, **unused) -> dict:
    """Bits/dim of `points` test images (default eval.likelihood_images, at least 1): PF-ODE with Hutchinson's
    divergence (T31), plus DDPM's bound for DDPM recipes; writes RUN/likelihood.json. method="ddpm-bound":
    DDPM's bound alone, for any run, with the reverse variance `variance` on `steps` respaced steps
    (ddpm_variance.ddpm_bound); writes RUN/likelihood-ddpm-<variance>-<steps>-seed<seed>.json."""
    refuse(unused, "an image")
    if method not in ("hutchinson", "ddpm-bound"):
        raise ValueError(f"--method={method!r}: the exact divergence of an image model costs one backward "
                         "pass per pixel; image runs use --method hutchinson (PF-ODE) or ddpm-bound")
    if method != "ddpm-bound" and (variance is not None or steps is not None):
        raise ValueError("--variance and --steps choose the DDPM bound's reverse variance and respaced "
                         "steps: give them with --method ddpm-bound")
    n = points or cfg.eval.likelihood_images or 64
    x8 = load_images(cfg.data, "test").to_tensor()[:n].to(next(model.parameters()).device)
    if method == "ddpm-bound":
        m = ddpm_bound(model, replace(cfg, seed=seed), x8, _num_classes(model), variance=variance,
                       steps=steps or 0, x_train=load_images(cfg.data, "train").to_tensor())
        m["seed"] = seed
        save_json(m, os.path.join(out, f"likelihood-ddpm-{m['ddpm_variance']}-{m['ddpm_process_steps']}-"
                                       f"seed{seed}.json"))
        return m
    m = bits_per_dim(model, replace(cfg, seed=seed), x8, _num_classes(model))
    save_json(m, os.path.join(out, "likelihood.json"))
    return m


def likelihood_summary(out: str, m: dict) -> str:
    extra = (f", DDPM bound {m['bpd_ddpm_bound']:.4f} ± {m['bpd_ddpm_bound_se']:.4f}"
             if "bpd_ddpm_bound" in m else "")
    if "bpd_pf_ode" not in m:
        return (f"{out}: bits/dim ↓ of {m['bpd_images']} test images: DDPM bound {m['bpd_ddpm_bound']:.4f} ± "
                f"{m['bpd_ddpm_bound_se']:.4f} (Σ {m['ddpm_variance']}, {m['ddpm_process_steps']} steps)")
    return (f"{out}: bits/dim ↓ of {m['bpd_images']} test images: PF-ODE {m['bpd_pf_ode']:.4f} ± "
            f"{m['bpd_pf_ode_se']:.4f} (NFE {m['bpd_pf_ode_nfe']}){extra}")


# ---- the table -----------------------------------------------------------------------------------------

PAPER_004 = {"x0": (49.10, None), "eps": (15.75, 1.21), "score": (78.83, None),
             "score-cfg@w=1": (61.91, None),
            "score-cfg@w=5": (74.21, None), "learned-variance": (58.89, 1.10)}   # FID, NLL (no unit stated)


def run_table(base, rows, out: str, *, progress: bool = True, log=print, device: str | None = None) -> str:
    """Train and evaluate each row (recipe) of seed 004's table at `base`'s budget into out/<row>/, a run
    folder each. Resumable: a row whose metrics.json exists for the same config is read; an unfinished row
    resumes from its newest checkpoint (with the σ_data its folder recorded, where `base` measures it).
    Writes out/images.json and out/images.md; returns the markdown."""
    for r in rows:
        if r not in IMAGE_RECIPES:
            raise ValueError(f"row {r!r} is not allowed; choose among {list(IMAGE_RECIPES)}")
    results = {r: train_row(replace(base, recipe=r).validate(), os.path.join(out, r), prepare, train_run,
                            progress=progress, log=log, device=device) for r in rows}
    for r in results:  # throughput from the training log: every sitting of a resumed row, evaluation excluded
        results[r]["train_img_per_s"] = logged_img_per_s(os.path.join(out, r, "metrics.jsonl"),
                                                         base.train.batch)
    save_json({"preset_config": to_toml(base), "rows": results}, os.path.join(out, "images.json"))
    md = table_markdown(results, base)
    save_text(md, os.path.join(out, "images.md"))
    return md


def train_row(cfg, folder: str, prepare_fn, train_fn, *, progress: bool = True, log=print,
              device: str | None = None) -> dict:
    """One row of a results table: the run `cfg` trained and evaluated in the run folder `folder` (a kind's
    prepare and train_run), its metrics returned. Resumable: a folder whose metrics.json exists for the same
    config is read; an unfinished one resumes from its newest checkpoint, with the σ_data it recorded where
    `cfg` measures it (train.sigma_data = 0); a folder of another config is an error."""
    done = os.path.join(folder, "metrics.json")
    fresh = not os.path.exists(os.path.join(folder, "config.toml"))
    if not fresh:
        saved = read_config(folder, "--out")
        cfg = with_sigma_data(cfg, lambda: saved.train.sigma_data)   # measured when the row started
        if to_toml(saved) != to_toml(cfg):
            raise ValueError(f"{folder} holds a run with another config; use another --out")
        if os.path.exists(done):
            log(f"{os.path.basename(folder)}: finished earlier, read {done}")
            return read_json(done)
    setup = prepare_fn(cfg, device, log=log)   # data and model checked before the row's folder exists
    if fresh:
        start_run(setup.cfg, folder)
    return train_fn(setup.cfg, folder, setup, progress=progress, log=log)


def _logged(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def logged_img_per_s(path: str, batch: int) -> float:
    """Training images per second from a run's metrics.jsonl: Σ Δstep·batch / Σ Δseconds over consecutive
    lines of one sitting (seconds restart at 0 in each process, so a jump back marks a new sitting and is
    skipped)."""
    steps = secs = 0.0
    lines = _logged(path)
    for a, b in zip(lines, lines[1:]):
        if b["seconds"] > a["seconds"] and b["step"] > a["step"]:
            steps, secs = steps + b["step"] - a["step"], secs + b["seconds"] - a["seconds"]
    return steps * batch / secs if secs else float("nan")


def logged_train_seconds(path: str) -> float:
    """Wall seconds of training over every sitting of a run (metrics.jsonl): the last `seconds` logged in each
    sitting, summed; NaN without a log. A new sitting starts where `seconds` goes back (they restart at 0 in
    each process) or `step` does not advance (a resume restarts from the last checkpoint, at or before the
    last logged step: this catches a sitting whose first line comes late). A run resumed only to be
    evaluated adds nothing, so its metrics still state what the training took."""
    lines, total = _logged(path), 0.0
    for a, b in zip(lines, lines[1:] + [None]):
        if b is None or b["seconds"] <= a["seconds"] or b["step"] <= a["step"]:      # a sitting's last line
            total += a["seconds"]
    return total if lines else float("nan")


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _sigma_data_text(results: dict, base) -> str:
    """σ_data of the table's EDM rows: the base config's number, or the one each row measured."""
    if base.train.sigma_data:
        return f"{base.train.sigma_data:g} (given)"
    seen = sorted({round(m["sigma_data"], 4) for m in results.values() if "sigma_data" in m})
    return (", ".join(f"{v:.4f}" for v in seen) or "–") + " (measured from the training images)"


def table_markdown(results: dict, base) -> str:
    t = base.train
    lines = [f"Seed 004's table on {base.data.name}: U-Net "
             f"{base.model.model_channels}×{list(base.model.channel_mult)}, "
             f"{_as_list(base.model.num_blocks)} block(s)/level, {base.model.resample} resampling, "
             f"{t.iterations} steps × batch {t.batch} ({t.precision}), EMA {t.ema}; σ_data "
             f"{_sigma_data_text(results, base)}; {base.eval.samples} samples per row; FID, precision and "
             "recall in our classifier's features (not Inception: compare orderings with seed 004, not "
             "values). FID against all test images ± its bootstrap sd (the samples resampled "
             f"{FID_BOOTSTRAP}×: the noise of one draw of {base.eval.samples}); precision and recall "
             f"against a fixed random {base.eval.samples} of the test images.", "",
             "Bits/dim of 8-bit test images ± standard error (a conditional row: p(x) through the null "
             f"class). PF-ODE: centred dequantisation, σ_min = {PF_ODE_SIGMA_MIN} for every row. DDPM "
             f"bound: {VLB_STEPS} random steps of {DDPM_T - 1}, its ± including that draw; decoder "
             "variance β̃_2 for fixed-variance rows (β_1 in brackets), the learned Σ_θ(1) for the "
             "learned-variance row. Seed 004's table states no unit for its NLL (bits/dim, as DDPM and IDDPM "
             "report theirs, is a guess).", "",
             "FID, precision and recall are marked UNRELIABLE where the feature classifier is near chance.",
             "",
             "| row | FID ↓ | precision | recall | classes hit | classifier acc. | bits/dim PF-ODE | "
             "bits/dim DDPM bound | train img/s | sampler | NFE | seed 004 FID | seed 004 NLL (no unit) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, p=3: ("–" if v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731
                        else f"{v:.{p}f}")
    pm = lambda m, k: "–" if m.get(k) is None else f"{m[k]:.3f} ± {m.get(k + '_se') or 0:.3f}"  # noqa: E731
    b1 = lambda m: ("" if m.get("bpd_ddpm_bound_beta1") is None  # noqa: E731
                    else f" ({m['bpd_ddpm_bound_beta1']:.3f})")
    for r, m in results.items():
        for key, s in m.items():
            if not key.startswith("samples"):
                continue
            name = r + key[len("samples"):]
            seed = PAPER_004.get(name, (None, None))
            bad = " (UNRELIABLE)" if m.get("sample_metrics_unreliable") else ""
            lines.append(f"| {name} | {fid_text(s)}{bad} | {f(s.get('precision'))} | "
                         f"{f(s.get('recall'))} | {s.get('modes', {}).get('classes_hit', '–')} | "
                         f"{f(m.get('classifier_test_accuracy'))} | {pm(m, 'bpd_pf_ode')} | "
                         f"{pm(m, 'bpd_ddpm_bound')}{b1(m)} | {f(m.get('train_img_per_s'), 1)} | "
                         f"{s['sampler']} | {s['nfe']} | {f(seed[0], 2)} | {f(seed[1], 2)} |")
    cal = [(r, m["calibration"]) for r, m in results.items() if "bins" in m.get("calibration", {})]
    if cal:
        lines += ["", "Calibration of the confidence head on held-out test images, per pixel: the variance "
                  "it predicts for the error of μ is var_x0 = σ_φ² − σ² (T8: σ_φ² = σ² + Var[x0 | x̃]). "
                  + BY_SIGMA_TEXT, "", by_sigma_markdown(cal).rstrip("\n")]
    return "\n".join(lines) + "\n"


def paired_calibration_run(out: str, cfg: ImageRunConfig, model, others: list, *,
                           weights: str = "model.safetensors", recalibrate: str | None = None,
                           groups: int = 1) -> dict:
    """`gendiff eval RUN --calibration-against OTHER[,…]`: `calibrate_paired` of RUN's head (the reference)
    against the heads of the other run folders, on the same eval.calibration_images test images of RUN's
    data; writes RUN/calibration-paired.json (the readout, plus the runs and the weights used), or with
    `recalibrate` (calibrate_paired) RUN/calibration-paired-recal-<how>[-<groups>groups].json.
    others: [(run folder, its config, its model)] (the CLI loads their final EMA, model.safetensors)."""
    models, runs = {os.path.basename(os.path.normpath(out)): model}, {}
    for path, ocfg, omodel in others:
        name = os.path.basename(os.path.normpath(path))
        if ocfg.kind != "images" or ocfg.data != cfg.data:
            raise ValueError(f"--calibration-against {path!r}: an image run on the same data as {out!r} is "
                             f"needed (it is a {ocfg.kind!r} run on {getattr(ocfg, 'data', None)!r})")
        if name in models:
            raise ValueError(f"--calibration-against {path!r}: two runs are named {name!r}; give folders "
                             "with distinct names")
        models[name], runs[name] = omodel, path
    for name, m in models.items():
        if not m.head.has_confidence:
            raise ValueError(f"run {name!r} has no confidence head (head={m.head.name!r}); allowed: runs "
                             "whose head predicts σ_φ (diag, excess, sigma-only, full)")
    n = cfg.eval.calibration_images or 256
    x0 = load_images(cfg.data, "test").to_tensor()[:n]
    res = calibrate_paired(models, cfg, x0, recalibrate=recalibrate, groups=groups)
    res.update(reference_run=out, reference_weights=weights, against=runs)
    name = "calibration-paired" + ("" if recalibrate is None else f"-recal-{recalibrate}") + (
        f"-{groups}groups" if recalibrate is not None and groups > 1 else "")
    save_json(res, os.path.join(out, f"{name}.json"))
    return res


def paired_calibration_summary(out: str, res: dict) -> str:
    names = [os.path.basename(os.path.normpath(out)), *res["against"]]
    lines = [f"{out}: paired calibration of Var[x0 | x̃] on the pixels no model floors (NLL nats/pixel; gain "
             "= other − this run, > 0: this run better, ± bootstrap sd over images)"]
    for label, row in res["bins"].items():
        if not row["rest"]:
            lines.append(f"  {label}: no pixel that every model leaves unfloored")
            continue
        h = row["head"]
        parts = [f"{names[0]} NLL {h['nll']:.4f} (floored {100 * h['floored_share']:.2f}%, "
                 f"±1s {100 * h['coverage_1s']:.0f}%)"]
        for name in names[1:]:
            g = row["gain"][name]
            r = row[name]
            parts.append(f"{name} NLL {r['nll']:.4f} (floored {100 * r['floored_share']:.2f}%), "
                         f"gain {g['nll']:+.4f} ± {g['nll_sd']:.4f}: {g['verdict']}")
        lines.append(f"  {label}, {100 * row['rest'] / row['elements']:.1f}% of pixels: " + "; ".join(parts))
    return "\n".join(lines)
