"""The training loop (THEORY §10), for any model, loss and batch source: Adam with inverse-√ lr decay, EMAs,
snapshots, checkpoints with exact resume, non-finite step skipping, bf16 autocast, torchrun data parallelism.

Noise levels come from a density object (schedules.py, `ln σ ~ N(P_mean, P_std²)` by default), batches from a
source with `draw(n, σ, generator) -> NoisyBatch` (data/sources.py), the loss is any callable
`loss(denoiser, batch) -> [N]`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from . import checkpoint as ckpt
from .checks import check_choice, check_positive
from .ema import EMA, PowerEMA, power_ema_gamma, save_posthoc
from .io import generator, save_state
from .losses import NoisyBatch
from .precond import Denoiser
from .schedules import LogNormalSigma, inverse_sqrt_lr

PRECISIONS = ("fp32", "bf16")


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
    sigma_data: float = 0.5         # σ_d of the EDM preconditioning (T4); image runs: 0 = measure it
    ema: float = 0.99               # classic EMA decay (ema_sigma_rel = 0)
    ema_sigma_rel: float = 0.0      # > 0: EDM2's power-function EMA with this relative std (replaces `ema`)
    snapshot_every: int = 256
    max_bad_steps: int = 8         # consecutive non-finite losses/gradients skipped before the run stops
    precision: str = "fp32"        # fp32 | bf16 (autocast of the forward pass; the loss math stays float32)
    compile: bool = False          # torch.compile the backbone for training (BENCHMARKS: no gain on this CPU)
    ema_posthoc: tuple = field(default=(), metadata={"variable_length": True, "item": 0.0})
                                    # σ_rel of power EMAs whose snapshots (every snapshot_every steps) allow a
                                    # post-hoc EMA of any σ_rel (EDM2; ema.posthoc_ema), e.g. [0.05, 0.1]

    def validate(self):
        for name in ("iterations", "batch", "lr_ref_iter", "snapshot_every", "max_bad_steps"):
            check_positive(name, getattr(self, name), integer=True)
        for name in ("lr", "p_std"):
            check_positive(name, getattr(self, name))
        self._check_sigma_data()
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

    def _check_sigma_data(self) -> None:
        check_positive("sigma_data", self.sigma_data)


@dataclass
class TrainResult:
    ema: torch.nn.Module                            # the main EMA's averaged model
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

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the result: the kept snapshots and the count of skipped steps (the
        per-step lists cover the steps one call ran)."""
        state = {f"snapshot.{it}.{k}": v for it, snap in self.snapshots.items() for k, v in snap.items()}
        return {**state, "snapshots": sorted(self.snapshots), "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict) -> None:
        for it in state.get("snapshots", []):
            prefix = f"snapshot.{it}."
            self.snapshots[int(it)] = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        self.bad_steps = state.get("bad_steps", 0)


@dataclass
class Outputs:
    """What a run keeps beyond its TrainResult; every part is off by default."""
    # resumed from when it holds a checkpoint; written every checkpoint_every steps
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0           # steps (0: only at the end, on Ctrl-C and before a non-finite stop)
    keep_checkpoints: int = 3           # newest checkpoints kept
    snapshot_dir: str | None = None     # ema-<step>.safetensors every cfg.snapshot_every steps
    keep_snapshots: tuple = ()          # steps whose EMA state dict goes into TrainResult.snapshots
    posthoc_dir: str | None = None      # the power EMAs of cfg.ema_posthoc every cfg.snapshot_every steps


def train(denoiser: torch.nn.Module, loss_fn, source, cfg: TrainConfig, *, seed: int = 0, sigma_density=None,
          outputs: Outputs | None = None, callbacks=(), progress: bool = True,
          desc: str = "train") -> TrainResult:
    """Train `denoiser` in place on batches from `source`; returns its EMA, the kept snapshots and per-step
    stats.

    Same seed ⇒ identical weights: initialisation uses torch.manual_seed(seed) (set by the caller
    when it builds the model) and data a dedicated generator seeded from `seed`.
    sigma_density: any object with `sample(n, generator) -> σ [n]`; default `LogNormalSigma(p_mean, p_std)`.
    One with `update(σ, ‖ε̂ − ε‖²)` (AdaptiveSchedule, T20) is refitted after every step from `loss_fn.last`;
    one with `parameters()` (LearnedDensity, T22) is trained jointly: the denoiser on the loss' mean, the
    density's parameters on its second moment (the estimator's variance when the mean is shape-free), by
    a second Adam with the same learning-rate schedule.
    outputs: checkpoints, snapshots and post-hoc EMA snapshots (Outputs); none by default.
    callbacks: each `callback(done, result)` runs after every finished step.

    Checkpoints (`checkpoint.py`): with `outputs.checkpoint_dir`, the newest good checkpoint there is resumed
    (the state objects of `_state_objects`: model, EMAs, optimisers, RNGs, the density's and the source's
    state, kept snapshots) and a new one is written every `checkpoint_every` steps, at the end, on Ctrl-C
    (then KeyboardInterrupt propagates) and before a stop for non-finite steps: a run killed at any step and
    resumed ends bit for bit where the uninterrupted run ends (CPU). The per-step `losses`/`loss_vars` cover
    the steps this call ran. A non-finite loss or gradient skips the step (no update, counted in `bad_steps`);
    `cfg.max_bad_steps` in a row stop the run with FloatingPointError.
    The EMA is `EMA(cfg.ema)`, or `PowerEMA(cfg.ema_sigma_rel)` when that is > 0; with `cfg.ema_posthoc`, one
    PowerEMA per σ_rel is kept too and written to `outputs.posthoc_dir` every `snapshot_every` steps
    (`ema.load_posthoc` / `ema.posthoc_ema` reconstruct any σ_rel afterwards, EDM2).
    """
    cfg.validate()
    out = outputs or Outputs()
    density = LogNormalSigma(cfg.p_mean, cfg.p_std) if sigma_density is None else sigma_density
    gen = generator(seed, "train-data")
    ema = PowerEMA(denoiser, cfg.ema_sigma_rel) if cfg.ema_sigma_rel else EMA(denoiser, cfg.ema)
    posthoc = [PowerEMA(denoiser, sigma_rel) for sigma_rel in cfg.ema_posthoc]
    emas = [ema, *posthoc]
    eta = _learned_parameters(density)
    opts = [torch.optim.Adam(denoiser.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), foreach=True)] + \
        ([torch.optim.Adam(eta, lr=cfg.lr, betas=tuple(cfg.betas))] if eta else [])
    result = TrainResult(ema=ema.module)
    if out.snapshot_dir is not None:
        os.makedirs(out.snapshot_dir, exist_ok=True)
    world = _World()
    if world.size > 1:
        if cfg.batch % world.size:
            raise ValueError(f"batch={cfg.batch} must be divisible by the world size {world.size} (torchrun "
                             "processes)")
        if hasattr(density, "update") or eta:
            raise ValueError(f"{density!r} learns from the loss during training; with {world.size} processes "
                             "it would see one shard only: not supported, train it in one process")
    state = _state_objects(denoiser, emas, opts, gen, density, source, result)
    first = ckpt.load_objects(out.checkpoint_dir, state) if out.checkpoint_dir is not None else 0
    result.resumed_from = first
    writes = out.checkpoint_dir is not None and world.rank == 0        # rank 0 writes, every rank resumes

    def save(step):
        if writes:
            ckpt.save_objects(out.checkpoint_dir, step, state, out.keep_checkpoints)

    def save_power_emas(step):
        if posthoc and out.posthoc_dir is not None and world.rank == 0:
            save_posthoc(out.posthoc_dir, step, posthoc)

    # the compiled view shares the parameters; state dicts, EMA and checkpoints read the plain module
    step = _Step(cfg, loss_fn, _compiled(denoiser) if cfg.compile else denoiser, opts=opts, density=density,
                 source=source, gen=gen, world=world)
    bar = _progress(cfg.iterations - first, desc, progress)
    start = time.perf_counter()
    bad_in_row = 0
    with _graceful_interrupt(out.checkpoint_dir is not None) as interrupted:
        for i in range(first, cfg.iterations):
            finite, loss, per_example = step(i)
            done = i + 1
            if finite:
                bad_in_row = 0
                result.lrs.append(opts[0].param_groups[0]["lr"])
                for e in emas:                    # the EMA, then any post-hoc power EMAs (EDM2)
                    e.update(denoiser, done)
                result.losses.append(loss.item())
                result.loss_vars.append(per_example.detach().var().item() if per_example.numel() > 1 else 0.0)
            else:
                result.bad_steps += 1
                bad_in_row += 1
                if bad_in_row >= cfg.max_bad_steps:
                    save(done)   # step i's data was drawn and counted: a resume goes on with step i + 1
                    raise FloatingPointError(
                        f"{desc}: {bad_in_row} non-finite steps in a row (loss {loss.item()}) at iteration "
                        f"{i}; stopped (max_bad_steps={cfg.max_bad_steps}); lower the learning rate (--lr)")
            if done % cfg.snapshot_every == 0 or done in out.keep_snapshots:
                snap = {k: v.detach().clone() for k, v in ema.state_dict().items()}
                if done in out.keep_snapshots:
                    result.snapshots[done] = snap
                if out.snapshot_dir is not None and done % cfg.snapshot_every == 0:
                    save_state(snap, os.path.join(out.snapshot_dir, f"ema-{done:06d}.safetensors"))
            if done % cfg.snapshot_every == 0:
                save_power_emas(done)
            if out.checkpoint_every and done % out.checkpoint_every == 0 and done < cfg.iterations:
                save(done)
            for callback in callbacks:
                callback(done, result)
            bar.update(1)
            if done % 64 == 0 and result.losses:
                bar.set_postfix(loss=f"{np.mean(result.losses[-64:]):.4f}")
            if world.any(interrupted()):  # Ctrl-C on any rank: finish the step, checkpoint it, then stop
                save(done)
                bar.close()
                raise KeyboardInterrupt(f"{desc}: interrupted; checkpoint at step {done} in "
                                        f"{out.checkpoint_dir}")
    if cfg.iterations % cfg.snapshot_every:
        save_power_emas(cfg.iterations)   # the last step too
    save(cfg.iterations)
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _state_objects(denoiser, emas, opts, gen, density, source, result) -> dict:
    """Everything `train` must restore to continue bit for bit, as name → object with state_dict /
    load_state_dict (checkpoint.save_objects): keys read `model.<param>`, `ema.<param>`, `posthoc<k>.<param>`,
    `opt<j>.state.<idx>.<moment>`, `rng.data`, `rng.torch`, `density.*`, `source.*`, `result.snapshot.*`."""
    state = {"model": denoiser, "ema": emas[0]}
    state.update({f"posthoc{k}": e for k, e in enumerate(emas[1:])})
    state.update({f"opt{j}": ckpt.OptimizerState(o) for j, o in enumerate(opts)})
    state["rng"] = _RNGState(gen)
    if hasattr(density, "state_dict"):          # an adaptive or learned density
        state["density"] = density
    if hasattr(source, "state_dict"):           # the data order (DataSource)
        state["source"] = source
    state["result"] = result
    return state


