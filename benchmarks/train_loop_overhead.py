"""Does the full training loop (checkpointable state, non-finite skipping, autocast switch, distributed hooks,
callbacks) slow the toy? Side by side in one process: `gendiff.train.train` against `legacy_train`, a copy
of the bare loop of commit 2f72794 (sample σ, draw, loss, backward, Adam, EMA lerp), on the
same model, data and batch, alternating the two three times per run kind; prints it/s and the ratio
new/legacy (target ≥ 0.9), and the time to write one checkpoint of the reference model.
Usage: python benchmarks/train_loop_overhead.py [--iterations 200] [--batch 4096] [--threads N]
"""
import argparse
import copy
import tempfile
import time

import torch

from gendiff import checkpoint as ckpt
from gendiff.data.sources import ToyBatches
from gendiff.experiments.ablate import AblateConfig
from gendiff.experiments.recipes import TOY_RECIPES
from gendiff.data.toy import tree
from gendiff.io import generator
from gendiff.runtime import configure
from gendiff.schedules import LogNormalSigma, inverse_sqrt_lr
from gendiff.experiments.config import ToyTrainConfig
from gendiff.train import Outputs, train


def legacy_train(denoiser, loss_fn, source, cfg, seed=0):
    """The bare inner loop of commit 2f72794 (the baseline; no checkpoints, no skipping, no hooks)."""
    density = LogNormalSigma(cfg.p_mean, cfg.p_std)
    gen = generator(seed, "train-data")
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    opt = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    losses = []
    for i in range(cfg.iterations):
        for group in opt.param_groups:
            group["lr"] = inverse_sqrt_lr(cfg.lr, i, cfg.lr_ref_iter)
        sigma = density.sample(cfg.batch, gen)
        batch = source.draw(cfg.batch, sigma, gen)
        loss = loss_fn(denoiser, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), denoiser.parameters()):
                p_ema.lerp_(p, 1 - cfg.ema)
        losses.append(loss.item())
    return losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    configure(args.threads)
    cfg = AblateConfig()
    tcfg = ToyTrainConfig(iterations=args.iterations, batch=args.batch, snapshot_every=10**9)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.iterations} iterations per measurement, best of 3 alternations")
    print(f"{'run kind':<16} {'legacy it/s':>12} {'new it/s':>10} {'new/legacy':>11}")
    for name in ("edm", "confidence", "confidence-full"):
        spec = TOY_RECIPES[name]
        src = ToyBatches(tree("A"), spec.mode)
        best = {"legacy": 0.0, "new": 0.0}
        for _ in range(3):
            for kind in ("legacy", "new"):
                torch.manual_seed(0)
                model = spec.build_model(cfg.train)
                t = time.perf_counter()
                if kind == "legacy":
                    legacy_train(model, spec.loss_fn(None), src, tcfg)
                else:
                    train(model, spec.loss_fn(None), src, tcfg, progress=False)
                best[kind] = max(best[kind], args.iterations / (time.perf_counter() - t))
        print(f"{name:<16} {best['legacy']:12.1f} {best['new']:10.1f} {best['new'] / best['legacy']:11.3f}")
    torch.manual_seed(0)
    model = TOY_RECIPES["confidence"].build_model(cfg.train)
    with tempfile.TemporaryDirectory() as d:
        train(model, TOY_RECIPES["confidence"].loss_fn(None), ToyBatches(tree("A"), "point"),
              ToyTrainConfig(iterations=1, batch=64, snapshot_every=10**9), progress=False,
              outputs=Outputs(checkpoint_dir=d))
        step, tensors, meta = ckpt.latest(d)          # everything a checkpoint of this run holds
        n, t0 = 20, time.perf_counter()
        for i in range(n):
            ckpt.save(d, 100 + i, tensors, meta, keep=3)
        per = (time.perf_counter() - t0) / n
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    print(f"checkpoint write (model + EMA + Adam + RNG, {size / 1e3:.0f} kB, fsync + rename + prune): "
          f"{per * 1e3:.1f} ms")

if __name__ == "__main__":
    main()
