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

--data mnist / fashion-mnist: the same for images, with an exact posterior that keeps MNIST's pixel values.
The distribution is the product of the training split's per-pixel marginals (each of the 784 pixels
independent, its 256 byte values with their training frequencies; 81% of MNIST's pixels are background at
exactly −1). Its posterior factorises per pixel: p(x0 = v_k | x̃) ∝ h_k·N(x̃; v_k, σ²) over the 256 levels
v_k = k/127.5 − 1, so mean and variance are exact (float64). Images are drawn from that product (not the
test set: only for its own draws is the posterior exact). It is not MNIST (the pixels of a digit are not
independent, and a real posterior also reads the neighbours), but it has MNIST's near-binary pixel values, the
shape that decides coverage: where a pixel may be ink or background, p(x0 | x̃) is two-peaked, and a
Gaussian interval of the right variance covers too much at ±1 std and too little at ±2.

Each bin also prints `rescaled` (calibration.rescale_coverage): whether one scalar on the variance, per σ
bin, could put both coverages inside issue 18's 68 ± 5% / 95 ± 3%.

`--readout RUN/calibration-paired.json` prints the same table for a trained run's readout (`gendiff eval RUN
--calibration-against ...`, every predictor in it, on the elements none of them floors).

Usage: python benchmarks/oracle_coverage.py [--data tree|mnist|fashion-mnist] [--points 8192]
       [--sigmas 0.05,0.1,0.2,0.5,1,2] [--seed 0] [--json OUT.json]
       (under a minute each; no training; the tree of `gendiff ablate`, classes "A"; --points counts images
       for mnist / fashion-mnist, default 512)
"""
import argparse
import json

import torch

from gendiff.calibration import GAUSS_COVERAGE_1, GAUSS_COVERAGE_2, calibration_by_sigma
from gendiff.data.images import load_mnist
from gendiff.data.toy import tree
from gendiff.experiments.images import sigma_edges
from gendiff.io import generator

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1      # to_tensor's byte values in [−1, 1]


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
    return calibration_by_sigma(post.mean, var, x0r, sig, sigma_edges(sigmas),
                                labels=[f"sigma={s:g}" for s in sigmas],
                                fit=torch.arange(len(xn)) % 2 == 0, seed=seed)


def pixel_marginals(images) -> torch.Tensor:
    """[P, 256] float64: each pixel's frequency of each byte value over uint8 images [N, C, H, W]."""
    b = torch.from_numpy(images.reshape(len(images), -1)).long()
    counts = torch.zeros(b.shape[1], 256, dtype=torch.float64)
    counts.scatter_add_(1, b.T.contiguous(), torch.ones(b.T.shape, dtype=torch.float64))
    return counts / len(images)


def pixel_posterior(freq: torch.Tensor, xn: torch.Tensor, sigma: float, chunk: int = 16):
    """(mean, variance) of p(x0 | x̃) per pixel under the independent-pixel product of `freq` [P, 256], for
    noisy images xn [M, P] at noise σ: weights h_k·N(x̃; v_k, σ²) over the levels, normalised per pixel."""
    logh = freq.log()                                                # −inf where a value never occurs
    mean, var = [], []
    for x in xn.split(chunk):
        logits = logh - (x[..., None] - LEVELS) ** 2 / (2 * sigma ** 2)
        w = torch.softmax(logits, dim=-1)
        m = (w * LEVELS).sum(-1)
        mean.append(m)
        var.append((w * (LEVELS - m[..., None]) ** 2).sum(-1))
    return torch.cat(mean), torch.cat(var)


def pixel_coverage(name: str, sigmas, images: int, seed: int) -> dict:
    """calibration_by_sigma of the exact posterior of the independent-pixel product of `name`'s training
    marginals, on `images` draws from that product at each σ (even-index images fit the constant)."""
    freq = pixel_marginals(load_mnist(name, "train").images)
    g = generator(seed, "pixel-oracle")
    x0 = LEVELS[torch.multinomial(freq, images, replacement=True, generator=g).T]          # [M, P]
    mus, vs = [], []
    for s in sigmas:
        m, v = pixel_posterior(freq, x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64), s)
        mus.append(m)
        vs.append(v)
    sig = torch.tensor(sigmas, dtype=torch.float64).repeat_interleave(images)
    return calibration_by_sigma(torch.cat(mus), torch.cat(vs), x0.repeat(len(sigmas), 1), sig,
                                sigma_edges(sigmas),
                                labels=[f"sigma={s:g}" for s in sigmas],
                                fit=(torch.arange(images) % 2 == 0).repeat(len(sigmas)), seed=seed)


def print_table(readout: dict, predictors) -> None:
    """One markdown row per σ bin and predictor of a calibration_by_sigma readout: floored share, coverage,
    mean z², kurtosis of z, and whether one scalar on the variance could reach issue 18's band. Coverage
    ± its bootstrap sd over examples (images; points for the tree)."""
    print("| σ | predictor | floored | ±1 std | ±2 std | mean z² | kurtosis of z | one scalar can reach the "
          "target | closest (±1 / ±2) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, b in readout["bins"].items():
        for name in predictors:
            h = b[name]
            if h["rescaled"] is None:
                continue
            r = h["rescaled"]
            can = f"yes, c ∈ [{r['scale_lo']:.3g}, {r['scale_hi']:.3g}]" if r["feasible"] else "no"
            print(f"| {label.split('=')[1]} | {name} | {100 * h['floored_share']:.2f}% | "
                  f"{100 * h['coverage_1s']:.1f} ± {100 * h['coverage_1s_sd']:.1f}% | "
                  f"{100 * h['coverage_2s']:.1f} ± {100 * h['coverage_2s_sd']:.1f}% | {h['z2_mean']:.3f} | "
                  f"{r['kurtosis']:.1f} | {can} | {100 * r['best']['coverage_1s']:.1f}% / "
                  f"{100 * r['best']['coverage_2s']:.1f}% |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="tree", choices=("tree", "mnist", "fashion-mnist"))
    ap.add_argument("--points", type=int, default=None, help="points (tree, default 8192) or images (512)")
    ap.add_argument("--sigmas", default="0.05,0.1,0.2,0.5,1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--readout", help="instead: print the table for a readout JSON written by gendiff "
                    "(RUN/calibration-paired.json, calibration.json): every predictor in it")
    args = ap.parse_args()
    if args.readout:
        with open(args.readout) as f:
            out = json.load(f)
        out = out.get("readout", out)
        first = next(iter(out["bins"].values()))
        print_table(out, [k for k, v in first.items() if isinstance(v, dict) and "rescaled" in v])
        return
    sigmas = [float(s) for s in args.sigmas.split(",")]
    if args.data == "tree":
        points = args.points or 8192
        out = exact_coverage(sigmas, points, args.seed)
        what = f"exact posterior of the tree, {points // 2} measured points per σ"
    else:
        points = args.points or 512
        out = pixel_coverage(args.data, sigmas, points, args.seed)
        what = (f"exact posterior of {args.data}'s independent-pixel product, {points - points // 2} "
                "measured images per σ")
    print(f"{what}; Gaussian: {100 * GAUSS_COVERAGE_1:.1f}% / {100 * GAUSS_COVERAGE_2:.1f}%")
    print_table(out, ("head", "constant"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data, "points": points, "seed": args.seed, "readout": out}, f, indent=1)


if __name__ == "__main__":
    main()
