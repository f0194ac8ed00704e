"""DDPM's reverse variance on image runs (THEORY T24, T26, T38): which Σ_t a run can use, and the DDPM bound
with it.

`gendiff eval RUN --sampler ddpm --variance V --steps K` and `gendiff likelihood RUN --method ddpm-bound
--variance V --steps K` reach these: V is β ("beta"), β̃ ("beta_tilde"), IDDPM's learned v ("v", the
learned-variance recipe's head, T26), T38's β̃_t + c_0²·Var[x0 | x_t] per element from the confidence head
("phi", a run whose head `has_confidence`), or one number per step ("analytic", Analytic-DPM's v̄_t measured
on training images, any run); K respaced steps of the T = 1000 linear-β process (IDDPM), whose own β', β̃', ᾱ'
every variance then uses (`process.DDPM.respaced`). EDM-trained runs are read at the DDPM σ̃_t (T2): the same
VE denoiser, another grid.
"""
from __future__ import annotations

import math
import time

import torch

from ..checks import check_choice
from ..guidance import Conditioned
from ..heads import make_head
from ..io import generator
from ..likelihood import ddpm_vlb
from ..process import DDPM_VARIANCES, analytic_variances
from ..samplers import GRID_SAMPLERS
from .config import ImageRunConfig
from .recipes import DDPM_T, HEUN_STEPS, IMAGE_RECIPES, RESPACED, ddpm

DDPM_VARIANCE_CHOICES = (*DDPM_VARIANCES, "v")   # beta, beta_tilde, phi, analytic; v: IDDPM's learned (T26)
ANALYTIC_IMAGES = 128                            # training images behind Analytic-DPM's v̄_t (analytic_table)
VLB_STEPS = 50             # diffusion steps of the DDPM bound drawn at random out of T − 1 (bits_per_dim)


class LastG(torch.nn.Module):
    """A v-head denoiser for sample_ddpm: forward returns μ and keeps G, so the learned variance of the same
    step (`v(z, t)`) costs no second network evaluation (T26)."""

    def __init__(self, model, ddpm_process, head):
        super().__init__()
        self.model, self.ddpm, self.head, self.last = model, ddpm_process, head, None

    def forward(self, x, sigma):
        p = self.model.predict(x, sigma)
        self.last = (float(torch.as_tensor(sigma).flatten()[0]), x.shape, self.head.interpolation(p))
        return p.mu

    def v(self, z, t):
        ab, om = float(self.ddpm.alpha_bar[t]), float(self.ddpm.one_minus_alpha_bar[t])
        s = math.sqrt(om / ab)
        if self.last is None or self.last[1] != z.shape or abs(self.last[0] - s) > 1e-6 * s:
            self.forward(z / math.sqrt(ab), s)
        return self.last[2]


def ddpm_variance(cfg: ImageRunConfig, variance: str | None = None) -> str:
    """The reverse variance of DDPM sampling and of the DDPM bound for this run: `variance` checked against
    what its head can give (phi: a learned confidence, `make_head(...).has_confidence`; v: the
    learned-variance recipe's v head; beta, beta_tilde, analytic: any run), or by default v for the v head,
    else beta_tilde."""
    head = IMAGE_RECIPES[cfg.recipe].head
    if variance is None:
        return "v" if head == "v" else "beta_tilde"
    check_choice("--variance", variance, DDPM_VARIANCE_CHOICES)
    if variance == "phi" and not make_head(head).has_confidence:
        raise ValueError(f"--variance phi needs a learned confidence σ_φ (T38); recipe={cfg.recipe!r} has "
                         f"head {head!r} (σ_φ is c_var): use a confidence recipe, or --variance analytic")
    if variance == "v" and head != "v":
        raise ValueError(f"--variance v needs IDDPM's learned variance (T26, recipe 'learned-variance'); "
                         f"recipe={cfg.recipe!r} has head {head!r}")
    return variance


