"""Toy training it/s of the seed's own code (Francesco215/logvar_diffusion `training.py`, `do_train`)
against gendiff's, run kind by run kind, in one process, at the same batch and thread count (issue 17: ≥ 10×).

The seed's code is not part of gendiff: fetch the repository yourself and pass its `training.py` (it needs
einops, click, tqdm and matplotlib: `pip install einops click tqdm`). Its loop runs as written, with its
figures and snapshots off (viz_iter=None, pkl_pattern=None); a short warm-up call first builds its cached
ground truth. Pairs (like with like):
  edm             do_train(new=False, score_matching=False)  ToyModel.loss with new=False: EDM's loss
  seed-method     do_train(new=True,  score_matching=False)  the seed's full-covariance NLL
  score-matching  do_train(new=False, score_matching=True)   exact score matching (the seed's loop also
                                                             evaluates its NLL under no_grad each step)
gendiff's side is `gendiff.train` with the recipe of the same name (`benchmarks/toy_training.py` does the
same for every kind). The seed's it/s is timed by difference (do_train at N steps minus at N/4: its set-up
cancels); gendiff's is the loop's own it_per_s. Rounds alternate seed, gendiff, seed, gendiff … per kind;
the table gives the mean over rounds of each and the ratio of the means.

Usage: python benchmarks/seed_side_by_side.py --seed-code PATH/training.py [--iterations 100]
       [--batch 4096] [--threads N] [--rounds 2]
"""
import argparse
import contextlib
import importlib.util
import io
import statistics
import sys
import time

import torch

from gendiff import losses
from gendiff.data.sources import ToyBatches
from gendiff.data.toy import tree
from gendiff.experiments.ablate import AblateConfig
from gendiff.experiments.config import ToyTrainConfig
from gendiff.experiments.recipes import TOY_RECIPES
from gendiff.runtime import configure
from gendiff.train import train

PAIRS = {"edm": dict(new=False, score_matching=False), "seed-method": dict(new=True, score_matching=False),
         "score-matching": dict(new=False, score_matching=True)}


def load_seed(path: str):
    spec = importlib.util.spec_from_file_location("seed_training", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def seed_it_per_s(mod, kind: str, iterations: int, batch: int) -> float:
    """Steps per second of the seed's loop alone: do_train's time at `iterations` minus its time at a quarter
    of them, over the difference in steps (model building, optimiser set-up and the first steps cancel)."""
    kw = dict(PAIRS[kind], batch_size=batch, viz_iter=None, pkl_pattern=None, device=torch.device("cpu"))
    few = max(iterations // 4, 1)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        mod.do_train(total_iter=3, **kw)                     # warm-up: the cached ground truth, first steps
        t0 = time.perf_counter()
        mod.do_train(total_iter=few, **kw)
        t1 = time.perf_counter()
        mod.do_train(total_iter=iterations, **kw)
        t2 = time.perf_counter()
    return (iterations - few) / ((t2 - t1) - (t1 - t0))


def ours_it_per_s(kind: str, iterations: int, batch: int) -> float:
    """gendiff.train's own steps per second (timed inside its loop, after a warm-up call)."""
    spec, cfg = TOY_RECIPES[kind], AblateConfig()
    torch.manual_seed(0)
    model = spec.build_model(cfg.train)
    src = ToyBatches(tree("A"), spec.mode, need_score=spec.loss == "score-matching")
    loss = losses.make_loss(spec.loss)
    train(model, loss, src, ToyTrainConfig(iterations=3, batch=batch), progress=False)       # warm-up
    res = train(model, loss, src, ToyTrainConfig(iterations=iterations, batch=batch), progress=False)
    return res.it_per_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed-code", required=True, help="path to the seed repository's training.py")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    configure(args.threads)
    mod = load_seed(args.seed_code)
    configure(args.threads)          # the seed module sets nothing, but keep ours last
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.iterations} iterations per measurement, {args.rounds} rounds")
    print(f"{'run kind':<16} {'seed it/s':>10} {'gendiff it/s':>13} {'ratio':>7}   rounds (seed | gendiff)")
    for kind in PAIRS:
        s, o = [], []
        for _ in range(args.rounds):
            s.append(seed_it_per_s(mod, kind, args.iterations, args.batch))
            o.append(ours_it_per_s(kind, args.iterations, args.batch))
        ms, mo = statistics.mean(s), statistics.mean(o)
        print(f"{kind:<16} {ms:10.1f} {mo:13.1f} {mo / ms:6.2f}x   "
              f"{', '.join(f'{v:.1f}' for v in s)} | {', '.join(f'{v:.1f}' for v in o)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
