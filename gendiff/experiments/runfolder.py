"""A run folder: what `gendiff train` writes, for every kind of run (toy or images).

RUN/config.toml     the fully resolved config (enough to re-run: `gendiff train --config RUN/config.toml`)
RUN/metrics.jsonl   one JSON line per logging step: step, loss, loss_var, lr, seconds
RUN/tb/             the same scalars as TensorBoard events (`tensorboard --logdir RUN/tb`)
RUN/checkpoints/    checkpoint.py's atomic, checksummed checkpoints (the newest `checkpoint.keep`)
RUN/posthoc/        power-EMA snapshots (train.ema_posthoc), for `gendiff posthoc-ema`
RUN/model.safetensors, RUN/metrics.json, RUN/samples.png   the final EMA model, its measured metrics, a plot
`--resume RUN` continues from the newest good checkpoint with RUN's own config; a run killed at any step and
resumed ends bit for bit where the uninterrupted run ends (CPU; tests/test_run.py kills real processes). The
kind-specific parts (what to train, how to measure) live in toy.py and images.py.
"""
from __future__ import annotations

import json
import os
import time

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.tensorboard import SummaryWriter

from ..ema import load_posthoc, posthoc_ema
from ..io import save_json, save_state, save_text
from ..train import Outputs, train
from .config import resolve, to_dict, to_toml

LOG_EVERY = 16


def _cut_log(path: str, upto: int):
    """Keep the lines of steps ≤ upto (a resumed run replays what came after its checkpoint)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= upto:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):   # a line torn by a kill mid-write, or blank
                continue
    save_text("".join(keep), path)


class RunLog:
    """metrics.jsonl (one line per LOG_EVERY steps) and TensorBoard events of a run folder. The log is cut
    back to the step training actually starts from (known at the first step: the checkpoint resumed from,
    whichever fallback was taken), so the log matches the state resumed. Only the primary process writes."""

    def __init__(self, out: str, primary: bool = True):
        self.out, self.path, self.primary, self.start, self.tb = out, os.path.join(out, "metrics.jsonl"), \
            primary, time.perf_counter(), None

    def _open(self, first: int) -> None:
        _cut_log(self.path, first)
        self.tb = SummaryWriter(os.path.join(self.out, "tb"), purge_step=first + 1)

    def on_step(self, done: int, result) -> None:
        if not self.primary:
            return
        if self.tb is None:
            self._open(done - 1)
        if done % LOG_EVERY or not result.losses:
            return
        line = {"step": done, "loss": result.losses[-1], "loss_var": result.loss_vars[-1],
                "lr": result.lrs[-1],
                "bad_steps": result.bad_steps, "seconds": round(time.perf_counter() - self.start, 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        for k in ("loss", "loss_var", "lr", "bad_steps"):
            self.tb.add_scalar(f"train/{k}", line[k], done)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train_in_folder(model, loss, source, cfg, out: str, *, density, desc: str, progress: bool, log,
                    primary: bool):
    """train.train on a run folder: metrics.jsonl and TensorBoard (RunLog), checkpoints/ (resumed when there),
    posthoc/ snapshots; the primary process then writes the EMA to model.safetensors. Returns the
    TrainResult."""
    runlog = RunLog(out, primary)
    try:
        res = train(model, loss, source, cfg.train, seed=cfg.seed, progress=progress, desc=desc,
                    sigma_density=density, callbacks=[runlog.on_step],
                    outputs=Outputs(checkpoint_dir=os.path.join(out, "checkpoints"),
                                    checkpoint_every=cfg.checkpoint.every,
                                    keep_checkpoints=cfg.checkpoint.keep,
                                    posthoc_dir=os.path.join(out, "posthoc")))
    finally:
        runlog.close()
    if primary:
        if res.resumed_from:
            log(f"resumed from step {res.resumed_from}")
        save_state(res.ema.state_dict(), os.path.join(out, "model.safetensors"))
    return res


def start_run(cfg, out: str) -> None:
    """Create the run folder with its config.toml. Call it after everything that can reject the run
    (the config, the data, the model) has been checked: a rejected run creates nothing."""
    if os.path.exists(os.path.join(out, "config.toml")):
        ck = os.path.join(out, "checkpoints")
        started = os.path.isdir(ck) and os.listdir(ck)
        raise ValueError(f"--out={out!r} already holds a run; continue it with `gendiff train --resume {out}`"
                         + ("" if started else " (it has no checkpoint yet: to start it anew with another "
                                               "config, delete the folder)"))
    os.makedirs(out, exist_ok=True)
    save_text(to_toml(cfg), os.path.join(out, "config.toml"))
    save_json(to_dict(cfg), os.path.join(out, "config.json"))


def read_config(out: str, option: str = "--resume"):
    """The resolved config of the run folder `out` (its config.toml)."""
    path = os.path.join(out, "config.toml")
    if not os.path.exists(path):
        raise ValueError(f"{option}={out!r} is not a run folder (no config.toml)")
    return resolve(toml_path=path)


def weights_path(out: str, weights: str = "model.safetensors") -> str:
    path = os.path.join(out, weights)
    if not os.path.exists(path):
        raise ValueError(f"run {out!r} has no {weights} (unfinished? `gendiff train --resume {out}`; a "
                         "post-hoc EMA: `gendiff posthoc-ema`)")
    return path


def load_weights(model, out: str, weights: str = "model.safetensors"):
    """`model` with the weights file of the run folder loaded (safetensors only), in eval mode, no
    gradients."""
    path = weights_path(out, weights)
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"--weights={weights!r}: {path} is not a readable safetensors file ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"--weights={weights!r} does not fit the run's model ({str(e).splitlines()[0]})"
                         ) from None
    return model.eval().requires_grad_(False)


def weights_tag(weights: str) -> str:
    """'' for the final EMA, else '-<file stem>': results of other weights get their own file names."""
    return "" if weights == "model.safetensors" else "-" + os.path.splitext(os.path.basename(weights))[0]


def posthoc_run(out: str, sigma_rel: float, step: int | None = None) -> str:
    """EDM2's post-hoc EMA of a run trained with `train.ema_posthoc`: the σ_rel EMA at `step`
    (default the last snapshot) reconstructed from the run's posthoc/ snapshots; written to
    RUN/model-posthoc-<σ_rel>.safetensors. Returns the file name (for `gendiff eval RUN --weights NAME`)."""
    read_config(out, "run")
    snaps = load_posthoc(os.path.join(out, "posthoc"), step)
    if not snaps:
        upto = f" up to step {step}" if step else ""
        raise ValueError(f"run {out!r} has no post-hoc EMA snapshots{upto}; train with --set "
                         "'train.ema_posthoc=[0.05, 0.1]'")
    target = step or max(s[0] for s in snaps)
    name = f"model-posthoc-{sigma_rel:.3f}-{target}.safetensors"
    save_state(posthoc_ema(snaps, target, sigma_rel), os.path.join(out, name))
    return name


def refuse(options: dict, kind: str, why: str = "") -> None:
    """The first option given (not None) of `options` is one error: it does not apply to this kind of run."""
    for name, value in options.items():
        if value is not None:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to {kind} run{why}")


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
