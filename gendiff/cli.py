"""`gendiff` command line. Global settings (threads, allocator, denormals) are made here, not in the
library."""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from .calibration import RECALIBRATIONS
from .checkpoint import CheckpointError
from .checks import check_choice
from .data.images import fetch
from .distill import HEAD_LOSSES
from .experiments.ablate import GUIDES, AblateConfig, quick, run_seeds
from .experiments.config import PRESETS, resolve, to_toml
from .experiments.ddpm_variance import DDPM_VARIANCE_CHOICES
from .experiments.distill import distill
from .experiments.filtering import FILTER_SUBSETS, filter_run, filter_summary
from .experiments.html import write_report
from .experiments.images import (AUTOGUIDE_W, load_guide, paired_calibration_run, paired_calibration_summary,
                                 resolve_device, run_table)
from .experiments.kinds import kind_of, load_run
from .experiments.latent import LATENT_ROWS, PIXEL_PRESETS, run_latent_table
from .experiments.recipes import IMAGE_RECIPES, IMAGE_SUITES, MAIN_RUNS, SUITES, TOY_RECIPES
from .experiments.report import calibration_markdown, metrics_markdown, rerender
from .experiments.runfolder import posthoc_run, read_config, start_run
from .experiments.vae import encode_run, encode_summary
from .mixture_eval import INITS
from .precond import SOURCE_SCALINGS
from .runtime import configured
from .samplers import GRID_SAMPLERS
from .scores import HYBRID_SIGMA, SCORE_MODES
from .uncertainty import SCORE_SIGMAS


def _number(name, cast, minimum):
    """argparse type: `cast` of the text, at least `minimum`, with an error naming the option."""
    def parse(s):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if cast is int else 'a number'}; "
                                             f"got {s!r}") from None
        if not (math.isfinite(v) and v >= minimum):
            raise argparse.ArgumentTypeError(f"{name} must be finite and >= {minimum}; got {v}")
        return v
    return parse


def _positive_int(name):
    return _number(name, int, 1)


def _nonneg_float(name):
    return _number(name, float, 0.0)


