"""Quality against steps for progressive distillation (issue 20), from the recorded results files: the tree
(MMD² against NFE: the teacher with DPM-Solver++(2M), the distilled students with Euler, the teacher's Heun-63
as a band) and MNIST (FID against NFE: the teacher with DPM-Solver++(2M), the students of the rounds with the
classic EMA and with the power EMA, the teacher's Heun 18 as a band). Nothing is measured here.

Usage:
  python benchmarks/distill_figure.py --tree docs/results/distill-tree-128/summary.json \\
      --mnist docs/results/distill-mnist --teacher docs/results/guidance-mnist/eval-default-2000-seed0.json \\
      --out docs/results/distill-mnist/distill-steps.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", required=True, help="benchmarks/distill_tree.py's summary.json")
    ap.add_argument("--mnist", required=True, help="the MNIST distillation results folder")
    ap.add_argument("--teacher", required=True, help="the teacher's own-sampler eval JSON (seed 0)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = load(args.tree)

    def tree_line(pick, label, **kw):
        sel = sorted((r["nfe"], r["mmd"]["mean"], r["mmd"]["sd_train"]) for r in rows if pick(r))
        a.errorbar([s[0] for s in sel], [s[1] for s in sel], yerr=[s[2] for s in sel], marker="o", capsize=3,
                   label=label, **kw)

    heun = [r for r in rows if r["model"] == "teacher" and r["sampler"] == "heun"][0]
    a.axhspan(heun["mmd"]["mean"] - heun["mmd"]["sd_train"], heun["mmd"]["mean"] + heun["mmd"]["sd_train"],
              color="0.85")
    a.axhline(heun["mmd"]["mean"], color="0.4", lw=1, label=f"teacher, Heun (NFE {heun['nfe']})")
    tree_line(lambda r: r["model"] == "teacher" and r["sampler"] == "dpmpp_2m", "teacher, DPM-Solver++(2M)")
    tree_line(lambda r: r["model"].startswith("student"), "students (Euler on their grid)")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("NFE")
    a.set_ylabel("MMD² ↓ (± sd over training seeds)")
    a.set_title("exact tree (T6 teacher, 128 → 4 steps)", fontsize=9)
    a.legend(fontsize=7)

    teacher = load(args.teacher)
    b.axhspan(teacher["fid"] - teacher["fid_sd"], teacher["fid"] + teacher["fid_sd"], color="0.85")
    b.axhline(teacher["fid"], color="0.4", lw=1, label=f"teacher, its Heun (NFE {teacher['nfe']})")
    pts = []
    for n in (4, 8, 16):
        path = os.path.join(args.mnist, f"eval-dpmpp_2m-{n}-2000-seed0.json")
        if os.path.exists(path):
            m = load(path)
            pts.append((n, m["fid"], m["fid_sd"]))
    series = [("teacher, DPM-Solver++(2M)", pts)]
    for label, folder in (("students, classic EMA 0.999 (before)", args.mnist),
                          ("students, power EMA (σ_rel 0.05)", os.path.join(args.mnist, "power-ema"))):
        sel = []
        for k in (1, 2, 3):
            path = os.path.join(folder, f"round-{k}-metrics.json")
            if os.path.exists(path):
                s = load(path)["samples"]
                sel.append((s["nfe"], s["fid"], s["fid_sd"]))
        series.append((label, sorted(sel)))
    for label, sel in series:
        b.errorbar([s[0] for s in sel], [s[1] for s in sel], yerr=[s[2] for s in sel], marker="o", capsize=3,
                   label=label)
    b.set_xscale("log", base=2)
    b.set_xlabel("NFE")
    b.set_ylabel("FID (our classifier's features) ↓, n = 2000")
    b.set_title("MNIST (sample seed 0, ± bootstrap sd)", fontsize=9)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
