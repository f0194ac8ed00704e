"""Toy runs: one recipe of `gendiff ablate` trained on the exact 2-D tree in a run folder, and the commands on
such a folder (sample, eval, likelihood, report), every number measured against the exact mixture."""
from __future__ import annotations

import math
import os
import time
from typing import NamedTuple

import matplotlib
import numpy as np
import torch

from ..checks import check_choice, check_positive
from ..data.sources import ToyBatches
from ..data.toy import tree
from ..io import StackedGenerator, atomic_path, derive_seed, generator, save_figure, save_json
from ..likelihood import continuous_elbo, log_likelihood
from ..mixture_eval import Evaluator
from ..process import VP
from ..samplers import GRID_SAMPLERS
from ..schedules import LogNormalSigma, distill_sigmas, edm_sigmas
from ..scores import CountCalls, with_score_mode
from .config import ToyRunConfig
from .recipes import TOY_RECIPES
from .runfolder import load_weights, refuse, train_in_folder, weights_tag

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)


class Setup(NamedTuple):
    model: torch.nn.Module
    loss: object
    source: object
    density: object
    cfg: ToyRunConfig       # the config as given (a toy run resolves nothing at prepare; images.Setup does)


def build_model(cfg: ToyRunConfig):
    return TOY_RECIPES[cfg.recipe].build_model(cfg.train)


def prepare(cfg: ToyRunConfig, device=None, log=print) -> Setup:
    """The model (seeded initialisation), loss, batch source and training density of a toy run."""
    if device == "cuda":
        raise ValueError("--device cuda: toy runs train on the CPU (the exact tree's batches are drawn "
                         "there); use --device cpu or auto")
    recipe = TOY_RECIPES[cfg.recipe]
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = build_model(cfg)
    density = recipe.density(cfg.train)
    source = ToyBatches(tree(cfg.classes), recipe.mode, need_score=recipe.loss == "score-matching")
    return Setup(model, recipe.loss_fn(density), source, density, cfg)


def _evaluator(cfg: ToyRunConfig, seed: int, samples: int, eval_points: int) -> Evaluator:
    return Evaluator(tree(cfg.classes), seed=seed, samples=samples, eval_points=eval_points,
                     sigma_density=LogNormalSigma(cfg.train.p_mean, cfg.train.p_std), sampler=cfg.sampler)


def train_run(cfg: ToyRunConfig, out: str, setup: Setup, *, progress: bool = True, log=print,
              primary: bool = True) -> dict:
    """Train (or continue) the run in `out`; evaluate the final EMA against the tree; returns the metrics."""
    res = train_in_folder(setup.model, setup.loss, setup.source, cfg, out, density=setup.density,
                          desc=cfg.recipe, progress=progress, log=log, primary=primary)
    if not primary:
        return {}
    ev = _evaluator(cfg, cfg.seed, cfg.eval.samples, cfg.eval.eval_points)
    if cfg.distill.steps:     # a distilled student: Euler on its own grid (sample_points), not Heun
        x, _, secs = sample_points(res.ema, cfg, cfg.eval.samples, seed=cfg.seed)
    else:
        x, secs, _ = ev.sample(res.ema)
    metrics = {**ev.sample_metrics(x), **ev.score_errors(res.ema), "sample_s": secs,
               "bad_steps": res.bad_steps, "iterations": cfg.train.iterations}
    save_json(metrics, os.path.join(out, "metrics.json"))
    plot_points(x, ev.ref, os.path.join(out, "samples.png"), cfg.recipe)
    return metrics


def summary(cfg: ToyRunConfig, metrics: dict) -> str:
    return (f"{cfg.recipe}: median NLL {metrics['median_nll']:.3f}, MMD² {metrics['mmd']:.2e}, score error "
            f"{metrics['score_error']:.4f}")


def plot_points(x, ref, path, title):
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, pts, name in ((axes[0], ref, "ground truth"), (axes[1], x, title)):
        p = pts[:4096].double().numpy()
        ax.scatter(p[:, 0], p[:, 1], s=0.5, alpha=0.5)
        ax.set_title(name)
        ax.set_aspect("equal")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def load_model(cfg: ToyRunConfig, out: str, weights: str = "model.safetensors"):
    return load_weights(build_model(cfg), out, weights)


# ---- sampling: one seed per sample ---------------------------------------------------------------------

def distill_grid(cfg: ToyRunConfig, steps: int):
    """The distillation grid (T35, schedules.distill_sigmas) at `steps` over the run's sampling range."""
    sc = cfg.sampler
    return distill_sigmas(steps, sc.sigma_min, sc.sigma_max, sc.rho)