class _DefaultsFormatter(argparse.HelpFormatter):
    """--help shows every option's default, unless its help text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS)
                or action.option_strings == ["-h", "--help"]):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gendiff", description=__doc__)
    p.add_argument("--version", action="version", version="gendiff 0.1.0")
    sub = p.add_subparsers(dest="command", required=True)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, formatter_class=_DefaultsFormatter, **k)
    a = sub.add_parser("ablate",
                       help="the main experiment on the 2-D tree, measured against the exact ground truth",
                       description="Toy recipes: "
                       + "; ".join(f"{k}: {v.help}" for k, v in TOY_RECIPES.items()))
    a.add_argument("--out", help="results folder (default results/ablate-<timestamp>)")
    a.add_argument("--suite", choices=sorted([*SUITES, *IMAGE_SUITES, "latent"]), default="main",
                   help="main: the main experiment (runs: " + ",".join(MAIN_RUNS) + "); objectives: "
                   "parameterisations, weightings and training densities (T17–T21), "
                   + str(len(SUITES["objectives"]))
                   + " runs; images: seed 004's MNIST table with the EDM and confidence rows; "
                   "confidence-images: the confidence heads on MNIST (rows "
                   + ", ".join(IMAGE_SUITES["confidence-images"][0]) + "; preset mnist-conf); latent: THEORY "
                   "T36's modes of latent diffusion (rows " + ", ".join(LATENT_ROWS)
                   + "; preset latent-mnist, "
                   "--set latent.vae_run=RUN of an encoded VAE run; the pixel row at mnist-cpu); image and "
                   "latent suites are resumable: finished rows are read, unfinished ones resume from their "
                   "checkpoints")
    a.add_argument("--preset", choices=sorted(PRESETS),
                   help="image suites: the budget (default mnist-cpu for images, mnist-conf for "
                   "confidence-images, latent-mnist for latent)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="image suites: override a key of the preset (as gendiff train --set); "
                   "--suite latent: pixel.KEY=VALUE overrides a key of the pixel reference "
                   "(e.g. pixel.train.iterations=2000)")
    a.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="image suites: where to train and sample (auto: the GPU when CUDA is there)")
    a.add_argument("--rows",
                   help="image suites: comma-separated rows (default: the suite's, e.g. "
                   + ", ".join(IMAGE_SUITES["images"][0]) + ")")
    a.add_argument("--runs", help="comma-separated toy recipes (overrides --suite)")
    a.add_argument("--quick", action="store_true", help="few hundred iterations, small batches")
    a.add_argument("--seed", type=_number("--seed", int, 0), default=0)
    a.add_argument("--seeds", help="comma-separated seeds: one run each, plus a mean ± std summary")
    a.add_argument("--iterations", type=_positive_int("--iterations"))
    a.add_argument("--batch", type=_positive_int("--batch"))
    a.add_argument("--lr", type=_number("--lr", float, 1e-12), help="Adam learning rate (default 1e-2)")
    a.add_argument("--samples", type=_positive_int("--samples"))
    a.add_argument("--steps", type=_positive_int("--steps"), help="Heun steps (default 32)")
    a.add_argument("--guidance", "-w", type=_nonneg_float("--guidance"),
                   help="autoguidance weight w (default 3)")
    a.add_argument("--guide", choices=GUIDES, help="guide model: snapshot (default), small, cfg")
    a.add_argument("--churn", type=_nonneg_float("--churn"), help="EDM stochastic churn (default 0)")
    a.add_argument("--init", choices=INITS,
                   help="sampling starts from exact samples of p(x; σ_max) (exact, the "
                   "seed's reference; default) or from N(0, σ_max²I) (gaussian)")
    a.add_argument("--hybrid-sigma", type=_number("--hybrid-sigma", float, 1e-12),
                   help=f"σ below which the hybrid score mode uses T14 (default {HYBRID_SIGMA})")
    a.add_argument("--no-figures", action="store_true")
    a.add_argument("--threads", type=_positive_int("--threads"), help="torch threads (default: all cores)")
    a.add_argument("--jobs", type=_positive_int("--jobs"),
                   help="toy suites: worker processes, one trained model each at a time, sharing the threads "
                   "(default: one per thread, at most one per model; 1 = all in this process)")
    a.add_argument("--no-progress", action="store_true")
    d = sub.add_parser("data",
                       help="obtain and verify a dataset offline (md5 against the published checksums)")
    d.add_argument("action", choices=("fetch",))
    d.add_argument("name", choices=("mnist", "fashion-mnist"))
    d.add_argument("--root", help="destination folder (default: the gendiff data folder, $GENDIFF_DATA)")
    r = sub.add_parser("report",
                       help="write FOLDER/index.html (self-contained: config, metrics, curves, samples, "
                       "σ_φ or uncertainty maps, eval and likelihood results) for a run folder of gendiff "
                       "train or a results folder of gendiff ablate (whose metrics.md is re-rendered from "
                       "metrics.json first)")
    r.add_argument("folder", help="a run folder (gendiff train) or a results folder (gendiff ablate)")
    t = sub.add_parser("train",
                       help="train one run (toy, images, a VAE, latent diffusion) in a run folder "
                       "(config.toml, metrics.jsonl, checkpoints); resumable",
                       description="Configuration: a preset, then --config FILE.toml, then "
                       "each --set key=value (e.g. --set recipe=edm --set train.batch=512); the resolved "
                       "config is written to RUN/config.toml. Keys and defaults: `gendiff train "
                       "--print-config`. Own images: --preset mnist-tiny --set data.name=folder --set "
                       "data.path=DIR (see README, 'Your own data').")
    t.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named recipe (default: toy-reference, the main experiment's; or mnist-cpu when "
                        "--config is "
                   "an image run's). toy-quick: a toy smoke run; mnist-cpu / mnist-gpu: seed 004's table on "
                   "a CPU / GPU budget; mnist-tiny: an image smoke run; vae-mnist: the VAE of latent "
                   "diffusion (then gendiff encode RUN); vae-tiny: a VAE smoke run; latent-mnist: diffusion "
                   "in that VAE's latent space (--set latent.vae_run=RUN --set latent.mode=a|b|c, THEORY "
                   "T36), at mnist-cpu's training compute; latent-tiny: a latent smoke run. Toy recipes "
                   "(--set recipe=…): see gendiff ablate --help. Image recipes (--set recipe=… on an image "
                   "preset): " + "; ".join(f"{k}: {v.help}" for k, v in IMAGE_RECIPES.items()))
    t.add_argument("--config", help="a TOML file of overrides (e.g. a run folder's config.toml)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key (repeatable)")
    t.add_argument("--out", help="run folder (default runs/<recipe>-<timestamp>)")
    t.add_argument("--resume", metavar="RUN",
                   help="continue RUN from its newest good checkpoint, with its config")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="image runs: auto = the GPU when CUDA is there (cuda:$LOCAL_RANK under torchrun, "
                        "NCCL), "
                   "else the CPU; toy runs train on the CPU")
    t.add_argument("--threads", type=_positive_int("--threads"), help="torch threads (default: all cores)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("sample",
                       help="write N samples of a trained run to a folder (images: one PNG each, plus "
                       "samples.npz and grid.png; toy: samples.npz and a plot); sample i always comes from "
                       "seed (--seed, i), whatever the batch size")
    s.add_argument("run", help="a run folder written by gendiff train")
    s.add_argument("--samples", type=_positive_int("--samples"), default=64, help="how many (default 64)")
    s.add_argument("--out", help="destination folder (default RUN/samples-seed<SEED>)")
    s.add_argument("--batch", type=_positive_int("--batch"),
                   help="samples per batch (default: eval.batch for "
                   "images, 4096 for toy runs); does not change the samples")
    e = sub.add_parser("eval",
                       help="measure a trained run's samples: toy against the exact ground truth; images "
                       "FID/precision/recall in the feature classifier's space")
    e.add_argument("run", help="a run folder written by gendiff train")
    e.add_argument("--samples", type=_positive_int("--samples"),
                   help="default 4096 (toy) or eval.samples (images)")
    e.add_argument("--calibration-against", metavar="RUN2[,RUN3]",
                   help="image runs with a confidence head: instead of sampling, compare this run's σ_φ "
                   "pixel for pixel with other runs' on the same noisy test images (each scored on its own "
                   "error, on the pixels none floors; NLL differences with a bootstrap sd); writes "
                   "RUN/calibration-paired.json")
    e.add_argument("--recalibrate", choices=RECALIBRATIONS,
                   help="with --calibration-against: scale every head's variance by one scalar per σ, "
                   "fitted on the half of the images that fits the constant (nll: mean z², the NLL's "
                   "optimum; coverage: inside 68 ± 5%% / 95 ± 3%% where one scalar can be); writes "
                   "RUN/calibration-paired-recal-HOW.json")
    e.add_argument("--recalibrate-groups", type=_positive_int("--recalibrate-groups"), metavar="N",
                   help="with --recalibrate: one scalar per σ and per each of N equal-count groups of the "
                   "predicted variance (default 1); writes RUN/calibration-paired-recal-HOW-Ngroups.json")
    e.add_argument("--filter", type=_number("--filter", float, 0.0), metavar="FRACTION",
                   help="image runs with a confidence head: the BayesDiff test instead: drop the FRACTION "
                   "(e.g. 0.1) of samples with the highest own uncertainty (mean σ_φ² − σ² along the "
                   "trajectory) and compare FID/precision/recall of the rest with random subsets of the "
                   "same size; writes RUN/filter-….json")
    e.add_argument("--filter-subsets", type=_number("--filter-subsets", int, 2), metavar="R",
                   help=f"--filter: random subsets per seed (default {FILTER_SUBSETS})")
    e.add_argument("--filter-sigmas", metavar="LO,HI",
                   help="--filter: the σ range of the uncertainty score (default "
                   f"{SCORE_SIGMAS[0]:g},{SCORE_SIGMAS[1]:g})")
    e.add_argument("--seeds", help="--filter: comma-separated seeds, one draw each, plus the gain over "
                   "random as mean ± sd across them (default: --seed)")
    for x in (s, e):
        x.add_argument("--seed", type=_number("--seed", int, 0), default=0,
                       help="seed of the samples (default 0)")
        x.add_argument("--steps", type=_positive_int("--steps"),
                       help="sampler steps (default: the run's sampler.steps for toy runs; its "
                       "eval.sampler_steps or its recipe's default for images)")
        x.add_argument("--sampler", choices=[*sorted(GRID_SAMPLERS), "ddpm"],
                       help="toy runs: any σ-grid sampler (default "
                       "heun); image runs: their recipe's sampler (Heun on EDM's grid; a distilled student: "
                       "Euler on its own), any σ-grid sampler on EDM's grid for a recipe sampled on σ, or "
                       "ddpm (DDPM ancestral sampling on --steps respaced steps, any run)")
        x.add_argument("--variance", choices=DDPM_VARIANCE_CHOICES,
                       help="image runs sampling with DDPM: the reverse variance (T38): beta, beta_tilde "
                       "(default), v (the learned-variance recipe's, its default), phi (β̃ + "
                       "c_0²·Var[x0 | x_t] per pixel from a confidence head), analytic (one v̄_t per step, "
                       "Analytic-DPM)")
        x.add_argument("--score-mode", choices=SCORE_MODES, help="toy runs: T13 (tweedie, default) or T14")
        x.add_argument("--cfg-weight", type=_nonneg_float("--cfg-weight"),
                       help="class-conditional image runs: "
                       "classifier-free guidance weight w (T33; default: the conditional model alone)")
        x.add_argument("--autoguide", metavar="GUIDE_RUN",
                       help="image runs: autoguidance (THEORY T34, EDM2) with the model of image run "
                       "GUIDE_RUN (the same data and conditioning, smaller and/or trained shorter) as the "
                       "guide: D_guide + w·(D_main − D_guide)")
        x.add_argument("--autoguide-weights", metavar="FILE",
                       help="--autoguide: the guide run's weights file (default model.safetensors)")
        x.add_argument("--guidance", type=_nonneg_float("--guidance"), metavar="W",
                       help=f"--autoguide: the weight w (1 = the main model alone; default {AUTOGUIDE_W:g})")
        x.add_argument("--guidance-interval", metavar="LO,HI",
                       help="image runs with --cfg-weight or --autoguide: guide only for σ in [LO, HI] "
                       "(Kynkäänniemi et al. 2024; HI may be inf), the main model alone elsewhere")
        x.add_argument("--sampling-sigma", choices=SOURCE_SCALINGS,
                       help="latent runs of THEORY T36 mode c: the denoiser's scalings from the diffusion σ "
                       "(diffusion) or from √(σ² + s̄²), s̄ the per-channel mean VAE std (total); default "
                       "latent.sampling_sigma")
        x.add_argument("--weights", default="model.safetensors",
                       help="weights file in the run folder (e.g. a "
                       "post-hoc EMA written by gendiff posthoc-ema)")
        x.add_argument("--threads", type=_positive_int("--threads"),
                       help="torch threads (default: all cores)")
    s.add_argument("--label", type=_number("--label", int, 0),
                   help="class-conditional image runs: sample only "
                   "this class (default: classes 0, 1, … in turn)")
    di = sub.add_parser("distill",
                        help="progressive distillation (THEORY T35) of a trained toy or image run: each "
                        "round a student, initialised from its teacher's EMA, learns to take one DDIM step "
                        "where the teacher takes two; one run folder per round (OUT/round-1, …), "
                        "checkpointed and resumable (run the command again)",
                        description="Round k's teacher is round k − 1's student (round 1: RUN's EMA); the "
                        "steps halve each round from --steps. Each round folder's config.toml is the "
                        "teacher's config with a [distill] table; gendiff sample / eval on it sample with "
                        "Euler (= DDIM) steps on the student's grid (schedules.distill_sigmas) at its own "
                        "step count. A round's weights average is EDM2's power EMA (σ_rel 0.05) where the "
                        "teacher's EMA is classic, so that a short round's EMA follows the student rather "
                        "than keeping the teacher it started from; --set train.ema_sigma_rel=0 keeps the "
                        "teacher's classic EMA.")
    di.add_argument("run",
                    help="a toy or image run folder written by gendiff train (or a distillation round)")
    di.add_argument("--rounds", type=_positive_int("--rounds"), required=True, help="rounds of halving")
    di.add_argument("--out", help="folder of the round folders (default RUN-distill)")
    di.add_argument("--steps", type=_positive_int("--steps"),
                    help="the first teacher's DDIM steps, a multiple of 2^rounds (default: a distilled RUN's "
                    "own steps, else the power of two nearest its Heun NFE: 64 for toy runs, 32 for images)")
    di.add_argument("--iterations", type=_positive_int("--iterations"),
                    help="training steps per round (default: the teacher's train.iterations)")
    di.add_argument("--head-loss", choices=HEAD_LOSSES, default="nll",
                    help="a confidence head: nll, its NLL of the teacher's two-step target (σ_φ² − σ² "
                    "then estimates the student's own squared error); posterior (T37's head only), the NLL "
                    "of that target under N(μ, σ_φ² − σ²), without the σ² term; or none (no loss of its "
                    "own: it starts as the teacher's)")
    di.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the teacher's config for the rounds (as gendiff train --set, "
                    "e.g. "
                    "train.lr=1e-3)")
    di.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="image runs: auto = the GPU when CUDA is there; toy runs train on the CPU")
    di.add_argument("--threads", type=_positive_int("--threads"), help="torch threads (default: all cores)")
    di.add_argument("--no-progress", action="store_true", help="no progress bar")
    en = sub.add_parser("encode",
                        help="a VAE run: encode its train and test images once to the posterior mean and std "
                        "per image, RUN/latents.safetensors, with the sha256 of the VAE weights and the "
                        "per-channel normalisation to encode.sigma_data (THEORY T36)")
    en.add_argument("run", help="a VAE run folder written by gendiff train --preset vae-…")
    en.add_argument("--weights", default="model.safetensors",
                    help="weights file in the run folder (other weights write latents-<stem>.safetensors)")
    en.add_argument("--batch", type=_positive_int("--batch"), help="images per batch (default encode.batch)")
    en.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto = the GPU when CUDA is there")
    en.add_argument("--threads", type=_positive_int("--threads"), help="torch threads (default: all cores)")
    ph = sub.add_parser("posthoc-ema",
                        help="EDM2's post-hoc EMA: reconstruct the EMA of any σ_rel from a run's "
                        "snapshots (train with --set 'train.ema_posthoc=[0.05, 0.1]')")
    ph.add_argument("run", help="a run folder written by gendiff train")
    ph.add_argument("--sigma-rel", type=_number("--sigma-rel", float, 1e-6), required=True,
                    help="relative std of the target EMA, in (0, 0.2887)")
    ph.add_argument("--step", type=_positive_int("--step"), help="training step (default: the last snapshot)")
    lk = sub.add_parser("likelihood",
                        help="bits/dim: toy runs of held-out points (PF-ODE, continuous ELBO, exact); "
                        "image runs of test images (PF-ODE, DDPM bound)")
    lk.add_argument("run", help="a run folder written by gendiff train")
    lk.add_argument("--points", type=_positive_int("--points"),
                    help="held-out points (toy, default 512) or test "
                    "images (images, default eval.likelihood_images)")
    lk.add_argument("--method", choices=("exact", "hutchinson", "ddpm-bound"),
                    help="divergence (default: exact for toy runs, "
                    "hutchinson for images); ddpm-bound: image runs, DDPM's bound alone, with --variance and "
                    "--steps")
    lk.add_argument("--variance", choices=DDPM_VARIANCE_CHOICES,
                    help="--method ddpm-bound: the reverse variance, as gendiff eval's --variance")
    lk.add_argument("--steps", type=_positive_int("--steps"),
                    help="--method ddpm-bound: respaced DDPM steps (default: all 1000, 50 of them drawn)")
    lk.add_argument("--seed", type=_number("--seed", int, 0), default=0,
                    help="seed of the held-out points (toy) or "
                    "of the dequantisation and Hutchinson probes (images: the first --points test images)")
    lk.add_argument("--threads", type=_positive_int("--threads"), help="torch threads (default: all cores)")
    return p


def _given(args, *names) -> dict:
    """The options among `names` that were given (not None): each kind fills in its own defaults."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _interval(text: str) -> tuple:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--guidance-interval={text!r} must be two numbers LO,HI (e.g. 0.3,5 or 0.3,inf)"
                         ) from None
    if not 0 <= lo < hi:
        raise ValueError(f"--guidance-interval={text!r} needs 0 <= LO < HI (HI may be inf)")
    return lo, hi


