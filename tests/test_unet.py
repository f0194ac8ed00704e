"""The image backbone `gendiff.nets.unet.UNet` (ADM / EDM DhariwalUNet family) on tiny configurations.

What is checked: output shapes, the zero-initialised start (F = 0, G = 0, so μ = c_skip·x̃ and σ_φ = c_var
inside a `Denoiser`), that the skip connections, the noise embedding and the class embedding (with its null
class ∅) reach the output, bf16 autocast against fp32, that a tiny model overfits one batch and that every
parameter gets a gradient, and the ValueErrors for bad labels, shapes and configurations.

Breakages tried on purpose (each made the tests named fail, then was reverted):
- decoder given zeros instead of the encoder activations (skip dropped):
  test_skip_connections_carry_encoder_activations, test_overfits_one_batch
- skips popped in the wrong order (first in, first out): test_skip_connections_carry_encoder_activations
  (and most others: the channel counts no longer match)
- the noise embedding left out of `emb`: test_noise_level_changes_output, test_gradients_reach_every_parameter
- the class embedding multiplied by 0 (labels ignored): test_class_conditioning_and_null_class,
  test_gradients_reach_every_parameter
- class_labels=None mapped to row 0 instead of the null row num_classes:
  test_class_conditioning_and_null_class
- output conv not zero-initialised: test_zero_init_start, test_denoiser_diag_head_at_init
- the label range check removed: test_bad_labels
- the input shape check removed (the error then comes from deep inside torch): test_bad_inputs
- the num_groups divisibility check removed: test_bad_config
- the output not cast back to x's dtype under autocast: test_bf16_autocast_close_to_fp32
- attention output detached: test_gradients_reach_every_parameter
- scale-shift computed from emb.detach(): test_gradients_reach_every_parameter
- plain downsampling by a 2×2 max instead of the mean: test_plain_resampling
- decoder levels given num_blocks blocks instead of num_blocks + 1, or the encoder's per-level counts read in
  reverse: test_blocks_per_level
"""
from __future__ import annotations

import pytest
import torch

from gendiff.losses import ConfidenceNLL, EDMLoss, NoisyBatch
from gendiff.nets.unet import ResBlock, UNet
from gendiff.precond import Denoiser

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(model_channels=8, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(7,))


def tiny(**kw) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**TINY, **kw})