class _RNGState:
    """The data generator's and torch's global RNG state (`rng.data`, `rng.torch`)."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def state_dict(self) -> dict:
        return {"data": self.gen.get_state(), "torch": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["data"])
        torch.set_rng_state(state["torch"])


def _learned_parameters(density) -> list:
    """A learned density's parameters (T22), trained by a second Adam; none for a fixed or adaptive one."""
    return list(density.parameters()) if hasattr(density, "parameters") else []


class _Step:
    """One optimisation step: `__call__(i)` draws σ and a batch, takes the loss (autocast for bf16),
    backpropagates and, when loss and gradients are finite, steps the optimisers; returns
    (finite, mean loss, per-example loss). With several processes every rank draws the same global batch
    (same generator) and trains on its contiguous shard; gradients are averaged by all-reduce, so the update
    equals one process's on the whole batch (to float rounding)."""

    def __init__(self, cfg: TrainConfig, loss_fn, model: torch.nn.Module, *, opts: list, density, source,
                 gen: torch.Generator, world: _World):
        self.cfg, self.loss_fn, self.model, self.opts = cfg, loss_fn, model, opts
        self.density, self.source, self.gen, self.world = density, source, gen, world
        self.eta = _learned_parameters(density)

    def __call__(self, i: int):
        cfg = self.cfg
        for group in (g for o in self.opts for g in o.param_groups):
            group["lr"] = inverse_sqrt_lr(cfg.lr, i, cfg.lr_ref_iter)
        sigma = self.density.sample(cfg.batch, self.gen)
        batch = self.world.shard(self.source.draw(cfg.batch, sigma, self.gen))
        with torch.autocast("cpu" if batch.x0.device.type == "cpu" else batch.x0.device.type,
                            dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            per_example = self.loss_fn(self.model, batch).float()
        loss = per_example.mean()
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            backward(per_example, list(self.model.parameters()), self.eta)
            finite = all_finite([p.grad for o in self.opts for g in o.param_groups for p in g["params"]])
        finite, loss = self.world.reduce(self.opts, finite, loss)
        if finite:
            if hasattr(self.density, "update") and getattr(self.loss_fn, "last", None) is not None:
                self.density.update(*self.loss_fn.last)  # an adaptive p(λ) learns from the per-λ loss (T20)
            for o in self.opts:
                o.step()
        return finite, loss, per_example


def all_finite(tensors) -> bool:
    """Whether every tensor (None skipped) is finite, in one check and one synchronisation: the sum of their
    sums is finite iff no element is inf or NaN (finite gradients never come near float32's 3·10³⁸; a sum that
    overflowed would count as non-finite, which only skips that step)."""
    ts = [t for t in tensors if t is not None]
    return not ts or bool(torch.isfinite(torch.stack([t.sum() for t in ts]).sum()))


def _compiled(denoiser):
    """The denoiser with a torch.compile'd backbone sharing its parameters (a `Denoiser`; state dicts, EMA and
    checkpoints keep reading the plain module)."""
    if not isinstance(denoiser, Denoiser):
        raise ValueError("compile=true needs a precond.Denoiser around a backbone; got "
                         f"{type(denoiser).__name__}")
    return Denoiser(torch.compile(denoiser.net), denoiser.precond, denoiser.head, denoiser.head_net)


def backward(per_example: torch.Tensor, params: list, eta: list = ()) -> None:
    """Gradients of one step: `params` (the denoiser) get ∇ mean(L); `eta` (a learned density's parameters,
    T22) get ∇ mean(L²), the estimator's second moment, whose shape-gradient is the variance's."""
    if eta:
        for p, g in zip(eta, torch.autograd.grad(per_example.square().mean(), eta, retain_graph=True)):
            p.grad = g
    per_example.mean().backward(inputs=params)


class _World:
    """This process's place in a torch.distributed run (torchrun: gloo on CPU, NCCL on GPU); size 1
    without."""

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
        return NoisyBatch(**{f.name: cut(getattr(batch, f.name)) for f in fields(batch)})

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
            print(f"{self.desc}: {self.n}/{self.total} steps, {rate:.1f} it/s, "
                  f"ETA {eta:.0f} s {self.postfix}",
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
