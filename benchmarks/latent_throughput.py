"""Training throughput of latent diffusion against pixel diffusion (issue 19 target: the latent model trains
at ≥ 3× the pixel model's img/s), in one process on an idle machine.

The rows of `gendiff ablate --suite latent` log their img/s while they train, which on a shared machine mixes
in whatever else ran; this script times the same configurations side by side: the latent preset (default
latent-mnist) in each T36 mode (a, b, c) on the encoded dataset of a VAE run, and its pixel reference
(latent.PIXEL_PRESETS, built by latent.pixel_reference exactly as the suite builds it), each through the one
training loop (`train.train`: σ draw, batch, recipe loss under the preset's precision, backward, Adam, EMA).
The models take turns, `--rounds` times `--steps` steps each, so all see the same machine load; each turn is
timed from the end of its first step to the end of its last (the EMA copy and Adam's first allocations are
left out); the reported img/s is the median over rounds, and the ratio is latent / pixel per round, median
[min, max]. By default each model trains at its preset's batch, as the suite does (latent-mnist 128,
mnist-cpu 64); `--batch N` times all at one batch. Evaluation (sampling, decoding) is not timed.

Usage: python benchmarks/latent_throughput.py VAE_RUN [--preset latent-mnist] [--modes a,b,c] [--steps 10]
       [--rounds 3] [--batch N] [--threads N]
"""
import argparse
import statistics
import time
from dataclasses import replace

import torch

from gendiff.experiments import images, latent
from gendiff.experiments.config import resolve
from gendiff.runtime import configure
from gendiff.train import train


def setups(vae_run: str, preset: str, modes):
    """name -> (Setup, config) for each latent mode and the pixel reference."""
    out = {}
    for mode in modes:
        cfg = resolve(preset, None, [f"latent.vae_run={vae_run}", f"latent.mode={mode}"])
        s = latent.prepare(cfg, log=lambda *_: None)
        out[f"latent {mode}"] = s
    base = resolve(preset, None, [f"latent.vae_run={vae_run}"])
    pixel = latent.pixel_reference(base, resolve(latent.PIXEL_PRESETS[preset]))
    out["pixel"] = images.prepare(pixel, log=lambda *_: None)
    return out


def timed(setup, steps: int, seed: int, batch: int = 0) -> float:
    """img/s of training steps 2 … `steps` of setup's model (continuing from its current weights; the first
    step, with the EMA copy and Adam's first allocations before it, is not timed); a non-finite step is an
    error (a skipped update would count images it did not train on)."""
    tcfg = replace(setup.cfg.train, iterations=steps, ema_posthoc=[], **({"batch": batch} if batch else {}))
    stamps = []
    res = train(setup.model, setup.loss, setup.source, tcfg, seed=seed, sigma_density=setup.density,
                progress=False, callbacks=[lambda done, result: stamps.append(time.perf_counter())])
    if res.bad_steps:
        raise FloatingPointError(f"{res.bad_steps} non-finite step(s) while timing; the ratio would be wrong")
    return (len(stamps) - 1) * tcfg.batch / (stamps[-1] - stamps[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("vae_run", help="an encoded VAE run folder (gendiff train --preset vae-mnist; "
                    "gendiff encode)")
    ap.add_argument("--preset", default="latent-mnist", choices=sorted(latent.PIXEL_PRESETS))
    ap.add_argument("--modes", default="a,b,c")
    ap.add_argument("--steps", type=int, default=10, help="training steps per model per round (the first "
                    "is not timed)")
    ap.add_argument("--batch", type=int, default=0, help="one batch size for every model (default: each "
                    "preset's own, as the suite trains them: the img/s then also carries the batch's effect)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    configure(args.threads)
    runs = setups(args.vae_run, args.preset, [m.strip() for m in args.modes.split(",")])
    for s in runs.values():           # warm-up: first-call allocations and autocast caches
        timed(s, 3, seed=99, batch=args.batch)
    ips = {k: [] for k in runs}
    for r in range(args.rounds):
        names = list(runs)
        for k in names[r % len(names):] + names[:r % len(names)]:       # rotating order
            ips[k].append(timed(runs[k], args.steps, seed=r, batch=args.batch))
    pix = ips["pixel"]
    print(f"preset {args.preset} against {latent.PIXEL_PRESETS[args.preset]}, {args.rounds} rounds × "
          f"{args.steps} steps, {torch.get_num_threads()} threads")
    print("| model | data shape | batch | precision | img/s (median over rounds) "
          "| ratio to pixel, median [min, max] |")
    print("|---|---|---|---|---|---|")
    for k, v in ips.items():
        s = runs[k]
        shape = tuple(s.latents.train_mean.shape[1:]) if k != "pixel" else tuple(s.test.images.shape[1:])
        ratios = [a / b for a, b in zip(v, pix)]
        print(f"| {k} | {'×'.join(map(str, shape))} | {args.batch or s.cfg.train.batch} | "
              f"{s.cfg.train.precision} | "
              f"{statistics.median(v):.1f} | "
              f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}] |")


if __name__ == "__main__":
    main()
