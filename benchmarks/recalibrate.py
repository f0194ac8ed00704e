"""Calibration of one trained run of a finished `gendiff ablate` folder against the exact optimum of every
training mode, not only its own: e.g. how far the seed's method (point-cov, Σ_src counted twice) sits from
the point-mode truth σ²I + Cov[x0 | x̃]. Loads the run's final EMA snapshot (safetensors); no training.
Usage: python benchmarks/recalibrate.py RESULTS_FOLDER RUN   (e.g. results/ablate-seed0 seed-method)
"""
import argparse
import json
import os

import torch
from safetensors.torch import load_file

from gendiff.experiments.ablate import AblateConfig, make_evaluator
from gendiff.experiments.recipes import TOY_RECIPES
from gendiff.runtime import configured
from gendiff.data.sources import MODES


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("run", choices=sorted(TOY_RECIPES))
    args = ap.parse_args()
    with open(os.path.join(args.folder, "config.json")) as f:
        conf = json.load(f)
    cfg = AblateConfig(seed=conf["seed"])
    if conf["train"]["iterations"] != cfg.train.iterations or conf["eval_points"] != cfg.eval_points:
        raise SystemExit("this script re-evaluates default-config folders only")
    spec = TOY_RECIPES[args.run]
    model = spec.build_model(cfg.train)
    model.load_state_dict(load_file(os.path.join(args.folder, "snapshots", spec.model or args.run,
                                                 f"ema-{cfg.train.iterations:06d}.safetensors")))
    ev = make_evaluator(cfg)
    with torch.no_grad():
        learned = torch.cat([p.covariance() for p in ev._held_out(model.predict)]).double()
    print(f"{args.run} (trained in mode {spec.mode}), seed {cfg.seed}, {len(learned)} held-out points")
    print(f"{'against':<10} {'ratio':>7} {'excess med rel err':>19} "
          f"{'median tr(Σ_φ − σ²I) / tr(Σ* − σ²I)':>38}")
    floor = ev.sigma.square()[:, None, None] * torch.eye(2, dtype=torch.float64)
    tr = lambda m: torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    for mode in MODES:
        cal = ev.calibration(model, mode)
        excess = tr(learned - floor) / tr(ev.optimum(mode) - floor)
        print(f"{mode:<10} {cal['ratio']:7.3f} {cal['median_rel_error_excess']:19.3f} "
              f"{float(excess.median()):38.3f}")


if __name__ == "__main__":
    with configured():
        main()
