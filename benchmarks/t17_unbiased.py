"""T17 in practice: for one fixed trained network, the same weighted loss estimated under different training
densities p(λ) (importance weight w/p) agrees within standard errors while the estimator's variance differs.

Loads the final EMA of a run of a finished `gendiff ablate --suite objectives` folder (default: w-sigmoid,
F-prediction, w = sigmoid(−λ + 2)), draws fresh ground-truth batches of the tree, and prints per density the
Monte Carlo mean of ½(w/p)‖ε̂ − ε‖², its standard error and the per-sample variance. Every density is
truncated to σ ∈ [0.002, 80] (equal endpoints), so all estimate the same integral.
Usage: python benchmarks/t17_unbiased.py RESULTS_FOLDER [--run w-sigmoid] [--n 200000]
"""
import argparse
import math
import os

import torch
from safetensors.torch import load_file

from gendiff.experiments.ablate import AblateConfig
from gendiff.experiments.recipes import TOY_RECIPES
from gendiff.data.toy import tree
from gendiff.losses import NoisyBatch
from gendiff.runtime import configured
from gendiff.schedules import AdaptiveSchedule, make_schedule, make_weighting

DENSITIES = [("cosine", {}), ("cosine", {"shift": 1.0}), ("cosine", {"shift": -1.0}), ("flow-matching", {}),
             ("edm-training", {"p_mean": -1.2, "p_std": 1.2}),
             ("log-uniform", {"sigma_min": 0.002, "sigma_max": 80.0})]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--run", default="w-sigmoid")
    ap.add_argument("--n", type=int, default=200000)
    args = ap.parse_args()
    cfg = AblateConfig()
    spec = TOY_RECIPES[args.run]
    model = spec.build_model(cfg.train)
    model.load_state_dict(load_file(os.path.join(args.folder, "snapshots", args.run,
                                                 f"ema-{cfg.train.iterations:06d}.safetensors")))
    gt = tree("A")
    print(f"run {args.run}: weighting {spec.weighting}, {args.n} samples per density, tree A")
    print(f"{'density':<34} {'mean':>9} {'std err':>9} {'variance':>10}")
    for name, kw in DENSITIES + [("adaptive", {})]:
        if name == "adaptive":  # T20, fitted to this network first on 100 batches of its own draws (EMA 0.9)
            dens = AdaptiveSchedule(make_weighting(spec.weighting.name, **spec.weighting.kwargs), ema=0.9)
            loss = spec.loss_fn(dens)
            g = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for _ in range(100):
                    sigma = dens.sample(8192, g)
                    x0, _ = gt.sample(8192, generator=g)
                    loss(model,
                         NoisyBatch(x0, x0 + sigma[:, None] * torch.randn(x0.shape, generator=g), sigma))
                    dens.update(*loss.last)
        else:
            truncate = None if name == "log-uniform" else (0.002, 80.0)
            dens = make_schedule(name, truncate=truncate, **kw)
            loss = spec.loss_fn(dens)
        g = torch.Generator().manual_seed(1)
        vals = []
        with torch.no_grad():
            for _ in range(args.n // 8192):
                sigma = dens.sample(8192, g)
                x0, _ = gt.sample(8192, generator=g)
                xn = x0 + sigma[:, None] * torch.randn(x0.shape, generator=g)
                vals.append(loss(model, NoisyBatch(x0, xn, sigma)).double())
        v = torch.cat(vals)
        label = f"{name} {kw}" if kw else name
        print(f"{label:<34} {float(v.mean()):9.4f} {float(v.std()) / math.sqrt(len(v)):9.4f} "
              f"{float(v.var()):10.3f}")


if __name__ == "__main__":
    with configured():
        main()
