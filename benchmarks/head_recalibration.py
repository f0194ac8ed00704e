"""Recalibrate a confidence head on the EMA model's own error (issue 18): the output conv's G rows only.

Why: a head is trained on the error of the training weights, while the run's model is their EMA, whose mean is
more accurate. On MNIST (BENCHMARKS, issue 18) the training weights' head at 4800 steps is near calibrated
(mean z² 0.84–0.97 at σ = 0.1–1) and the EMA's claims 2–5× its squared error in the middle deciles. This
script keeps the EMA model's mean bit for bit and refits only the G rows of its output conv (the last 3×3 conv
of the U-Net, `conv_out`: G is linear in the final features there), with the loss of the run's recipe
(nll / nll-log-grad, T7 through the excess head, T37) on noisy training images at σ from the run's training
density. F's rows get no update (their gradient is masked), so μ, the samples and FID are unchanged; the
script checks that μ is identical before and after on a probe batch.

Usage: python benchmarks/head_recalibration.py RUN [--steps 300] [--batch 128] [--lr 1e-3] [--seed 0]
       [--threads N]
Writes RUN/model-recal-<steps>.safetensors; read it with
`gendiff eval RUN --weights model-recal-<steps>.safetensors --calibration-against OTHER_RUN`.
"""
import argparse
import os
import time

import torch

from gendiff.experiments.images import load_splits
from gendiff.experiments.kinds import load_run
from gendiff.experiments.recipes import IMAGE_RECIPES
from gendiff.heads import ExcessHead
from gendiff.io import save_state
from gendiff.losses import NoisyBatch, make_loss


def recalibrate(run: str, steps: int, batch: int, lr: float, seed: int, x=None) -> tuple[str, dict]:
    """(weights file name, stats): the run's EMA model with conv_out's G rows refitted for `steps` steps."""
    cfg, model = load_run(run)
    recipe = IMAGE_RECIPES[cfg.recipe]
    if not isinstance(model.head, ExcessHead):
        raise SystemExit(f"{run}: recipe {cfg.recipe!r} has head {type(model.head).__name__}; this script "
                         "refits T37's excess-variance head (recipes confidence-excess*)")
    conv = model.net.conv_out
    c = model.net.img_channels
    for p in model.parameters():
        p.requires_grad_(False)
    mask = torch.zeros_like(conv.weight)
    mask[c:] = 1                                                     # G's output rows only
    bmask = torch.zeros_like(conv.bias)
    bmask[c:] = 1
    conv.weight.requires_grad_(True)
    conv.bias.requires_grad_(True)
    conv.weight.register_hook(lambda g: g * mask)
    conv.bias.register_hook(lambda g: g * bmask)
    opt = torch.optim.Adam([conv.weight, conv.bias], lr=lr)
    density, loss = recipe.density(cfg.train), make_loss(recipe.loss)
    x = load_splits(cfg.data)[0].to_tensor() if x is None else x
    g = torch.Generator().manual_seed(seed)
    probe = x[:16] + 0.5 * torch.randn(x[:16].shape, generator=g)
    with torch.no_grad():
        mu_before = model(probe, torch.full((16,), 0.5))
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        x0 = x[idx]
        sig = density.sample(batch, g)
        noisy = x0 + sig.view(-1, *([1] * (x0.ndim - 1))) * torch.randn(x0.shape, generator=g)
        val = loss(model, NoisyBatch(x0, noisy, sig)).mean()
        opt.zero_grad(set_to_none=True)
        val.backward()
        opt.step()
        losses.append(val.item())
    with torch.no_grad():
        mu_after = model(probe, torch.full((16,), 0.5))
    if not torch.equal(mu_before, mu_after):
        raise RuntimeError("the mean changed: F's rows of conv_out were updated")
    name = f"model-recal-{steps}.safetensors"
    save_state(model.state_dict(), os.path.join(run, name))
    k = max(1, steps // 10)
    return name, {"seconds": time.perf_counter() - t0, "loss_first": sum(losses[:k]) / k,
                  "loss_last": sum(losses[-k:]) / k}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name, stats = recalibrate(args.run, args.steps, args.batch, args.lr, args.seed)
    print(f"{name}: {args.steps} steps × {args.batch} in {stats['seconds']:.0f} s, loss (first / last tenth) "
          f"{stats['loss_first']:.2f} / {stats['loss_last']:.2f} nats/image; the mean is unchanged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
