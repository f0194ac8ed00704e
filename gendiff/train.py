"""Training loop for the toy (THEORY §10): Adam, inverse-sqrt lr decay, EMA, safetensors snapshots.

Noise levels come from a density object (schedules.py, `ln σ ~ N(P_mean, P_std²)` by default), batches
from the exact mixture in one of three modes, the loss is any callable `loss(denoiser, batch) -> [N]`.
"""
from __future__ import annotations

import contextlib
import copy
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checkpoint as ckpt
from .checks import as_sigma, check_choice, check_positive
from .data.toy import EXACT_MODES, GaussianMixture
from .ema import power_ema_decay, power_ema_gamma
from .io import generator, save_state
from .losses import NoisyBatch
from .schedules import LogNormalSigma, inverse_sqrt_lr

PRECISIONS = ("fp32", "bf16")
MODES = EXACT_MODES  # point | source | point-cov, each with its exact optimum (GaussianMixture.denoiser)


@dataclass
class TrainConfig:
    """The optimisation recipe of any run (toy or images): Adam with inverse-√ lr decay, EMA, the default
    training density ln σ ~ N(p_mean, p_std²), snapshots, fault limits, precision, compile."""
    iterations: int = 4096
    batch: int = 4096
    lr: float = 1e-2
    lr_ref_iter: int = 512          # lr·1/√max(i/lr_ref_iter, 1)
    betas: tuple = (0.9, 0.99)
    p_mean: float = -2.4            # ln σ ~ N(p_mean, p_std²)
    p_std: float = 1.5
    sigma_data: float = 0.5
    ema: float = 0.99               # classic EMA decay (ema_sigma_rel = 0)
    ema_sigma_rel: float = 0.0      # > 0: EDM2's power-function EMA with this relative std (replaces `ema`)
    snapshot_every: int = 256
    max_bad_steps: int = 8          # consecutive non-finite losses/gradients skipped before the run stops
    precision: str = "fp32"         # fp32 | bf16 (autocast of the forward pass; the loss math stays float32)
    compile: bool = False           # torch.compile the backbone for training (BENCHMARKS: no gain on this CPU)
    ema_posthoc: tuple = field(default=(), metadata={"variable_length": True, "item": 0.0})
                                    # σ_rel of power EMAs whose snapshots (every snapshot_every steps) allow a
                                    # post-hoc EMA of any σ_rel (EDM2; ema.posthoc_ema), e.g. [0.05, 0.1]

    _positive_ints = ("iterations", "batch", "lr_ref_iter", "snapshot_every", "max_bad_steps")

    def validate(self):
        for name in self._positive_ints:
            check_positive(name, getattr(self, name), integer=True)
        for name in ("lr", "p_std", "sigma_data"):
            check_positive(name, getattr(self, name))
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema={self.ema} must be in [0, 1)")
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile={self.compile!r} must be true or false")
        check_positive("ema_sigma_rel", self.ema_sigma_rel, allow_zero=True)
        for v in (self.ema_sigma_rel or None, *self.ema_posthoc):
            if v is not None:
                power_ema_gamma(v)
        return self


@dataclass
class ToyTrainConfig(TrainConfig):
    """TrainConfig plus the toy MLP's size (THEORY §10: the seed's five linear layers of width 64)."""
    width: int = 64
    hidden_layers: int = 4

    _positive_ints = TrainConfig._positive_ints + ("width", "hidden_layers")


class BatchSource:
    """Draws noisy batches from the exact mixture.

    point:     x0 ~ p, x̃ = x0 + σε (T7/T9).
    source:    x0 = m_k with k ~ φ, Σ_src = Σ_k, x̃ = m_k + Σ_k^½ε₁ + σε₂ (T3/T12).
    point-cov: x0 ~ p as in point mode, plus Σ_src = Σ_k of the sample's component: the seed's
               training.py (`new_method`), whose trace term then counts Σ_k a second time.
    need_score adds the exact ∇ log p(x̃; σ) for score matching (§10).
    """

    def __init__(self, mixture: GaussianMixture, mode: str, need_score: bool = False):
        check_choice("mode", mode, MODES)
        self.mixture, self.mode, self.need_score = mixture, mode, need_score
        self.means = mixture.means64.float()
        self.covs = mixture.covs64.float()
        self.chol = torch.linalg.cholesky(mixture.covs64).float()

    def draw(self, n: int, sigma: torch.Tensor, generator=None) -> NoisyBatch:
        k = self.mixture.sample_components(n, generator)
        e1 = torch.randn(n, self.mixture.dim, generator=generator)
        e2 = torch.randn(n, self.mixture.dim, generator=generator)
        sample = self.means[k] + (self.chol[k] @ e1[:, :, None]).squeeze(-1)
        x_noisy = sample + sigma[:, None] * e2
        x0 = self.means[k] if self.mode == "source" else sample
        batch = NoisyBatch(x0, x_noisy, sigma, source_cov=None if self.mode == "point" else self.covs[k])
        if self.need_score:
            batch.score = self.mixture.score(x_noisy, sigma)
        return batch


