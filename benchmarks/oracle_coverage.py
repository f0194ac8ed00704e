"""What ±1 / ±2 std coverage a perfect Gaussian head reaches on the exact tree (issue 18's coverage target).

A head trained by the Gaussian NLL aims at T8's optimum σ_φ² = σ² + Var[x0 | x̃], i.e. the predicted error
bar of x0 is the exact posterior std. Whether that interval covers 68.3% / 95.4% of the x0 depends on the
shape of p(x0 | x̃), not on the head: a Gaussian posterior gives exactly those numbers; a mixture (the tree at
moderate σ, a pixel that is ink or background) gives others at the right variance. This script reads the
exact posterior of the tree (GaussianMixture.posterior, float64: mean and the diagonal of the covariance,
per element) at fixed σ, through the same readout as the image rows (calibration.calibration_by_sigma:
even-index points fit the best constant per σ, odd-index points are measured), so its coverage is the one
a perfectly calibrated Gaussian head would show there. z2_mean ≈ 1 for the exact posterior (its variance is
right on average); coverage away from 68 / 95 is the posterior's shape.

Usage: python benchmarks/oracle_coverage.py [--points 8192] [--sigmas 0.05,0.1,0.2,0.5,1,2] [--seed 0]
       [--json OUT.json]          (under a minute; no training; the tree of `gendiff ablate`, classes "A")
"""
import argparse
import json
import math

import torch

from gendiff.calibration import GAUSS_COVERAGE_1, GAUSS_COVERAGE_2, calibration_by_sigma
from gendiff.data.toy import tree
from gendiff.io import generator


def exact_coverage(sigmas, points: int, seed: int, classes: str = "A") -> dict:
    """calibration_by_sigma of the exact posterior (mean, diagonal variance) of the tree at each σ."""
    gt = tree(classes)
    g = generator(seed, "oracle-coverage")
    x0 = gt.sample(points, generator=g, dtype=torch.float64)[0]
    sig = torch.tensor(sigmas, dtype=torch.float64).repeat_interleave(points)
    x0r = x0.repeat(len(sigmas), 1)
    xn = x0r + sig[:, None] * torch.randn(x0r.shape, generator=g, dtype=torch.float64)
    post = gt.posterior(xn, sig)
    var = torch.diagonal(post.cov, dim1=-2, dim2=-1)
    # bin edges halfway (in log σ) between the grid values, so each bin holds one σ
    logs = [math.log(s) for s in sigmas]
    edges = ([math.exp(logs[0] - 1)] + [math.exp((a + b) / 2) for a, b in zip(logs, logs[1:])]
             + [math.exp(logs[-1] + 1)])
    return calibration_by_sigma(post.mean, var, x0r, sig, edges, labels=[f"sigma={s:g}" for s in sigmas],
                                fit=torch.arange(len(xn)) % 2 == 0, seed=seed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=8192)
    ap.add_argument("--sigmas", default="0.05,0.1,0.2,0.5,1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    out = exact_coverage(sigmas, args.points, args.seed)
    print(f"exact posterior of the tree, {args.points // 2} measured points per σ; Gaussian: "
          f"{100 * GAUSS_COVERAGE_1:.1f}% / {100 * GAUSS_COVERAGE_2:.1f}%")
    print("| σ | ±1 std, exact | ±2 std, exact | mean z², exact | ±1 std, best constant "
          "| ±2 std, best constant |")
    print("|---|---|---|---|---|---|")
    for label, b in out["bins"].items():
        h, c = b["head"], b["constant"]
        print(f"| {label.split('=')[1]} | {100 * h['coverage_1s']:.1f}% | {100 * h['coverage_2s']:.1f}% | "
              f"{h['z2_mean']:.3f} | {100 * c['coverage_1s']:.1f}% | {100 * c['coverage_2s']:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"points": args.points, "seed": args.seed, "readout": out}, f, indent=1)


if __name__ == "__main__":
    main()
