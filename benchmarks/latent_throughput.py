"""Training throughput of latent diffusion against pixel diffusion (issue 19 target: the latent model trains
at ≥ 3× the pixel model's img/s), in one process on an idle machine.

The rows of `gendiff ablate --suite latent` log their img/s while they train, which on a shared machine mixes
in whatever else ran; this script times the same configurations side by side: the latent preset (default
latent-mnist) in each T36 mode (a, b, c) on the encoded dataset of a VAE run, and its pixel reference
(latent.PIXEL_PRESETS, built by latent.pixel_reference exactly as the suite builds it), each through the one
training loop (`train.train`: σ draw, batch, recipe loss under the preset's precision, backward, Adam, EMA).
The models take turns, `--rounds` times `--steps` steps each, so all see the same machine load; the reported
img/s is the median over rounds of (steps × batch / seconds), and the ratio is latent / pixel per round,
median [min, max]. Evaluation (sampling, decoding) is not timed.

Usage: python benchmarks/latent_throughput.py VAE_RUN [--preset latent-mnist] [--modes a,b,c] [--steps 10]
       [--rounds 3] [--threads N]
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


def timed(setup, steps: int, seed: int) -> float:
    """img/s of `steps` training steps of setup's model (continuing from its current weights)."""
    cfg = setup.cfg
    tcfg = replace(cfg.train, iterations=steps, ema_posthoc=[])
    t0 = time.perf_counter()
    train(setup.model, setup.loss, setup.source, tcfg, seed=seed, sigma_density=setup.density, progress=False)
    return steps * tcfg.batch / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("vae_run", help="an encoded VAE run folder (gendiff train --preset vae-mnist; "
                    "gendiff encode)")
    ap.add_argument("--preset", default="latent-mnist", choices=sorted(latent.PIXEL_PRESETS))
    ap.add_argument("--modes", default="a,b,c")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    configure(args.threads)
    runs = setups(args.vae_run, args.preset, [m.strip() for m in args.modes.split(",")])
    for s in runs.values():           # warm-up: first-call allocations and autocast caches
        timed(s, 2, seed=99)
    ips = {k: [] for k in runs}
    for r in range(args.rounds):
        names = list(runs)
        for k in names[r % len(names):] + names[:r % len(names)]:       # rotating order
            ips[k].append(timed(runs[k], args.steps, seed=r))
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
        print(f"| {k} | {'×'.join(map(str, shape))} | {s.cfg.train.batch} | {s.cfg.train.precision} | "
              f"{statistics.median(v):.1f} | "
              f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}] |")


if __name__ == "__main__":
    main()