def randomize_zero_inits(net: torch.nn.Module, std: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Give the parameters that start at zero by design (output conv, last conv of each block, attention
    output) random values, so that every path reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def images(n=4, c=1, res=28, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, res, res, generator=g) * 2 - 1


# ---- shapes and the zero-initialised start --------------------------------------------------------

@pytest.mark.parametrize("kw, x_shape", [
    (dict(), (3, 1, 28, 28)),
    (dict(g_channels=1), (3, 1, 28, 28)),
    (dict(img_channels=2, g_channels=2, num_classes=5), (2, 2, 28, 28)),
    (dict(img_resolution=16, channel_mult=(1, 2), attn_resolutions=(8,), num_blocks=2), (2, 1, 16, 16)),
    (dict(num_blocks=(1, 2, 3), resample="plain", emb_channels=24, g_channels=1), (2, 1, 28, 28)),
])
def test_output_shapes(kw, x_shape):
    net = tiny(**kw)
    x = images(x_shape[0], x_shape[1], x_shape[2])
    out = net(x, torch.randn(x_shape[0]))
    if net.g_channels:
        F, G = out
        assert G.shape == (x_shape[0], net.g_channels, *x_shape[2:])
    else:
        F = out
        assert isinstance(F, torch.Tensor)
    assert F.shape == x.shape and F.dtype == x.dtype
    F_scalar = net(x, 0.3)                             # one c_noise for the whole batch
    assert (F_scalar[0] if isinstance(F_scalar, tuple) else F_scalar).shape == x.shape


def test_zero_init_start():
    net = tiny(g_channels=1, num_classes=3)
    F, G = net(images(), torch.randn(4), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(F, torch.zeros_like(F)) and torch.equal(G, torch.zeros_like(G))


def test_denoiser_diag_head_at_init():
    """μ = c_skip·x̃ and σ_φ = c_var·exp(G/2) = c_var at init, σ_φ shaped like the image."""
    den = Denoiser(tiny(g_channels=1), "edm", "diag")
    x, sigma = images(), torch.tensor([0.01, 0.3, 2.0, 40.0])
    p = den.predict(x, sigma)
    sc = p.scalings
    assert p.sigma_phi.shape == x.shape
    torch.testing.assert_close(p.sigma_phi, torch.broadcast_to(sc.c_var, x.shape))
    torch.testing.assert_close(p.mu, sc.c_skip * x)


# ---- what reaches the output ----------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(num_blocks=2), dict(num_blocks=(2, 1, 3), resample="plain")])
def test_skip_connections_carry_encoder_activations(kw):
    """Each decoder block's input ends with the matching encoder activation (last in, first out)."""
    net = randomize_zero_inits(tiny(**kw))
    enc_out, dec_in = [], []
    hooks = [net.conv_in.register_forward_hook(lambda m, i, o: enc_out.append(o))]
    hooks += [m.register_forward_hook(lambda m, i, o: enc_out.append(o)) for m in net.enc]
    hooks += [m.register_forward_pre_hook(lambda m, i: dec_in.append(i[0]))
              for m in net.dec if isinstance(m, ResBlock)]
    with torch.no_grad():
        net(images(), torch.randn(4))
    for h in hooks:
        h.remove()
    # the activation stored at a position is the last output there: attention replaces its block's output
    kinds = [type(net.conv_in).__name__] + [type(m).__name__ for m in net.enc]
    stored = []
    for kind, out in zip(kinds, enc_out):
        if kind == "Attention":
            stored[-1] = out
        else:
            stored.append(out)
    assert len(dec_in) == len(stored)
    for inp, skip in zip(dec_in, reversed(stored)):
        torch.testing.assert_close(inp[:, -skip.shape[1]:], skip, rtol=0, atol=0)


def test_blocks_per_level():
    """num_blocks per level: that many ResBlocks at each resolution in the encoder, one more in the decoder
    (ADM: the decoder also takes the skip of the level's input)."""
    net = tiny(num_blocks=(1, 3, 2))
    seen = {"enc": [], "dec": []}
    hooks = [m.register_forward_pre_hook(lambda m, i, part=part: seen[part].append((m, i[0].shape[-1])))
             for part in ("enc", "dec") for m in getattr(net, part) if isinstance(m, ResBlock)]
    with torch.no_grad():
        net(images(), torch.randn(4))
    for h in hooks:
        h.remove()
    count = {part: {r: sum(1 for _, res in seen[part] if res == r) for r in (28, 14, 7)} for part in seen}
    assert count == {"enc": {28: 1, 14: 3, 7: 2}, "dec": {28: 2, 14: 4, 7: 3}}
    assert net.num_blocks == (1, 3, 2) and tiny(num_blocks=2).num_blocks == (2, 2, 2)


def test_plain_resampling():
    """resample="plain" (EDM2): down = the mean of each 2×2 patch, up = each pixel repeated 2×2, no
    parameters; the U-Net then has exactly the resampling convs' parameters fewer (C·C·9 + C per conv)."""
    from gendiff.nets.unet import Downsample, Upsample
    x = images(2, 3, 8)
    down = Downsample(3, conv=False)(x)
    torch.testing.assert_close(down, x.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5)))
    up = Upsample(3, conv=False)(x)
    torch.testing.assert_close(up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), rtol=0, atol=0)
    assert not list(Downsample(3, conv=False).parameters()) and not list(Upsample(3, conv=False).parameters())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    conv, plain = tiny(), tiny(resample="plain")
    widths = [TINY["model_channels"] * m for m in TINY["channel_mult"]]    # 8, 16, 16
    resample_convs = widths[:-1] + widths[1:]                              # down at 28, 14; up at 7→14, 14→28
    assert n(conv) - n(plain) == sum(c * c * 9 + c for c in resample_convs)
    assert plain.resample == "plain" and conv.resample == "conv"


def test_noise_level_changes_output():
    net = randomize_zero_inits(tiny())
    x = images()
    with torch.no_grad():
        a, b = net(x, torch.full((4,), -1.0)), net(x, torch.full((4,), 1.0))
    assert (a - b).abs().max() > 1e-3


def test_class_conditioning_and_null_class():
    net = randomize_zero_inits(tiny(num_classes=3))
    x, c = images(), torch.randn(4)
    with torch.no_grad():
        F0 = net(x, c, torch.zeros(4, dtype=torch.long))
        F1 = net(x, c, torch.ones(4, dtype=torch.long))
        F_null = net(x, c, torch.full((4,), 3))
        F_none = net(x, c)
        F_scalar = net(x, c, 1)
    assert (F0 - F1).abs().max() > 1e-3
    assert (F0 - F_null).abs().max() > 1e-3
    torch.testing.assert_close(F_none, F_null, rtol=0, atol=0)     # None = ∅ = row num_classes
    torch.testing.assert_close(F_scalar, F1, rtol=0, atol=0)
    assert net.class_emb.num_embeddings == 4


# ---- validation ----------------------------------------------------------------------------------

