"""Sample quality of gendiff's fast-layout U-Net against diffusers' UNet2DModel at equal size and equal
training (the target: "≥ 1.5× diffusers' img/s at equal size, with samples of equal quality").

Each network (benchmarks/unet_training.py: FAST, REFERENCE mirrored by diffusers, optionally REFERENCE in
gendiff) trains through gendiff's image loop (`experiments.images.prepare`'s `backbone` hook) with one recipe:
the mnist-cpu preset's (Adam, batch, steps, EMA, bf16) with the `edm` recipe, one run per seed, on MNIST's
training split. Each run is then measured as a table row is: FID, precision and recall of Heun-18 samples in
our classifier's features, bits/dim (PF-ODE, Hutchinson) of test images. The runs are the same seed for each
network: same data order, same σ draws; only the network differs.

Resumable: each run folder under --out holds its recipe (config.toml; a rerun with another recipe is refused)
and its metrics.json once done, and is skipped on a rerun (a started run resumes from its checkpoint);
results.json and results.md are rewritten after every run. The img/s column comes from runs made one after
another, not side by side: benchmarks/unet_training.py is the speed measurement.

Usage: python benchmarks/unet_quality.py [--out docs/results/unet-quality] [--seeds 0,1] [--samples 2000]
       [--models fast,diffusers[,adm]] [--set key=value ...]
"""
import argparse
import json
import os
import statistics
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet_training import FAST, REFERENCE, DiffusersBackbone, diffusers_like, n_params  # noqa: E402

from gendiff.experiments.config import resolve, to_toml  # noqa: E402
from gendiff.experiments.images import build_model, prepare, train_run, with_sigma_data  # noqa: E402
from gendiff.io import save_json, save_text  # noqa: E402
from gendiff.nets.unet import UNet  # noqa: E402
from gendiff.runtime import configure  # noqa: E402


def _layout(layout: dict) -> list[str]:
    """--set strings putting a unet_training layout into the run's model table."""
    def value(v):
        return "[" + ", ".join(map(str, v)) + "]" if isinstance(v, tuple) else v
    return [f"model.{k}={value(v)}" for k, v in layout.items()]


def _diffusers(shape, num_classes, g_channels):
    """build_model's backbone hook: UNet2DModel mirroring the run's model table (the REFERENCE layout)."""
    if num_classes or g_channels:
        raise ValueError("the diffusers baseline is unconditional and has no G head: use recipe=edm")
    theirs = diffusers_like(UNet(img_resolution=shape[1], img_channels=shape[0], **REFERENCE))
    if theirs is None:
        raise SystemExit('diffusers is not installed: pip install -c constraints.txt -e ".[bench]"')
    return DiffusersBackbone(theirs)


# name -> (label, the run's model table, backbone hook: None = gendiff's UNet of that table)
MODELS = {"fast": ("gendiff UNet, fast layout", _layout(FAST), None),
          "adm": ("gendiff UNet, ADM layout", _layout(REFERENCE), None),
          "diffusers": ("diffusers UNet2DModel (ADM layout)", _layout(REFERENCE), _diffusers)}


def summary(results: dict) -> str:
    """Every finished run in results.json, by network then seed, with each network's mean ± sd over seeds."""
    lines = ["| network | parameters | seed | FID ↓ | precision | recall | bits/dim PF-ODE | train img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for m in MODELS:
        fids, bpds = [], []
        seeds = sorted(int(k.rsplit("seed", 1)[1]) for k in results if k.startswith(f"{m}-seed"))
        for s in seeds:
            r = results[f"{m}-seed{s}"]
            row = r["samples"]
            fids.append(row["fid"])
            bpds.append(r["bpd_ode"])
            lines.append(f"| {MODELS[m][0]} | {r['parameters'] / 1e6:.3f} M | {s} | {row['fid']:.2f} | "
                         f"{row['precision']:.3f} | {row['recall']:.3f} | {r['bpd_ode']:.3f} ± "
                         f"{r['bpd_ode_se']:.3f} | {r['train_img_per_s']:.1f} |")
        if len(fids) > 1:
            lines.append(f"| {MODELS[m][0]} | | mean ± sd | {statistics.mean(fids):.2f} ± "
                         f"{statistics.stdev(fids):.2f} | | | {statistics.mean(bpds):.3f} ± "
                         f"{statistics.stdev(bpds):.3f} | |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/unet-quality")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--samples", type=int, default=2000, help="generated images per run for FID / P / R")
    ap.add_argument("--models", default="fast,diffusers", help=f"comma-separated, from {sorted(MODELS)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the recipe (mnist-cpu preset, recipe edm), e.g. train.iterations=3000")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    configure(args.threads)
    models = [m.strip() for m in args.models.split(",")]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"--models={args.models!r}: {bad[0]!r} is not one of {sorted(MODELS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    for s in seeds:
        for m in models:
            key = f"{m}-seed{s}"
            run = os.path.join(args.out, key)
            done = os.path.join(run, "metrics.json")
            label, layout, backbone = MODELS[m]
            cfg = resolve("mnist-cpu", sets=["recipe=edm", f"seed={s}", f"eval.samples={args.samples}",
                                             *layout, *args.set])
            recipe = (f"# {label}"
                      + (" (backbone hook; [model] is the layout it mirrors)" if backbone else "")
                      + "\n" + to_toml(cfg))
            cfg_path = os.path.join(run, "config.toml")
            if os.path.exists(cfg_path) and open(cfg_path).read() != recipe:
                raise SystemExit(f"{run} was made with another recipe (its config.toml differs): "
                                 "use another --out or remove it")
            os.makedirs(run, exist_ok=True)
            if not os.path.exists(cfg_path):
                save_text(recipe, cfg_path)
            if os.path.exists(done):
                metrics = json.load(open(done))
            else:
                print(f"== {key}: {label}", flush=True)
                metrics = train_run(cfg, run, prepare(cfg, backbone=backbone), progress=False)
            net = build_model(with_sigma_data(cfg, lambda: 1.0), (1, 28, 28), 10, backbone)  # to count only
            results[key] = dict(parameters=n_params(net), samples=metrics["samples"],
                                bpd_ode=metrics["bpd_pf_ode"], bpd_ode_se=metrics["bpd_pf_ode_se"],
                                train_img_per_s=metrics["train_img_per_s"])
            save_json(results, path)
            save_text(summary(results), os.path.join(args.out, "results.md"))
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