def _guidance(args, cfg) -> dict:
    """The guidance options of `sample`/`eval` as keywords of an image run's sample_run/eval_run (the guide
    loaded by images.load_guide); other kinds of run refuse them."""
    if args.autoguide is None:
        for name in ("guidance", "autoguide_weights"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} goes with --autoguide GUIDE_RUN")
    given = [n for n in ("autoguide", "guidance_interval") if getattr(args, n) is not None]
    if given and cfg.kind != "images":
        raise ValueError(f"--{given[0].replace('_', '-')} applies to image runs; {args.run!r} is a "
                         f"{cfg.kind!r} run")
    out = {}
    if args.guidance_interval is not None:
        out["interval"] = _interval(args.guidance_interval)
    if args.autoguide is not None:
        out["autoguide"] = load_guide(
            cfg, args.autoguide, AUTOGUIDE_W if args.guidance is None else args.guidance,
            args.autoguide_weights or "model.safetensors")
    return out


def _sample(args) -> int:
    cfg, model = load_run(args.run, args.weights)
    dest = args.out or os.path.join(args.run, f"samples-seed{args.seed}")
    info = kind_of(cfg).sample_run(args.run, cfg, model, samples=args.samples, dest=dest, seed=args.seed,
                                   **_given(args, "steps", "batch", "sampler", "score_mode", "variance",
                                            "cfg_weight", "label", "sampling_sigma"), **_guidance(args, cfg))
    print(f"{args.run}: {info['samples']} samples ({info['sampler']}, NFE {info['nfe']}, seed {args.seed}: "
          f"sample i from seed ({args.seed}, i)) in {dest}")
    return 0


