"""Where T13 and T14 trade places for the exact source-mode optimum: the hybrid score's default threshold.

The consistent source mode (T3/T12) learns μ = E[m_k | x̃] and Σ_φ = σ²I + E[Σ_k | x̃] + Cov[m_k | x̃].
Plugging that exact optimum into Tweedie's score (T13) and into the σ_φ score (T14), this prints the
σ²-weighted score error σ²‖s − s*‖² against the true score of the tree at each σ, and the σ where
the two curves cross (the default of `gendiff ablate --hybrid-sigma`). No training: exact quantities.
Usage: python benchmarks/hybrid_threshold.py [--points 8192] [--seed 0]
"""
import argparse
import math

import torch

from gendiff.data.toy import tree
from gendiff.runtime import configured
from gendiff.scores import PhiScoreDenoiser, tweedie_score

SIGMAS = (0.003, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05, 0.07, 0.1, 0.2, 0.5, 1.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    gt = tree("A")
    g = torch.Generator().manual_seed(args.seed)
    x0, _ = gt.sample(args.points, generator=g, dtype=torch.float64)
    t13, t14 = gt.denoiser("source"), PhiScoreDenoiser(gt.denoiser("source"))
    print(f"exact source-mode optimum of tree A, {args.points} ground-truth points per σ, float64")
    print(f"{'sigma':>8} {'T13 error':>12} {'T14 error':>12}  better")
    rows = []
    for s in SIGMAS:
        x = x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        exact = gt.score(x, s)
        err = [float((s * s * (tweedie_score(d(x, s), x, s) - exact).square().sum(1)).mean())
               for d in (t13, t14)]
        rows.append((s, *err))
        print(f"{s:8.3f} {err[0]:12.3e} {err[1]:12.3e}  {'T13' if err[0] < err[1] else 'T14'}")
    for (s0, a0, b0), (s1, a1, b1) in zip(rows, rows[1:]):
        if (a0 - b0) * (a1 - b1) < 0:  # log-linear interpolation of log(T13/T14) between the two σ
            r0, r1 = math.log(a0 / b0), math.log(a1 / b1)
            cross = math.exp(math.log(s0) + r0 / (r0 - r1) * (math.log(s1) - math.log(s0)))
            print(f"crossover: sigma ≈ {cross:.3f} (T14 below, T13 above)")


if __name__ == "__main__":
    with configured():
        main()
