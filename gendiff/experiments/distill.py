"""`gendiff distill RUN --rounds K`: progressive distillation (THEORY T35, gendiff/distill.py) of a trained
toy or image run, one run folder per round.

OUT/round-1, OUT/round-2, … (OUT defaults to RUN-distill): each a run folder as `gendiff train` writes it
(config.toml, metrics.jsonl, checkpoints/, model.safetensors, metrics.json), trained through the one loop
(runfolder.train_in_folder, by the kind's own train_run) and so checkpointed and resumable. Its config.toml is
the teacher's config with a [distill] table: the teacher's folder, its steps and the student's (half), the
round number (halvings since the run trained on data) and the head loss. Round 1's teacher is RUN's EMA
(`model.safetensors`); round k's is round k − 1's student EMA; each student starts from its teacher's weights.
The round's EMA is EDM2's power EMA (σ_rel DISTILL_EMA_SIGMA_REL) where the teacher's is classic, so that a
short round's average follows the student rather than keeping its start (`--set train.ema…` chooses another).
The steps halve every round, from `--steps` (the first teacher's DDIM steps): by default a distilled RUN's own
steps, else the power of two nearest its Heun sampler's NFE (toy: Heun 32, NFE 63 → 64; images: Heun 18,
NFE 35 → 32). The grid of every round is schedules.distill_sigmas over the run's sampling range (toy:
sampler.sigma_min … sigma_max, ρ; images: 0.002 … 80, ρ = 7); `gendiff sample` / `eval` on a round sample
with Euler (= DDIM) steps on the student's grid at its own step count (toy.sampling_defaults,
images.sample_images).

Running the command again reads the finished rounds (metrics.json), resumes an unfinished one from its
checkpoint and goes on; a round folder that holds another config is an error.
"""
from __future__ import annotations

import math
import os

from ..distill import DistillationLoss
from ..samplers import heun_nfe
from .config import DistillConfig, override, to_toml
from .ddpm_variance import sampler_steps
from .kinds import kind_of, load_run
from .runfolder import read_config, read_json, start_run

DISTILLED_KINDS = ("toy", "images")
# A round's weights average: EDM2's power EMA with this σ_rel (ema.PowerEMA) where the teacher's config has
# the classic EMA and --set gives neither train.ema nor train.ema_sigma_rel. A student starts at its teacher,
# and a classic EMA of a short round still holds the start: decay 0.999 over 500 steps keeps 0.999^500 = 61%
# of the teacher's weights (measured on MNIST, 4-step student: EMA FID 65.7 against its raw weights' 60.4,
# BENCHMARKS), and each round's teacher is that EMA. The power EMA's average spans a fixed share of the
# round, whatever its length, so it follows the student.
DISTILL_EMA_SIGMA_REL = 0.05


def default_steps(cfg) -> int:
    """The first teacher's DDIM steps for a run: a distilled run's own student steps; else the power of two
    nearest the NFE of its Heun sampler (toy: sampler.steps; images: eval.sampler_steps or Heun 18)."""
    if cfg.distill.steps:
        return cfg.distill.steps
    heun = cfg.sampler.steps if cfg.kind == "toy" else sampler_steps(cfg, 0, False)
    return 2 ** round(math.log2(heun_nfe(heun)))


def round_config(teacher_cfg, teacher: str, teacher_steps: int, *, iterations: int | None = None, sets=(),
                 head_loss: str = "nll"):
    """The config of the round whose teacher is the run folder `teacher` (config `teacher_cfg`) at
    `teacher_steps` DDIM steps: the teacher's config, then `sets` (`--set key=value`; distill.* is not
    settable) and `iterations`, and the [distill] table. The weights average is the power EMA of σ_rel
    DISTILL_EMA_SIGMA_REL unless the teacher's config has a power EMA already or `sets` choose train.ema or
    train.ema_sigma_rel (`--set train.ema_sigma_rel=0` keeps the teacher's classic EMA). Validated."""
    for item in sets:
        if item.strip().startswith("distill"):
            raise ValueError(f"--set {item!r}: the [distill] table is written by gendiff distill (use "
                             "--steps, --head-loss)")
    if teacher_steps % 2:
        raise ValueError(f"--steps: the teacher's {teacher_steps} steps cannot be halved; allowed: an even "
                         "number")
    cfg = override(teacher_cfg, sets)
    ema_set = any(item.split("=", 1)[0].strip() in ("train.ema", "train.ema_sigma_rel") for item in sets)
    if not ema_set and not cfg.train.ema_sigma_rel:
        cfg.train.ema_sigma_rel = DISTILL_EMA_SIGMA_REL
    cfg.distill = DistillConfig(teacher=os.path.abspath(teacher), teacher_steps=teacher_steps,
                                steps=teacher_steps // 2, round=teacher_cfg.distill.round + 1,
                                head_loss=head_loss)
    if iterations is not None:
        cfg.train.iterations = iterations
    return cfg.validate()


