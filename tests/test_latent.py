"""Latent diffusion with the VAE's σ as known noise (THEORY T3, T12, T36): LatentSource's three training
modes, the latent loss against T7/T12/T36, its optimum on a Gaussian toy, and the sampling-time choice of
scalings.

Mode (c) feeds x̃ = m + s·ε₁ + σ·ε₂ ~ N(m, σ² + s²) (T3) and the per-element s to the loss; with the scalings
of the total σ_t = √(σ² + s²) (T36's choice) T9's (1 − k_t) = σ_t²/c_var² already holds s², so T36's
per-element formula G + e^(−G)·[(1 − k) + s²/c_var² + k(F − F*)²] + log 2πc_var² holds with 1 − k read as
σ²/c_var² (the diffusion part, as in T12's derivation); read as 1 − c_out²/c_var² of σ_t it counts s² twice
(the test shows that reading differs). c_noise stays the diffusion σ (one per example for the U-Net).

Breakages tried (the test that catches each):
- mode (c) without ε₁ (x̃ = m + σε₂): test_latent_source_modes_draw_T36 (standardised variance 0.6, not 1);
  mode (b) with x0 = m (ε₁ dropped): same test; LatentSource passing s in mode (b) too: same test;
- ConfidenceNLL adding s² as the trace term also under total-σ scalings (double count):
  test_latent_loss_is_T7_with_the_total_noise_variance and test_latent_optimum_* (∂L/∂G ≠ 0 at the optimum);
- NoisyBatch.predict not passing source_sigma (scalings from σ, no s² anywhere): the same tests;
- Denoiser.predict checking source_sigma > 0 (s = 0 refused): test_latent_loss_with_s_zero_is_the_pixel_loss;
- Head.nll ignoring source_var (the total_sigma=False option without s²): the T7 and optimum tests;
- Denoiser.predict taking c_noise from the total σ, or WithSourceSigma not passing s̄ (scalings from σ):
  test_sampling_denoiser_choices;
- _World.shard with its old fixed field list (source_sigma and latent_eps dropped):
  test_shard_keeps_every_batch_field.
All of them were run (each caught by its test, then restored).
"""
import math

import pytest
import torch
from torch import nn

from gendiff.data.sources import LatentSource
from gendiff.heads import LOG_2PI, nll_full
from gendiff.losses import ConfidenceNLL, EDMLoss, NoisyBatch
from gendiff.precond import Denoiser, EDMPrecond, WithSourceSigma, sampling_denoiser
from gendiff.train import _World

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
SIGMA_D = 0.5


class TableNet(nn.Module):
    """A backbone whose raw outputs are parameters, whatever its input: the loss's gradient in F and G."""

    def __init__(self, F, G=None):
        super().__init__()
        self.F = nn.Parameter(F.clone())
        self.G = None if G is None else nn.Parameter(G.clone())

    def forward(self, x_in, c_noise):
        return self.F if self.G is None else (self.F, self.G)


def edm(sigma):
    """EDM's scalings (T4, T5) at σ, written out here as the oracle."""
    s2, d2 = sigma ** 2, SIGMA_D ** 2
    return {"c_skip": d2 / (s2 + d2), "c_out": sigma * SIGMA_D / torch.sqrt(s2 + d2),
            "c_in": 1 / torch.sqrt(s2 + d2), "c_var": sigma * torch.sqrt(1 + d2 / (s2 + d2)),
            "k": d2 / (s2 + 2 * d2)}


def t7(mu, var_phi, x0, V):
    """T7 with noise variance V per element, summed per example."""
    return (0.5 * (var_phi.log() + (V + (mu - x0) ** 2) / var_phi + LOG_2PI)).flatten(1).sum(1)