def test_bad_labels():
    net = tiny(num_classes=3)
    x, c = images(2), torch.randn(2)
    with pytest.raises(ValueError, match=r"class_labels holds 4.*0 … 3"):
        net(x, c, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"class_labels holds -1"):
        net(x, c, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"class_labels must hold integer"):
        net(x, c, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"class_labels must be one label per example, shape \[2\]"):
        net(x, c, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"unconditional \(num_classes=0\)"):
        tiny()(x, c, torch.tensor([0, 1]))


def test_bad_inputs():
    net = tiny()
    with pytest.raises(ValueError, match=r"expects x of shape \[N, 1, 28, 28\].*got \(2, 1, 27, 27\)"):
        net(torch.zeros(2, 1, 27, 27), torch.zeros(2))
    with pytest.raises(ValueError, match=r"img_channels=1.*got \(2, 3, 28, 28\)"):
        net(torch.zeros(2, 3, 28, 28), torch.zeros(2))
    with pytest.raises(ValueError, match=r"got \(1, 28, 28\)"):
        net(torch.zeros(1, 28, 28), torch.zeros(1))
    with pytest.raises(ValueError, match=r"c_noise of shape \[2\] or a scalar; got shape \(3,\)"):
        net(torch.zeros(2, 1, 28, 28), torch.zeros(3))


@pytest.mark.parametrize("kw, msg", [
    (dict(channel_mult=(1, 2, 2, 2)), r"img_resolution=28 is not divisible by .* = 8"),
    (dict(img_resolution=30), r"img_resolution=30 is not divisible by .* = 4"),
    (dict(num_groups=3), r"num_groups=3 does not divide .*allowed: a divisor of 8: \[1, 2, 4, 8\]"),
    (dict(attn_resolutions=(8,)), r"attn_resolutions=\(8,\) holds 8.*\[28, 14, 7\]"),
    (dict(dropout=1.0), r"dropout=1.0 must be < 1"),
    (dict(model_channels=0), r"model_channels=0 must be > 0"),
    (dict(channel_mult=()), r"channel_mult=\(\) must be a non-empty"),
    (dict(num_classes=-1), r"num_classes=-1 must be >= 0"),
    (dict(num_blocks=(1, 2)), r"num_blocks=\(1, 2\) must be one integer or one per level \(3 levels"),
    (dict(num_blocks=(1, 0, 1)), r"num_blocks\[1\]=0 must be > 0"),
    (dict(num_blocks=0), r"num_blocks=0 must be > 0"),
    (dict(num_blocks=True), r"num_blocks=True must be an integer"),
    (dict(num_blocks=1.5), r"num_blocks=1.5 must be an integer"),
    (dict(resample="bilinear"), r"resample='bilinear' is not allowed; choose one of \['conv', 'plain'\]"),
])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        UNet(**{**TINY, **kw})


def test_explicit_groups_that_divide():
    net = tiny(num_groups=4)
    assert {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)} == {4}


# ---- precision and training ----------------------------------------------------------------------

def test_bf16_autocast_close_to_fp32():
    net = randomize_zero_inits(tiny(g_channels=1, num_classes=2), std=0.1)
    x, c, y = images(), torch.randn(4), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        F32, G32 = net(x, c, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F16, G16 = net(x, c, y)
    assert F16.dtype == torch.float32 and G16.dtype == torch.float32      # cast back to x's dtype
    for a, b in ((F16, F32), (G16, G32)):
        assert (a - b).norm() / b.norm() < 0.05


def _fixed_batch(n=8, seed=0):
    """Smooth images (bilinear from 7×7: structure a denoiser can learn, unlike white noise), noised once."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.nn.functional.interpolate(images(n, res=7, seed=seed), size=28, mode="bilinear")
    sigma = torch.exp(torch.randn(n, generator=g) * 0.5 - 0.5)
    return NoisyBatch(x0, x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g), sigma)


def test_overfits_one_batch():
    den = Denoiser(tiny(), "edm")
    batch, loss_fn = _fixed_batch(), EDMLoss()
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = loss_fn(den, batch).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_fn(den, batch).mean().item() < 0.5 * first


@pytest.mark.parametrize("kw", [dict(num_blocks=2), dict(num_blocks=(1, 2, 2), resample="plain")])
def test_gradients_reach_every_parameter(kw):
    """Through the diagonal head's NLL (T9), F and G both matter; after a few steps the zero-initialised
    layers have moved, so every parameter gets a non-zero gradient."""
    den = Denoiser(tiny(g_channels=1, num_classes=2, **kw), "edm", "diag")
    batch, loss_fn = _fixed_batch(), ConfidenceNLL()
    batch.labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.Adam(den.parameters(), lr=1e-3)
    for _ in range(4):
        opt.zero_grad()
        loss_fn(den, batch).mean().backward()
        opt.step()
    missing = [n for n, p in den.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reaches {missing}"
