"""Autoguidance (THEORY T34, EDM2) and classifier-free guidance (T33) on an image run, against the weight w,
with and without a guidance interval (Kynkäänniemi et al. 2024): FID ± its bootstrap sd (or mean ± sd over
seeds), precision and recall of the run's sampler, every cell the CLI's own `gendiff eval RUN --autoguide
GUIDE --guidance W [--guidance-interval LO,HI]` (or `--cfg-weight W` for a class-conditional run), read back
from the JSON it wrote in the run folder (images.eval_file) when it is already there: an interrupted sweep
resumes. The unguided row (w = 1 autoguided is the main model bit for bit) is measured once.

Usage (issue 20: a guide is the same U-Net trained shorter and/or smaller, on the same data):
  gendiff train --preset mnist-conf --set recipe=confidence-excess --set train.iterations=800 --out runs/guide
  python benchmarks/guidance_images.py RUN --guide runs/guide --weights 1.5,2,3 --interval 0.3,5 \\
      --samples 2000 --seeds 0 --out docs/results/guidance-mnist.md --figure docs/results/guidance-mnist.png
  (a class-conditional RUN: --cfg-weights 0.5,1,2 adds the CFG rows, with the same interval; --sampler
  dpmpp_2m --steps 16: every cell with that sampler instead of the run's own)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from gendiff.experiments.images import eval_file, eval_run, load_guide, resolve_device
from gendiff.experiments.kinds import load_run
from gendiff.experiments.recipes import IMAGE_RECIPES
from gendiff.experiments.runfolder import read_json
from gendiff.runtime import configured


def numbers(text: str) -> list:
    return [float(v) for v in text.split(",") if v.strip()] if text else []


def mean_sd(cells: list, key: str, sd_key: str | None = None) -> tuple:
    """One cell's value and its own sd (None without sd_key), or several seeds' mean and sd."""
    vals = [c[key] for c in cells]
    if len(vals) == 1:
        return vals[0], cells[0].get(sd_key) if sd_key else None
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def summary(cells: list, key: str, sd_key: str | None = None) -> str:
    """One cell's value ± its own sd, or several seeds' mean ± sd."""
    m, sd = mean_sd(cells, key, sd_key)
    return f"{m:.2f}" + ("" if sd is None else f" ± {sd:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="the main image run folder")
    ap.add_argument("--guide", help="the guide run folder (autoguidance rows)")
    ap.add_argument("--guide-weights", default="model.safetensors")
    ap.add_argument("--weights", default="1.5,2,3", help="autoguidance weights w (1 = unguided)")
    ap.add_argument("--cfg-weights", default="", help="CFG weights (class-conditional runs)")
    ap.add_argument("--interval", help="LO,HI: every guided row also with this guidance interval")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=0, help="sampler steps (default: the run's)")
    ap.add_argument("--sampler", default=None,
                    help="a σ-grid sampler (euler, dpmpp_2m, …) for every cell (default: the run's own)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", help="also write the table (markdown) here")
    ap.add_argument("--figure", help="also draw FID against w here (PNG)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    intervals = [None] + ([tuple(numbers(args.interval))] if args.interval else [])
    with configured(args.threads):
        cfg, model = load_run(args.run)
        model = model.to(resolve_device(args.device))
        conditional = IMAGE_RECIPES[cfg.recipe].conditional
        n = args.samples or cfg.eval.samples
        rows = [("none", None, None, None)]
        if args.guide:
            guide = load_guide(cfg, args.guide, 1.0, args.guide_weights)      # loaded once; w per row
            for w in numbers(args.weights):
                rows += [("autoguidance", w, {"autoguide": guide._replace(w=w)}, iv) for iv in intervals]
        if args.cfg_weights:
            if not conditional:
                raise SystemExit(f"--cfg-weights: recipe {cfg.recipe!r} is unconditional")
            rows += [("CFG", w, {"cfg_weight": w}, iv) for w in numbers(args.cfg_weights) for iv in intervals]
        lines = ["| guidance | w (autoguidance: 1 = none; CFG: 0 = none) | interval | NFE | FID ↓ | "
                 "precision ↑ | recall ↑ |",
                 "|---|---|---|---|---|---|---|"]
        points = []
        for kind, w, opts, iv in rows:
            start, cells = time.perf_counter(), []
            for s in seeds:
                kw = {**(opts or {}), **({} if iv is None else {"interval": iv}), "steps": args.steps,
                      "sampler": args.sampler}
                m = read_json(os.path.join(args.run, eval_file(cfg, n, s, **kw)))
                if m is not None and args.guide and m.get("autoguide_run", guide.run) != guide.run:
                    m = None                       # a cell of another guide folder with the same name
                cells.append(m or eval_run(args.run, cfg, model, samples=n, seed=s, **kw))
            span = "all σ" if iv is None else f"[{iv[0]:g}, {iv[1]:g}]"
            line = (f"| {kind} | {'–' if w is None else f'{w:g}'} | {span} | {cells[0]['nfe']} | "
                    f"{summary(cells, 'fid', 'fid_sd')} | {summary(cells, 'precision')} | "
                    f"{summary(cells, 'recall')} |")
            lines.append(line)
            points.append((kind, w, span, mean_sd(cells, "fid", "fid_sd")))
            print(line, f"({time.perf_counter() - start:.0f} s)", flush=True)
    text = (f"Guidance on {args.run} ({cfg.recipe}), sampler {cells[0]['sampler']}: {n} samples per cell, "
            f"seeds {args.seeds} "
            "(FID ± its bootstrap sd for one seed, else mean ± sd over seeds)"
            + (f"; guide {args.guide}" if args.guide else "") + ".\n\n" + "\n".join(lines) + "\n")
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.figure:
        figure(points, args.figure, f"{os.path.basename(os.path.normpath(args.run))}: {n} samples, seeds "
                                    f"{args.seeds}")
    return 0


def figure(points: list, path: str, title: str) -> None:
    """FID against w per guidance and interval (± the bootstrap sd of one seed, or the sd over seeds), the
    unguided FID as a horizontal band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for kind, w, span, (m, e) in points:
        if kind == "none":
            ax.axhspan(m - (e or 0.0), m + (e or 0.0), color="0.85")
            ax.axhline(m, color="0.4", lw=1, label="unguided")
    for key in dict.fromkeys((k, sp) for k, _, sp, _ in points if k != "none"):
        # one axis for both: the factor on the main model's difference (T34: D_g + w(D_m − D_g); T33:
        # D_u + (1 + w)(D_c − D_u)), so CFG's w sits at 1 + w and 1 is unguided for both
        sel = [(w + (k == "CFG"), m, e or 0.0) for k, w, sp, (m, e) in points if (k, sp) == key]
        ax.errorbar([x[0] for x in sel], [x[1] for x in sel], yerr=[x[2] for x in sel], marker="o", capsize=3,
                    label=f"{key[0]}, " + ("every σ" if key[1] == "all σ" else f"σ in {key[1]}"))
    ax.set_xlabel("guidance factor (autoguidance: w; CFG: 1 + w)")
    ax.set_ylabel("FID (our classifier's features) ↓")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