def _eval(args) -> int:
    cfg, model = load_run(args.run, args.weights)
    kind = kind_of(cfg)
    if args.filter is not None or args.calibration_against is not None:
        for name in ("autoguide", "autoguide_weights", "guidance", "guidance_interval"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} goes with sampling (gendiff eval RUN or "
                                 "gendiff sample RUN), not with --filter or --calibration-against")
    if args.recalibrate_groups is not None and args.recalibrate is None:
        raise ValueError(f"--recalibrate-groups {args.recalibrate_groups} goes with --recalibrate "
                         "nll|coverage")
    if args.recalibrate is not None and args.calibration_against is None:
        raise ValueError(f"--recalibrate {args.recalibrate} goes with --calibration-against RUN2 (it "
                         "rescales the heads read there)")
    if args.filter is not None:
        return _filter(args, cfg, model)
    if args.calibration_against is not None:
        if cfg.kind != "images":
            raise ValueError(f"--calibration-against is for image runs; {args.run!r} is a {cfg.kind!r} run")
        others = [(r, *load_run(r)) for r in (r.strip() for r in args.calibration_against.split(",")) if r]
        res = paired_calibration_run(args.run, cfg, model, others, weights=args.weights,
                                     recalibrate=args.recalibrate, groups=args.recalibrate_groups or 1)
        print(paired_calibration_summary(args.run, res))
        return 0
    for name in ("filter_subsets", "filter_sigmas", "seeds"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name.replace('_', '-')} goes with --filter FRACTION (the BayesDiff test)")
    m = kind.eval_run(args.run, cfg, model, seed=args.seed, weights=args.weights,
                      **_given(args, "samples", "steps", "sampler", "score_mode", "cfg_weight", "variance",
                               "sampling_sigma"), **_guidance(args, cfg))
    print(kind.eval_summary(args.run, m))
    return 0