def batch_tensors(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    x0 = 0.5 * torch.randn(shape, generator=g, dtype=F64)
    sigma = torch.exp(1.5 * torch.randn(n, generator=g, dtype=F64) - 1)          # per example
    s = 0.05 + torch.rand(shape, generator=g, dtype=F64)                          # per element
    xn = x0 + torch.sqrt(sigma.view(-1, *[1] * (len(shape) - 1)) ** 2 + s ** 2) * torch.randn(
        shape, generator=g, dtype=F64)
    F, G = torch.randn(shape, generator=g, dtype=F64), 0.5 * torch.randn(shape, generator=g, dtype=F64)
    return x0, xn, sigma, s, F, G


# ---- the source ---------------------------------------------------------------------------------------

def _standard(r, what):
    """r should be N(0, 1) elementwise: mean and variance within 6 standard errors."""
    r = r.flatten()
    n = r.numel()
    assert abs(float(r.mean())) < 6 / math.sqrt(n), (what, float(r.mean()))
    assert abs(float(r.var()) - 1) < 6 * math.sqrt(2 / n), (what, float(r.var()))


def test_latent_source_modes_draw_T36():
    """One epoch of each mode (labels = example indices, to find each draw's m and s): (a) x0 = m and
    (x̃ − m)/σ ~ N(0, 1), s unused; (b) (x0 − m)/s and (x̃ − x0)/σ ~ N(0, 1), uncorrelated; (c) x0 = m,
    batch.source_sigma = s, (x̃ − m)/√(σ² + s²) ~ N(0, 1). Bad input is a ValueError."""
    g = torch.Generator().manual_seed(0)
    M = 20000
    m = torch.randn(M, 2, 2, 2, generator=g)
    s = 0.1 + 0.8 * torch.rand(M, 2, 2, 2, generator=g)
    sigma = torch.exp(torch.randn(M, generator=g) - 1)
    idx = torch.arange(M)
    batches = {mode: LatentSource(m, s, mode, idx, M).draw(M, sigma, torch.Generator().manual_seed(1))
               for mode in ("mean", "sample", "source")}
    sg = sigma.view(-1, 1, 1, 1)
    a = batches["mean"]
    assert torch.equal(a.x0, m[a.labels]) and a.source_sigma is None
    _standard((a.x_noisy - a.x0) / sg, "a")
    again = LatentSource(m, 2 * s, "mean", idx, M).draw(M, sigma, torch.Generator().manual_seed(1))
    assert torch.equal(again.x_noisy, a.x_noisy)                       # (a) ignores s
    b = batches["sample"]
    assert b.source_sigma is None
    r1, r2 = (b.x0 - m[b.labels]) / s[b.labels], (b.x_noisy - b.x0) / sg
    _standard(r1, "b: x0 − m")
    _standard(r2, "b: x̃ − x0")
    assert abs(float((r1 * r2).mean())) < 6 / math.sqrt(r1.numel())
    c = batches["source"]
    assert torch.equal(c.x0, m[c.labels]) and torch.equal(c.source_sigma, s[c.labels])
    _standard((c.x_noisy - c.x0) / torch.sqrt(sg ** 2 + c.source_sigma ** 2), "c")
    with pytest.raises(ValueError, match="mode='x'"):
        LatentSource(m, s, "x")
    with pytest.raises(ValueError, match="std must be a tensor shaped like mean"):
        LatentSource(m, s[:, :1], "source")
    with pytest.raises(ValueError, match=">= 0"):
        LatentSource(m, -s, "source")


# ---- the loss -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["none", "diag", "excess"])
def test_latent_loss_with_s_zero_is_the_pixel_loss(head):
    """On the same tensors (x0, x̃, σ), a batch with source_sigma = 0 gives the pixel-space loss: the
    confidence NLL under both options, and EDM's loss."""
    x0, xn, sigma, _, F, G = batch_tensors((6, 2, 3, 3))
    den = Denoiser(TableNet(F, None if head == "none" else G), EDMPrecond(SIGMA_D), head)
    pix, lat = NoisyBatch(x0, xn, sigma), NoisyBatch(x0, xn, sigma, source_sigma=torch.zeros_like(x0))
    for loss in (ConfidenceNLL(), ConfidenceNLL(total_sigma=False), EDMLoss()):
        with torch.no_grad():
            torch.testing.assert_close(loss(den, lat), loss(den, pix), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head", ["diag", "excess"])
def test_latent_loss_is_T7_with_the_total_noise_variance(head):
    """With s > 0 per element: the loss equals T7 with V = σ² + s² at the prediction's (μ, σ_φ), under the
    scalings of the total σ (default) and of σ (total_sigma=False, s² as T12's trace term); under the total-σ
    scalings it is T36's per-element formula with 1 − k read as σ²/c_var² (its other reading differs); under
    σ's scalings it is nll_full (T12) with a diagonal S and Σ_src = diag(s²)."""
    x0, xn, sigma, s, F, G = batch_tensors((40, 3))
    den = Denoiser(TableNet(F, G), EDMPrecond(SIGMA_D), head)
    batch = NoisyBatch(x0, xn, sigma, source_sigma=s)
    V = sigma.view(-1, 1) ** 2 + s ** 2
    with torch.no_grad():
        for total in (True, False):
            p = den.predict(xn, sigma, source_sigma=s) if total else den.predict(xn, sigma)
            got = ConfidenceNLL(total_sigma=total)(den, batch)
            torch.testing.assert_close(got, t7(p.mu, p.variance(), x0, V), rtol=1e-10, atol=1e-10)
        if head != "diag":
            return
        e = edm(torch.sqrt(V))                                       # total σ_t, per element
        f_star = (x0 - e["c_skip"] * xn) / e["c_out"]
        cv2 = e["c_var"] ** 2
        t36 = 0.5 * (G + torch.exp(-G) * (sigma.view(-1, 1) ** 2 / cv2 + s ** 2 / cv2
                                          + e["k"] * (F - f_star) ** 2) + torch.log(2 * math.pi * cv2))
        torch.testing.assert_close(ConfidenceNLL()(den, batch), t36.sum(1), rtol=1e-10, atol=1e-10)
        twice = 0.5 * (G + torch.exp(-G) * ((1 - e["k"]) + s ** 2 / cv2 + e["k"] * (F - f_star) ** 2)
                       + torch.log(2 * math.pi * cv2))
        assert not torch.allclose(twice.sum(1), t36.sum(1), rtol=1e-3)
        sc = den.precond(sigma.view(-1, 1))                          # the diffusion σ's scalings
        G_full = torch.cat([G, torch.zeros(40, 3, dtype=F64)], 1)      # S = diag(e^(−G/2)), no off-diagonal
        want = nll_full(F, G_full, (x0 - sc.c_skip * xn) / sc.c_out, sc, torch.diag_embed(s ** 2))
        torch.testing.assert_close(ConfidenceNLL(total_sigma=False)(den, batch), want, rtol=1e-10, atol=1e-10)


def _optimum_net(head, total, x_noisy, sigma, s, var_phi, mu):
    """The (F, G) under `head` and the scalings (total σ or σ) that give μ and σ_φ² = var_phi."""
    sc = EDMPrecond(SIGMA_D)(torch.sqrt(sigma ** 2 + s ** 2) if total else sigma.expand_as(s))
    F = (mu - sc.c_skip * x_noisy) / sc.c_out
    floor = sc.sigma ** 2
    G = torch.log(var_phi / sc.c_var ** 2) if head == "diag" else torch.log((var_phi - floor) / sc.c_out ** 2)
    return TableNet(F, G)


@pytest.mark.parametrize("head", ["diag", "excess"])
@pytest.mark.parametrize("total", [True, False])
def test_latent_optimum_is_sigma2_plus_s2_plus_posterior_variance(head, total):
    """Gaussian toy, m ~ N(0, v) per element, x̃ = m + s·ε₁ + σ·ε₂: m | x̃ is Gaussian with mean
    v·x̃/(v + σ² + s²) and variance P = v(σ² + s²)/(v + σ² + s²). The loss is quadratic in m, so a two-point
    posterior (mean ± √P) gives its expectation exactly: at μ = E[m | x̃], σ_φ² = σ² + s² + P every gradient
    in F and G vanishes (to float64 rounding); at σ_φ² = σ² + P (s² dropped) or σ² + 2s² + P (counted twice)
    the G-gradient does not, and points back to the optimum (the excess head cannot go below its floor σ_t²
    under the total-σ scalings, so it skips σ² + P there)."""
    g = torch.Generator().manual_seed(5)
    n, d, v = 30, 4, SIGMA_D ** 2
    sigma = torch.exp(1.5 * torch.randn(n, 1, generator=g, dtype=F64) - 1)
    s = 0.05 + torch.rand(n, d, generator=g, dtype=F64)
    xn = torch.sqrt(v + sigma ** 2 + s ** 2) * torch.randn(n, d, generator=g, dtype=F64)
    post_mean, P = v * xn / (v + sigma ** 2 + s ** 2), v * (sigma ** 2 + s ** 2) / (v + sigma ** 2 + s ** 2)
    two = lambda t: torch.cat([t, t])                                                  # noqa: E731
    x0 = torch.cat([post_mean + P.sqrt(), post_mean - P.sqrt()])
    batch = NoisyBatch(x0, two(xn), two(sigma.flatten()), source_sigma=two(s))
    for var_phi, sign in ((sigma ** 2 + s ** 2 + P, 0), (sigma ** 2 + P, -1),
                          (sigma ** 2 + 2 * s ** 2 + P, 1)):
        if head == "excess" and total and bool((var_phi <= sigma ** 2 + s ** 2).any()):
            continue                   # below the excess head's floor σ_t²: not reachable, nothing to test
        net = _optimum_net(head, total, two(xn), two(sigma), two(s), two(var_phi), two(post_mean))
        den = Denoiser(net, EDMPrecond(SIGMA_D), head)
        ConfidenceNLL(total_sigma=total)(den, batch).sum().backward()
        gF, gG = (t.grad[:n] + t.grad[n:] for t in (net.F, net.G))      # each x̃'s two posterior points
        if sign == 0:
            torch.testing.assert_close(gF, torch.zeros_like(gF), rtol=0, atol=1e-10)
            torch.testing.assert_close(gG, torch.zeros_like(gG), rtol=0, atol=1e-10)
        else:                          # σ_φ too small: the loss falls as G grows; too large: as G shrinks
            assert bool((sign * gG > 1e-8).all()), (sign, gG.abs().min())


def test_latent_optimum_through_the_source():
    """The same optimum through LatentSource's mode (c) and the loss on one epoch of a Gaussian dataset
    (m ~ N(0, v), s per element): the mean gradient in G at σ_φ² = σ² + s² + P is 0 within 5 standard errors,
    at σ_φ² = σ² + P (the source noise left out) more than 20 away; in F likewise 0 at μ = E[m | x̃]."""
    g = torch.Generator().manual_seed(6)
    M, v = 20000, SIGMA_D ** 2
    m = math.sqrt(v) * torch.randn(M, 2, 2, 2, generator=g, dtype=F64)
    s = 0.1 + 0.7 * torch.rand(M, 2, 2, 2, generator=g, dtype=F64)
    sigma = torch.exp(torch.randn(M, generator=g, dtype=F64) - 1)
    b = LatentSource(m, s, "source").draw(M, sigma, torch.Generator().manual_seed(7))
    b = NoisyBatch(b.x0.double(), b.x_noisy.double(), b.sigma.double(), source_sigma=b.source_sigma.double())
    sg, ss = b.sigma.view(-1, 1, 1, 1), b.source_sigma
    tot = v + sg ** 2 + ss ** 2
    mu, P = v * b.x_noisy / tot, v * (sg ** 2 + ss ** 2) / tot
    for var_phi, optimal in ((sg ** 2 + ss ** 2 + P, True), (sg ** 2 + P, False)):
        net = _optimum_net("diag", True, b.x_noisy, sg, ss, var_phi, mu)
        ConfidenceNLL()(Denoiser(net, EDMPrecond(SIGMA_D), "diag"), b).sum().backward()
        for grad, name in ((net.G.grad, "G"), (net.F.grad, "F")):
            z = float(grad.mean()) / (float(grad.std()) / math.sqrt(grad.numel()))
            if optimal:
                assert abs(z) < 5, (name, z)
            elif name == "G":
                assert abs(z) > 20, z


# ---- sampling, sharding -------------------------------------------------------------------------------

class Recording(nn.Module):
    def forward(self, x_in, c_noise):
        self.seen = (x_in, c_noise)
        return 0.3 * x_in + 0.1


def test_sampling_denoiser_choices():
    """"diffusion": the model itself. "total": scalings from √(σ² + s̄²) per element (the net sees c_in·x̃,
    μ = c_skip·x̃ + c_out·F, σ_φ = c_var, EDM's T4/T5 at the total σ), c_noise = ¼ log σ of the diffusion
    σ. Bad choices are ValueErrors."""
    den = Denoiser(Recording(), EDMPrecond(SIGMA_D), "none")
    assert sampling_denoiser(den, "diffusion") is den
    s_bar = torch.tensor([0.1, 0.4], dtype=F64).view(1, 2, 1, 1)
    wrapped = sampling_denoiser(den, "total", s_bar)
    assert isinstance(wrapped, WithSourceSigma) and wrapped.sigma_data == SIGMA_D
    x = torch.randn(3, 2, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.02, 0.5, 3.0], dtype=F64)
    with torch.no_grad():
        mu = wrapped.predict(x, sigma).mu
        s2 = sigma.view(-1, 1, 1, 1) ** 2      # what the sampler is given: the ODE of the total noise
        torch.testing.assert_close(wrapped(x, sigma), x - s2 / (s2 + s_bar ** 2) * (x - mu), rtol=1e-12,
                                   atol=0)
        e = edm(torch.sqrt(sigma.view(-1, 1, 1, 1) ** 2 + s_bar ** 2))
        x_in, c_noise = den.net.seen
        torch.testing.assert_close(x_in, e["c_in"] * x, rtol=1e-12, atol=0)
        torch.testing.assert_close(c_noise, sigma.log() / 4, rtol=1e-12, atol=0)
        torch.testing.assert_close(mu, e["c_skip"] * x + e["c_out"] * (0.3 * x_in + 0.1), rtol=1e-12,
                                   atol=1e-14)
        torch.testing.assert_close(wrapped.predict(x, sigma).variance(),
                                   torch.broadcast_to(e["c_var"] ** 2, x.shape), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="source_scalings='median'"):
        sampling_denoiser(den, "median")
    with pytest.raises(ValueError, match="needs typical_source_sigma"):
        sampling_denoiser(den, "total")


def test_shard_keeps_every_batch_field():
    """A data-parallel shard of a latent batch cuts every per-example field, source_sigma and latent_eps
    included."""
    w = _World()
    w.size, w.rank = 2, 1
    b = NoisyBatch(*(torch.arange(4.0).view(4, 1) + k for k in range(3)), labels=torch.arange(4),
                   source_sigma=torch.ones(4, 1) * 0.2, latent_eps=torch.arange(8.0).view(4, 2))
    part = w.shard(b)
    assert torch.equal(part.source_sigma, b.source_sigma[2:])
    assert torch.equal(part.latent_eps, b.latent_eps[2:])
    assert torch.equal(part.x0, b.x0[2:]) and torch.equal(part.labels, b.labels[2:])


def test_total_sampling_follows_the_marginals_of_the_total_noise():
    """T36 "total" sampling on a Gaussian where everything is closed form: m ~ N(0, v) per element, a model of
    mode (c) that is exact, μ = E[m | x̃] = v/(v + σ² + s̄²)·x̃. The marginals the sampler must follow have
    variance v + s̄² + σ², so Heun from σ = 80 ends at x with variance v + s̄², and `final` decodes
    E[m | x] with variance v²/(v + s̄²). Breakage tried: forward returning μ (as before this test): the
    samples collapse onto μ (variance 0.04 instead of 1.25 here)."""
    from gendiff.samplers import sample_heun
    from gendiff.schedules import edm_sigmas

    v, s_bar = 1.0, 0.5

    class Exact(nn.Module):
        sigma_data = 1.0

        def predict(self, x, sigma, source_sigma=None, class_labels=None):
            s = torch.as_tensor(sigma, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
            tau2 = s.square() + (0.0 if source_sigma is None else source_sigma.square())
            return type("P", (), {"mu": v / (v + tau2) * x})()

    den = WithSourceSigma(Exact(), torch.tensor(s_bar, dtype=F64))
    g = torch.Generator().manual_seed(0)
    x = sample_heun(den, 80.0 * torch.randn(20000, 1, dtype=F64, generator=g),
                    edm_sigmas(64, 0.002, 80.0, 7.0))
    se = math.sqrt(2 / 20000)                                  # relative sd of a sample variance
    assert abs(float(x.var()) / (v + s_bar ** 2) - 1) < 4 * se + 0.03   # + Heun-64's discretisation
    m = den.final(x, 0.002)
    assert abs(float(m.var()) / (v ** 2 / (v + s_bar ** 2)) - 1) < 4 * se + 0.03
