"""Held-out recalibration of a confidence head, checked (issue 18's coverage target): both halves, against
the baselines at their best, and coverage conditional on what the head claims and on the pixel.

`gendiff eval RUN --calibration-against OTHER --recalibrate coverage --recalibrate-groups N` fits each model's
map on the even-index calibration images and measures the odd ones, with every model recalibrated the same
way.
This script asks three more questions of the same readout (the same seeded noisy test images):
- does it hold on the other split? Each split in turn fits (the map and the constant) and the other is
  measured, so the fit of the map is itself tested on images it did not see twice;
- does the head beat the baselines at their best? The head gets the coverage map; every baseline (other runs,
  e.g. u(σ)) gets the NLL map (its own best scale per σ and group); the best constant is NLL-optimal anyway.
  NLL gains are paired per pixel, ± bootstrap sd over the measured images;
- is coverage right where it matters, not only pooled? On the measured half, ±1 / ±2 std coverage per group of
  the head's raw claimed variance (the map's groups, fitted on the fit half) and for background pixels (x0 at
  the data's minimum, −1) against the rest (ink).
Also printed: each split's map (scales per group; a map that is not monotone reorders the claims).

Usage: python benchmarks/recalibration_check.py RUN --against OTHER[,OTHER2] [--weights model.safetensors]
       [--groups 4] [--images 512] [--threads N] [--json OUT.json] [--md OUT.md]
"""
import argparse
import json
import os

import torch

from gendiff.calibration import calibration_by_sigma
from gendiff.experiments.images import (CALIBRATION_SIGMAS, _calibration_inputs, _excess_readout,
                                        _recalibrated, load_images, sigma_edges)
from gendiff.experiments.kinds import load_run
from gendiff.io import derive_seed


def _coverage(err2, var):
    z2 = err2 / var
    return {"n": int(z2.numel()), "coverage_1s": float((z2 <= 1).double().mean()),
            "coverage_2s": float((z2 <= 4).double().mean())}


def check(run: str, against: list, weights: str, groups: int, images: int) -> dict:
    cfg, model = load_run(run, weights)
    others = {os.path.basename(os.path.normpath(r)): load_run(r)[1] for r in against}
    x0 = load_images(cfg.data, "test").to_tensor()[:images]
    n, sigmas = len(x0), list(CALIBRATION_SIGMAS)
    noisy = _calibration_inputs(x0, sigmas, cfg.seed)
    head = _excess_readout(model, noisy, sigmas)
    reads = {k: _excess_readout(m, noisy, sigmas) for k, m in others.items()}
    x0r = x0.repeat(len(sigmas), *([1] * (x0.ndim - 1))).double()
    background = x0r <= x0.min()
    sig = torch.tensor(sigmas, dtype=torch.float64).repeat_interleave(n)
    out = {"run": run, "weights": weights, "against": against, "groups": groups, "images": n, "splits": {}}
    for split, parity in (("fit even, measure odd", 0), ("fit odd, measure even", 1)):
        fit = torch.arange(n) % 2 == parity
        meas = ~fit
        (mu, var), hmap = _recalibrated(x0, sigmas, head, "coverage", groups, fit)
        base = {k: _recalibrated(x0, sigmas, r, "nll", groups, fit)[0] for k, r in reads.items()}
        res = calibration_by_sigma(mu, var, x0r, sig, sigma_edges(sigmas), fit=fit.repeat(len(sigmas)),
                                   labels=[f"sigma={s:g}" for s in sigmas], rest="common", baselines=base,
                                   seed=derive_seed(cfg.seed, "calibration"))
        err2 = (mu.double() - x0r).square()
        for k, s in enumerate(sigmas):
            rows = slice(k * n, (k + 1) * n)
            e, v, raw = err2[rows][meas], var[rows][meas].double(), head[1][rows][meas].double()
            g = torch.searchsorted(torch.tensor(hmap[k]["edges"], dtype=torch.float64), raw.contiguous(),
                                   right=True)
            bg = background[rows][meas]
            row = res["bins"][f"sigma={s:g}"]
            row["map"] = hmap[k]
            row["by_group"] = [_coverage(e[g == j], v[g == j]) for j in range(len(hmap[k]["scales"]))]
            row["background"], row["ink"] = _coverage(e[bg], v[bg]), _coverage(e[~bg], v[~bg])
        out["splits"][split] = res
    return out


def markdown(out: dict) -> str:
    names = out["against"]
    lines = [f"{out['run']} ({out['weights']}): coverage map, {out['groups']} groups per σ, on "
             f"{out['images']} test images; baselines at their NLL map. Coverage ± bootstrap sd; gains = "
             "baseline − head, nats/pixel."]
    for split, res in out["splits"].items():
        lines += ["", f"**{split}**", "",
                  "| σ | ±1 / ±2 std | over the constant | "
                  + " | ".join(f"over {os.path.basename(os.path.normpath(r))}" for r in names)
                  + " | ±1 / ±2 by claim group (low → high) | background | ink | map scales |",
                  "|---" * (7 + len(names)) + "|"]
        for label, row in res["bins"].items():
            h = row["head"]
            gains = [row["gain"][k] for k in row["gain"]]
            pc = lambda c: f"{100 * c['coverage_1s']:.1f} / {100 * c['coverage_2s']:.1f}"  # noqa: E731
            lines.append(
                f"| {label.split('=')[1]} | {100 * h['coverage_1s']:.1f} ± {100 * h['coverage_1s_sd']:.1f} / "
                f"{100 * h['coverage_2s']:.1f} ± {100 * h['coverage_2s_sd']:.1f} | "
                + " | ".join(f"{g['nll']:+.3f} ± {g['nll_sd']:.3f}" for g in gains) + " | "
                + "; ".join(pc(c) for c in row["by_group"])
                + f" | {pc(row['background'])} | {pc(row['ink'])} | "
                + ", ".join(f"{c:.2f}" for c in row["map"]["scales"]) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--against", required=True, help="comma-separated run folders (baselines)")
    ap.add_argument("--weights", default="model.safetensors")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        against = [r for r in args.against.split(",") if r]
        out = check(args.run, against, args.weights, args.groups, args.images)
    text = markdown(out)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