def _filter(args, cfg, model) -> int:
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
    over = _given(args, "samples", "steps", "sampler", "score_mode", "cfg_weight", "variance",
                  "sampling_sigma")
    if args.filter_subsets is not None:
        over["subsets"] = args.filter_subsets
    if args.filter_sigmas is not None:
        try:
            over["sigmas"] = tuple(float(v) for v in args.filter_sigmas.split(","))
        except ValueError:
            over["sigmas"] = ()
        if len(over["sigmas"]) != 2:
            raise ValueError(f"--filter-sigmas={args.filter_sigmas!r} must be two numbers LO,HI (e.g. "
                             f"{SCORE_SIGMAS[0]:g},{SCORE_SIGMAS[1]:g})")
    m = filter_run(args.run, cfg, model, fraction=args.filter, seeds=seeds, weights=args.weights, **over)
    print(filter_summary(args.run, m))
    return 0


def _likelihood(args) -> int:
    cfg, model = load_run(args.run)
    kind = kind_of(cfg)
    m = kind.likelihood_run(args.run, cfg, model, seed=args.seed,
                            **_given(args, "points", "method", "variance", "steps"))
    print(kind.likelihood_summary(args.run, m))
    return 0


def _encode(args) -> int:
    cfg = read_config(args.run, "run")
    if cfg.kind != "vae":
        raise ValueError(f"gendiff encode applies to VAE runs; {args.run!r} is a {cfg.kind!r} run")
    _, model = load_run(args.run, args.weights)
    model = model.to(resolve_device(args.device))
    info = encode_run(args.run, cfg, model, weights=args.weights, **_given(args, "batch"))
    print(encode_summary(args.run, info))
    return 0


