"""DDPM's reverse variance at equal steps (THEORY T38; issue 18, Build 5): β, β̃, IDDPM's learned v (T26),
Analytic-DPM's one v̄_t per step, and the confidence head's per-pixel β̃_t + c_0²·(σ_φ² − σ̃²)⁺, each at 10,
25 and 100 respaced steps: the DDPM bound in bits/dim (± its standard error over test images) and the FID of
DDPM ancestral samples (± its bootstrap sd; with several --seeds, mean ± sd over seeds).

Every cell is the CLI's own evaluation, nothing copied: `gendiff likelihood RUN --method ddpm-bound --variance
V --steps K --points P` (images.likelihood_run: the bound of the K-step respaced model, every step summed,
discretised decoder, T38's and v's own Σ_1) and `gendiff eval RUN --sampler ddpm --variance V --steps K
--samples N` (images.eval_run). Each writes its JSON into the run folder (RUN/likelihood-ddpm-V-K-seedS.json,
RUN/eval-ddpm-V-K-N-seedS.json); a cell whose JSON is already there with the same points/samples is read
back, so an interrupted table resumes. Give one run folder or several (e.g. a confidence run for phi and a
learned-variance run for v): each gets every variance its head allows (phi needs a learned confidence, v the
v head; β, β̃, analytic any run; analytic's v̄_t from ANALYTIC_IMAGES training images, as the CLI).
EDM-trained runs are read at the DDPM σ̃_t (T2).

Usage (real runs, on a machine with time for it: 3 steps × 5 variances × (N samples + P bound images)):
  python benchmarks/ddpm_variances.py RUN_CONFIDENCE RUN_LEARNED_VARIANCE --samples 10000 --points 1000 \\
      --seeds 0,1,2 --device auto --out docs/results/ddpm-variances.md
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from gendiff.experiments.ddpm_variance import ANALYTIC_IMAGES, DDPM_VARIANCE_CHOICES, ddpm_variance
from gendiff.experiments.images import eval_file, eval_run, likelihood_run, resolve_device
from gendiff.experiments.kinds import load_run
from gendiff.experiments.runfolder import read_json
from gendiff.runtime import configured


def supported(cfg, wanted) -> list:
    out = []
    for v in wanted:
        try:
            out.append(ddpm_variance(cfg, v))
        except ValueError:
            pass
    return out


def cell(run, cfg, model, variance, steps, seed, args) -> dict:
    """The bound and the FID of one (variance, steps, seed), read back where its JSON is already there."""
    lk = read_json(os.path.join(run, f"likelihood-ddpm-{variance}-{steps}-seed{seed}.json"))
    if lk is None or lk.get("bpd_images") != args.points:
        lk = likelihood_run(run, cfg, model, points=args.points, method="ddpm-bound", variance=variance,
                            steps=steps, seed=seed)
    ev = read_json(os.path.join(run, eval_file(cfg, args.samples, seed, steps=steps, sampler="ddpm",
                                               variance=variance)))
    if ev is None and args.samples:
        ev = eval_run(run, cfg, model, samples=args.samples, steps=steps, seed=seed, sampler="ddpm",
                      variance=variance)
    return {"bpd": lk["bpd_ddpm_bound"], "bpd_se": lk["bpd_ddpm_bound_se"],
            "fid": None if ev is None else ev["fid"], "fid_sd": None if ev is None else ev.get("fid_sd")}


def pm(values, sds) -> str:
    """'mean ± sd': one value with its own sd, or several (seeds) with their spread."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}" + ("" if sds[0] is None else f" ± {sds[0]:.3f}")
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{m:.3f} ± {sd:.3f} (over {len(values)} seeds)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="image run folders written by gendiff train")
    ap.add_argument("--steps", default="10,25,100", help="respaced DDPM steps (default 10,25,100)")
    ap.add_argument("--variances", default=",".join(DDPM_VARIANCE_CHOICES),
                    help="which of " + ", ".join(DDPM_VARIANCE_CHOICES) + " (each run: those its head "
                    "allows)")
    ap.add_argument("--samples", type=int, default=10000, help="samples per FID (0: no FID; default 10000)")
    ap.add_argument("--points", type=int, default=1000, help="test images of the bound (default 1000)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = args.variances.split(",")
    lines = ["| run | recipe | variance | steps | DDPM bound bits/dim ↓ | FID ↓ |",
             "|---|---|---|---|---|---|"]
    with configured(args.threads):
        for run in args.runs:
            cfg, model = load_run(run)
            model = model.to(resolve_device(args.device))
            for v in supported(cfg, wanted):
                for k in steps:
                    start = time.perf_counter()
                    cells = [cell(run, cfg, model, v, k, s, args) for s in seeds]
                    row = (f"| {os.path.basename(os.path.normpath(run))} | {cfg.recipe} | {v} | {k} | "
                           f"{pm([c['bpd'] for c in cells], [c['bpd_se'] for c in cells])} | "
                           f"{pm([c['fid'] for c in cells], [c['fid_sd'] for c in cells])} |")
                    lines.append(row)
                    print(row, f"({time.perf_counter() - start:.0f} s)", flush=True)
    text = (f"DDPM reverse variance at equal steps (T38): bound on {args.points} test images (± se over "
            f"images), FID of {args.samples} samples (± bootstrap sd, or sd over seeds {args.seeds}); "
            f"analytic's v̄_t from {ANALYTIC_IMAGES} training images.\n\n"
            + "\n".join(lines) + "\n")
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
