"""T6's head against T37's on the exact tree (issue 18, item 2): which σ_φ each reaches.

Trains the toy recipes (default "confidence", T6's σ_φ = c_var·e^(G/2), and "confidence-excess", T37's
σ_φ² = σ² + c_out²·e^G; "confidence-sigma-only", EDM2's u(σ), can be added) with the ablate defaults (4096
iterations at batch 4096, same seed and initialisation seed as `gendiff ablate`), then reads each final EMA
model at the Evaluator's held-out points (x0 from the tree, σ from the training density, x̃ = x0 + σε) and
reports per σ range of mixture_metrics.SIGMA_BINS:
- `σφ<σ`: the share of elements with σ_φ < σ, which no optimum allows (T8: σ_φ² = σ² + Var[x0 | x̃]);
- `exc err`: the median over elements of |(σ_φ² − σ²) − Var[x0 | x̃]| / Var[x0 | x̃] against the exact
  posterior variance (the excess the head claims against the truth; ≥ 1 where σ_φ < σ);
- `ratio`: the calibration ratio E[tr(Σ_φ⁻¹·target)]/d (mixture_metrics.calibration; 1 when calibrated);
- `w/k p50, p99`: the mean's F-space weight c_out²/σ_φ² (T37: ∂L/∂F = k_eff·(F − F*) with k_eff = c_out²/σ_φ²)
  over EDM's k = c_out²/c_var²; at most 1/(1 − k) ≤ 2 under T37, unbounded under T6 once σ_φ < σ;
- `score err`: the σ²-weighted score error of the Tweedie score (T13), as the ablate table reports it.
The first block is the exact optimum (the mixture's posterior, float64) read the same way: zeros where it is
the reference, and the w/k a perfect head would give the mean.

Usage: python benchmarks/heads_tree.py [--iterations 4096] [--batch 4096] [--seed 0] [--threads 2]
       [--recipes confidence,confidence-excess] [--json OUT.json]
(~40 s of training per recipe at the defaults on 2 threads.)
"""
import argparse
import json
import time
from dataclasses import replace

import torch

from gendiff.data.sources import ToyBatches
from gendiff.data.toy import tree
from gendiff.experiments.ablate import AblateConfig, make_evaluator
from gendiff.experiments.recipes import TOY_RECIPES
from gendiff.io import derive_seed
from gendiff.mixture_metrics import SIGMA_BINS
from gendiff.precond import PRECONDS
from gendiff.runtime import configured
from gendiff.train import train


def trained(name: str, cfg: AblateConfig):
    """The final EMA model of toy recipe `name` trained as `gendiff ablate` trains it (same seeds)."""
    spec = TOY_RECIPES[name]
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = spec.build_model(cfg.train)
    density = spec.density(cfg.train)
    t0 = time.perf_counter()
    res = train(model, spec.loss_fn(density), ToyBatches(tree(cfg.classes), spec.mode), cfg.train,
                seed=cfg.seed, sigma_density=density, progress=False, desc=name)
    return res.ema, time.perf_counter() - t0


class ExactOptimum:
    """The exact point-mode optimum μ* = E[x0 | x̃], σ_φ*² = σ² + Var[x0 | x̃] (T8) with the toy's EDM
    scalings, so that `by_sigma_bin` reads it like a trained model."""

    def __init__(self, gt, precond):
        self.exact, self.precond = gt.denoiser("point"), precond

    def predict(self, x, sigma):
        return self.exact.predict(x.double(), sigma.double())

    def __call__(self, x, sigma):
        return self.exact(x.double(), sigma.double())


def by_sigma_bin(model, ev) -> dict:
    """The per-σ-range numbers of the module docstring for one model at the Evaluator's held-out points."""
    preds = ev._held_out(model.predict)
    var = torch.cat([p.variance() for p in preds]).double()                      # σ_φ² [N, d]
    s = ev.sigma[:, None]
    exact = torch.diagonal(ev.optimum("point"), dim1=-2, dim2=-1) - s ** 2      # Var[x0 | x̃] [N, d]
    rel = ((var - s ** 2) - exact).abs() / exact
    sc = model.precond(s)
    w_over_k = sc.c_out ** 2 / var / sc.k
    cal = ev.calibration(model, "point")
    scores = ev.score_errors(model)

    def row(m, ratio, score):
        return {"points": int(m.sum()),
                "share_sigma_phi_below_sigma": float((var[m] < s[m] ** 2).double().mean()),
                "median_rel_error_excess": float(rel[m].median()), "ratio": ratio,
                "w_over_k_p50": float(w_over_k[m].median()),
                "w_over_k_p99": float(torch.quantile(w_over_k[m].flatten(), 0.99)), "score_error": score}
    out = {}
    for lo, hi in zip(SIGMA_BINS[:-1], SIGMA_BINS[1:]):
        key, m = f"[{lo:g}, {hi:g})", (ev.sigma >= lo) & (ev.sigma < hi)
        if bool(m.any()):
            out[key] = row(m, cal["ratio_by_sigma"][key], scores["score_error_by_sigma"][key])
    out["all"] = row(torch.ones_like(ev.sigma, dtype=torch.bool), cal["ratio"], scores["score_error"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=AblateConfig().train.iterations)
    ap.add_argument("--batch", type=int, default=AblateConfig().train.batch)
    ap.add_argument("--recipes", default="confidence,confidence-excess",
                    help="comma-separated toy recipes with a confidence head")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-points", type=int, default=AblateConfig().eval_points)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()
    names = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for r in names:
        if r not in TOY_RECIPES:
            raise SystemExit(f"--recipes: {r!r} is not a toy recipe; choose from {sorted(TOY_RECIPES)}")
    base = AblateConfig(seed=args.seed, eval_points=args.eval_points)
    cfg = replace(base, train=replace(base.train, iterations=args.iterations, batch=args.batch),
                  guide_iter=min(base.guide_iter, args.iterations))
    cfg.validate()
    with configured(args.threads):
        ev = make_evaluator(cfg)
        results = {}
        print(f"exact tree (class {cfg.classes}), {len(ev.sigma)} held-out points from the training density, "
              f"seed {cfg.seed}; {cfg.train.iterations} iterations at batch {cfg.train.batch}")
        for name in ["exact", *names]:
            if name == "exact":
                model, seconds, what = ExactOptimum(ev.gt, PRECONDS["edm"](cfg.train.sigma_data)), 0.0, \
                    "the exact optimum, T8"
            else:
                model, seconds = trained(name, cfg)
                what = f"head {TOY_RECIPES[name].head}, trained in {seconds:.0f} s"
            results[name] = {"train_seconds": seconds, **by_sigma_bin(model, ev)}
            print(f"\n{name} ({what})")
            print(f"{'σ range':<14} {'points':>7} {'σφ<σ':>7} {'exc err':>8} {'ratio':>7} {'w/k p50':>8} "
                  f"{'w/k p99':>8} {'score err':>10}")
            for key, r in results[name].items():
                if isinstance(r, dict):
                    print(f"{key:<14} {r['points']:7d} {r['share_sigma_phi_below_sigma']:7.3f} "
                          f"{r['median_rel_error_excess']:8.3f} {r['ratio']:7.3f} {r['w_over_k_p50']:8.3f} "
                          f"{r['w_over_k_p99']:8.3f} {r['score_error']:10.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"iterations": cfg.train.iterations, "batch": cfg.train.batch, "seed": cfg.seed,
                       "eval_points": len(ev.sigma), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
