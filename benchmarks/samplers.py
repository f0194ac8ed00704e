"""Every sampler on the exact 2-D tree: quality versus NFE, likelihood by PF-ODE and by ELBO, T13 versus T14.

Models: `exact` (the tree's posterior mean, a perfect denoiser: only the sampler errs), and the `edm` and
`confidence` models trained with `gendiff ablate`'s recipe (seed 0; cached under OUT/models/). Every σ-grid
sampler starts from exact samples of p(x; σ_max = 5) as `gendiff ablate` does; DDPM (linear β, T = 1000) and
DDIM start at the largest step whose σ̃ ≤ 5, from the exact p(x; σ̃) mapped to the DDPM latent (T2), so every
sampler covers the same σ range. NFE is counted (a wrapper counts denoiser calls), not computed.
Metrics (`Evaluator.sample_metrics`): median NLL and outlier rate under the true density, MMD² to a reference
set.

Usage: python benchmarks/samplers.py [--out docs/results/samplers] [--samples 8192] [--seeds 0,1,2]
       [--threads 1] [--quick]
Resumable: every finished row is appended to OUT/rows.jsonl at once, and a rerun skips the rows it finds
(keyed by part, model, sampler, score mode, NFE budget and seed). Then OUT/samplers.md and
docs/samplers-nfe.png are (re)written from all rows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch

from gendiff.experiments.ablate import AblateConfig, _train_model
from gendiff.experiments.recipes import TOY_RECIPES
from gendiff.data.toy import tree
from gendiff.mixture_eval import Evaluator, SamplerConfig
from gendiff.io import generator, save_figure, save_state, save_text
from gendiff.likelihood import continuous_elbo, ddpm_vlb, log_likelihood
from gendiff.process import DDPM, VP
from gendiff.runtime import configured
from gendiff.samplers import (sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_euler_maruyama,
                              sample_heun, sample_langevin, sample_pc)
from gendiff.schedules import LogNormalSigma, edm_sigmas
from gendiff.scores import CountCalls, with_score_mode

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 5.0, 7.0
BUDGETS = (8, 16, 32, 64, 128, 1000)
DDPM_T = 1000


def _grid(steps):
    return edm_sigmas(steps, SIGMA_MIN, SIGMA_MAX, RHO)


def _ddpm_start(ddpm):
    sig = (ddpm.one_minus_alpha_bar / ddpm.alpha_bar).sqrt()
    return int((sig <= SIGMA_MAX).nonzero().max())


def plan(name: str, nfe: int):
    """(sampler(den, x_init, z_init, ddpm, t0, gen) -> x) for a budget, or None where it does not apply."""
    if name == "euler":
        return lambda d, x, z, dd, t0, g: sample_euler(d, x, _grid(nfe))
    if name == "heun":
        return lambda d, x, z, dd, t0, g: sample_heun(d, x, _grid((nfe + 1) // 2))
    if name == "dpmpp_2m":
        return lambda d, x, z, dd, t0, g: sample_dpmpp_2m(d, x, _grid(nfe))
    if name == "euler_maruyama":
        return lambda d, x, z, dd, t0, g: sample_euler_maruyama(d, x, _grid(nfe), generator=g)
    if name == "pc":
        return lambda d, x, z, dd, t0, g: sample_pc(d, x, _grid((nfe + 1) // 2), generator=g)
    if name == "langevin":  # 10 geometric scales from σ_max to 0.01 (NCSN, T29), then a final denoise
        if nfe < 100:
            return None
        scales = torch.exp(torch.linspace(math.log(SIGMA_MAX), math.log(0.01), 10, dtype=torch.float64))
        return lambda d, x, z, dd, t0, g: sample_langevin(d, x, scales, steps_per_scale=(nfe - 1) // 10,
                                                          generator=g)
    if name == "ddim":
        def run(d, x, z, dd, t0, g):
            steps = sorted({int(round(v)) for v in torch.linspace(t0, 1, min(nfe, t0)).tolist()},
                           reverse=True)
            return sample_ddim(d, z, dd, steps)
        return run if nfe < 1000 else None
    if name == "ddpm":  # the full ancestral chain only (its NFE is fixed by the start step)
        return ((lambda d, x, z, dd, t0, g: sample_ddpm(d, z, dd, t_start=t0, generator=g))
                if nfe == 1000 else None)
    raise ValueError(name)


SAMPLERS = ("euler", "heun", "dpmpp_2m", "euler_maruyama", "pc", "langevin", "ddim", "ddpm")


def load_or_train(name: str, out: str, quick: bool):
    cfg = AblateConfig(runs=(name,))
    if quick:
        cfg.train = replace(cfg.train, iterations=256, batch=512)
    spec = TOY_RECIPES[name]
    path = os.path.join(out, "models", f"{name}{'-quick' if quick else ''}.safetensors")
    model = spec.build_model(cfg.train)
    if os.path.exists(path):
        from safetensors.torch import load_file
        model.load_state_dict(load_file(path))
    else:
        res = _train_model(name, spec, cfg, "A", 0, None, progress=False)
        model = res.ema
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_state(model.state_dict(), path)
    return model.eval().requires_grad_(False)


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def key(r):
    return (r["part"], r["model"], r["sampler"], r.get("score_mode", "tweedie"), r.get("budget"),
            r.get("seed"))


def append(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def sampling_part(models, seeds, samples, rows_path, done, log):
    gt = tree("A")
    ddpm = DDPM(DDPM_T)
    t0 = _ddpm_start(ddpm)
    ab0 = float(ddpm.alpha_bar[t0])
    sig0 = math.sqrt(float(ddpm.one_minus_alpha_bar[t0]) / ab0)
    for seed in seeds:
        ev = Evaluator(gt, seed=seed, samples=samples, eval_points=256,
                       sigma_density=LogNormalSigma(-2.4, 1.5), sampler=SamplerConfig(sigma_max=SIGMA_MAX))
        z_init = math.sqrt(ab0) * gt.sample(samples, sig0, generator=generator(seed, "ddpm-init"))[0]
        jobs = [(m, s, "tweedie", b) for m in models for s in SAMPLERS for b in BUDGETS]
        jobs += [("confidence", s, "phi", 32) for s in SAMPLERS if "confidence" in models]  # T13 vs T14
        for m, s, mode, b in jobs:
            if m != "exact" and seed != seeds[0]:
                continue
            row = {"part": "sampling", "model": m, "sampler": s, "score_mode": mode, "budget": b,
                   "seed": seed}
            fn = plan(s, b)
            if fn is None or key(row) in done:
                continue
            den = models[m]
            if mode == "phi":
                den = with_score_mode(den, "phi")
            counter = CountCalls(den)
            start = time.perf_counter()
            with torch.no_grad():
                x = fn(counter, ev.x_init, z_init, ddpm, t0, generator(seed, f"sampler-{s}-{b}"))
            row.update(nfe=counter.calls, seconds=time.perf_counter() - start, **ev.sample_metrics(x.float()))
            append(rows_path, row)
            done.add(key(row))
            log(f"{m:10s} {s:15s} {mode:7s} NFE {row['nfe']:5d}  median NLL {row['median_nll']:7.3f}  "
                f"outliers {row['outlier_rate']:.4f}  MMD² {row['mmd']:.2e}  {row['seconds']:.1f}s")


def likelihood_part(models, points, rows_path, done, log):
    gt = tree("A")
    x = gt.sample(points, generator=generator(0, "likelihood-points"))[0].double()
    d = x.shape[1]
    ref = {"part": "likelihood", "model": "exact", "sampler": "oracle: −log p(x; σ_min)", "seed": 0}
    if key(ref) not in done:
        nll = float(-gt.logp(x, SIGMA_MIN).mean())
        ref.update(nll=nll, bpd=nll / (d * math.log(2)), nfe=0, seconds=0.0)
        append(rows_path, ref)
        done.add(key(ref))
    for m, den in models.items():
        for method, fn in (
                ("PF-ODE (exact div., dopri5 1e-5)", lambda c: -log_likelihood(
                    c, x.float() if m != "exact" else x, sigma_min=SIGMA_MIN, sigma_max=80.0)[0]),
                ("continuous ELBO (VP, σ ∈ [0.002, 80], 16 draws)", lambda c: torch.stack([continuous_elbo(
                    c, x.float() if m != "exact" else x, VP(-2 * math.log(80.0), -2 * math.log(SIGMA_MIN)),
                    generator=torch.Generator().manual_seed(i))["total"] for i in range(16)]).mean(0)),
                ("DDPM bound (linear β, T = 1000)", lambda c: ddpm_vlb(
                    c, x.float() if m != "exact" else x, DDPM(DDPM_T),
                    generator=torch.Generator().manual_seed(0)
                )["total"])):
            row = {"part": "likelihood", "model": m, "sampler": method, "seed": 0}
            if key(row) in done:
                continue
            c = CountCalls(den)
            start = time.perf_counter()
            nll = fn(c).double()
            row.update(nll=float(nll.mean()), nll_se=float(nll.std() / math.sqrt(len(nll))),
                       bpd=float(nll.mean()) / (d * math.log(2)), nfe=c.calls,
                       seconds=time.perf_counter() - start)
            append(rows_path, row)
            done.add(key(row))
            log(f"{m:10s} {method:45s} NLL {row['nll']:.3f} ± {row['nll_se']:.3f} nats  NFE {row['nfe']}  "
                f"{row['seconds']:.1f}s")


def _mean_sd(vals):
    vals = [v for v in vals if v is not None]
    if len(vals) < 2:
        return vals[0], None
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _fmt(vals, digits=3, sci=False):
    m, s = _mean_sd(vals)
    f = (lambda v: f"{v:.2e}") if sci else (lambda v: f"{v:.{digits}f}")
    return f(m) if s is None else f"{f(m)} ± {f(s)}"


def render(rows, out, fig_path):
    lines = ["# Samplers on the exact tree (benchmarks/samplers.py)\n",
             "Command: `python benchmarks/samplers.py` (see its docstring). Mean ± std over seeds where "
             "several seeds ran (the exact model); trained models: seed 0. MMD² is unbiased (can be < 0).\n"]
    samp = [r for r in rows if r["part"] == "sampling"]
    for model in ("exact", "edm", "confidence"):
        rs = [r for r in samp if r["model"] == model and r["score_mode"] == "tweedie"]
        if not rs:
            continue
        lines += [f"\n## {model}: quality versus NFE\n",
                  "| sampler | budget | NFE | median NLL ↓ | outliers ↓ | MMD² | "
                  "seconds | seeds |", "|---|---|---|---|---|---|---|---|"]
        for s in SAMPLERS:
            for b in BUDGETS:
                cell = [r for r in rs if r["sampler"] == s and r["budget"] == b]
                if cell:
                    lines.append(f"| {s} | {b} | {cell[0]['nfe']} | {_fmt([r['median_nll'] for r in cell])} "
                                 f"| {_fmt([r['outlier_rate'] for r in cell], 4)} | "
                                 f"{_fmt([r['mmd'] for r in cell], sci=True)} | "
                                 f"{_fmt([r['seconds'] for r in cell], 1)} | {len(cell)} |")
    phi = [r for r in samp if r["model"] == "confidence" and r["budget"] == 32]
    if any(r["score_mode"] == "phi" for r in phi):
        lines += ["\n## T13 versus T14 (confidence model, budget 32)\n",
                  "| sampler | NFE | median NLL T13 | median NLL T14 | outliers T13 | outliers T14 | MMD² "
                  "T13 | MMD² T14 |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in SAMPLERS:
            a = [r for r in phi if r["sampler"] == s and r["score_mode"] == "tweedie"]
            b = [r for r in phi if r["sampler"] == s and r["score_mode"] == "phi"]
            if a and b:
                a, b = a[0], b[0]
                lines.append(f"| {s} | {a['nfe']} | {a['median_nll']:.3f} | {b['median_nll']:.3f} | "
                             f"{a['outlier_rate']:.4f} | {b['outlier_rate']:.4f} | {a['mmd']:.2e} | "
                             f"{b['mmd']:.2e} |")
    lik = [r for r in rows if r["part"] == "likelihood"]
    if lik:
        lines += ["\n## Likelihood of held-out ground-truth points (2-D, nats and bits/dim)\n",
                  "| model | method | NLL (nats) ↓ | bits/dim | NFE | seconds |", "|---|---|---|---|---|---|"]
        for r in lik:
            se = f" ± {r['nll_se']:.3f}" if "nll_se" in r else ""
            lines.append(f"| {r['model']} | {r['sampler']} | {r['nll']:.3f}{se} | {r['bpd']:.3f} | "
                         f"{r['nfe']} | {r['seconds']:.1f} |")
    save_text("\n".join(lines) + "\n", os.path.join(out, "samplers.md"))
    _figure(samp, fig_path)


def _figure(samp, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = [m for m in ("exact", "edm", "confidence") if any(r["model"] == m for r in samp)]
    if not models:
        return
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.5), squeeze=False)
    for j, m in enumerate(models):
        for s in SAMPLERS:
            pts = sorted({r["budget"] for r in samp if r["model"] == m and r["sampler"] == s
                          and r["score_mode"] == "tweedie"})
            if not pts:
                continue
            xs, outl, mmds = [], [], []
            for b in pts:
                cell = [r for r in samp if r["model"] == m and r["sampler"] == s and r["budget"] == b
                        and r["score_mode"] == "tweedie"]
                xs.append(cell[0]["nfe"])
                outl.append(_mean_sd([r["outlier_rate"] for r in cell])[0])
                mmds.append(_mean_sd([r["mmd"] for r in cell])[0])
            axes[0, j].plot(xs, outl, marker="o", label=s)
            axes[1, j].plot(xs, [max(v, 1e-6) for v in mmds], marker="o", label=s)
        axes[0, j].set_title(f"{m}")
        for i, lab in enumerate(("outlier rate (ground truth: 0.01)", "MMD² (clipped at 1e-6)")):
            axes[i, j].set_xscale("log")
            axes[i, j].set_xlabel("NFE")
            axes[i, j].set_ylabel(lab)
        axes[0, j].set_yscale("log")
        axes[1, j].set_yscale("log")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/samplers")
    ap.add_argument("--figure", default="docs/samplers-nfe.png")
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--points", type=int, default=512, help="held-out points for the likelihood table")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parts", default="sampling,likelihood")
    ap.add_argument("--quick", action="store_true", help="tiny models and few samples: a smoke test")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.quick:
        a.samples, a.points, seeds = 256, 16, seeds[:1]
    os.makedirs(a.out, exist_ok=True)
    rows_path = os.path.join(a.out, "rows.jsonl")
    done = {key(r) for r in read_rows(rows_path)}
    log = lambda s: print(s, flush=True)  # noqa: E731
    with configured(a.threads):
        models = {"exact": tree("A").denoiser("point")}
        for name in ("edm", "confidence"):
            models[name] = load_or_train(name, a.out, a.quick)
        parts = a.parts.split(",")
        if "sampling" in parts:
            sampling_part(models, seeds, a.samples, rows_path, done, log)
        if "likelihood" in parts:
            likelihood_part(models, a.points, rows_path, done, log)
    render(read_rows(rows_path), a.out, a.figure)
    print(f"wrote {a.out}/samplers.md and {a.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
