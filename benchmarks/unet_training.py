"""Training throughput of gendiff's U-Net (gendiff/nets/unet.py) against diffusers' `UNet2DModel` at the same
parameter count, on 28×28 one-channel images (MNIST-sized), fp32 and bf16 autocast.

The networks (~1.74 M parameters unless said):
- `diffusers UNet2DModel`: the baseline, ADM's layout as diffusers builds it — widths 32·[1, 2, 2],
  layers_per_block 2, attention at 7×7 and in the middle block, scale-shift time conditioning, conv
  down/upsampling (its only choice in UNet2DModel);
- `gendiff, ADM layout`: our U-Net in that same layout (REFERENCE below): the implementation alone;
- `diffusers, 16·[1,4,4]`: diffusers given the fast layout's widths as far as UNet2DModel can take them
  (2 layers per block, conv resampling, a 192-wide time embedding to reach 1.725 M parameters): what the
  layout alone gives diffusers, so that the gain is split into layout and the rest;
- `gendiff, fast layout` (FAST below): our U-Net at the same parameter count with the width moved to
  where a convolution is cheap — 16 channels at 28×28 and 64 at 14×14 and 7×7 (16·[1, 4, 4]), blocks per
  level [2, 2, 3], EDM2's parameter-free resampling (2×2 average / nearest, no 3×3 conv), a 128-wide noise
  embedding. Its samples are compared with the baseline's at equal training by benchmarks/unet_quality.py.

All sit in the same `gendiff.precond.Denoiser` (EDM preconditioning) and train with the same loop: EDM's loss
(`losses.EDMLoss`), σ log-normal (P_mean −1.2, P_std 1.2), Adam. Steps of the models alternate in one process,
in a rotating order, so all see the same machine load; the per-step median is reported as img/s (wall clock),
with the process CPU time per step beside it (steadier than wall time on a shared machine).

diffusers is an optional extra (`pip install -c constraints.txt -e ".[bench]"`); without it only ours are
timed.

Usage: python benchmarks/unet_training.py [--steps 10] [--batch 128] [--threads N] [--precision fp32,bf16]
       [--profile]
"""
import argparse
import statistics
import time

import torch
from torch import nn

from gendiff import losses
from gendiff.nets.unet import Attention, UNet
from gendiff.precond import Denoiser
from gendiff.runtime import configure