def sampling_defaults(cfg: ToyRunConfig, sampler: str | None = None, steps: int = 0) -> tuple:
    """(sampler, steps, σ grid) of the run: Heun at sampler.steps on EDM's grid; a distilled student
    (distill.steps > 0) Euler (= DDIM, T35) at its distill.steps on its own grid (`distill_grid`)."""
    if cfg.distill.steps:
        steps = steps or cfg.distill.steps
        return sampler or "euler", steps, distill_grid(cfg, steps)
    sc = cfg.sampler
    steps = steps or sc.steps
    return sampler or "heun", steps, edm_sigmas(steps, sc.sigma_min, sc.sigma_max, sc.rho)


def sample_points(model, cfg: ToyRunConfig, n: int, *, seed: int = 0, sampler: str | None = None,
                  steps: int = 0, score_mode: str = "tweedie", batch: int = 4096):
    """n samples of the run's model with any σ-grid sampler (default `sampling_defaults`: Heun at the run's
    sampler.steps with its sampler.churn; a distilled student Euler at its own steps on its grid) from the
    run's σ_max (exact p(x; σ_max) or Gaussian, `sampler.init`). Sample
    i draws its start and all its noise from its own generator (seed, i): the samples do not depend on
    `batch`, except for `pc`, whose Langevin step size uses norms averaged over the batch (score_sde's rule):
    it samples all n in one batch. Returns (samples [n, 2], NFE per sample, seconds)."""
    sampler, steps, grid = sampling_defaults(cfg, sampler, steps)
    check_choice("sampler", sampler, GRID_SAMPLERS)
    for name, v in (("samples", n), ("batch", batch)):
        check_positive(name, v, integer=True)
    gt, sc = tree(cfg.classes), cfg.sampler
    batch = n if sampler == "pc" else batch
    knobs = {"churn": sc.churn} if sampler == "heun" else {}
    counted = CountCalls(with_score_mode(model, score_mode))
    outs, start, batches = [], time.perf_counter(), 0
    for i in range(0, n, batch):
        idx = range(i, min(i + batch, n))
        init = [generator(seed, f"sample-{j}-init") for j in idx]
        if sc.init == "exact":
            x = torch.cat([gt.sample(1, sc.sigma_max, generator=g)[0] for g in init])
        else:
            x = sc.sigma_max * torch.cat([torch.randn(1, gt.dim, generator=g) for g in init])
        with torch.no_grad():
            outs.append(GRID_SAMPLERS[sampler](counted, x, grid,
                                               generator=StackedGenerator(seed, idx), **knobs))
        batches += 1
    return torch.cat(outs), counted.calls // batches, time.perf_counter() - start


def sample_run(out: str, cfg: ToyRunConfig, model, *, samples: int, dest: str, seed: int = 0,
               sampler: str | None = None,
               steps: int = 0, score_mode: str = "tweedie", batch: int = 4096, **unused) -> dict:
    """`gendiff sample` on a toy run: dest/samples.npz (points [N, 2]) and dest/samples.png (beside the ground
    truth). Sampler and steps: `sampling_defaults` (a distilled student: Euler at its own steps)."""
    refuse(unused, "a toy")
    sampler, steps, _ = sampling_defaults(cfg, sampler, steps)
    x, nfe, secs = sample_points(model, cfg, samples, seed=seed, sampler=sampler, steps=steps,
                                 score_mode=score_mode, batch=batch)
    os.makedirs(dest, exist_ok=True)
    with atomic_path(os.path.join(dest, "samples.npz")) as tmp, open(tmp, "wb") as f:
        np.savez(f, samples=x.numpy(), seed=np.int64(seed), index=np.arange(samples))
    ref = tree(cfg.classes).sample(min(samples, 4096), generator=generator(seed, "reference"))[0]
    plot_points(x, ref, os.path.join(dest, "samples.png"), f"{cfg.recipe}, {sampler} {steps}")
    info = {"samples": samples, "sampler": sampler, "steps": steps, "nfe": nfe, "seed": seed, "seconds": secs}
    save_json(info, os.path.join(dest, "samples.json"))
    return info


