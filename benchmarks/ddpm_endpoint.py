"""How much of DDPM's sharpness on the tree its endpoint alone explains (issue 18).

DDPM and DDIM on the linear-β schedule (T = 1000) stop at σ̃_1 = √(β_1/(1 − β_1)) ≈ 0.01 and return the
posterior mean there; the σ-grid samplers go down to 0.002 and end with D(x; 0.002) too. A perfect sampler
with an endpoint σ draws x ~ p(x; σ) exactly (the tree's closed form) and returns the exact posterior mean
D(x; σ): its median NLL, at σ̃_1 against at 0.002, is the endpoint's share with no sampler error. Compare with
the DDPM and DDIM rows of docs/results/samplers/samplers.md (median NLL −1.692 ± 0.020 and −1.638 ± 0.012
against Heun-1000's −1.455 ± 0.014; the exact denoiser, seeds 0, 1, 2, 8192 samples). No training, seconds.
Usage: python benchmarks/ddpm_endpoint.py [--samples 8192] [--seeds 0,1,2]
"""
import argparse

import torch

from gendiff.data.toy import tree
from gendiff.mixture_metrics import median_nll
from gendiff.process import DDPM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    gt, ddpm = tree("A"), DDPM(1000)
    s1 = float((ddpm.one_minus_alpha_bar[1] / ddpm.alpha_bar[1]).sqrt())
    den = gt.denoiser("point")
    rows = []
    print(f"tree A, exact denoiser, {args.samples} samples per seed; σ̃_1 = {s1:.6f}")
    print(f"{'seed':>4} {'truth':>9} {'D(p(x; 0.002))':>15} {'D(p(x; σ̃_1))':>14} {'endpoint':>9}")
    for seed in (int(s) for s in args.seeds.split(",")):
        g = torch.Generator().manual_seed(seed)
        x0, _ = gt.sample(args.samples, generator=g, dtype=torch.float64)
        ends = []
        for s in (0.002, s1):
            xs, _ = gt.sample(args.samples, s, generator=g, dtype=torch.float64)
            with torch.no_grad():
                ends.append(median_nll(den(xs, torch.tensor(s, dtype=torch.float64)), gt))
        rows.append((median_nll(x0, gt), *ends))
        print(f"{seed:4d} {rows[-1][0]:9.3f} {ends[0]:15.3f} {ends[1]:14.3f} {ends[1] - ends[0]:9.3f}")
    t = torch.tensor(rows, dtype=torch.float64)
    shift = t[:, 2] - t[:, 1]
    print("mean ± std over seeds: " + ", ".join(f"{name} {c.mean():.3f} ± {c.std():.3f}" for name, c in (
        ("truth", t[:, 0]), ("D at 0.002", t[:, 1]), ("D at σ̃_1", t[:, 2]),
        ("endpoint σ̃_1 − 0.002", shift)))
          + " nats")


if __name__ == "__main__":
    main()