def ddpm_choice(cfg: ImageRunConfig, sampler=None, variance=None) -> tuple[bool, str | None]:
    """(DDPM ancestral sampling?, its reverse variance) of an image run for --sampler and --variance, checked:
    the DDPM recipes' own sampler, or any run with sampler="ddpm"; a variance needs the DDPM sampler. A σ-grid
    sampler (samplers.GRID_SAMPLERS, on EDM's ρ = 7 grid) is allowed for the recipes sampled on σ (Heun is
    their own); a distilled student samples with Euler on its own grid only (T35)."""
    recipe_ddpm = IMAGE_RECIPES[cfg.recipe].sampler == "ddpm"
    if sampler not in (None, "ddpm", *GRID_SAMPLERS):
        raise ValueError(f"--sampler={sampler!r} is not a sampler; allowed: ddpm (DDPM ancestral sampling, "
                         f"with --variance), {', '.join(sorted(GRID_SAMPLERS))} (σ-grid samplers) or none "
                         "(the recipe's own)")
    if sampler in GRID_SAMPLERS and recipe_ddpm:
        raise ValueError(f"--sampler={sampler!r} integrates on EDM's σ grid; recipe={cfg.recipe!r} samples "
                         "with DDPM's discrete steps: use its own sampler or --sampler ddpm")
    if sampler in GRID_SAMPLERS and cfg.distill.steps and sampler != "euler":
        raise ValueError(f"--sampler={sampler!r}: a distilled student samples with Euler (= DDIM) on its own "
                         "grid (T35), the steps it was trained for; allowed: euler or none")
    if sampler == "pc":
        raise ValueError("--sampler='pc' sizes its Langevin steps by norms over the whole batch, so an image "
                         "would depend on how the batches are split; image runs draw each image from its own "
                         f"generator: allowed: ddpm, {', '.join(sorted(set(GRID_SAMPLERS) - {'pc'}))}")
    use_ddpm = recipe_ddpm or sampler == "ddpm"
    if variance is not None and not use_ddpm:
        raise ValueError(f"--variance={variance!r} chooses the variance of DDPM sampling and needs --sampler "
                         "ddpm; " + (f"got --sampler={sampler!r}" if sampler is not None else
                                     f"recipe={cfg.recipe!r} samples on a σ grid"))
    return use_ddpm, (ddpm_variance(cfg, variance) if use_ddpm else None)


def grid_choice(cfg: ImageRunConfig, sampler=None) -> str | None:
    """The σ-grid sampler `sampler` picks for this run when it is not the run's own (Heun on EDM's grid; a
    distilled student's Euler on its grid); None for the run's own and for DDPM (results files and labels
    name only a sampler that differs from the run's own)."""
    own = "euler" if cfg.distill.steps else "heun"
    return sampler if sampler in GRID_SAMPLERS and sampler != own else None


def sampler_steps(cfg: ImageRunConfig, steps: int, use_ddpm: bool) -> int:
    """`steps`, else the run's eval.sampler_steps where it samples on the kind of steps it was made for (σ
    grid or DDPM; a σ-grid sampler other than Heun takes the same count), else the default of the sampler used
    (RESPACED DDPM steps, HEUN_STEPS on a σ grid); a distilled student (distill.steps > 0) its own steps for
    its own sampler (Euler on its grid, images.sample_images)."""
    if cfg.distill.steps and not use_ddpm:
        return steps or cfg.distill.steps
    own = cfg.eval.sampler_steps if (IMAGE_RECIPES[cfg.recipe].sampler == "ddpm") == use_ddpm else 0
    return steps or own or (RESPACED if use_ddpm else HEUN_STEPS)


def analytic_table(model, cfg: ImageRunConfig, process, x_train: torch.Tensor, *, num_classes: int = 0,
                   images: int = ANALYTIC_IMAGES, seed: int = 0) -> torch.Tensor:
    """Analytic-DPM's v̄_t ([T + 1], float64) of the run's model on `process` (`process.analytic_variances`):
    the mean squared error of x̂0 on `images` of the training images x_train drawn at random (seeded), at each
    step's σ̃. A class-conditional model is measured on its null class ∅ (`num_classes`: the unconditional
    model, an approximation for conditional or guided sampling)."""
    dev = next(model.parameters()).device
    x = x_train[torch.randperm(len(x_train), generator=generator(seed, "analytic-images"))[:images]].to(dev)
    den = model
    if IMAGE_RECIPES[cfg.recipe].conditional:
        den = lambda xx, s: model(xx, s, class_labels=torch.full((len(xx),), num_classes,  # noqa: E731
                                                                 device=dev))
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
        return analytic_variances(den, x, process, generator=generator(seed, "analytic-noise"),
                                  batch=cfg.eval.batch)


