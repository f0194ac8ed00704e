"""`gendiff train`: one toy run in a run folder, resumable (issue 9).

RUN/config.toml     the fully resolved config (enough to re-run: `gendiff train --config RUN/config.toml`)
RUN/metrics.jsonl   one JSON line per logging step: step, loss, loss_var, lr, seconds
RUN/tb/             the same scalars as TensorBoard events (`tensorboard --logdir RUN/tb`)
RUN/checkpoints/    checkpoint.py's atomic, checksummed checkpoints (the newest `checkpoint.keep`)
RUN/model.safetensors, RUN/metrics.json, RUN/samples.png   the final EMA model, its measured metrics, a plot
`--resume RUN` continues from the newest good checkpoint with RUN's own config; a run killed at any step and
resumed ends bit for bit where the uninterrupted run ends (CPU; tests/test_run.py kills real processes).
"""
from __future__ import annotations

import json
import os
import time

import torch

from .config import TrainRunConfig, resolve, to_dict, to_toml
from .io import derive_seed, save_json, save_state, save_text

LOG_EVERY = 16


def _metrics_log(path: str, upto: int):
    """Keep the lines of steps ≤ upto (a resumed run replays what came after its checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= upto]
    save_text("".join(keep), path)


class RunLog:
    """metrics.jsonl (one line per LOG_EVERY steps) and TensorBoard events of a run folder; on a resumed run the
    lines after the checkpoint are dropped first (the steps are replayed). Only the primary process writes."""

    def __init__(self, out: str, primary: bool = True):
        from . import checkpoint as ckpt
        found = ckpt.steps(os.path.join(out, "checkpoints"))
        self.path, self.primary, self.start, self.tb = os.path.join(out, "metrics.jsonl"), primary, \
            time.perf_counter(), None
        if primary:
            _metrics_log(self.path, max(found) if found else 0)
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out, "tb"), purge_step=max(found) + 1 if found else None)

    def on_step(self, done: int, result) -> None:
        if not self.primary or done % LOG_EVERY or not result.losses:
            return
        line = {"step": done, "loss": result.losses[-1], "loss_var": result.loss_vars[-1], "lr": result.lrs[-1],
                "bad_steps": result.bad_steps, "seconds": round(time.perf_counter() - self.start, 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        for k in ("loss", "loss_var", "lr", "bad_steps"):
            self.tb.add_scalar(f"train/{k}", line[k], done)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train_in_folder(model, loss, source, cfg, out: str, *, density, desc: str, progress: bool, log, primary: bool):
    """train.train on a run folder: metrics.jsonl and TensorBoard (RunLog), checkpoints/ (resumed when there),
    posthoc/ snapshots; the primary process then writes the EMA to model.safetensors. Returns the TrainResult."""
    from .train import Outputs, train
    runlog = RunLog(out, primary)
    try:
        res = train(model, loss, source, cfg.train, seed=cfg.seed, progress=progress, desc=desc,
                    sigma_density=density, callbacks=[runlog.on_step],
                    outputs=Outputs(checkpoint_dir=os.path.join(out, "checkpoints"),
                                    checkpoint_every=cfg.checkpoint.every, keep_checkpoints=cfg.checkpoint.keep,
                                    posthoc_dir=os.path.join(out, "posthoc")))
    finally:
        runlog.close()
    if primary:
        if res.resumed_from:
            log(f"resumed from step {res.resumed_from}")
        save_state(res.ema.state_dict(), os.path.join(out, "model.safetensors"))
    return res


def train_run(cfg, out: str, *, progress: bool = True, log=print, primary: bool = True, device=None) -> dict:
    """Train (or continue) the run in `out`; evaluate the final EMA; returns the final metrics. Under torchrun
    only the primary process (rank 0) writes logs, the model and metrics; the others return {}. An image run's
    config (config.ImageRunConfig) goes to image_runs.train_image_run."""
    from .ablate import RUNS, make_denoiser
    from .config import ImageRunConfig
    from .data.toy import tree
    from .evaluate import Evaluator
    from .schedules import LogNormalSigma
    from .data.sources import ToyBatches
    if isinstance(cfg, ImageRunConfig):
        from .image_runs import train_image_run
        return train_image_run(cfg, out, progress=progress, log=log, primary=primary, device=device)
    spec = RUNS[cfg.run]
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = make_denoiser(spec, _ablate_view(cfg))
    density = spec.density(_ablate_view(cfg))
    source = ToyBatches(tree(cfg.classes), spec.mode, need_score=spec.loss == "score-matching")
    res = train_in_folder(model, spec.loss_fn(density), source, cfg, out, density=density, desc=cfg.run,
                          progress=progress, log=log, primary=primary)
    if not primary:
        return {}
    ev = Evaluator(tree(cfg.classes), seed=cfg.seed, samples=cfg.eval.samples, eval_points=cfg.eval.eval_points,
                   sigma_density=LogNormalSigma(cfg.train.p_mean, cfg.train.p_std), sampler=cfg.sampler)
    x, secs, _ = ev.sample(res.ema)
    metrics = {**ev.sample_metrics(x), **ev.score_errors(res.ema), "sample_s": secs,
               "bad_steps": res.bad_steps, "iterations": cfg.train.iterations}
    save_json(metrics, os.path.join(out, "metrics.json"))
    _plot(x, ev.ref, os.path.join(out, "samples.png"), cfg.run)
    return metrics


def _ablate_view(cfg: TrainRunConfig):
    """The AblateConfig fields the run registry reads (train recipe, sampler)."""
    from .ablate import AblateConfig
    return AblateConfig(runs=(cfg.run,), classes=cfg.classes, seed=cfg.seed, train=cfg.train, sampler=cfg.sampler)


def _plot(x, ref, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .io import save_figure
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, pts, name in ((axes[0], ref, "ground truth"), (axes[1], x, title)):
        p = pts[:4096].double().numpy()
        ax.scatter(p[:, 0], p[:, 1], s=0.5, alpha=0.5)
        ax.set_title(name)
        ax.set_aspect("equal")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def start_run(cfg: TrainRunConfig, out: str) -> None:
    """Create the run folder with its config.toml (after validation: a rejected config creates nothing)."""
    if os.path.exists(os.path.join(out, "config.toml")):
        raise ValueError(f"--out={out!r} already holds a run; continue it with `gendiff train --resume {out}`")
    os.makedirs(out, exist_ok=True)
    save_text(to_toml(cfg), os.path.join(out, "config.toml"))
    save_json(to_dict(cfg), os.path.join(out, "config.json"))


def resume_config(out: str, option: str = "--resume") -> TrainRunConfig:
    path = os.path.join(out, "config.toml")
    if not os.path.exists(path):
        raise ValueError(f"{option}={out!r} is not a run folder (no config.toml)")
    return resolve(toml_path=path)


def load_run(out: str, weights: str = "model.safetensors"):
    """(config, EMA model) of a finished run folder; the weights (a file in the folder: the final EMA, or a
    post-hoc EMA of `gendiff posthoc-ema`) load through safetensors only."""
    from safetensors.torch import load_file
    from .ablate import RUNS, make_denoiser
    cfg = resume_config(out, "run")
    path = os.path.join(out, weights)
    if not os.path.exists(path):
        raise ValueError(f"run {out!r} has no {weights} (unfinished? `gendiff train --resume {out}`; a post-hoc "
                         "EMA: `gendiff posthoc-ema`)")
    model = make_denoiser(RUNS[cfg.run], _ablate_view(cfg))
    model.load_state_dict(load_file(path))
    return cfg, model.eval().requires_grad_(False)


def evaluate_run(out: str, *, sampler: str = "heun", steps: int = 32, samples: int = 4096, seed: int = 0,
                 score_mode: str = "tweedie", save_samples: bool = False, weights: str = "model.safetensors") -> dict:
    """Sample the run's model with any σ-grid sampler from exact p(x; σ_max) and measure the samples against
    the tree's ground truth; writes RUN/eval-<sampler>-<steps>-<score_mode>.json (and .npz of the samples)."""
    import numpy as np
    from .checks import check_choice, check_positive
    from .data.toy import tree
    from .evaluate import Evaluator
    from .io import generator
    from .samplers import GRID_SAMPLERS, edm_sigmas
    from .schedules import LogNormalSigma
    from .scores import with_score_mode
    check_choice("sampler", sampler, GRID_SAMPLERS)
    check_positive("steps", steps, integer=True)
    check_positive("samples", samples, integer=True)
    cfg, model = load_run(out, weights)
    den = with_score_mode(model, score_mode)
    ev = Evaluator(tree(cfg.classes), seed=seed, samples=samples, eval_points=256,
                   sigma_density=LogNormalSigma(cfg.train.p_mean, cfg.train.p_std), sampler=cfg.sampler)
    calls = [0]

    def counted(x, s):
        calls[0] += 1
        return den(x, s)
    counted.predict = getattr(den, "predict", None)
    grid = edm_sigmas(steps, cfg.sampler.sigma_min, cfg.sampler.sigma_max, cfg.sampler.rho)
    start = time.perf_counter()
    with torch.no_grad():
        x = GRID_SAMPLERS[sampler](counted, ev.x_init, grid, generator=generator(seed, "eval-sampler"))
    m = {"sampler": sampler, "steps": steps, "score_mode": score_mode, "nfe": calls[0], "seed": seed,
         "seconds": time.perf_counter() - start, **ev.sample_metrics(x)}
    name = f"eval-{sampler}-{steps}-{score_mode}" + ("" if weights == "model.safetensors" else
                                                       "-" + os.path.splitext(weights)[0])
    save_json(m, os.path.join(out, name + ".json"))
    if save_samples:
        from .io import atomic_path
        with atomic_path(os.path.join(out, name + ".npz")) as tmp, open(tmp, "wb") as f:
            np.savez(f, samples=x.detach().numpy())
    return m


