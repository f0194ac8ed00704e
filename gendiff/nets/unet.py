"""A U-Net backbone for small images (MNIST 28×28), of the ADM / EDM family.

Sources: ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", its `UNetModel`) and EDM's
`DhariwalUNet` / `SongUNet` (Karras et al. 2022, networks.py), written anew and sized down:

- noise embedding: EDM's positional embedding of c_noise (cos/sin at frequencies 1 … 1/10⁴, endpoint
  included), then a two-layer MLP (SiLU), plus a learned class embedding (`num_classes + 1` rows, the last
  the null class ∅ for classifier-free guidance) → `emb` [N, emb_channels], SiLU'd once;
- residual blocks (ADM `ResBlock` with `use_scale_shift_norm`, EDM `UNetBlock` with `adaptive_scale`):
  h = conv(SiLU(GN(x))); h = SiLU(GN(h)·(1 + scale) + shift) with (scale, shift) = Linear(emb);
  out = x' + conv(dropout(h)), the last conv zero-initialised (ADM's `zero_module`) so every block starts
  as its skip path. Scale-shift rather than additive: ADM's ablation (§3, AdaGN against addition +
  GroupNorm) found the adaptive GroupNorm better, at the cost of one extra multiply per block;
- resample="conv": downsampling by a 3×3 conv of stride 2 (ADM `Downsample`, conv_resample), upsampling by
  nearest ×2 then a 3×3 conv (ADM `Upsample`); resample="plain": EDM2's parameter-free resampling (2×2
  average, nearest ×2; Karras et al. 2024 resample with the box filter [1, 1]), the next block's convs doing
  the mixing: 28 → 14 → 7 → 14 → 28; encoder activations are concatenated into the decoder (num_blocks + 1
  decoder blocks per level, ADM); num_blocks is one count or one per level;
- self-attention (multi-head, `attention` below) after every block at a resolution in
  `attn_resolutions`, and in the middle (block, attention, block) when the lowest resolution is one of them;
- output: GN, SiLU, one zero-initialised 3×3 conv to C + g_channels channels, split into F and G, so
  training starts from μ = c_skip·x̃ and G = 0 (σ_φ = c_var for the diagonal head).

Speed on CPU (benchmarks/unet_training.py; measured with torch 2.13, oneDNN): about 70–80% of a training
step is convolution, so at a given parameter count the cost is set by where the width sits: a 3×3 conv at
28×28 costs 16× the multiply-adds per parameter of one at 7×7. The benchmark's fast layout
(16·[1, 4, 4], blocks [2, 2, 3], plain resampling, 1.74 M parameters) trains ~1.5× faster than ADM's
32·[1, 2, 2] layout of the same size (ours or diffusers' UNet2DModel; batch 128, 2 threads, fp32 and bf16;
BENCHMARKS.md). The implementation follows what the rest costs. Plain NCHW is kept: channels_last
makes the bf16 convolutions ~15% faster, but torch's channels_last GroupNorm is 10–15× slower than its
NCHW kernel in bf16 (forward + backward), which more than eats the gain; torch.compile was slower still
(and compiles for ~2 minutes). Attention at 7×7 uses two matmuls rather than the fused kernel (see
`attention`). Under bf16 autocast the step is ~2× faster than fp32; F and G come back in x's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch import nn

from ..checks import as_sigma, check_choice, check_positive, one_per_example
from ..precond import EDMPrecond



RESAMPLE = ("conv", "plain")        # ADM's 3×3 conv resampling | EDM2's parameter-free 2×2 average / nearest


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _auto_groups(channels: int) -> int:
    """EDM's GroupNorm rule (min(32, C/4) groups, ≥ 4 channels per group), taken down to a divisor of C."""
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return g


class PositionalEmbedding(nn.Module):
    """EDM's `PositionalEmbedding` (endpoint=True): c: [N] -> [N, channels] = [cos(c·f), sin(c·f)],
    f = (1/max_positions)^(i/(channels/2 − 1)), i = 0 … channels/2 − 1."""

    def __init__(self, channels: int, max_positions: int = 10000):
        super().__init__()
        half = channels // 2
        freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        a = c.float()[:, None] * self.freqs[None, :]          # [N, half]
        return torch.cat([a.cos(), a.sin()], dim=1)           # [N, channels]


