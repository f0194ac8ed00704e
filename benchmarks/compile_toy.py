"""Does `train.compile = true` (torch.compile of the backbone) speed up training here? Side by side in one
process on the toy's reference batch: the same run kind trained without and with compile (each after its own
warm-up, which for compile includes the compilation), it/s of the timed steps and the ratio compiled/eager,
plus the compilation time. Usage: python benchmarks/compile_toy.py [--iterations 200] [--batch 4096]
[--threads N]
"""
import argparse
import time

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
    args = ap.parse_args()
    configure(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'run kind':<12} {'eager it/s':>10} {'compiled it/s':>14} {'ratio':>6} {'compile s':>10}")
    for name in ("edm", "confidence"):
        spec, rates, warm = TOY_RECIPES[name], {}, {}
        for comp in (False, True):
            torch.manual_seed(0)
            model = spec.build_model(AblateConfig().train)
            src, loss = ToyBatches(tree("A"), spec.mode), losses.make_loss(spec.loss)
            # train() builds its compiled view per call: warm up and time within one call, splitting by
            # callback
            marks = {}
            cb = lambda done, r: marks.setdefault(done, time.perf_counter())  # noqa: E731
            t0 = time.perf_counter()
            train(model, loss, src,
                  ToyTrainConfig(iterations=args.iterations + 5, batch=args.batch, compile=comp),
                  progress=False, callbacks=[cb])
            warm[comp] = marks[5] - t0
            rates[comp] = args.iterations / (marks[args.iterations + 5] - marks[5])
        print(f"{name:<12} {rates[False]:10.1f} {rates[True]:14.1f} {rates[True] / rates[False]:6.2f} "
              f"{warm[True] - warm[False]:10.1f}", flush=True)


if __name__ == "__main__":
    main()