def _init_distributed(cuda: bool = False) -> int:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL for a run on GPUs (each rank on
    cuda:$LOCAL_RANK), gloo on CPU. Returns this process's rank, or -1 when not distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return -1
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def _train(args) -> int:
    if args.resume:
        if args.config or args.set or args.out or args.preset is not None:
            raise ValueError("--resume RUN continues RUN with its own config.toml; it takes no --preset, "
                             "--config, --set or --out")
        cfg, out = read_config(args.resume), args.resume
    else:
        cfg = resolve(args.preset, args.config, args.set)
        if args.print_config:
            print(to_toml(cfg), end="")
            return 0
        name = getattr(cfg, "recipe", cfg.kind)             # a VAE run has no recipe
        out = args.out or os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    if getattr(cfg, "distill", None) is not None and cfg.distill.steps:
        raise ValueError("this config is a distillation round (distill.steps = "
                         f"{cfg.distill.steps}): gendiff distill trains and resumes rounds (run it again on "
                         "the same RUN and --out; finished rounds are read, an unfinished one resumes)")
    kind = kind_of(cfg)
    device = args.device if cfg.kind == "toy" else resolve_device(args.device).type
    rank = _init_distributed(cuda=device == "cuda")
    setup = kind.prepare(cfg, device)    # data, model, loss: anything that rejects the run, before the folder
    cfg = setup.cfg                      # resolved by prepare (an image run's σ_data measured): the one saved
    if not args.resume and rank <= 0:
        _check_writable(out, create=False)
        start_run(cfg, out)
    if rank >= 0:
        dist.barrier()
    try:
        metrics = kind.train_run(cfg, out, setup, progress=not args.no_progress and rank <= 0,
                                 primary=rank <= 0)
    finally:
        if rank >= 0 and dist.is_initialized():   # leave the group together (rank 0 evaluates last)
            dist.barrier()
            dist.destroy_process_group()
    if rank <= 0:
        print(f"{kind.summary(cfg, metrics)}; run folder {out}")
    return 0


