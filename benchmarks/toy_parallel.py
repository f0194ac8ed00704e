"""Throughput of toy training split across processes: one process with all T threads against T processes of
one thread each, training the same run kind at the reference batch (4096) at the same time. Prints the
steps per second summed over the processes and the ratio (what `gendiff ablate --jobs` relies on).
Usage: python benchmarks/toy_parallel.py [--kinds edm,score-matching] [--iterations 300] [--threads 2]
"""
import argparse
import subprocess
import sys
import time

import torch

from gendiff import losses
from gendiff.data.sources import ToyBatches
from gendiff.data.toy import tree
from gendiff.experiments.config import ToyTrainConfig
from gendiff.experiments.recipes import TOY_RECIPES
from gendiff.runtime import configure
from gendiff.train import train


def one(kind: str, threads: int, iterations: int) -> float:
    """it/s of `iterations` steps of `kind` at `threads` threads (after 5 warm-up steps)."""
    configure(threads)
    spec = TOY_RECIPES[kind]
    torch.manual_seed(0)
    model = spec.build_model(ToyTrainConfig())
    src = ToyBatches(tree("A"), spec.mode, need_score=spec.loss == "score-matching")
    loss = losses.make_loss(spec.loss)
    train(model, loss, src, ToyTrainConfig(iterations=5, batch=4096), progress=False)
    return train(model, loss, src, ToyTrainConfig(iterations=iterations, batch=4096), progress=False).it_per_s


def spawn(kind: str, threads: int, iterations: int, copies: int) -> list:
    cmd = [sys.executable, __file__, "--worker", kind, str(threads), str(iterations)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    return [float(p.communicate()[0]) for p in procs]


def main():
    if sys.argv[1:2] == ["--worker"]:
        kind, threads, iterations = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(one(kind, threads, iterations))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="edm,score-matching")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    T = args.threads
    print(f"torch {torch.__version__}, batch 4096, {args.iterations} iterations, {args.rounds} rounds")
    print(f"{'run kind':<16} {f'1 proc x {T} thr':>16} {f'{T} proc x 1 thr (sum)':>22} {'ratio':>7}")
    for kind in args.kinds.split(","):
        a, b = [], []
        for _ in range(args.rounds):   # interleaved, so a drift of the machine hits both alike
            a.append(spawn(kind, T, args.iterations, 1)[0])
            b.append(sum(spawn(kind, 1, args.iterations, T)))
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        print(f"{kind:<16} {ma:16.1f} {mb:22.1f} {mb / ma:7.2f}   "
              f"(rounds: {', '.join(f'{x:.0f}' for x in a)} | {', '.join(f'{x:.0f}' for x in b)})")


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    if sys.argv[1:2] != ["--worker"]:
        print(f"total {time.perf_counter() - t:.1f} s")
