"""Benchmark the exact mixture oracle: GaussianMixture.logp/score vs the straightforward formulation.

The baseline is the autoguidance paper's formulation (NVlabs/edm2 toy_example.py), written out here:
all points and components at once, per-component inverse through the eigendecomposition Σ_k = Q Λ Qᵀ,

    y = m − x                                   [N, K, d]
    z = einsum('kij,kj,klj,nkl->nki', Q, 1/(Λ+σ²), Q, y)   (Σ_k + σ²I)⁻¹(m_k − x)
    w = φ / √((2π)^d det(Σ_k + σ²I)) · exp(−½ y·z)
    p = Σ_k w,   score = Σ_k w z / Σ_k w

(no log-sum-exp, so its log p is −inf where every w underflows). Both run in the same process on the
same points: 4096 points × 1016 components (tree "A") at σ = 0.1 in float32, then with a random σ
per point. Prints the median over the repeats in ms, the ratio baseline/ours, and the max abs
difference between the two (a sanity check). First, per case, the code as it was before issue 17's faster
score (`OldRotated`, the same chunks) against today's, alternated, and whether their values are equal bit
for bit.

    python benchmarks/mixture.py [--repeats 30] [--threads N]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from gendiff import runtime
from gendiff.data.toy import GaussianMixture, tree


class EinsumBaseline:
    """The paper's one-shot formulation: every point against every component, no chunking, no log-sum-exp."""

    def __init__(self, g: GaussianMixture, dtype):
        L, Q = torch.linalg.eigh(g.covs64)
        self.mu, self.L, self.Q = g.means64.to(dtype), L.to(dtype), Q.to(dtype)
        self.phi, self.dim = g.weights64.to(dtype), g.dim

    def logp_and_score(self, x: torch.Tensor, sigma):
        s = torch.as_tensor(sigma, dtype=x.dtype)
        Lp = self.L + (s.square() if s.ndim == 0 else s.square().view(-1, 1, 1))   # [K, d] or [N, K, d]
        y = self.mu - x[:, None, :]                                                 # [N, K, d]
        spec = "kij,kj,klj,nkl->nki" if Lp.ndim == 2 else "kij,nkj,klj,nkl->nki"
        z = torch.einsum(spec, self.Q, 1 / Lp, self.Q, y)                           # [N, K, d]
        c = self.phi / ((2 * math.pi) ** self.dim * Lp.prod(-1)).sqrt()             # [K] or [N, K]
        w = c * torch.exp(-0.5 * (y * z).sum(-1))                                   # [N, K]
        pdf = w.sum(-1)
        return pdf.log(), (w[..., None] * z).sum(-2) / pdf[:, None]