def eval_run(out: str, cfg: ToyRunConfig, model, *, sampler: str | None = None, steps: int = 0,
             samples: int = 4096,
             seed: int = 0, score_mode: str = "tweedie", weights: str = "model.safetensors",
             **unused) -> dict:
    """Samples of the run's model (sample_points; `sampling_defaults`) measured against the tree's ground
    truth; writes RUN/eval-<sampler>-<steps>-<score_mode>.json."""
    refuse(unused, "a toy")
    sampler, steps, _ = sampling_defaults(cfg, sampler, steps)
    x, nfe, secs = sample_points(model, cfg, samples, seed=seed, sampler=sampler, steps=steps,
                                 score_mode=score_mode)
    ev = _evaluator(cfg, seed, samples, 256)
    m = {"sampler": sampler, "steps": steps, "score_mode": score_mode, "nfe": nfe, "seed": seed,
         "seconds": secs, **ev.sample_metrics(x)}
    save_json(m, os.path.join(out, f"eval-{sampler}-{steps}-{score_mode}{weights_tag(weights)}.json"))
    return m


def eval_summary(out: str, m: dict) -> str:
    return (f"{out}: {m['sampler']} NFE {m['nfe']}: median NLL {m['median_nll']:.3f}, outliers "
            f"{m['outlier_rate']:.4f}, MMD² {m['mmd']:.2e}")


def likelihood_run(out: str, cfg: ToyRunConfig, model, *, points: int = 512, method: str = "exact",
                   seed: int = 0, **unused) -> dict:
    """Bits/dim of held-out ground-truth points: PF-ODE (T31) next to the continuous ELBO (VP over the same σ
    range) and the exact −log p(x; σ_min) of the tree; writes RUN/likelihood.json."""
    refuse(unused, "a toy")
    check_positive("points", points, integer=True)
    gt = tree(cfg.classes)
    x = gt.sample(points, generator=generator(seed, "likelihood-points"))[0]
    s_min, s_max = cfg.sampler.sigma_min, 80.0
    d = x.shape[1]
    start = time.perf_counter()
    logp, info = log_likelihood(model, x, sigma_min=s_min, sigma_max=s_max, method=method,
                                generator=generator(seed, "hutchinson"))
    ode_s = time.perf_counter() - start
    elbo = torch.stack([continuous_elbo(model, x, VP(-2 * math.log(s_max), -2 * math.log(s_min)),
                                        generator=torch.Generator().manual_seed(i))["total"]
                         for i in range(8)])
    bpd = lambda nats: float(nats) / (d * math.log(2))  # noqa: E731
    m = {"points": points, "method": method, "sigma_min": s_min, "sigma_max": s_max,
         "pf_ode_bpd": bpd(-logp.mean()), "pf_ode_nfe": info["nfe"], "pf_ode_seconds": ode_s,
         "elbo_bpd": bpd(elbo.mean()), "exact_bpd": bpd(-gt.logp(x.double(), s_min).mean())}
    save_json(m, os.path.join(out, "likelihood.json"))
    return m


def likelihood_summary(out: str, m: dict) -> str:
    return (f"{out}: bits/dim PF-ODE {m['pf_ode_bpd']:.4f} (NFE {m['pf_ode_nfe']}), ELBO "
            f"{m['elbo_bpd']:.4f}, exact {m['exact_bpd']:.4f}")


def phi_map(cfg: ToyRunConfig, model):
    """A figure of σ_φ of the run's model on a grid at σ = 0.05 beside the exact optimum (T8), log10; None for
    a model without a confidence head."""
    if not model.head.has_confidence:
        return None
    gt, sigma, res = tree(cfg.classes), 0.05, 120
    ref = gt.sample(4096, generator=torch.Generator().manual_seed(0))[0]
    lo, hi = ref.min(0).values - 0.2, ref.max(0).values + 0.2
    gx, gy = (torch.linspace(float(lo[i]), float(hi[i]), res) for i in (0, 1))
    x = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).reshape(-1, 2)
    s = torch.full((len(x),), sigma)
    with torch.no_grad():
        learned = model.predict(x, s).variance().double().mean(1)
    exact = gt.denoiser("point").predict(x.double(), s.double()).variance().mean(1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    vmin, vmax = float(exact.sqrt().log10().min()), float(exact.sqrt().log10().max())   # one colour scale
    for ax, v, t in ((axes[0], learned, "learned σ_φ"), (axes[1], exact, "exact optimum (T8)")):
        im = ax.imshow(v.sqrt().log10().view(res, res).numpy(), origin="lower", vmin=vmin, vmax=vmax,
                       extent=(float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])), cmap="viridis")
        ax.set_title(f"{t}, log10, σ = {sigma}")
    fig.colorbar(im, ax=axes, shrink=0.8)
    return fig