def ddpm_keywords(model, den, process, variance: str, x0_var=None):
    """(denoiser, keywords of sample_ddpm / ddpm_vlb) for a checked `variance`: the v head's `LastG` and its
    v (no second network evaluation), or the variance name and Analytic-DPM's table."""
    if variance == "v":
        lg = LastG(den, process, model.head)
        return lg, {"v": lg.v}
    return den, {"variance": variance, "x0_var": x0_var}


def ddpm_bound(model, cfg: ImageRunConfig, x8: torch.Tensor, num_classes: int, *, variance: str | None = None,
               steps: int = 0, x_train=None, analytic_images: int = ANALYTIC_IMAGES, generator_=None) -> dict:
    """DDPM's discretised bound (T27) in bits/dim of 8-bit images x8 for any run (a conditional one on its
    null class), with the reverse variance `variance` (`ddpm_variance`; analytic's table from
    `analytic_images` of the training images x_train, `analytic_table`). steps = 0 or T: the T = 1000
    process, VLB_STEPS of its T − 1 steps drawn at random (unbiased; the ± includes that draw); k < T: the
    k-step respaced process (IDDPM; the model DDPM sampling with k steps uses), every step summed. Decoder:
    β̃_2 for β and β̃ (β_1's total also given, `bpd_ddpm_bound_beta1`), the v head's and T38's their own Σ_1.
    Random draws from `generator_` (default: the run seed's "likelihood" stream)."""
    obj = IMAGE_RECIPES[cfg.recipe]
    name = ddpm_variance(cfg, variance)
    if name == "analytic" and x_train is None:
        raise ValueError("variance 'analytic' needs training images x_train for its v̄_t (analytic_table)")
    den = (Conditioned(model, torch.full((len(x8),), num_classes, device=x8.device)) if obj.conditional
           else model)
    n, d = len(x8), x8[0].numel()
    se = lambda v: float(v.std() / math.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
    process = ddpm() if not steps or steps >= DDPM_T else ddpm().respaced(steps)
    drawn = VLB_STEPS if process.T == DDPM_T else None
    x0_var = (analytic_table(model, cfg, process, x_train, num_classes=num_classes, images=analytic_images,
                             seed=cfg.seed) if name == "analytic" else None)
    den, kw = ddpm_keywords(model, den, process, name, x0_var)
    start = time.perf_counter()
    with torch.no_grad():
        vlb = ddpm_vlb(den, x8, process, decoder="discretized", steps=drawn, decoder_variance="beta_tilde",
                       generator=generator_ or generator(cfg.seed, "likelihood"), **kw)
    steps_se = math.sqrt(float(vlb["step_var"])) / (d * math.log(2))      # nats per image -> bits/dim
    out = {"bpd_ddpm_bound": float(vlb["bits_per_dim"].mean()),
           "bpd_ddpm_bound_se": math.hypot(se(vlb["bits_per_dim"]), steps_se),
           "bpd_ddpm_bound_se_steps": steps_se, "bpd_ddpm_bound_steps": drawn or process.T - 1,
           "ddpm_variance": name, "ddpm_process_steps": process.T, "bpd_images": n,
           "bpd_ddpm_bound_seconds": time.perf_counter() - start}
    if vlb.get("reconstruction_by_variance") is not None:          # a fixed-variance row: β_1 too
        alt = vlb["total"] - vlb["reconstruction"] + vlb["reconstruction_by_variance"]["beta"]
        out["bpd_ddpm_bound_beta1"] = float(alt.mean()) / (d * math.log(2))
    return out