def distill_round(teacher: str, folder: str, teacher_steps: int, *, iterations: int | None = None, sets=(),
                  head_loss: str = "nll", device=None, progress: bool = True, log=print) -> dict:
    """Train (or resume, or read) one round in `folder`: the student of `teacher`'s EMA at half its
    `teacher_steps`. Returns the round's metrics (the kind's train_run)."""
    teacher_cfg, teacher_model = load_run(teacher)
    cfg = round_config(teacher_cfg, teacher, teacher_steps, iterations=iterations, sets=sets,
                       head_loss=head_loss)
    fresh = not os.path.exists(os.path.join(folder, "config.toml"))
    if not fresh:
        saved = read_config(folder, "--out")
        if to_toml(saved) != to_toml(cfg):
            raise ValueError(f"{folder} holds a distillation round with another config (teacher, steps, "
                             "--iterations, --set or --head-loss differ); use another --out")
        done = read_json(os.path.join(folder, "metrics.json"))
        if done is not None:
            log(f"round {cfg.distill.round}: finished earlier, read {folder}/metrics.json")
            return done
    kind = kind_of(cfg)
    setup = kind.prepare(cfg, device, log=log)       # data, source, the student's architecture
    student = setup.model
    student.load_state_dict(teacher_model.state_dict())            # the student starts as its teacher
    teacher_model = teacher_model.to(next(student.parameters()).device)
    loss = DistillationLoss(teacher_model, kind.distill_grid(cfg, teacher_steps), cfg.distill.head_loss)
    setup = setup._replace(loss=loss, density=loss.density)
    if fresh:
        start_run(setup.cfg, folder)
    log(f"round {cfg.distill.round}: {teacher_steps} → {cfg.distill.steps} steps, teacher {teacher}, in "
        f"{folder}")
    return kind.train_run(setup.cfg, folder, setup, progress=progress, log=log)


def distill(run: str, rounds: int, *, out: str | None = None, steps: int | None = None,
            iterations: int | None = None, sets=(), head_loss: str = "nll", device=None,
            progress: bool = True, log=print) -> list[tuple[str, object, dict]]:
    """`gendiff distill RUN --rounds K` (module docstring). Returns (folder, config, metrics) per round."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"--rounds={rounds!r} must be an integer >= 1")
    cfg = read_config(run, "RUN")
    if cfg.kind not in DISTILLED_KINDS:
        raise ValueError(f"gendiff distill applies to diffusion runs ({', '.join(DISTILLED_KINDS)}); "
                         f"{run!r} is a {cfg.kind!r} run")
    steps = steps or default_steps(cfg)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or steps % 2 ** rounds:
        raise ValueError(f"--steps={steps!r} cannot be halved --rounds={rounds} times; allowed: a "
                         f"multiple of 2^{rounds} = {2 ** rounds} (e.g. {2 ** max(rounds, 6)})")
    out = out or run.rstrip("/\\") + "-distill"
    results, teacher = [], run
    for k in range(rounds):
        folder = os.path.join(out, f"round-{cfg.distill.round + k + 1}")
        metrics = distill_round(teacher, folder, steps // 2 ** k, iterations=iterations, sets=sets,
                                head_loss=head_loss, device=device, progress=progress, log=log)
        results.append((folder, read_config(folder, "--out"), metrics))
        teacher = folder
    return results