class DataSource:
    """Draws noisy batches from a fixed dataset: x0 from `data` [M, ...] (images scaled to [−1, 1], or any
    points) in epoch order, x̃ = x0 + σε (T2, VE space; any process reads its latent from σ̃, T1).

    The order is a fresh permutation from the training generator at every epoch; the permutation and the
    position in it are this source's state (`state_dict`), checkpointed by `train`, so a resumed run sees
    the same examples. labels: [M] class indices < num_classes; with `label_dropout` p each drawn label
    becomes the null class ∅ = num_classes with probability p (classifier-free guidance training, T33).
    The data is checked here, before any training: empty, non-finite or ill-shaped data is a ValueError.
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int = 0,
                 label_dropout: float = 0.0, shape: tuple | None = None, name: str = "data", device=None):
        check_data(data, labels, num_classes, shape, name)
        if isinstance(label_dropout, bool) or not isinstance(label_dropout, (int, float)) \
                or not 0 <= label_dropout < 1:
            raise ValueError(f"label_dropout={label_dropout!r} must be a number in [0, 1)")
        if label_dropout and labels is None:
            raise ValueError(f"label_dropout={label_dropout} needs labelled data; {name} has no labels")
        # random draws use the (CPU) training generator; batches live on `device` (the data's by default)
        self.device = torch.device(device) if device is not None else data.device
        self.data, self.num_classes, self.label_dropout = data.float().to(self.device), num_classes, \
            float(label_dropout)
        self.labels = None if labels is None else labels.long().to(self.device)
        self.perm, self.pos = torch.zeros(0, dtype=torch.long), 0

    def _indices(self, n: int, generator) -> torch.Tensor:
        parts = []
        while n > 0:
            if self.pos == len(self.perm):
                self.perm, self.pos = torch.randperm(len(self.data), generator=generator), 0
            take = min(n, len(self.perm) - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos, n = self.pos + take, n - take
        return torch.cat(parts)

    def draw(self, n: int, sigma: torch.Tensor, generator=None) -> NoisyBatch:
        dev = self.device
        idx = self._indices(n, generator).to(dev)
        x0, sigma = self.data[idx], torch.as_tensor(sigma).to(dev)
        x_noisy = x0 + as_sigma(sigma, x0) * torch.randn(x0.shape, generator=generator).to(dev)
        labels = None
        if self.labels is not None:
            labels = self.labels[idx]
            if self.label_dropout:
                labels = torch.where(torch.rand(n, generator=generator).to(dev) < self.label_dropout,
                                     self.num_classes, labels)
        return NoisyBatch(x0, x_noisy, sigma, labels=labels)

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": torch.tensor([self.pos])}

    def load_state_dict(self, state: dict):
        self.perm, self.pos = state["perm"].long(), int(state["pos"][0])


def check_data(data, labels=None, num_classes: int = 0, shape: tuple | None = None, name: str = "data"):
    """Training data as a model can take it, or a ValueError naming what is wrong (before any training)."""
    if not torch.is_tensor(data) or data.ndim < 2:
        raise ValueError(f"{name} must be a tensor [N, ...] of examples; got "
                         f"{type(data).__name__ if not torch.is_tensor(data) else tuple(data.shape)}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty (0 examples); allowed: at least one example")
    if shape is not None and tuple(data.shape[1:]) != tuple(shape):
        raise ValueError(f"{name} has examples of shape {tuple(data.shape[1:])}; the model takes {tuple(shape)}")
    if not data.is_floating_point():
        raise ValueError(f"{name} has dtype {data.dtype}; allowed: floating point (images scaled to [-1, 1])")
    bad = ~torch.isfinite(data.flatten(1)).all(1)
    if bad.any():
        raise ValueError(f"{name} holds {int(bad.sum())} examples with NaN or Inf values (first: example "
                         f"{int(bad.nonzero()[0])}); allowed: finite values only")
    if labels is None:
        if num_classes:
            raise ValueError(f"num_classes={num_classes} but {name} has no labels")
        return
    if not torch.is_tensor(labels) or labels.shape != (len(data),) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor [{len(data)}] (one class per example); got "
                         f"{tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__}")
    check_positive("num_classes", num_classes, integer=True)
    out = (labels < 0) | (labels >= num_classes)
    if out.any():
        raise ValueError(f"labels hold {int(labels[out][0])}, out of range; allowed: 0 … {num_classes - 1} "
                         f"(num_classes={num_classes})")


@dataclass
class TrainResult:
    ema: torch.nn.Module
    snapshots: dict = field(default_factory=dict)   # iteration -> EMA state_dict
    losses: list = field(default_factory=list)      # per-iteration mean loss
    loss_vars: list = field(default_factory=list)   # per-iteration variance of the per-example loss (T17/T20)
    lrs: list = field(default_factory=list)         # per-iteration learning rate, as the optimiser used it
    seconds: float = 0.0
    bad_steps: int = 0                              # non-finite steps skipped (loss or gradient)
    resumed_from: int = 0                           # the checkpoint step this call started from (0: fresh)

    @property
    def it_per_s(self) -> float:
        return len(self.losses) / self.seconds if self.seconds else float("nan")


def train(denoiser: torch.nn.Module, loss_fn, source, cfg: TrainConfig, *, seed: int = 0,
          snapshot_dir: str | None = None, keep_snapshots=(), progress: bool = True,
          desc: str = "train", sigma_density=None, checkpoint_dir: str | None = None,
          checkpoint_every: int = 0, keep_checkpoints: int = 3, step_callback=None,
          posthoc_dir: str | None = None) -> TrainResult:
    """Train `denoiser` in place; returns its EMA and the EMA snapshots at `keep_snapshots` iterations.

    Same seed ⇒ identical weights: initialisation uses torch.manual_seed(seed) (set by the caller
    when it builds the model) and data a dedicated generator seeded from `seed`.
    sigma_density: any object with `sample(n, generator) -> σ [n]`; default `LogNormalSigma(p_mean, p_std)`.
    One with `update(σ, ‖ε̂ − ε‖²)` (AdaptiveSchedule, T20) is refitted after every step from `loss_fn.last`;
    one with `parameters()` (LearnedDensity, T22) is trained jointly: the denoiser on the loss' mean, the
    density's parameters on its second moment (the estimator's variance when the mean is shape-free), by
    a second Adam with the same learning-rate schedule.

    Checkpoints (`checkpoint.py`): with `checkpoint_dir`, the newest good checkpoint there is resumed (model,
    EMA, optimisers, data generator, global RNG, the density's state, kept snapshots, step) and a new one is
    written every `checkpoint_every` steps, at the end, on Ctrl-C (then KeyboardInterrupt propagates) and
    before a stop for non-finite steps: a run killed at any step and resumed ends bit for bit where the
    uninterrupted run ends (CPU). The per-step `losses`/`loss_vars` cover the steps this call ran.
    A non-finite loss or gradient skips the step (no update, counted in `bad_steps`); `cfg.max_bad_steps` in a
    row stop the run with FloatingPointError. step_callback(done, result) runs after every finished step.
    With `cfg.ema_posthoc`, one power EMA per σ_rel is kept too and written to `posthoc_dir` every
    `snapshot_every` steps (`ema.load_posthoc` / `ema.posthoc_ema` reconstruct any σ_rel afterwards, EDM2).
    """
    cfg.validate()
    density = LogNormalSigma(cfg.p_mean, cfg.p_std) if sigma_density is None else sigma_density
    gen = generator(seed, "train-data")
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    eta = list(density.parameters()) if hasattr(density, "parameters") else []
    opts = [torch.optim.Adam(denoiser.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))] + ([torch.optim.Adam(eta, lr=cfg.lr, betas=tuple(cfg.betas))] if eta else [])
    result = TrainResult(ema=ema)
    if snapshot_dir is not None:
        os.makedirs(snapshot_dir, exist_ok=True)
    world = _World()
    if world.size > 1:
        if cfg.batch % world.size:
            raise ValueError(f"batch={cfg.batch} must be divisible by the world size {world.size} (torchrun processes)")
        if hasattr(density, "update") or eta:
            raise ValueError(f"{density!r} learns from the loss during training; with {world.size} processes it "
                             "would see one shard only: not supported, train it in one process")
    gammas = [power_ema_gamma(v) for v in cfg.ema_posthoc]
    posthoc = [copy.deepcopy(ema) for _ in gammas]
    main_gamma = power_ema_gamma(cfg.ema_sigma_rel) if cfg.ema_sigma_rel else None
    emas = [(ema, (lambda t: cfg.ema) if main_gamma is None else (lambda t: power_ema_decay(t, main_gamma)))]
    emas += [(m, (lambda t, g=g: power_ema_decay(t, g))) for m, g in zip(posthoc, gammas)]
    state = _TrainState(denoiser, ema, opts, gen, density, result, source, posthoc)
    first = state.restore(checkpoint_dir) if checkpoint_dir is not None else 0
    result.resumed_from = first
    writes = checkpoint_dir is not None and world.rank == 0            # rank 0 writes, every rank resumes
    save = (lambda step: state.save(checkpoint_dir, step, keep_checkpoints)) if writes else (lambda step: None)
    # the compiled view shares the parameters; state dicts, EMA and checkpoints read the plain module
    step = _Step(cfg, loss_fn, _compiled(denoiser) if cfg.compile else denoiser, eta, emas, desc, save, world, state)
    bar = _progress(cfg.iterations - first, desc, progress)
    start = time.perf_counter()
    bad_in_row = 0
    with _graceful_interrupt(checkpoint_dir is not None) as interrupted:
        for i in range(first, cfg.iterations):
            bad_in_row = step(i, bad_in_row)
            done = i + 1
            if done % cfg.snapshot_every == 0 or done in keep_snapshots:
                snap = {k: v.detach().clone() for k, v in ema.state_dict().items()}
                if done in keep_snapshots:
                    result.snapshots[done] = snap
                if snapshot_dir is not None and done % cfg.snapshot_every == 0:
                    save_state(snap, os.path.join(snapshot_dir, f"ema-{done:06d}.safetensors"))
            if posthoc and posthoc_dir is not None and world.rank == 0 and done % cfg.snapshot_every == 0:
                save_posthoc(posthoc_dir, done, cfg.ema_posthoc, gammas, posthoc)
            if checkpoint_every and done % checkpoint_every == 0 and done < cfg.iterations:
                save(done)
            if step_callback is not None:
                step_callback(done, result)
            bar.update(1)
            if done % 64 == 0 and result.losses:
                bar.set_postfix(loss=f"{np.mean(result.losses[-64:]):.4f}")
            if world.any(interrupted()):  # Ctrl-C on any rank: finish the step, checkpoint it, then stop
                save(done)
                bar.close()
                raise KeyboardInterrupt(f"{desc}: interrupted; checkpoint at step {done} in {checkpoint_dir}")
    if posthoc and posthoc_dir is not None and world.rank == 0 and cfg.iterations % cfg.snapshot_every:
        save_posthoc(posthoc_dir, cfg.iterations, cfg.ema_posthoc, gammas, posthoc)   # the last step too
    save(cfg.iterations)
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


class _Step:
    """One training step (`__call__(i, bad_in_row)` returns the count of consecutive non-finite steps) over the
    run's state. With several processes every rank draws the same global batch (same generator) and trains on
    its contiguous shard; gradients are averaged by all-reduce, so the update equals one process's on the whole
    batch (to float rounding)."""

    def __init__(self, cfg, loss_fn, model, eta, emas, desc, save, world, state):
        self.cfg, self.loss_fn, self.model, self.eta, self.emas = cfg, loss_fn, model, eta, emas
        self.desc, self.save, self.world, self.s = desc, save, world, state

    def __call__(self, i: int, bad_in_row: int) -> int:
        cfg, s = self.cfg, self.s
        for group in (g for o in s.opts for g in o.param_groups):
            group["lr"] = inverse_sqrt_lr(cfg.lr, i, cfg.lr_ref_iter)
        sigma = s.density.sample(cfg.batch, s.gen)
        batch = self.world.shard(s.source.draw(cfg.batch, sigma, s.gen))
        with torch.autocast("cpu" if batch.x0.device.type == "cpu" else batch.x0.device.type, dtype=torch.bfloat16,
                            enabled=cfg.precision == "bf16"):
            per_example = self.loss_fn(self.model, batch).float()
        loss = per_example.mean()
        for o in s.opts:
            o.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            backward(per_example, list(self.model.parameters()), self.eta)
            finite = all(p.grad is None or bool(torch.isfinite(p.grad).all())
                         for o in s.opts for g in o.param_groups for p in g["params"])
        finite, loss = self.world.reduce(s.opts, finite, loss)
        result = s.result
        if not finite:
            result.bad_steps += 1
            if bad_in_row + 1 >= cfg.max_bad_steps:
                self.save(i + 1)   # step i's data was drawn and counted: a resume goes on with step i + 1
                raise FloatingPointError(
                    f"{self.desc}: {bad_in_row + 1} non-finite steps in a row (loss {loss.item()}) at iteration "
                    f"{i}; stopped (max_bad_steps={cfg.max_bad_steps}); lower the learning rate (--lr)")
            return bad_in_row + 1
        result.lrs.append(s.opts[0].param_groups[0]["lr"])
        if hasattr(s.density, "update") and getattr(self.loss_fn, "last", None) is not None:
            s.density.update(*self.loss_fn.last)  # an adaptive p(λ) learns from the per-λ loss (T20)
        for o in s.opts:
            o.step()
        with torch.no_grad():
            for ema, decay in self.emas:          # the EMA, then any post-hoc power EMAs (EDM2)
                d = decay(i + 1)
                for p_ema, p in zip(ema.parameters(), s.denoiser.parameters()):
                    p_ema.lerp_(p, 1 - d)
        result.losses.append(loss.item())
        result.loss_vars.append(per_example.detach().var().item() if per_example.numel() > 1 else 0.0)
        return 0


def save_posthoc(folder: str, step: int, sigma_rels, gammas, emas) -> None:
    """posthoc-<k>-<step>.safetensors: power EMA k at `step`, with step, γ and σ_rel in its metadata."""
    os.makedirs(folder, exist_ok=True)
    for k, (sr, g, m) in enumerate(zip(sigma_rels, gammas, emas)):
        save_state(m.state_dict(), os.path.join(folder, f"posthoc-{k}-{step:08d}.safetensors"),
                   metadata={"step": str(step), "gamma": repr(g), "sigma_rel": repr(sr)})


def _compiled(denoiser):
    """The denoiser with a torch.compile'd backbone sharing its parameters (a `Denoiser`; state dicts, EMA and
    checkpoints keep reading the plain module)."""
    from .precond import Denoiser
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"compile=true needs a precond.Denoiser around a backbone; got {type(denoiser).__name__}")
    return Denoiser(torch.compile(denoiser.net), denoiser.precond, denoiser.head)


def backward(per_example: torch.Tensor, params: list, eta: list = ()) -> None:
    """Gradients of one step: `params` (the denoiser) get ∇ mean(L); `eta` (a learned density's parameters,
    T22) get ∇ mean(L²), the estimator's second moment, whose shape-gradient is the variance's."""
    if eta:
        for p, g in zip(eta, torch.autograd.grad(per_example.square().mean(), eta, retain_graph=True)):
            p.grad = g
    per_example.mean().backward(inputs=params)


class _World:
    """This process's place in a torch.distributed run (torchrun: gloo on CPU, NCCL on GPU); size 1 without."""

    def __init__(self):
        import torch.distributed as dist
        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.size = self.dist.get_world_size() if self.dist else 1
        self.rank = self.dist.get_rank() if self.dist else 0

    def shard(self, batch: NoisyBatch) -> NoisyBatch:
        if self.size == 1:
            return batch
        n = len(batch.x0) // self.size
        part = slice(self.rank * n, (self.rank + 1) * n)
        cut = lambda v: v[part] if torch.is_tensor(v) and v.ndim > 0 else v  # noqa: E731
        return NoisyBatch(cut(batch.x0), cut(batch.x_noisy), cut(batch.sigma), cut(batch.source_cov),
                          cut(batch.score), cut(batch.labels))

    def any(self, flag: bool) -> bool:
        """True on every rank if it is on some rank (so all ranks stop at the same step)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        self.dist.all_reduce(t)
        return t.item() > 0

    def reduce(self, opts, finite: bool, loss: torch.Tensor):
        """Average gradients and the loss over ranks; a step is finite only if it is on every rank."""
        if self.size == 1:
            return finite, loss
        flag = torch.tensor([1.0 if finite else 0.0, loss.item() if finite else 0.0])
        self.dist.all_reduce(flag)
        finite = flag[0].item() == self.size
        if finite:
            for p in (p for o in opts for g in o.param_groups for p in g["params"] if p.grad is not None):
                self.dist.all_reduce(p.grad)
                p.grad /= self.size
        return finite, torch.tensor(flag[1].item() / self.size) if finite else loss


@contextlib.contextmanager
def _graceful_interrupt(enabled: bool):
    """While training with checkpoints, SIGINT sets a flag that the loop checks between steps (so the
    checkpoint is of a finished step); elsewhere, or off the main thread, Ctrl-C behaves as usual."""
    flag = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.append(signum))
    try:
        yield lambda: bool(flag)
    finally:
        signal.signal(signal.SIGINT, previous)


class _TrainState:
    """Everything `train` must restore to continue bit for bit, as flat tensors + JSON (checkpoint.py)."""

    def __init__(self, denoiser, ema, opts, gen, density, result, source=None, posthoc=()):
        self.denoiser, self.ema, self.opts, self.gen, self.density, self.result, self.source = \
            denoiser, ema, opts, gen, density, result, source
        self.posthoc = list(posthoc)

    def tensors(self):
        t = {f"model.{k}": v for k, v in self.denoiser.state_dict().items()}
        t.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for j, m in enumerate(self.posthoc):
            t.update({f"posthoc{j}.{k}": v for k, v in m.state_dict().items()})
        meta = {"optimizers": []}
        for j, o in enumerate(self.opts):
            ot, om = ckpt.optimizer_to_flat(o, f"opt{j}")
            t.update(ot)
            meta["optimizers"].append(om)
        t["rng.data"] = self.gen.get_state()
        t["rng.torch"] = torch.get_rng_state()
        if hasattr(self.density, "state_dict"):
            t.update({f"density.{k}": v for k, v in self.density.state_dict().items()})
        if hasattr(self.source, "state_dict"):   # the data order (DataSource)
            t.update({f"source.{k}": v for k, v in self.source.state_dict().items()})
        for it, snap in self.result.snapshots.items():
            t.update({f"snapshot.{it}.{k}": v for k, v in snap.items()})
        meta["snapshots"] = sorted(self.result.snapshots)
        meta["bad_steps"] = self.result.bad_steps
        return t, meta

    def save(self, folder, step, keep):
        t, meta = self.tensors()
        ckpt.save(folder, step, {k: v.detach().cpu() for k, v in t.items()}, meta, keep)   # GPU runs: host copies

    def restore(self, folder) -> int:
        found = ckpt.latest(folder)
        if found is None:
            return 0
        step, t, meta = found
        part = lambda prefix: {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}  # noqa: E731
        self.denoiser.load_state_dict(part("model."))
        self.ema.load_state_dict(part("ema."))
        for j, m in enumerate(self.posthoc):
            m.load_state_dict(part(f"posthoc{j}."))
        for j, (o, om) in enumerate(zip(self.opts, meta["optimizers"])):
            ckpt.optimizer_from_flat(o, f"opt{j}", t, om)
        self.gen.set_state(t["rng.data"])
        torch.set_rng_state(t["rng.torch"])
        if hasattr(self.density, "load_state_dict"):
            self.density.load_state_dict(part("density."))
        if hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(part("source."))
        for it in meta.get("snapshots", []):
            self.result.snapshots[int(it)] = part(f"snapshot.{it}.")
        self.result.bad_steps = meta.get("bad_steps", 0)
        return step


class _PlainProgress:
    """Progress as plain lines (about ten per run) when stderr is not a terminal: logs stay readable."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.every, self.start = max(1, total // 10), time.perf_counter()

    def update(self, k: int = 1):
        self.n += k
        if self.n % self.every == 0 or self.n == self.total:
            rate = self.n / max(time.perf_counter() - self.start, 1e-9)
            eta = (self.total - self.n) / rate
            print(f"{self.desc}: {self.n}/{self.total} steps, {rate:.1f} it/s, ETA {eta:.0f} s {self.postfix}",
                  file=sys.stderr, flush=True)

    def set_postfix(self, **kw):
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    """tqdm (with ETA) on a terminal, plain periodic lines otherwise, nothing when disabled."""
    from tqdm.auto import tqdm
    if enabled and not sys.stderr.isatty():
        return _PlainProgress(total, desc)
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, mininterval=0.5)