class OldRotated(GaussianMixture):
    """GaussianMixture as it was before issue 17's faster score (commit a20b933), for old-vs-new timings in
    one process: addmm with a broadcast bias, (u·z).sum + log det in fresh temporaries, softmax with
    lse = max logit − log max r (two max passes), the score readout out of place, logp computed with the
    score."""

    def __init__(self, g: GaussianMixture):
        super().__init__(g.weights64, g.means64, g.covs64, chunk_size=g.chunk_size)

    def _rotated(self, x, s):
        p = self._p(x.dtype, x.device)
        if "Qtm" not in p:
            p["Qtm"] = p["Qaug"][-1].contiguous()
        u = torch.addmm(p["Qtm"], x, p["Qcat"], alpha=-1).view(-1, self.dim, self.K)
        s2 = s.square()
        var = p["L"] + (s2 if s.ndim == 0 else s2.view(-1, 1, 1))
        z = u / var
        logdet = var.prod(-2).log() if s.ndim and self.dim == 2 else var.log().sum(-2)
        logits = (u * z).sum(-2).add_(logdet).mul_(-0.5).add_(p["logw_c"])
        return logits, z

    def _logits(self, x, s):
        if s.ndim == 0 or s.numel() == 1:
            return super()._logits(x, s)
        logits, z = self._rotated(x, s)
        Qcat = self._p(x.dtype, x.device)["Qcat"]
        return logits, lambda r: (r.unsqueeze(-2) * z).flatten(1) @ Qcat.T

    @staticmethod
    def _softmax_lse(logits):
        r = torch.softmax(logits, -1)
        return r, logits.amax(-1) - r.amax(-1).log()

    def score(self, x, sigma=0.0):
        return self.logp_and_score(x, sigma)[1]

    def logp_and_score(self, x, sigma=0.0, need_score: bool = True, _need_logp: bool = True):
        return super().logp_and_score(x, sigma, need_score)


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--points", type=int, default=4096)
    args = ap.parse_args()

    runtime.configure(threads=args.threads)
    dtype, n = torch.float32, args.points
    g = tree("A")
    base = EinsumBaseline(g, dtype)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; {n} points x {g.K} components (tree 'A'), float32, "
          f"median of {args.repeats}")

    x_scalar = g.sample(n, sigma=0.1, generator=gen, dtype=dtype)[0]
    sig_pp = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.05), math.log(1.0),
                                                                    generator=gen))
    x_pp = g.sample(n, sigma=sig_pp, generator=gen, dtype=dtype)[0]
    cases = [("sigma=0.1", x_scalar, 0.1), ("sigma per point, log-uniform [0.05, 1]", x_pp, sig_pp.to(dtype))]

    old = OldRotated(g)
    for name, x, sigma in cases:
        for _ in range(2):  # old and new alternated, twice
            t_old = median_ms(lambda: old.score(x, sigma), args.repeats)
            t_new = median_ms(lambda: g.score(x, sigma), args.repeats)
            t_old_b = median_ms(lambda: old.logp_and_score(x, sigma), args.repeats)
            t_new_b = median_ms(lambda: g.logp_and_score(x, sigma), args.repeats)
            print(f"[{name}] score: before issue 17 {t_old:7.2f} ms, now {t_new:7.2f} ms "
                  f"({t_old / t_new:.2f}x); logp_and_score: {t_old_b:7.2f} ms, now {t_new_b:7.2f} ms "
                  f"({t_old_b / t_new_b:.2f}x)")
        same = [torch.equal(a, b) for a, b in zip(old.logp_and_score(x, sigma), g.logp_and_score(x, sigma))]
        print(f"  now == before issue 17, bit for bit: logp {same[0]}, score {same[1]}, "
              f"score() {torch.equal(old.score(x, sigma), g.score(x, sigma))}")
        t_both = median_ms(lambda: g.logp_and_score(x, sigma), args.repeats)
        t_sep = median_ms(lambda: (g.logp(x, sigma), g.score(x, sigma)), args.repeats)
        t_base = median_ms(lambda: base.logp_and_score(x, sigma), args.repeats)
        print(f"[{name}]")
        print(f"  ours logp_and_score        {t_both:9.2f} ms")
        print(f"  ours logp, then score      {t_sep:9.2f} ms")
        print(f"  baseline einsum (both)     {t_base:9.2f} ms")
        print(f"  ratio baseline/ours: {t_base / t_both:.2f}x (logp_and_score), {t_base / t_sep:.2f}x "
              "(separate)")

        lp, sc = g.logp_and_score(x, sigma)
        lp_b, sc_b = base.logp_and_score(x, sigma)
        ok = torch.isfinite(lp_b) & torch.isfinite(sc_b).all(1)
        ref_lp, ref_sc = g.logp_and_score(x.double(), sigma.double() if torch.is_tensor(sigma) else sigma)
        print(f"  max |ours - baseline|: logp {(lp - lp_b)[ok].abs().max().item():.3g}, "
              f"score {(sc - sc_b)[ok].abs().max().item():.3g} (max |score| {sc.abs().max().item():.3g}; "
              f"{int((~ok).sum())} of {n} baseline rows non-finite)")
        print(f"  max |float32 - float64|: ours logp {(lp.double() - ref_lp).abs().max().item():.3g} "
              f"score {(sc.double() - ref_sc).abs().max().item():.3g}; "
              f"baseline logp {(lp_b.double() - ref_lp)[ok].abs().max().item():.3g} "
              f"score {(sc_b.double() - ref_sc)[ok].abs().max().item():.3g}")


if __name__ == "__main__":
    main()