class DiffusersBackbone(nn.Module):
    """diffusers' UNet2DModel behind the Denoiser contract `net(x, c_noise) -> F` (img_channels and
    img_resolution as gendiff's UNet has them, for the image samplers)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.img_channels, self.img_resolution = model.config.in_channels, model.config.sample_size

    def forward(self, x, c_noise):
        return self.model(x, c_noise).sample


REFERENCE = dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(7,))
FAST = dict(model_channels=16, channel_mult=(1, 4, 4), num_blocks=(2, 2, 3), attn_resolutions=(7,),
            emb_channels=128, resample="plain")


def diffusers_like(ours: UNet):
    """A UNet2DModel shaped like `ours` (None when diffusers is not installed): same widths, levels, attention
    and GroupNorm groups; `ours` must have the same block count at every level and conv resampling."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return None
    if len(set(ours.num_blocks)) != 1 or ours.resample != "conv":
        raise ValueError("diffusers' UNet2DModel has one layers_per_block and conv resampling; "
                         f"got num_blocks={ours.num_blocks}, resample={ours.resample!r}")
    mc, mult = ours.model_channels, ours.channel_mult
    res = [ours.img_resolution >> i for i in range(len(mult))]
    attn = [r in ours.attn_resolutions for r in res]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    widths = [mc * m for m in mult]
    ours_attn = [m for m in ours.modules() if isinstance(m, Attention)]
    head_dim = ours_attn[0].qkv.in_features // ours_attn[0].heads if ours_attn else 8  # channels per head
    groups = min(ours.enc[0].norm1.num_groups, *[w // 4 for w in widths])
    while any(w % groups for w in widths):
        groups -= 1
    return UNet2DModel(sample_size=ours.img_resolution, in_channels=ours.img_channels,
                       out_channels=ours.img_channels, block_out_channels=tuple(widths),
                       layers_per_block=ours.num_blocks[0], down_block_types=down, up_block_types=up,
                       attention_head_dim=head_dim, norm_num_groups=groups,
                       resnet_time_scale_shift="scale_shift", time_embedding_dim=ours.emb1.out_features,
                       add_attention=attn[-1], dropout=0.0)


BASELINE = "diffusers UNet2DModel"


def n_params(m):
    return sum(p.numel() for p in m.parameters())


class Trainer:
    def __init__(self, name, net, batch, seed=0):
        torch.manual_seed(seed)
        self.name, self.den = name, Denoiser(net, "edm")
        self.opt = torch.optim.Adam(self.den.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(seed)
        self.x0 = torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1
        self.loss = losses.EDMLoss()
        self.times, self.cpu = [], []

    def step(self, bf16: bool):
        t0, c0 = time.perf_counter(), time.process_time()
        sigma = (torch.randn(self.x0.shape[0]) * 1.2 - 1.2).exp()
        x_noisy = self.x0 + sigma[:, None, None, None] * torch.randn_like(self.x0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = self.loss(self.den, losses.NoisyBatch(self.x0, x_noisy, sigma)).float().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0, time.process_time() - c0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model and precision")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--profile", action="store_true", help="print a torch profile of one step of each model")
    args = ap.parse_args()
    configure(args.threads)

    ref = UNet(**REFERENCE)
    nets = {"gendiff, fast layout": UNet(**FAST), "gendiff, ADM layout": ref}
    theirs = diffusers_like(ref)
    if theirs is None:
        print("diffusers is not installed: timing gendiff's UNets only "
              "(pip install -c constraints.txt -e \".[bench]\" for the comparison)")
    else:
        nets[BASELINE] = DiffusersBackbone(theirs)
        # what the layout alone gives diffusers at the same size (its conv resampling, one block count; the
        # noise embedding widened to 192 to make up the parameters: 1.725 M)
        nets["diffusers, 16·[1,4,4]"] = DiffusersBackbone(diffusers_like(UNet(**{
            **FAST, "num_blocks": 2, "resample": "conv", "emb_channels": 192})))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} × 1×28×28, "
          f"{args.steps} timed steps (+{args.warmup} warm-up) per model and precision")
    for name, net in nets.items():
        print(f"  {name:<22} {n_params(net) / 1e6:6.3f} M parameters")

    print(f"{'precision':<10} {'model':<22} {'img/s':>8} {'s/step':>8} {'CPU s/step':>11} "
          f"{'ratio to baseline':>18}")
    for prec in args.precision.split(","):
        bf16 = {"fp32": False, "bf16": True}[prec]
        trainers = [Trainer(name, net, args.batch) for name, net in nets.items()]
        for _ in range(args.warmup):
            for t in trainers:
                t.step(bf16)
        for i in range(args.steps):  # alternate, rotating the order: every model sees the same machine load
            for t in trainers[i % len(trainers):] + trainers[:i % len(trainers)]:
                wall, cpu = t.step(bf16)
                t.times.append(wall)
                t.cpu.append(cpu)
        base = next((args.batch / statistics.median(t.times) for t in trainers if t.name == BASELINE), None)
        for t in trainers:
            med = statistics.median(t.times)
            ratio = f"{args.batch / med / base:17.2f}x" if base else ""
            print(f"{prec:<10} {t.name:<22} {args.batch / med:8.1f} {med:8.3f} "
                  f"{statistics.median(t.cpu):11.3f} {ratio}")
        if args.profile:
            for t in trainers:
                with torch.profiler.profile() as p:
                    t.step(bf16)
                print(f"--- {prec} {t.name}")
                print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