class ResBlock(nn.Module):
    """ADM's ResBlock with scale-shift norm (EDM's UNetBlock, adaptive_scale=True, without attention)."""

    def __init__(self, cin: int, cout: int, emb_channels: int, groups_in: int, groups_out: int,
                 dropout: float):
        super().__init__()
        self.norm0 = nn.GroupNorm(groups_in, cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * cout)
        self.norm1 = nn.GroupNorm(groups_out, cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: [N, cin, H, W]; emb: [N, E] (already SiLU'd)
        h = self.conv0(nnf.silu(self.norm0(x)))                                # [N, cout, H, W]
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)      # [N, cout, 1, 1] each
        h = nnf.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        return h + (x if self.skip is None else self.skip(x))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused_above: int = 256) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v, q, k, v: [N, heads, L, d]. For short sequences (L ≤ `fused_above`: 7×7, 14×14), two
    plain matmuls with the softmax in fp32 (measured on CPU at L = 49: forward + backward 4.7× faster than
    the fused kernel in bf16, 1.3× in fp32); longer ones go to `F.scaled_dot_product_attention`, whose fused
    kernel never stores the L×L weights."""
    if q.shape[-2] > fused_above:
        return nnf.scaled_dot_product_attention(q, k, v)
    w = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5    # [N, heads, L, L]
    return torch.matmul(w.softmax(-1).to(v.dtype), v)


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions (ADM's AttentionBlock), residual, its output
    projection zero-initialised."""

    def __init__(self, channels: int, groups: int, head_channels: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            self.heads = 1
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W]
        N, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(N, H * W, C)              # [N, HW, C]
        q, k, v = self.qkv(h).reshape(N, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = attention(q, k, v)                                                 # [N, heads, HW, C/heads]
        o = self.proj(o.transpose(1, 2).reshape(N, H * W, C))                   # [N, HW, C]
        return x + o.reshape(N, H, W, C).permute(0, 3, 1, 2).contiguous()       # [N, C, H, W]


class Downsample(nn.Module):
    """[N, C, H, W] -> [N, C, H/2, W/2]: a 3×3 conv of stride 2 (ADM's Downsample with conv_resample), or with
    conv=False a 2×2 average (EDM2's resampling with its box filter [1, 1]: no parameters)."""

    def __init__(self, channels: int, conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if conv else None

    def forward(self, x):
        return nnf.avg_pool2d(x, 2) if self.conv is None else self.conv(x)


class Upsample(nn.Module):
    """[N, C, H, W] -> [N, C, 2H, 2W]: nearest ×2, then a 3×3 conv (ADM's Upsample) unless conv=False (EDM2:
    the next block's convolutions do the mixing)."""

    def __init__(self, channels: int, conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if conv else None

    def forward(self, x):
        x = nnf.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class _Trunk(nn.Module):
    """The noise (and class) embedding, the encoder and the middle of the U-Net: shared by `UNet`, which adds
    the decoder, and `NoisyClassifier`, which adds a pooled read-out (ADM's EncoderUNetModel). Arguments as
    `UNet`'s."""

    def __init__(self, img_resolution: int = 28, img_channels: int = 1, model_channels: int = 32,
                 channel_mult=(1, 2, 2), num_blocks: int | tuple = 2, attn_resolutions=(7,),
                 dropout: float = 0.0, num_classes: int = 0, emb_channels: int | None = None,
                 num_groups: int | None = None, resample: str = "conv"):
        super().__init__()
        check_positive("img_resolution", img_resolution, integer=True)
        check_positive("img_channels", img_channels, integer=True)
        check_positive("model_channels", model_channels, integer=True)
        check_positive("num_classes", num_classes, integer=True, allow_zero=True)
        check_positive("dropout", dropout, allow_zero=True)
        if dropout >= 1:
            raise ValueError(f"dropout={dropout!r} must be < 1; allowed: 0 <= dropout < 1")
        channel_mult = tuple(channel_mult)
        if not channel_mult or any(isinstance(m, bool) or not isinstance(m, int) or m <= 0
                                   for m in channel_mult):
            raise ValueError(f"channel_mult={channel_mult!r} must be a non-empty sequence of integers > 0")
        levels = len(channel_mult)
        if not isinstance(num_blocks, (list, tuple)):
            check_positive("num_blocks", num_blocks, integer=True)
            num_blocks = (num_blocks,) * levels
        blocks = tuple(num_blocks)
        if len(blocks) != levels:
            raise ValueError(f"num_blocks={num_blocks!r} must be one integer or one per level ({levels} "
                             f"levels: channel_mult={channel_mult})")
        for i, b in enumerate(blocks):
            check_positive(f"num_blocks[{i}]", b, integer=True)
        check_choice("resample", resample, RESAMPLE)
        if img_resolution % 2 ** (levels - 1):
            raise ValueError(f"img_resolution={img_resolution} is not divisible by 2^(len(channel_mult) − 1)"
                             f" = {2 ** (levels - 1)} (channel_mult={channel_mult}: {levels - 1} "
                             "downsamplings); "
                             "use fewer levels or a resolution divisible by it")
        resolutions = [img_resolution >> i for i in range(levels)]
        attn_resolutions = tuple(attn_resolutions)
        bad = [r for r in attn_resolutions if r not in resolutions]
        if bad:
            raise ValueError(f"attn_resolutions={attn_resolutions!r} holds {bad[0]!r}, not a resolution of "
                             "this "
                             f"U-Net; allowed: any of {resolutions}")
        if emb_channels is None:
            emb_channels = 4 * model_channels
        check_positive("emb_channels", emb_channels, integer=True)
        if num_groups is not None:
            check_positive("num_groups", num_groups, integer=True)

        def groups(c: int) -> int:
            if num_groups is None:
                return _auto_groups(c)
            if c % num_groups:
                widths = sorted({model_channels * m for m in channel_mult})
                g = math.gcd(*widths)
                raise ValueError(f"num_groups={num_groups} does not divide the {c} channels of a GroupNorm "
                                 f"(widths model_channels·channel_mult = {widths}); allowed: a divisor of "
                                 f"{g}: {_divisors(g)}, or None for the automatic rule")
            return num_groups

        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.num_classes, self.model_channels = num_classes, model_channels
        self.channel_mult, self.num_blocks, self.attn_resolutions = channel_mult, blocks, attn_resolutions
        self.resample, self.emb_channels, self._groups = resample, emb_channels, groups

        # noise (and class) embedding
        noise_channels = 2 * ((model_channels + 1) // 2)                    # cos and sin pairs
        self.pos = PositionalEmbedding(noise_channels)
        self.emb0 = nn.Linear(noise_channels, emb_channels)
        self.emb1 = nn.Linear(emb_channels, emb_channels)
        self.class_emb = nn.Embedding(num_classes + 1, emb_channels) if num_classes else None

        # encoder: conv_in, then per level num_blocks ResBlocks (+ attention), then a downsampling
        ch = model_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(img_channels, ch, 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [ch]
        for lvl, mult in enumerate(channel_mult):
            res, cout = resolutions[lvl], model_channels * mult
            for _ in range(blocks[lvl]):
                self.enc.append(ResBlock(ch, cout, emb_channels, groups(ch), groups(cout), dropout))
                ch = cout
                if res in attn_resolutions:
                    self.enc.append(Attention(ch, groups(ch)))
                skips.append(ch)
            if lvl < levels - 1:
                self.enc.append(Downsample(ch, resample == "conv"))
                skips.append(ch)

        # middle: block, attention (if the lowest resolution has attention), block
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_channels, groups(ch), groups(ch), dropout)])
        if resolutions[-1] in attn_resolutions:
            self.mid.append(Attention(ch, groups(ch)))
        self.mid.append(ResBlock(ch, ch, emb_channels, groups(ch), groups(ch), dropout))
        self._skip_channels, self._channels, self._resolutions, self._dropout = (
            skips, ch, resolutions, dropout)

    # ---- input checks -----------------------------------------------------------------------------

    def _check_x(self, x: torch.Tensor) -> None:
        want = (self.img_channels, self.img_resolution, self.img_resolution)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != want:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects x of shape [N, {want[0]}, {want[1]}, {want[2]}] "
                             f"(img_channels={want[0]}, img_resolution={want[1]}); got {shape}")

    def _noise(self, c_noise, x: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(c_noise, device=x.device)
        if c.ndim > 1 or c.numel() not in (1, x.shape[0]):
            raise ValueError(f"{type(self).__name__} takes one noise level per example: c_noise of shape "
                             f"[{x.shape[0]}] or a scalar; got shape {tuple(c.shape)}")
        return c.float().reshape(-1).expand(x.shape[0])                       # [N]

    def _labels(self, class_labels, n: int, device) -> torch.Tensor | None:
        if not self.num_classes:
            if class_labels is not None:
                raise ValueError("class_labels were given, but this UNet is unconditional (num_classes=0); "
                                 "build it with num_classes > 0 or pass class_labels=None")
            return None
        if class_labels is None:                                               # ∅ for every example
            return torch.full((n,), self.num_classes, dtype=torch.long, device=device)
        y = torch.as_tensor(class_labels, device=device)
        if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
            raise ValueError(f"class_labels must hold integer class indices; got dtype {y.dtype}")
        if y.ndim > 1 or y.numel() not in (1, n):
            raise ValueError(f"class_labels must be one label per example, shape [{n}], or a scalar; "
                             f"got shape {tuple(y.shape)}")
        out = (y < 0) | (y > self.num_classes)
        if bool(out.any()):
            raise ValueError(f"class_labels holds {int(y[out].flatten()[0])}, out of range; allowed: 0 … "
                             f"{self.num_classes} (num_classes={self.num_classes}; {self.num_classes} is the "
                             "null class ∅)")
        return y.long().reshape(-1).expand(n)                                  # [N]

    # ---- forward ------------------------------------------------------------------------------------

    def embedding(self, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """c_noise: [N], labels: [N] or None -> SiLU(emb): [N, emb_channels]."""
        emb = self.emb1(nnf.silu(self.emb0(self.pos(c_noise))))
        if self.class_emb is not None:
            emb = emb + self.class_emb(labels)
        return nnf.silu(emb)

    def encode(self, x: torch.Tensor, emb: torch.Tensor):
        """conv_in, the encoder and the middle: x [N, C, H, W], emb [N, E] -> (h [N, ch, H/2^(L−1),
        W/2^(L−1)], the activations stored for the decoder's skip connections, in order)."""
        h = self.conv_in(x)          # [N, mc·m0, H, W]
        skips = [h]
        for m in self.enc:
            if isinstance(m, ResBlock):
                h = m(h, emb)
                skips.append(h)
            elif isinstance(m, Attention):
                h = skips[-1] = m(h)
            else:                                                              # Downsample
                h = m(h)
                skips.append(h)
        for m in self.mid:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
        return h, skips


class UNet(_Trunk):
    """ADM/EDM-style U-Net: `net(c_in·x̃, c_noise, class_labels=None) -> F` or `(F, G)` (the `Denoiser`
    contract).

    img_resolution: H = W, divisible by 2^(len(channel_mult) − 1); model_channels · channel_mult: the widths
    per level; num_blocks: residual blocks per encoder level (num_blocks + 1 per decoder level), one integer
    for every level or one per level; resample: "conv" (ADM) or "plain" (EDM2, no parameters);
    attn_resolutions: resolutions with self-attention; num_classes: 0 = unconditional, else labels
    0 … num_classes − 1 plus the null class ∅ = num_classes; g_channels: channels of G (0 = none; the diagonal
    head or IDDPM's v take g_channels = img_channels); emb_channels: width of the noise embedding
    (default 4·model_channels, ADM); num_groups: GroupNorm groups (None: EDM's min(32, C/4) rule, per width).
    """

    def __init__(self, img_resolution: int = 28, img_channels: int = 1, model_channels: int = 32,
                 channel_mult=(1, 2, 2), num_blocks: int | tuple = 2, attn_resolutions=(7,),
                 dropout: float = 0.0,
                 num_classes: int = 0, g_channels: int = 0, emb_channels: int | None = None,
                 num_groups: int | None = None, resample: str = "conv"):
        check_positive("g_channels", g_channels, integer=True, allow_zero=True)
        super().__init__(img_resolution, img_channels, model_channels, channel_mult, num_blocks,
                         attn_resolutions, dropout, num_classes, emb_channels, num_groups, resample)
        self.g_channels = g_channels
        groups, emb_channels, dropout = self._groups, self.emb_channels, self._dropout
        skips, ch = list(self._skip_channels), self._channels

        # decoder: per level num_blocks + 1 ResBlocks on [h, skip] (+ attention), then an upsampling
        self.dec = nn.ModuleList()
        for lvl in reversed(range(len(self.channel_mult))):
            res, cout = self._resolutions[lvl], model_channels * self.channel_mult[lvl]
            for _ in range(self.num_blocks[lvl] + 1):
                cin = ch + skips.pop()
                self.dec.append(ResBlock(cin, cout, emb_channels, groups(cin), groups(cout), dropout))
                ch = cout
                if res in self.attn_resolutions:
                    self.dec.append(Attention(ch, groups(ch)))
            if lvl > 0:
                self.dec.append(Upsample(ch, self.resample == "conv"))

        # output: F (img_channels) and G (g_channels) from one zero-initialised conv
        self.norm_out = nn.GroupNorm(groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, img_channels + g_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise, class_labels=None):
        # x: [N, C, H, W]; c_noise: [N] or a scalar; class_labels: [N] ints in 0 … num_classes, or None (∅)
        self._check_x(x)
        emb = self.embedding(self._noise(c_noise, x), self._labels(class_labels, x.shape[0], x.device))
        h, skips = self.encode(x, emb)
        for m in self.dec:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, skips.pop()], dim=1), emb)
            else:                                                              # Attention, Upsample
                h = m(h)
        out = self.conv_out(nnf.silu(self.norm_out(h)))                        # [N, C + g, H, W]
        F = out[:, :self.img_channels].to(x.dtype).contiguous()
        if not self.g_channels:
            return F
        return F, out[:, self.img_channels:].to(x.dtype).contiguous()


