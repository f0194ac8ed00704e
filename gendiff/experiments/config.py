"""Typed run configuration: dataclasses, named presets, TOML files and `--set key=value` overrides.

A run config (`ToyRunConfig` for the exact 2-D tree, `ImageRunConfig` for images, `VAERunConfig` for the VAE
of latent diffusion, `LatentRunConfig` for diffusion in that VAE's latent space; its `kind` says which) is
the whole description of one `gendiff train` run; `resolve(preset, toml_path, sets)` builds it
in that order (preset, then the file, then each override) and validates it before anything touches the disk.
Every error names the key, the value given and what is allowed. `to_toml` writes the fully resolved config,
which `resolve(toml_path=...)` reads back to the same object (tested), so a run folder's `config.toml` is
enough to re-run it.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass

from ..checks import check_choice, check_positive
from ..data.images import check_channels, check_size
from ..data.toy import TREE_CLASSES
from ..distill import HEAD_LOSSES
from ..mixture_eval import SamplerConfig
from ..nets.unet import RESAMPLE
from ..precond import SOURCE_SCALINGS
from ..train import TrainConfig
from .recipes import IMAGE_RECIPES, TOY_RECIPES


@dataclass
class ToyTrainConfig(TrainConfig):
    """TrainConfig plus the toy MLP's size (THEORY §10: the seed's five linear layers of width 64); `train`
    reads only the TrainConfig part."""
    width: int = 64
    hidden_layers: int = 4

    def validate(self):
        super().validate()
        for name in ("width", "hidden_layers"):
            check_positive(name, getattr(self, name), integer=True)
        return self


@dataclass
class CheckpointConfig:
    every: int = 256          # steps between checkpoints (0: only at the end and on Ctrl-C)
    keep: int = 3             # newest checkpoints kept

    def validate(self):
        check_positive("checkpoint.every", self.every, integer=True, allow_zero=True)
        check_positive("checkpoint.keep", self.keep, integer=True)


@dataclass
class EvalConfig:
    samples: int = 4096       # samples drawn and measured at the end of training
    eval_points: int = 4096   # held-out noisy points (score error, calibration)

    def validate(self):
        check_positive("eval.samples", self.samples, integer=True)
        check_positive("eval.eval_points", self.eval_points, integer=True)


@dataclass
class DistillConfig:
    """A progressive-distillation round (T35), written by `gendiff distill`; all empty (steps = 0) for a run
    trained on data. A round's student samples with Euler (= DDIM) steps on its own grid
    (schedules.distill_sigmas at `steps`) by default."""
    teacher: str = ""         # the teacher's run folder (absolute): a trained run or the previous round
    teacher_steps: int = 0    # the teacher's DDIM steps in this round (2·steps)
    steps: int = 0            # the student's DDIM steps (0: not a distilled run)
    round: int = 0            # halvings since the run trained on data (round 1 halves its teacher's steps)
    head_loss: str = "nll"    # nll: a confidence head learns its NLL (T7) of the teacher's target D*;
                              # posterior: T37's head, the NLL of D* under N(μ, σ_φ² − σ²); none: none

    def validate(self):
        check_positive("distill.steps", self.steps, integer=True, allow_zero=True)
        check_choice("distill.head_loss", self.head_loss, HEAD_LOSSES)
        if not self.steps:
            if self.teacher or self.teacher_steps or self.round:
                raise ValueError("distill.teacher / teacher_steps / round describe a distillation round and "
                                 "need distill.steps > 0 (gendiff distill writes them)")
            return
        check_positive("distill.round", self.round, integer=True)
        if self.teacher_steps != 2 * self.steps:
            raise ValueError(f"distill.teacher_steps={self.teacher_steps!r} must be 2·distill.steps = "
                             f"{2 * self.steps} (each round halves the steps)")
        if not self.teacher:
            raise ValueError("distill.teacher='' must name the teacher's run folder")


def _check_kind(cfg, kind: str) -> None:
    if cfg.kind != kind:
        raise ValueError(f"kind={cfg.kind!r} does not match this config's tables (a {kind!r} run); "
                         f"allowed: {KINDS}")


@dataclass
class ToyRunConfig:
    kind: str = "toy"         # toy (the exact 2-D tree) | images | vae | latent
    recipe: str = "confidence"   # a toy recipe of `gendiff ablate --help` (head, batch mode, loss, density…)
    classes: str = "A"        # tree classes of the data
    seed: int = 0
    train: ToyTrainConfig = field(default_factory=ToyTrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self):
        _check_kind(self, "toy")
        check_choice("recipe", self.recipe, TOY_RECIPES)
        if TOY_RECIPES[self.recipe].model is not None:
            raise ValueError(f"recipe={self.recipe!r} reuses another recipe's model "
                             f"({TOY_RECIPES[self.recipe].model!r}); train that recipe instead")
        check_choice("classes", self.classes, TREE_CLASSES)
        check_positive("seed", self.seed, integer=True, allow_zero=True)
        for part in (self.train, self.sampler, self.checkpoint, self.eval, self.distill):
            part.validate()
        return self


@dataclass
class ImageDataConfig:
    name: str = "mnist"        # mnist | fashion-mnist | folder | npz
    path: str = ""             # folder or .npz file; for mnist/fashion-mnist a root holding the IDX files
                               # ('' = the gendiff data folder, then Debian's fashion-mnist package)
    subset: int = 0           # train on a fixed random subset of this many training images (0: all)
    size: int = 0             # folder/npz: resize every image to size×size (0: keep the images' own size)
    channels: int = 0         # folder/npz: convert every image to 1 (grayscale) or 3 (RGB) channels (0: keep)

    def validate(self):
        check_choice("data.name", self.name, ("mnist", "fashion-mnist", "folder", "npz"))
        if self.name in ("folder", "npz") and not self.path:
            raise ValueError(f"data.name={self.name!r} needs data.path (the {self.name} to read)")
        check_positive("data.subset", self.subset, integer=True, allow_zero=True)
        if self.size:
            check_size(self.size)
        if self.channels:
            check_channels(self.channels)
        if self.name in ("mnist", "fashion-mnist") and (self.size or self.channels):
            raise ValueError("data.size / data.channels apply to folder and npz data; "
                             f"data.name={self.name!r} is 28×28 grayscale")


_VAR = {"variable_length": True}


@dataclass
class UNetConfig:
    model_channels: int = 32
    channel_mult: tuple = field(default=(1, 2, 2), metadata=_VAR)
    num_blocks: int | tuple = field(default=2, metadata={"int_or_list": True})  # one int, or one per level
    attn_resolutions: tuple = field(default=(7,), metadata=_VAR)
    dropout: float = 0.0
    resample: str = "conv"    # conv: ADM's 3×3 conv resampling | plain: EDM2's 2×2 average / nearest, no conv
    emb_channels: int = 0     # width of the noise embedding (0: 4·model_channels, ADM)

    def validate(self):
        check_positive("model.model_channels", self.model_channels, integer=True)
        if not self.channel_mult:
            raise ValueError("model.channel_mult=[] must list at least one level, e.g. [1, 2, 2]")
        for i, m in enumerate(self.channel_mult):
            check_positive(f"model.channel_mult[{i}]", m, integer=True)
        if isinstance(self.num_blocks, int):
            check_positive("model.num_blocks", self.num_blocks, integer=True)
        else:
            if len(self.num_blocks) != len(self.channel_mult):
                raise ValueError(f"model.num_blocks={list(self.num_blocks)} must be one integer or one per "
                                 f"level ({len(self.channel_mult)} levels: "
                                 f"model.channel_mult={list(self.channel_mult)})")
            for i, b in enumerate(self.num_blocks):
                check_positive(f"model.num_blocks[{i}]", b, integer=True)
        check_choice("model.resample", self.resample, RESAMPLE)
        check_positive("model.emb_channels", self.emb_channels, integer=True, allow_zero=True)
        for i, r in enumerate(self.attn_resolutions):
            check_positive(f"model.attn_resolutions[{i}]", r, integer=True)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout={self.dropout!r} must be in [0, 1)")


SIGMA_DATA_MEASURED = 0.0   # train.sigma_data of an image run: measure σ_data from the training split


@dataclass
class ImageTrainConfig(TrainConfig):
    """TrainConfig of an image run: σ_data (EDM's σ_d, T4, of the EDM rows' preconditioning) defaults to
    SIGMA_DATA_MEASURED (0): `images.prepare` measures it once, as the std of every training pixel in [−1, 1]
    (`ImageData.pixel_std`, after data.subset), and the run's saved config.toml holds the number, so a
    resumed run and `load_run` read it back instead of measuring again. A number > 0 is used as given.
    (k-diffusion's MNIST config uses 0.6162; the toy keeps 0.5. DDPM rows use σ_data = 1 whatever it says:
    recipes.ImageRecipe.build_model.)"""
    sigma_data: float = SIGMA_DATA_MEASURED

    def _check_sigma_data(self) -> None:
        try:
            check_positive("train.sigma_data", self.sigma_data, allow_zero=True)
        except ValueError as e:
            raise ValueError(f"{e} (0: measured from the training split; > 0: used as given)") from None


@dataclass
class ImageEvalConfig:
    samples: int = 1000        # generated images for FID (± bootstrap sd), precision, recall, class counts;
                               # final tables: 10000 (mnist-gpu; on any preset --set eval.samples=10000, or
                               # `gendiff eval RUN --samples 10000` on a finished run)
    sampler_steps: int = 0     # 0: the recipe's default (Heun 18 steps; DDPM respaced to 100 steps)
    batch: int = 250           # images per sampler batch
    likelihood_images: int = 64   # test images for bits/dim (PF-ODE, Hutchinson; DDPM bound for DDPM rows)
    calibration_images: int = 256  # test images for σ_φ calibration (confidence rows)
    classifier_steps: int = 1500   # training steps of the FID feature classifier (cached in the data folder)

    def validate(self):
        for name in ("samples", "batch", "classifier_steps"):
            check_positive(f"eval.{name}", getattr(self, name), integer=True)
        for name in ("sampler_steps", "likelihood_images", "calibration_images"):
            check_positive(f"eval.{name}", getattr(self, name), integer=True, allow_zero=True)


@dataclass
class ImageRunConfig:
    kind: str = "images"      # toy | images | vae | latent (the 2-D tree, images, a VAE, a VAE's latents)
    recipe: str = "confidence"   # an image recipe (a row of seed 004's table): `gendiff train --help`
    seed: int = 0
    # T33 weights sampled for conditional rows
    cfg_weights: tuple = field(default=(1.0, 5.0), metadata={**_VAR, "item": 0.0})
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    train: ImageTrainConfig = field(default_factory=ImageTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: ImageEvalConfig = field(default_factory=ImageEvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self):
        _check_kind(self, "images")
        check_choice("recipe", self.recipe, IMAGE_RECIPES)
        check_positive("seed", self.seed, integer=True, allow_zero=True)
        for i, w in enumerate(self.cfg_weights):
            check_positive(f"cfg_weights[{i}]", w, allow_zero=True)
        for part in (self.data, self.model, self.train, self.checkpoint, self.eval, self.distill):
            part.validate()
        if self.distill.steps and IMAGE_RECIPES[self.recipe].sampler != "heun":
            raise ValueError(f"distill.steps={self.distill.steps}: recipe={self.recipe!r} samples with DDPM "
                             "ancestral steps on its discrete σ̃_t; distillation (T35) applies to the EDM "
                             "recipes (" + ", ".join(k for k, r in IMAGE_RECIPES.items()
                                                     if r.sampler == "heun") + ")")
        return self


@dataclass
class VAEModelConfig:
    """The VAE (nets/vae.py) and its loss: −log p(x | z) + kl_weight·KL (THEORY T36's encoder)."""
    latent_channels: int = 4
    channels: tuple = field(default=(16, 32, 64), metadata=_VAR)   # conv widths per level, full resolution
                               # first; the latent is at resolution / 2^(levels − 1): 28 → 7 for three levels
    blocks: int = 1            # residual blocks per level (encoder and decoder)
    kl_weight: float = 1.0     # β of the KL term (1: the ELBO itself)
    pixel_std: float = 0.1     # σ_x of the Gaussian decoder in [−1, 1] units; 0: learned (one scalar log σ_x)

    def validate(self):
        for name in ("latent_channels", "blocks"):
            check_positive(f"model.{name}", getattr(self, name), integer=True)
        if not self.channels:
            raise ValueError("model.channels=[] must list at least one level, e.g. [16, 32, 64]")
        for i, c in enumerate(self.channels):
            check_positive(f"model.channels[{i}]", c, integer=True)
        check_positive("model.kl_weight", self.kl_weight, allow_zero=True)
        check_positive("model.pixel_std", self.pixel_std, allow_zero=True)


@dataclass
class VAEEvalConfig:
    test_images: int = 1000    # test images for the reconstruction error and the σ_vae distribution
    batch: int = 500           # images per encoder/decoder batch

    def validate(self):
        for name in ("test_images", "batch"):
            check_positive(f"eval.{name}", getattr(self, name), integer=True)


NORMALISE_BY = ("mean", "sample")   # the per-channel std the latents are scaled by: of m, or of m + sε


@dataclass
class EncodeConfig:
    sigma_data: float = 0.5    # per-channel std of the normalised latents (EDM2's 0.5); s is scaled alike
    normalise_by: str = "mean"  # mean: the std of m over the training set; sample: of m + sε, √(Var m + E s²)
    batch: int = 500           # images per encoder batch

    def validate(self):
        check_positive("encode.sigma_data", self.sigma_data)
        check_choice("encode.normalise_by", self.normalise_by, NORMALISE_BY)
        check_positive("encode.batch", self.batch, integer=True)


@dataclass
class VAERunConfig:
    """A VAE run (issue 19): the VAE trained through the one loop (train.train) on an image dataset, evaluated
    by its reconstruction error and the distribution of its posterior std s; `gendiff encode RUN` then writes
    the encoded dataset. The loop draws a σ per example for every run; the ELBO ignores it, so train.p_mean,
    train.p_std and train.sigma_data mean nothing here."""
    kind: str = "vae"
    seed: int = 0
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: VAEEvalConfig = field(default_factory=VAEEvalConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)

    def validate(self):
        _check_kind(self, "vae")
        check_positive("seed", self.seed, integer=True, allow_zero=True)
        for part in (self.data, self.model, self.train, self.checkpoint, self.eval, self.encode):
            part.validate()
        if self.train.compile:
            raise ValueError("train.compile=true compiles a diffusion model's backbone; a VAE run trains "
                             "uncompiled (set train.compile=false)")
        return self


# THEORY T36's three ways to train on an encoded dataset, as data/sources.LatentSource names them
T36_MODES = {"a": "mean", "b": "sample", "c": "source"}
# recipes a latent run takes: the unconditional ones with EDM's density and Heun sampler (the DDPM rows fix
# σ_data = 1 and their own discrete process, which knows no source σ)
LATENT_RECIPES = tuple(k for k, r in IMAGE_RECIPES.items() if r.density_name == "edm" and not r.conditional)


@dataclass
class LatentConfig:
    """Where the latents come from and how T36 uses the VAE's posterior std s."""
    vae_run: str = ""          # a VAE run folder whose data `gendiff encode` wrote (RUN/latents.safetensors)
    vae_weights: str = "model.safetensors"   # the weights file of that run the latents were encoded with
    mode: str = "c"            # T36: a: x0 = m; b: x0 = m + s·ε₁ per batch; c: x0 = m, s part of the noise
    sampling_sigma: str = "diffusion"   # mode c at sampling: scalings from σ (diffusion) or from
                               # √(σ² + s̄²), s̄ the per-channel mean of s (total); c_noise from σ either way

    def validate(self):
        if not self.vae_run:
            raise ValueError("latent.vae_run='' must name a VAE run folder with encoded data (gendiff train "
                             "--preset vae-mnist --out VAE, gendiff encode VAE; --set latent.vae_run=VAE)")
        if not self.vae_weights:
            raise ValueError("latent.vae_weights='' must name a weights file of latent.vae_run "
                             "(default model.safetensors)")
        check_choice("latent.mode", self.mode, tuple(T36_MODES))
        check_choice("latent.sampling_sigma", self.sampling_sigma, SOURCE_SCALINGS)
        if self.sampling_sigma == "total" and self.mode != "c":
            raise ValueError(f"latent.sampling_sigma='total' applies to latent.mode='c' (the model trained "
                             f"with s in its scalings); latent.mode={self.mode!r} samples with 'diffusion'")


@dataclass
class LatentEvalConfig:
    samples: int = 1000        # generated images (decoded) for FID ± sd, precision, recall, class counts; as
                               # many test images decoded from their posterior mean m give the VAE's ceiling
    sampler_steps: int = 0     # Heun steps in latent space (0: the recipe's default, 18)
    batch: int = 250           # latents per sampler batch
    classifier_steps: int = 1500   # training steps of the FID feature classifier (cached in the data folder;
                               # the image runs' default, so latent and pixel rows share one classifier)

    def validate(self):
        for name in ("samples", "batch", "classifier_steps"):
            check_positive(f"eval.{name}", getattr(self, name), integer=True)
        check_positive("eval.sampler_steps", self.sampler_steps, integer=True, allow_zero=True)


@dataclass
class LatentRunConfig:
    """A latent diffusion run (issue 19; THEORY T3, T36): an image recipe's denoiser (LATENT_RECIPES) trained
    through the one loop on the encoded dataset of a VAE run (latent.vae_run, `gendiff encode`), in T36's mode
    latent.mode; sampled by Heun in latent space and decoded by that VAE's decoder; measured by the image
    metrics of the VAE run's dataset. train.sigma_data = 0 (the presets): measured from the latents, the std
    of the mode's x0 (m; m + s·ε₁ for mode b, in closed form)."""
    kind: str = "latent"
    recipe: str = "confidence"   # an image recipe of LATENT_RECIPES
    seed: int = 0
    latent: LatentConfig = field(default_factory=LatentConfig)
    model: UNetConfig = field(default_factory=lambda: UNetConfig(channel_mult=(1,), attn_resolutions=(7,)))
    train: ImageTrainConfig = field(default_factory=ImageTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: LatentEvalConfig = field(default_factory=LatentEvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # shared sampling code reads it; gendiff
    # distill does not take latent runs (experiments/distill.py DISTILLED_KINDS): steps stays 0

    def validate(self):
        _check_kind(self, "latent")
        check_choice("recipe", self.recipe, LATENT_RECIPES)
        check_positive("seed", self.seed, integer=True, allow_zero=True)
        for part in (self.latent, self.model, self.train, self.checkpoint, self.eval):
            part.validate()
        return self


def _latent(train: dict, model: dict, ev: dict | None = None, ck: int = 500):
    train = {"p_mean": -0.4, "p_std": 1.0, **train}     # EDM2's density for latents (ImageNet-512, σ_d 0.5)
    return lambda: LatentRunConfig(model=UNetConfig(**model), train=ImageTrainConfig(**train),
                                   checkpoint=CheckpointConfig(every=ck), eval=LatentEvalConfig(**(ev or {})))


def _vae(train: dict, model: dict | None = None, ev: dict | None = None, ck: int = 500,
         enc: dict | None = None):
    return lambda: VAERunConfig(model=VAEModelConfig(**(model or {})), train=TrainConfig(**train),
                                checkpoint=CheckpointConfig(every=ck), eval=VAEEvalConfig(**(ev or {})),
                                encode=EncodeConfig(**(enc or {})))


def _image(train: dict, model: dict | None = None, ev: dict | None = None, ck: int = 500):
    train = {"p_mean": -1.2, "p_std": 1.2, **train}     # EDM's image density (EDM Table 1) for the EDM rows
    return lambda: ImageRunConfig(model=UNetConfig(**(model or {})), train=ImageTrainConfig(**train),
                                  checkpoint=CheckpointConfig(every=ck), eval=ImageEvalConfig(**(ev or {})))


PRESETS = {
    "toy-reference": lambda: ToyRunConfig(),
    "toy-quick": lambda: ToyRunConfig(train=ToyTrainConfig(iterations=256, batch=512, lr_ref_iter=64,
                                                             snapshot_every=128),
                                        checkpoint=CheckpointConfig(every=64), eval=EvalConfig(1024, 1024)),
    # MNIST, seed 004's table: a CPU budget (the whole table ≤ 2 h on 2 cores, bf16), a GPU budget, a smoke
    # run
    "mnist-cpu": _image(dict(iterations=1500, batch=64, lr=2e-3, lr_ref_iter=1000, ema=0.998,
                             snapshot_every=500, precision="bf16"),
                        dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1)),
    "mnist-gpu": _image(dict(iterations=40000, batch=256, lr=1e-3, lr_ref_iter=10000, ema=0.9999,
                             snapshot_every=5000, precision="bf16"),
                        dict(model_channels=64, channel_mult=(1, 2, 2), num_blocks=2),
                        dict(samples=10000, sampler_steps=0, batch=1000, likelihood_images=512), ck=5000),
    # the confidence heads on MNIST (issue 18): the fast U-Net layout (BENCHMARKS, issue 10: ≈ 225 img/s in
    # bf16 on 2 cores), ≈ 30 CPU-minutes per row (3200 × 128 ≈ 7 epochs), FID at n = 10k
    "mnist-conf": _image(dict(iterations=3200, batch=128, lr=2e-3, lr_ref_iter=2000, ema=0.999,
                              snapshot_every=800, precision="bf16"),
                         dict(model_channels=16, channel_mult=(1, 4, 4), num_blocks=(2, 2, 3),
                              attn_resolutions=(7,), emb_channels=128, resample="plain"),
                         dict(samples=10000, batch=500, likelihood_images=64, calibration_images=512),
                         ck=400),
    "mnist-tiny": _image(dict(iterations=8, batch=8, lr=2e-3, lr_ref_iter=4, ema=0.9, snapshot_every=4),
                         dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(14,)),
                         dict(samples=16, sampler_steps=4, batch=16, likelihood_images=4,
                              calibration_images=8, classifier_steps=30), ck=4),
    # the VAE of latent diffusion (issue 19): MNIST 1×28×28 → 4×7×7, the ELBO (β = 1) at σ_x = 0.1, ≈ 4
    # epochs; not yet run to the end (≈ 0.4 s/step on one busy core: ≈ 10–25 min on 2 cores). And a smoke run
    "vae-mnist": _vae(dict(iterations=4000, batch=64, lr=1e-3, lr_ref_iter=2000, ema=0.999,
                           snapshot_every=1000),
                      dict(latent_channels=4, channels=(16, 32, 64), blocks=1, kl_weight=1.0, pixel_std=0.1)),
    "vae-tiny": _vae(dict(iterations=8, batch=8, lr=2e-3, lr_ref_iter=4, ema=0.9, snapshot_every=4),
                     dict(latent_channels=4, channels=(8, 8, 8), blocks=1),
                     dict(test_images=16, batch=16), ck=4, enc=dict(batch=64)),
    # latent diffusion on the 4×7×7 latents of vae-mnist (issue 19): a one-level U-Net (7 has no factor 2)
    # with attention at 7, at mnist-cpu's training compute: fwd + bwd of one image costs 0.235 GFLOP here and
    # 1.142 GFLOP in mnist-cpu's pixel U-Net (torch.utils.flop_counter, confidence head), so 3650 × 128
    # images = 109.8 TFLOP against mnist-cpu's 1500 × 64 = 109.6 TFLOP. And a smoke run
    "latent-mnist": _latent(dict(iterations=3650, batch=128, lr=2e-3, lr_ref_iter=2400, ema=0.999,
                                 snapshot_every=1200, precision="bf16"),
                            dict(model_channels=64, channel_mult=(1,), num_blocks=2, attn_resolutions=(7,)),
                            dict(samples=1000, batch=500)),
    "latent-tiny": _latent(dict(iterations=32, batch=8, lr=2e-3, lr_ref_iter=16, ema=0.9, snapshot_every=16),
                           dict(model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(7,)),
                           dict(samples=16, sampler_steps=4, batch=16, classifier_steps=30), ck=16),
}
IMAGE_PRESETS = tuple(k for k, f in PRESETS.items() if f().kind == "images")
KINDS = ("toy", "images", "vae", "latent")
DEFAULT_PRESET = {"toy": "toy-reference", "images": "mnist-cpu", "vae": "vae-mnist", "latent": "latent-mnist"}


def _type_name(v) -> str:
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
            tuple: "a list", list: "a list"}.get(type(v), type(v).__name__)


