"""A small convolutional VAE for latent diffusion with the encoder's σ as known noise (issue 19; THEORY T3,
T36).

Encoder: x [N, C, H, W] in [−1, 1] → the posterior q(z | x) = N(m, diag(s²)), m and log s each
[N, L, H/2^k, W/2^k] (k = len(channels) − 1 stride-2 convs: 28×28 → 7×7 for three levels). Decoder: z → x̂
[N, C, H, W], unsquashed (images are clamped to [−1, 1] only where they become pixels). Each level is
`blocks` residual blocks (GroupNorm, SiLU, 3×3 conv, twice); down by a 3×3 conv of stride 2, up by nearest ×2
then a 3×3 conv (LDM's autoencoder, CompVis `Encoder`/`Decoder`, sized down, without attention).

The loss is the negative ELBO per example in nats, with a KL weight β (β = 1: the ELBO itself):
    L = −log p(x | z) + β·KL(N(m, s²) ‖ N(0, I)),  z = m + s·ε (reparameterisation; ε drawn by the batch
        source with the data, `DataSource(latent_eps_shape=…)`, so a seed and a resumed run fix it),
    −log p(x | z) = Σ_pixels ½[(x − x̂)²/σ_x² + log 2πσ_x²], a Gaussian decoder with one pixel std σ_x,
        fixed (pixel_std > 0) or learned (pixel_std = 0: one scalar log σ_x, the `logvar` of LDM's
        LPIPSWithDiscriminator, there on an L1 + LPIPS reconstruction),
    KL = Σ_latents ½(m² + s² − 1) − log s (closed form; `gaussian_kl`).
An L2 reconstruction ‖x − x̂‖² with KL weight β' is this loss with fixed σ_x and β = β'/(2σ_x²), times
2σ_x². LDM's KL-f8 uses β = 10⁻⁶ on its L1 + LPIPS + GAN loss; EDM2 trains no VAE (it encodes with
Stability's, of that family). A small β or σ_x makes s small (a sharp posterior); the ELBO (β = 1) at a
moderate σ_x leaves s clearly non-zero, the regime where s matters as noise (T36).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch import nn

from ..checks import check_positive

LOG_2PI = math.log(2 * math.pi)
LOG_STD_RANGE = (-15.0, 10.0)      # log s clamped as LDM clamps its log-variance to [−30, 20]


def gaussian_kl(m: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """KL(N(m, s²) ‖ N(0, 1)) per element: ½(m² + s² − 1) − log s."""
    return 0.5 * (m.square() + torch.exp(2 * log_s) - 1) - log_s


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """−log N(x | mean, e^(2·log_std)) per element: ½(x − mean)²·e^(−2·log_std) + log_std + ½ log 2π."""
    return 0.5 * (x - mean).square() * torch.exp(-2 * log_std) + log_std + 0.5 * LOG_2PI


def _f32(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (the loss of a bf16-autocast forward pass in float32; float64 kept)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _groups(channels: int) -> int:
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return g


class _Block(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), 3×3 convs, channels kept."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm0, self.conv0 = nn.GroupNorm(_groups(ch), ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.norm1, self.conv1 = nn.GroupNorm(_groups(ch), ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        h = self.conv0(nnf.silu(self.norm0(x)))
        return x + self.conv1(nnf.silu(self.norm1(h)))


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return self.conv(nnf.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAE(nn.Module):
    """Encoder to a per-element Gaussian posterior, decoder back (module docstring).

    channels: conv widths per level, the first at full resolution; the latent is at
    resolution / 2^(len(channels) − 1). pixel_std: σ_x of the Gaussian decoder in [−1, 1] units, or 0 for one
    learned log σ_x (starting at σ_x = 1)."""

    def __init__(self, img_channels: int = 1, img_resolution: int = 28, latent_channels: int = 4,
                 channels=(16, 32, 64), blocks: int = 1, pixel_std: float = 0.1):
        super().__init__()
        for name, v in (("img_channels", img_channels), ("img_resolution", img_resolution),
                        ("latent_channels", latent_channels), ("blocks", blocks)):
            check_positive(name, v, integer=True)
        channels = tuple(channels)
        if not channels:
            raise ValueError("channels=() must list at least one level, e.g. (16, 32, 64)")
        for i, c in enumerate(channels):
            check_positive(f"channels[{i}]", c, integer=True)
        check_positive("pixel_std", pixel_std, allow_zero=True)
        down = 2 ** (len(channels) - 1)
        if img_resolution % down:
            raise ValueError(f"img_resolution={img_resolution} is not divisible by 2^{len(channels) - 1} = "
                             f"{down}, the downsampling of {len(channels)} levels "
                             f"(channels={list(channels)}); use fewer levels or resize the images")
        self.img_channels, self.img_resolution, self.latent_channels = img_channels, img_resolution, \
            latent_channels
        self.latent_resolution = img_resolution // down
        self.fixed_pixel_std = float(pixel_std)
        self.log_pixel_std = nn.Parameter(torch.zeros(())) if pixel_std == 0 else None
        enc = [nn.Conv2d(img_channels, channels[0], 3, padding=1)]
        for i, c in enumerate(channels):
            enc += [_Block(c) for _ in range(blocks)]
            if i + 1 < len(channels):
                enc.append(nn.Conv2d(c, channels[i + 1], 3, stride=2, padding=1))
        enc += [nn.GroupNorm(_groups(channels[-1]), channels[-1]), nn.SiLU(),
                nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)]
        dec = [nn.Conv2d(latent_channels, channels[-1], 3, padding=1)]
        for i in reversed(range(len(channels))):
            dec += [_Block(channels[i]) for _ in range(blocks)]
            if i > 0:
                dec.append(_Up(channels[i], channels[i - 1]))
        dec += [nn.GroupNorm(_groups(channels[0]), channels[0]), nn.SiLU(),
                nn.Conv2d(channels[0], img_channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple:
        """(L, h, w) of one image's latent."""
        return (self.latent_channels, self.latent_resolution, self.latent_resolution)

    def pixel_log_std(self) -> torch.Tensor:
        """log σ_x of the decoder, a scalar tensor (learned, or the fixed pixel_std)."""
        if self.log_pixel_std is not None:
            return self.log_pixel_std
        w = self.encoder[0].weight
        return torch.tensor(math.log(self.fixed_pixel_std), device=w.device, dtype=w.dtype)

    def encode(self, x: torch.Tensor):
        """x: [N, C, H, W] -> (m, log s), each [N, L, h, w] (log s clamped to LOG_STD_RANGE)."""
        if tuple(x.shape[1:]) != (self.img_channels, self.img_resolution, self.img_resolution):
            raise ValueError(f"the VAE takes images [N, {self.img_channels}, {self.img_resolution}, "
                             f"{self.img_resolution}]; got {tuple(x.shape)}")
        m, log_s = self.encoder(x).chunk(2, dim=1)
        return m, log_s.clamp(*LOG_STD_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, L, h, w] -> x̂ [N, C, H, W] (the decoder's mean, unclamped)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ = decode(m): the reconstruction from the posterior mean."""
        return self.decode(self.encode(x)[0])


class ELBOLoss:
    """The negative ELBO per example [N], in nats (module docstring): Gaussian reconstruction at the VAE's
    σ_x plus kl_weight·KL. A callable `loss(vae, batch)` for train.train: x = batch.x0, ε = batch.latent_eps;
    the batch's noise level and noisy input are not used (the loop draws them for every run; for a VAE they
    cost one randn of the batch's images and mean nothing). After each call `parts` holds the batch's
    (reconstruction, KL) per example, detached."""

    def __init__(self, kl_weight: float = 1.0):
        check_positive("kl_weight", kl_weight, allow_zero=True)
        self.kl_weight, self.parts = float(kl_weight), None

    def __call__(self, vae: VAE, batch) -> torch.Tensor:
        eps = getattr(batch, "latent_eps", None)
        if eps is None:
            raise ValueError("ELBOLoss needs batch.latent_eps, the reparameterisation's ε [N, "
                             "*latent_shape]: draw batches from "
                             "DataSource(latent_eps_shape=vae.latent_shape)")
        x = batch.x0
        m, log_s = vae.encode(x)
        x_hat = vae.decode(m + torch.exp(log_s) * eps.to(m.dtype))
        rec = gaussian_nll(_f32(x), _f32(x_hat), _f32(vae.pixel_log_std())).flatten(1).sum(1)
        kl = gaussian_kl(_f32(m), _f32(log_s)).flatten(1).sum(1)
        self.parts = (rec.detach(), kl.detach())
        return rec + self.kl_weight * kl
