"""The fast exact mixture score (GaussianMixture.logp_and_score, issue 17) against two references.

1. The formulation it replaced, written out here (`_old_logp_and_score`: the eigen-frame rotation,
   z = u / (Λ + σ²), log det from the product of Λ + σ², (u·z).sum, softmax with lse = max − log max r).
2. The float64 autograd gradient of log p (an independent check of the score as ∇ log p).

At 1016 components (tree "A"), points sampled at their σ plus uniform points in the view, σ from 1e-3
to 80, a scalar σ and one σ per point, float32 and float64. Tolerance, per point, with
scale = max(‖reference score‖_∞, 1/σ) (the noise score ε/σ has size 1/σ, so a tiny score reads
against that):
    float64: ‖Δscore‖_∞ ≤ 1e-9·scale, |Δlog p| ≤ 1e-9·max(1, |log p|)
    float32: ‖Δscore‖_∞ ≤ 1e-4·scale, |Δlog p| ≤ 1e-4·max(1, |log p|)
(the float32 checks also compare against the old float32 code, which sits within the same bound).

Broken on purpose while writing this test: dropping σ² from the determinant (log det from Λ alone)
made the per-point-σ checks fail (score error 0.79 of the scale; 2 of the 3 tests: the one-σ case of
the chunk test takes the scalar path), and responsibilities exp(logit − max) without the softmax's
normalisation made all 3 fail (score error 90 of the scale).

On this machine the new code also gives the old float32 and float64 values bit for bit (see
benchmarks/mixture.py); the test asks only for the tolerances above, which hold on any BLAS.
"""
from __future__ import annotations

import math

import pytest
import torch

from gendiff.data.toy import GaussianMixture, tree

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tree_a():
    return tree("A")


def _old_logp_and_score(g: GaussianMixture, x: torch.Tensor, s: torch.Tensor):
    """The rotated formulation before issue 17's rewrite, verbatim in its arithmetic (all chunks at once)."""
    d, K = g.dim, g.K
    Qjk = g.Q64.permute(2, 0, 1).to(x.dtype)                                   # [j, k, :] = Q_k[:, j]
    Qcat = Qjk.reshape(d * K, d).T
    Qtm = torch.einsum("jkc,kc->jk", Qjk, g.means64.to(x.dtype)).reshape(d * K)
    L = g.L64.T.to(x.dtype)
    logw_c = (g.weights64.log() - 0.5 * d * math.log(2 * math.pi)).to(x.dtype)
    u = torch.addmm(Qtm, x, Qcat, alpha=-1).view(-1, d, K)
    s2 = s.square()
    var = L + (s2 if s.ndim == 0 else s2.view(-1, 1, 1))
    z = u / var
    logdet = (var.prod(-2).log() if s.ndim else var.log().sum(-2))
    logits = (u * z).sum(-2).add_(logdet).mul_(-0.5).add_(logw_c)
    r = torch.softmax(logits, -1)
    lse = logits.amax(-1) - r.amax(-1).log()
    return lse, (r.unsqueeze(-2) * z).flatten(1) @ Qcat.T


def _autograd(g, x, sigma):
    x = x.double().clone().requires_grad_()
    s = sigma.double() if torch.is_tensor(sigma) else sigma
    lp = g.logp(x, s)
    (sc,) = torch.autograd.grad(lp.sum(), x)
    return lp.detach(), sc


