"""Does a distilled student keep a calibrated confidence? (Issue 20, "a distilled student that keeps its
confidence"; THEORY T35, T7/T8.) A confidence student is trained by its head's NLL against the deterministic
target D* (gendiff/distill.py), so at the optimum its σ_φ² − σ_t² is its own expected squared error against
D*, the teacher's two DDIM steps from the same x_t — not Var[x0 | x_t], which its head started from.

Per student round folder (`gendiff distill` on a toy run; e.g. benchmarks/distill_tree.py's
OUT/seed-*/distill/round-*), on its own grid: --points fresh tree points x0 per σ_t, x_t = x0 + σ_t·ε, D* from
its teacher (the folder's distill.teacher, through the round's DistillationLoss.target), and
calibration.calibration_by_sigma of the student's μ against D* with its variance σ_φ² − σ_t², beside the best
constant per σ_t (fitted on the other half of the points) and, as a second predictor of the same error, the
teacher's own σ_φ² − σ_t² (its Var[x0 | x_t]: what an uncalibrated student would inherit). Reports per σ_t:
NLL (nats/element) of the head, the gains over the constant and the teacher's variance ± bootstrap sd, ±1/±2
std coverage, the floored share. Writes OUT/distill-calibration.json and .md.

Usage: python benchmarks/distill_calibration.py results/distill-tree-128/seed-0/distill/round-{1..5} \\
       --points 8192 --out docs/results/distill-tree-128
"""
import argparse
import os
import sys

import numpy as np
import torch

from gendiff.calibration import FLOOR, calibration_by_sigma
from gendiff.data.toy import tree
from gendiff.distill import DistillationLoss
from gendiff.experiments.kinds import kind_of, load_run
from gendiff.io import save_json


def round_readout(folder: str, points: int, seed: int, floor: float = FLOOR) -> dict:
    cfg, student = load_run(folder)
    if not cfg.distill.steps:
        raise SystemExit(f"{folder} is not a distilled student (distill.steps = 0)")
    _, teacher = load_run(cfg.distill.teacher)
    loss = DistillationLoss(teacher, kind_of(cfg).distill_grid(cfg, cfg.distill.teacher_steps))
    starts = loss.table[::2][:-1]                       # the student's σ_t, float32 as its batches carry them
    g = torch.Generator().manual_seed(seed)
    data = tree(cfg.classes)
    mus, vars_, vts, targets, sigmas = [], [], [], [], []
    with torch.no_grad():
        for s in starts:
            x0 = data.sample(points, generator=g)[0]
            sig = torch.full((points,), float(s))
            x_t = x0 + sig[:, None] * torch.randn(x0.shape, generator=g)
            d_star = loss.target(x_t, sig)
            p, pt = student.predict(x_t, sig), teacher.predict(x_t, sig)
            mus.append(p.mu), vars_.append(p.excess_variance(sig)), vts.append(pt.excess_variance(sig))
            targets.append(d_star), sigmas.append(sig)
    sigma = torch.cat(sigmas)
    s = starts.double().numpy()
    edges = np.concatenate([[s[-1] / 2], np.sqrt(s[1:] * s[:-1])[::-1], [s[0] * 2]])   # increasing
    labels = [f"sigma={v:.4g}" for v in s[::-1]]
    fit = (torch.arange(len(sigma)) % 2 == 0).numpy()
    res = calibration_by_sigma(torch.cat(mus), torch.cat(vars_), torch.cat(targets), sigma, edges, fit=fit,
                               labels=labels, baselines={"teacher": torch.cat(vts)}, seed=seed, floor=floor)
    return {"folder": folder, "steps": cfg.distill.steps, "round": cfg.distill.round, "readout": res}


def num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def markdown(rows: list) -> str:
    out = ["| round | steps | σ_t | floored | NLL head | gain over constant | gain over teacher's variance | "
           "±1s | ±2s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for label, b in r["readout"]["bins"].items():
            h, gain = b["head"], b["gain"]
            out.append(f"| {r['round']} | {r['steps']} | {label.removeprefix('sigma=')} | "
                       f"{num(h['floored_share'], '.3f')} | {num(h['nll'], '.3f')} | "
                       f"{num(gain['constant']['nll'], '+.3f')} ± {num(gain['constant']['nll_sd'], '.3f')} | "
                       f"{num(gain['teacher']['nll'], '+.3f')} ± {num(gain['teacher']['nll_sd'], '.3f')} | "
                       f"{num(h['coverage_1s'], '.3f')} | {num(h['coverage_2s'], '.3f')} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rounds", nargs="+", help="student run folders written by gendiff distill (toy runs)")
    ap.add_argument("--points", type=int, default=8192, help="tree points per σ_t (default 8192)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--floor", type=float, default=FLOOR,
                    help=f"elements with σ_φ² − σ_t² ≤ (FLOOR·σ_t)² are reported apart (default {FLOOR:g}, "
                    "where T6's subtraction stops resolving; T37's excess c_out²e^G is computed directly and "
                    "resolves far less: e.g. 1e-6)")
    ap.add_argument("--out", help="folder for distill-calibration.json / .md (default: print only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [round_readout(f, args.points, args.seed, args.floor) for f in args.rounds]
    md = ("Distilled students' σ_φ² − σ_t² against their own squared error to D* (n = "
          f"{args.points} tree points per σ_t, half for the constant's fit; floor {args.floor:g}·σ_t; gains "
          "in nats/element, > 0: the "
          "student's head is better; ± bootstrap sd over points; Gaussian ±1s/±2s coverage 0.683/0.954)\n\n"
          + markdown(rows))
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        save_json(rows, os.path.join(args.out, "distill-calibration.json"))
        with open(os.path.join(args.out, "distill-calibration.md"), "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
