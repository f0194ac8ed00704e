"""Write the training weights (not the EMA) of a run's checkpoint as a weights file of the run folder, for
`gendiff eval RUN --weights model-raw-<step>.safetensors`: how much a run's EMA helps or hurts at that step.

Usage: python benchmarks/checkpoint_weights.py RUN [--step N] [--part model|ema]
(default: the last checkpoint, its training weights `model.*`; `--part ema` writes its EMA instead). Writes
RUN/model-<raw|ema>-<step>.safetensors (the file name is printed), never over model.safetensors.

Issue 20 used it on the MNIST distillation rounds: the 4-step student of 500-step rounds with a classic EMA
of decay 0.999 drew FID 65.7 from its EMA and 60.4 from its training weights (BENCHMARKS).
"""
from __future__ import annotations

import argparse
import os
import sys

from gendiff import checkpoint
from gendiff.io import save_state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    ap.add_argument("--part", choices=("model", "ema"), default="model")
    args = ap.parse_args(argv)
    folder = os.path.join(args.run, "checkpoints")
    steps = checkpoint.steps(folder) if os.path.isdir(folder) else []
    step = args.step if args.step is not None else (steps[-1] if steps else None)
    if step not in steps:
        raise SystemExit(f"--step={args.step}: {args.run} has checkpoints at steps {steps or 'none'}")
    prefix = args.part + "."
    _, tensors, _ = checkpoint.load(os.path.join(folder, f"ckpt-{step:08d}.json"))   # checksum verified
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    name = f"model-{'raw' if args.part == 'model' else 'ema'}-{step}.safetensors"
    save_state(state, os.path.join(args.run, name))
    print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