def _coerce(key: str, old, value, variable: bool = False, item=0, int_or_list: bool = False):
    """`value` (from TOML or text) as the type of the field's current value `old`, or a ValueError.
    int_or_list: the field takes one integer or a list of integers (e.g. model.num_blocks)."""
    if isinstance(value, str) and not isinstance(old, str):
        text = value.strip()
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            raise ValueError(f"{key}={text!r} is not {_type_name(old)}") from None
    if int_or_list:
        if isinstance(value, (list, tuple)):
            return _coerce(key, (0,), value, variable=True)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{key}={value!r} is not an integer or a list of integers (e.g. 2 or [2, 2, 3])")
        return value
    if isinstance(old, bool):
        ok = isinstance(value, bool)
    elif isinstance(old, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(old, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        ok = ok and math.isfinite(value)
    elif isinstance(old, (tuple, list)):
        ok = isinstance(value, (list, tuple)) and (variable or len(value) == len(old))
        like = (old[0] if old else item) if variable else None  # a variable-length list holds one type
        value = tuple(_coerce(f"{key}[{i}]", like if variable else o, v)
                      for i, (o, v) in enumerate(zip(old if not variable else value, value))) if ok else value
    else:
        ok = isinstance(value, type(old))
    if not ok:
        fixed = isinstance(old, (tuple, list)) and not variable
        raise ValueError(f"{key}={value!r} is not {_type_name(old)}"
                         + (f" of length {len(old)}" if fixed else ""))
    return value


def _set(obj, dotted: str, value, prefix: str = ""):
    head, _, rest = dotted.partition(".")
    names = [f.name for f in fields(obj)]
    key = prefix + head
    if head not in names:
        hint = ""
        if not prefix and head in ("data", "model") and getattr(obj, "kind", None) == "toy":
            hint = (f" ({head}.* keys belong to image runs: start from an image preset, e.g. "
                    "--preset mnist-tiny)")
        raise ValueError(f"unknown key {key!r}; allowed: " + ", ".join(prefix + n for n in names) + hint)
    old = getattr(obj, head)
    if is_dataclass(old):
        if not rest:
            raise ValueError(f"{key} is a table; set one of its keys: "
                             + ", ".join(f"{key}.{f.name}" for f in fields(old)))
        _set(old, rest, value, key + ".")
    else:
        if rest:
            raise ValueError(f"{key} is not a table; {dotted!r} does not exist")
        # object.__setattr__: some parts (SamplerConfig) are frozen; the tree being built is resolve()'s own
        meta = next(f for f in fields(obj) if f.name == head).metadata
        object.__setattr__(obj, head, _coerce(key, old, value, meta.get("variable_length", False),
                                              meta.get("item", 0), meta.get("int_or_list", False)))


def _flatten(table: dict, prefix: str = ""):
    for k, v in table.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def resolve(preset: str | None = None, toml_path: str | None = None, sets=()):
    """Preset, then the TOML file, then each `key=value` of `sets`; validated. Pure: touches no disk but the
    file it reads. preset None: the file's `kind` picks the default preset (DEFAULT_PRESET)."""
    table = None
    if toml_path is not None:
        try:
            with open(toml_path, "rb") as f:
                table = tomllib.load(f)
        except OSError as e:
            raise ValueError(f"--config={toml_path!r} cannot be read ({e.strerror or e})") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config={toml_path!r} is not valid TOML ({e})") from None
    if preset is None:
        kind = "toy" if table is None else table.get("kind")
        if kind not in KINDS:
            raise ValueError(f"--config={toml_path!r} has kind={kind!r}; a run config starts with kind = "
                             + " or ".join(f'"{k}"' for k in KINDS) + " (or give --preset)")
        preset = DEFAULT_PRESET[kind]
    check_choice("preset", preset, PRESETS)
    cfg = PRESETS[preset]()
    if table is not None and table.get("kind", cfg.kind) != cfg.kind:
        raise ValueError(f"--config={toml_path!r} is a {table['kind']!r} run but --preset={preset!r} is a "
                         f"{cfg.kind!r} preset; choose one of "
                         f"{[k for k, f in PRESETS.items() if f().kind == table['kind']]}")
    if table is not None:
        for key, value in _flatten(table):
            _set(cfg, key, value)
    return override(cfg, sets, in_place=True)


def override(cfg, sets=(), in_place: bool = False):
    """`cfg` (a deep copy unless in_place) with each `key=value` of `sets` applied (`--set`), validated."""
    cfg = cfg if in_place else copy.deepcopy(cfg)
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set {item!r} must look like key=value, e.g. train.batch=512")
        _set(cfg, key.strip(), value)
    return cfg.validate()


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(cfg) -> str:
    """The dataclass tree as TOML: scalars first, then one [table] per nested dataclass."""
    lines, tables = [], []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        (tables if is_dataclass(v) else lines).append((f.name, v))
    out = [f"{k} = {_toml_value(v)}" for k, v in lines]
    for name, sub in tables:
        out += ["", f"[{name}]"] + [f"{f.name} = {_toml_value(getattr(sub, f.name))}" for f in fields(sub)]
    return "\n".join(out) + "\n"


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