def likelihood_run(out: str, *, points: int = 512, method: str = "exact", seed: int = 0) -> dict:
    """Bits/dim of held-out ground-truth points: PF-ODE (T31) next to the continuous ELBO (VP over the same σ
    range) and the exact −log p(x; σ_min) of the tree; writes RUN/likelihood.json."""
    import math
    from .checks import check_positive
    from .data.toy import tree
    from .io import generator
    from .likelihood import continuous_elbo, log_likelihood
    from .process import VP
    check_positive("points", points, integer=True)
    cfg, model = load_run(out)
    gt = tree(cfg.classes)
    x = gt.sample(points, generator=generator(seed, "likelihood-points"))[0]
    s_min, s_max = cfg.sampler.sigma_min, 80.0
    d = x.shape[1]
    start = time.perf_counter()
    logp, info = log_likelihood(model, x, sigma_min=s_min, sigma_max=s_max, method=method,
                                generator=generator(seed, "hutchinson"))
    ode_s = time.perf_counter() - start
    elbo = torch.stack([continuous_elbo(model, x, VP(-2 * math.log(s_max), -2 * math.log(s_min)),
                                        generator=torch.Generator().manual_seed(i))["total"] for i in range(8)])
    bpd = lambda nats: float(nats) / (d * math.log(2))  # noqa: E731
    m = {"points": points, "method": method, "sigma_min": s_min, "sigma_max": s_max,
         "pf_ode_bpd": bpd(-logp.mean()), "pf_ode_nfe": info["nfe"], "pf_ode_seconds": ode_s,
         "elbo_bpd": bpd(elbo.mean()), "exact_bpd": bpd(-gt.logp(x.double(), s_min).mean())}
    save_json(m, os.path.join(out, "likelihood.json"))
    return m


def posthoc_run(out: str, sigma_rel: float, step: int | None = None) -> str:
    """EDM2's post-hoc EMA of a run trained with `train.ema_posthoc`: the σ_rel EMA at `step` (default the last
    snapshot) reconstructed from the run's posthoc/ snapshots; written to RUN/model-posthoc-<σ_rel>.safetensors.
    Returns the file name (for `gendiff eval RUN --weights NAME`)."""
    from .ema import load_posthoc, posthoc_ema
    resume_config(out, "run")
    snaps = load_posthoc(os.path.join(out, "posthoc"), step)
    if not snaps:
        raise ValueError(f"run {out!r} has no post-hoc EMA snapshots" + (f" up to step {step}" if step else "")
                         + "; train with --set 'train.ema_posthoc=[0.05, 0.1]'")
    target = step or max(s[0] for s in snaps)
    name = f"model-posthoc-{sigma_rel:.3f}-{target}.safetensors"
    save_state(posthoc_ema(snaps, target, sigma_rel), os.path.join(out, name))
    return name
