"""Training speed of every run kind of `gendiff ablate` at the reference batch (4096), on this machine.

Prints it/s per trained run kind and the ratio to the target (30 it/s).
Baseline in the same process: score matching with the exact score from the one-shot einsum formulation
of the mixture (benchmarks/mixture.py) instead of GaussianMixture.score.
Usage: python benchmarks/toy_training.py [--iterations 200] [--batch 4096] [--threads N]
"""
import argparse
import time
from dataclasses import replace

import torch

from gendiff import losses
from gendiff.data.sources import ToyBatches
from gendiff.experiments.ablate import AblateConfig
from gendiff.experiments.recipes import TOY_RECIPES
from gendiff.data.toy import tree
from gendiff.runtime import configure
from gendiff.experiments.config import ToyTrainConfig
from gendiff.train import train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="print a torch profile of the score-matching run")
    args = ap.parse_args()
    configure(args.threads)
    cfg = AblateConfig()
    tcfg = ToyTrainConfig(iterations=args.iterations, batch=args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.iterations} iterations per kind")
    print(f"{'run kind':<18} {'it/s':>8} {'vs 30 it/s':>11}")
    for name in ("edm", "confidence-frozen", "confidence", "confidence-full", "seed-method",
                 "score-matching"):
        spec = TOY_RECIPES[name]
        torch.manual_seed(0)
        model = spec.build_model(cfg.train)
        src = ToyBatches(tree("A"), spec.mode, need_score=spec.loss == "score-matching")
        loss = losses.make_loss(spec.loss)
        train(model, loss, src, ToyTrainConfig(iterations=5, batch=args.batch), progress=False)  # warm-up
        res = train(model, loss, src, tcfg, progress=False)
        print(f"{name:<18} {res.it_per_s:8.1f} {res.it_per_s / 30:10.2f}x")
        if name == "score-matching":
            from mixture import EinsumBaseline  # benchmarks/mixture.py

            class EinsumSource(ToyBatches):
                def draw(self, n, sigma, generator=None):
                    batch = super().draw(n, sigma, generator)
                    batch.score = base.logp_and_score(batch.x_noisy, sigma)[1]
                    return batch
            base = EinsumBaseline(src.mixture, torch.float32)
            esrc = EinsumSource(src.mixture, "point")
            slow = train(model, loss, esrc, ToyTrainConfig(iterations=max(args.iterations // 5, 10),
                                                           batch=args.batch), progress=False)
            print(f"{'  einsum baseline':<18} {slow.it_per_s:8.1f}   ours/baseline "
                  f"{res.it_per_s / slow.it_per_s:.2f}x")
        if name == "edm":  # the network's cost: the seed's 5 linear layers against the 4 gendiff had before
            torch.manual_seed(0)
            small = spec.build_model(replace(cfg.train, hidden_layers=3))
            train(small, loss, src, ToyTrainConfig(iterations=5, batch=args.batch), progress=False)
            r4 = train(small, loss, src, tcfg, progress=False)
            print(f"{'  edm, 4 linear':<18} {r4.it_per_s:8.1f}   seed network (5 linear) / 4 linear: "
                  f"{res.it_per_s / r4.it_per_s:.2f}x")
        if args.profile and name == "score-matching":
            from torch.profiler import profile
            with profile() as prof:
                train(model, loss, src, ToyTrainConfig(iterations=20, batch=args.batch), progress=False)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t:.1f} s")