class NoisyClassifier(_Trunk):
    """A noise-aware image classifier for classifier guidance (T32), ADM's EncoderUNetModel: the U-Net's
    embedding, encoder and middle, then GroupNorm, SiLU, global average pooling and a linear read-out:
    `net(x̃, σ) -> logits [N, classes]` of p_σ(y | x̃). The input is scaled as the EDM denoiser's, by
    `precond.EDMPrecond`'s c_in and c_noise (1/√(σ² + σ_data²) and ln(σ)/4, T4), so one network serves every
    σ. σ: a scalar or one per example. classes: the classes predicted; the other arguments as `UNet`'s
    (the trunk is unconditional)."""

    def __init__(self, classes: int = 10, img_resolution: int = 28, img_channels: int = 1,
                 model_channels: int = 32, channel_mult=(1, 2, 2), num_blocks: int | tuple = 1,
                 attn_resolutions=(7,), dropout: float = 0.0, emb_channels: int | None = None,
                 num_groups: int | None = None, resample: str = "conv", sigma_data: float = 0.5):
        check_positive("classes", classes, integer=True)
        check_positive("sigma_data", sigma_data)
        super().__init__(img_resolution, img_channels, model_channels, channel_mult, num_blocks,
                         attn_resolutions, dropout, 0, emb_channels, num_groups, resample)
        self.classes, self.precond = classes, EDMPrecond(sigma_data)
        ch = self._channels
        self.norm_out = nn.GroupNorm(self._groups(ch), ch)
        self.head = nn.Linear(ch, classes)

    @property
    def sigma_data(self) -> float:
        return self.precond.sigma_data

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        # x: [N, C, H, W] noisy images; sigma: a scalar or [N] -> logits [N, classes]
        self._check_x(x)
        s = one_per_example(as_sigma(sigma, x), x.shape, "NoisyClassifier")                        # [N]
        sc = self.precond(s)                                                                        # T4
        h, _ = self.encode(sc.c_in.view(-1, 1, 1, 1) * x, self.embedding(sc.c_noise, None))
        return self.head(nnf.silu(self.norm_out(h)).mean((2, 3))).to(x.dtype)


__all__ = ["NoisyClassifier", "UNet"]