def _distill(args) -> int:
    rounds = distill(args.run, args.rounds, out=args.out, steps=args.steps, iterations=args.iterations,
                     sets=args.set, head_loss=args.head_loss, device=args.device,
                     progress=not args.no_progress)
    for folder, cfg, metrics in rounds:
        print(f"{kind_of(cfg).summary(cfg, metrics)}; {cfg.distill.steps} steps; run folder {folder}")
    return 0


def _data(args) -> int:
    print(f"{args.name}: verified files in {fetch(args.name, args.root)}")
    return 0


def _ablate(args) -> int:
    if args.suite in IMAGE_SUITES:
        return _ablate_images(args)
    if args.suite == "latent":
        return _ablate_latent(args)
    runs = (tuple(r.strip() for r in args.runs.split(",") if r.strip()) if args.runs is not None
            else SUITES[args.suite])
    cfg = AblateConfig(runs=runs, seed=args.seed)
    if args.quick:
        cfg = quick(cfg)
    t = cfg.train
    if args.iterations:
        t = replace(t, iterations=args.iterations)
        # T34: the guide is the same run at 1/4 of training; the small guide trains 1/8 as long (512 of 4096)
        cfg = replace(cfg, guide_iter=max(1, args.iterations // 4),
                      guide_small_iter=max(1, args.iterations // 8))
    if args.batch:
        t = replace(t, batch=args.batch)
    if args.lr:
        t = replace(t, lr=args.lr)
    over = {k: v for k, v in {"samples": args.samples, "guidance": args.guidance, "guide": args.guide,
                              "hybrid_sigma": args.hybrid_sigma}.items() if v is not None}
    smp = {k: v for k, v in {"steps": args.steps, "churn": args.churn, "init": args.init}.items()
           if v is not None}
    cfg = replace(cfg, train=t, sampler=replace(cfg.sampler, **smp), figures=not args.no_figures, **over)
    cfg.validate()
    seeds = [cfg.seed] if args.seeds is None else _parse_seeds(args.seeds)
    out = args.out or os.path.join("results", "ablate-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    _check_writable(out)
    print(f"gendiff ablate: runs {', '.join(cfg.runs)} -> {out}")
    models = {TOY_RECIPES[r].model or r for r in cfg.runs}
    jobs = args.jobs or max(1, min(torch.get_num_threads(), len(models)))
    result = run_seeds(cfg, seeds, out, progress=not args.no_progress and jobs == 1, jobs=jobs)
    print(metrics_markdown(result))
    print(calibration_markdown(result))
    print(f"total {result['timings']['total_s']:.1f} s; results in {out}")
    return 0


def _ablate_images(args) -> int:
    rows_all, preset = IMAGE_SUITES[args.suite]
    opt = f"--suite {args.suite}"
    if args.runs is not None or args.seeds is not None or args.quick:
        raise ValueError(f"{opt} takes --preset, --set, --rows and --out; not --runs, --seeds or --quick")
    base = resolve(args.preset or preset, None, args.set)
    if base.kind != "images":
        raise ValueError(f"{opt} needs an image preset; --preset={args.preset!r} is a {base.kind!r} "
                         f"preset (e.g. --preset {preset})")
    rows = tuple(r.strip() for r in args.rows.split(",")) if args.rows else rows_all
    for r in rows:
        check_choice("--rows", r, IMAGE_RECIPES)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join("results", f"{args.suite}-{stamp}")
    _check_writable(out)
    print(f"gendiff ablate {opt}: rows {', '.join(rows)} -> {out}")
    start = time.perf_counter()
    table = run_table(base, rows, out, progress=not args.no_progress, device=args.device)
    print(table)
    print(f"total {time.perf_counter() - start:.1f} s (rows read from earlier sittings count 0 s)")
    return 0


def _ablate_latent(args) -> int:
    if args.runs is not None or args.seeds is not None or args.quick:
        raise ValueError("--suite latent takes --preset, --set, --rows, --device and --out; not --runs, "
                         "--seeds or --quick")
    preset = args.preset or "latent-mnist"
    check_choice("--preset", preset, PIXEL_PRESETS)        # a latent preset with a known pixel reference
    pixel_sets = [s.removeprefix("pixel.") for s in args.set if s.startswith("pixel.")]
    base = resolve(preset, None, [s for s in args.set if not s.startswith("pixel.")])
    pixel = resolve(PIXEL_PRESETS[preset], None, pixel_sets)
    rows = tuple(r.strip() for r in args.rows.split(",")) if args.rows else LATENT_ROWS
    for r in rows:
        check_choice("--rows", r, LATENT_ROWS)
    out = args.out or os.path.join("results", f"latent-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    _check_writable(out)
    print(f"gendiff ablate --suite latent: rows {', '.join(rows)} -> {out}")
    start = time.perf_counter()
    table = run_latent_table(base, pixel, out, rows, progress=not args.no_progress, device=args.device)
    print(table)
    print(f"total {time.perf_counter() - start:.1f} s (rows read from earlier sittings count 0 s)")
    return 0


def _report(args) -> int:
    if os.path.isfile(os.path.join(args.folder, "config.toml")):
        print(f"wrote {write_report(args.folder)}")
        return 0
    if any(os.path.isfile(os.path.join(args.folder, f)) for f in ("images.json", "latent.json")):
        # gendiff ablate --suite images / confidence-images / latent
        print(f"wrote {write_report(args.folder)}")
        return 0
    if not os.path.isfile(os.path.join(args.folder, "metrics.json")):
        raise ValueError(f"folder={args.folder!r} holds no metrics.json, images.json, latent.json or "
                         "config.toml; give a results folder of gendiff ablate or a run folder of "
                         "gendiff train")
    result = rerender(args.folder)
    print(metrics_markdown(result))
    print(calibration_markdown(result))
    print(f"rewrote {os.path.join(args.folder, 'metrics.md')} and {write_report(args.folder)}")
    return 0


def _posthoc(args) -> int:
    print(f"wrote {os.path.join(args.run, posthoc_run(args.run, args.sigma_rel, args.step))}")
    return 0


def _parse_seeds(text: str) -> list:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        seeds = None
    if not seeds or any(s < 0 or s >= 2**63 for s in seeds):
        raise ValueError(f"--seeds={text!r} must be comma-separated integers in [0, 2^63), e.g. 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds={text!r} repeats a seed; give distinct seeds")
    return seeds


def _check_writable(out: str, create: bool = True) -> None:
    """Prove the results folder writable before hours of work, not after. create=False leaves nothing behind:
    the nearest existing folder on the path must be writable."""
    try:
        if not create:
            parent = os.path.abspath(out)
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(13, f"{parent} is not a writable folder")
            return
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".gendiff-write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out={out!r} is not a writable folder ({e.strerror or e})") from None


COMMANDS = {"ablate": _ablate, "report": _report, "train": _train, "sample": _sample, "eval": _eval,
            "likelihood": _likelihood, "data": _data, "posthoc-ema": _posthoc, "encode": _encode,
            "distill": _distill}
ERRORS = ((ValueError, 2), (FloatingPointError, 3), (CheckpointError, 4))   # bad input, diverged, disk


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with configured(getattr(args, "threads", None)):
        try:
            return COMMANDS[args.command](args)
        except tuple(e for e, _ in ERRORS) as e:
            print(f"gendiff: error: {e}", file=sys.stderr)
            return next(code for kind, code in ERRORS if isinstance(e, kind))


if __name__ == "__main__":
    sys.exit(main())