def _cases(g, n=400, seed=0):
    """(x, σ) pairs in float64: per-point σ log-uniform in [1e-3, 80], and a list of scalar σ."""
    gen = torch.Generator().manual_seed(seed)
    sig = torch.exp(
        torch.empty(n, dtype=torch.float64).uniform_(math.log(1e-3), math.log(80.0), generator=gen))
    x = g.sample(n, sigma=sig, generator=gen, dtype=torch.float64)[0]
    u = (torch.rand(n // 4, 2, generator=gen, dtype=torch.float64) - 0.5) * 3.2
    sig_u = torch.exp(torch.empty(n // 4, dtype=torch.float64).uniform_(math.log(1e-3), math.log(80.0),
                                                                           generator=gen))
    yield torch.cat([x, u]), torch.cat([sig, sig_u])
    for s in (1e-3, 1e-2, 0.1, 1.0, 10.0, 80.0):
        yield (torch.cat([g.sample(n, sigma=s, generator=gen, dtype=torch.float64)[0], u]),
               torch.tensor(s, dtype=torch.float64))


def _check(lp, sc, ref_lp, ref_sc, sigma, rtol_sc, rtol_lp, what):
    inv_s = 1 / (sigma if sigma.ndim else sigma.expand(ref_lp.shape[0]))
    scale = torch.maximum(ref_sc.abs().amax(1), inv_s)
    err_sc = ((sc.double() - ref_sc).abs().amax(1) / scale).max().item()
    err_lp = ((lp.double() - ref_lp).abs() / ref_lp.abs().clamp_min(1)).max().item()
    assert err_sc <= rtol_sc, f"{what}: score error {err_sc:.3g} (relative to scale) > {rtol_sc}"
    assert err_lp <= rtol_lp, f"{what}: log p error {err_lp:.3g} (relative) > {rtol_lp}"


@pytest.mark.parametrize("dtype, rtol_sc, rtol_lp",
                         [(torch.float64, 1e-9, 1e-9), (torch.float32, 1e-4, 1e-4)])
def test_fast_score_matches_old_formula_and_autograd(tree_a, dtype, rtol_sc, rtol_lp):
    g = tree_a
    for x64, sig64 in _cases(g):
        old_lp, old_sc = _old_logp_and_score(g, x64, sig64)   # independent of the code under test
        x, sig = x64.to(dtype), sig64.to(dtype)
        for s in ((sig,) if sig.ndim else (sig, float(sig))):
            lp, sc = g.logp_and_score(x, s)
            assert lp.dtype == dtype and sc.dtype == dtype
            _check(lp, sc, old_lp, old_sc, sig64, rtol_sc, rtol_lp,
                   f"new {dtype} vs old float64, σ={'per point' if sig.ndim else s}")
        # the autograd gradient of the new log p agrees with both
        ref_lp, ref_sc = _autograd(g, x64, sig64)
        _check(old_lp, old_sc, ref_lp, ref_sc, sig64, 1e-9, 1e-9, "old float64 vs autograd")
        for s in ((sig,) if sig.ndim else (sig, float(sig))):
            lp, sc = g.logp_and_score(x, s)
            _check(lp, sc, ref_lp, ref_sc, sig64, rtol_sc, rtol_lp, f"{dtype} vs autograd")
            _check(g.logp(x, s), g.score(x, s), ref_lp, ref_sc, sig64, rtol_sc, rtol_lp, "logp/score")
        if dtype == torch.float32:  # the old float32 code sits within the same bound
            o_lp, o_sc = _old_logp_and_score(g, x, sig)
            _check(o_lp, o_sc, ref_lp, ref_sc, sig64, rtol_sc, rtol_lp, "old float32")


def test_fast_score_chunks_and_broadcast_sigma(tree_a):
    """Chunk boundaries and a one-element σ give the same values as one chunk and a scalar σ."""
    g = GaussianMixture(tree_a.weights64, tree_a.means64, tree_a.covs64, chunk_size=37)
    x, sig = next(_cases(tree_a, n=100))
    x, sig = x.float(), sig.float()
    lp, sc = g.logp_and_score(x, sig)
    lp1, sc1 = tree_a.logp_and_score(x, sig)
    torch.testing.assert_close(lp, lp1, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(sc, sc1, rtol=1e-5, atol=1e-4)
    for s in (torch.tensor([0.3]), torch.tensor(0.3)):
        lp_s, sc_s = g.logp_and_score(x, s)
        ref_lp, ref_sc = _autograd(tree_a, x.double(), torch.tensor(0.3, dtype=torch.float64))
        _check(lp_s, sc_s, ref_lp, ref_sc, torch.tensor(0.3, dtype=torch.float64), 1e-4, 1e-4, f"σ={s}")


def test_exact_denoiser_with_one_sigma_per_batch(tree_a, monkeypatch):
    """ExactDenoiser.forward given one σ per example, all equal (a sampler's step), takes the mixture's scalar
    one-matmul path and still equals Tweedie's x + σ²∇log p (T13) with the float64 autograd score, to 1e-9 of
    the scale, at σ from 1e-3 to 80; a batch whose σ differ per point keeps the per-point path (same check).
    Breakages tried: passing s[0] for every batch (the varying-σ case fails); passing s as is (the one-matmul
    path is never taken: the call count below fails)."""
    den = tree_a.denoiser("point")
    calls = []
    expanded = tree_a._expanded_weights
    monkeypatch.setattr(tree_a, "_expanded_weights", lambda *a: calls.append(a[0]) or expanded(*a))
    den(torch.zeros(5, 2, dtype=torch.float64), torch.full((5, 1), 0.3, dtype=torch.float64))
    assert calls == [0.3]                                       # the scalar path, once, at that σ
    for x64, sig64 in _cases(tree_a):
        sig = sig64 if sig64.ndim else torch.full((len(x64),), float(sig64), dtype=torch.float64)
        mu = den(x64, sig[:, None])
        _, ref_sc = _autograd(tree_a, x64, sig)
        scale = torch.maximum(ref_sc.abs().amax(1), 1 / sig)
        err = ((mu - x64) / sig[:, None] ** 2 - ref_sc).abs().amax(1)
        assert bool((err <= 1e-9 * scale).all()), float((err / scale).max())
