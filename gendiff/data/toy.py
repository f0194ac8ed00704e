"""Exact 2-D toy distributions: the autoguidance tree mixture and the classic 2-D toys (THEORY §10).

`GaussianMixture` is exact at every noise level σ (scalar or one per point): density,
score, sampling, and the posterior of x0 given x̃ = x0 + σ·ε. All components are
evaluated together with matrix algebra, in chunks of points that bound memory, with
log-sum-exp for stability.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from ..checks import as_sigma, check_choice, check_positive, one_per_example
from ..heads import Prediction


class Posterior(NamedTuple):
    mean: torch.Tensor  # [N, d]
    cov: torch.Tensor   # [N, d, d]


class GaussianMixture:
    """Σ_k φ_k N(m_k, Σ_k), smoothed by isotropic Gaussian noise σ: p(x; σ) = Σ_k φ_k N(x; m_k, Σ_k + σ²I)."""

    def __init__(self, weights, means, covs, chunk_size: int = 512):
        w = np.asarray(weights, dtype=np.float64)
        self.means64 = torch.as_tensor(np.asarray(means, dtype=np.float64))      # [K, d]
        self.covs64 = torch.as_tensor(np.asarray(covs, dtype=np.float64))        # [K, d, d]
        K, d = self.means64.shape
        if w.shape != (K,) or self.covs64.shape != (K, d, d) or not np.all(w > 0):
            raise ValueError("GaussianMixture needs weights [K] > 0, means [K, d], covs [K, d, d]")
        self.weights64 = torch.as_tensor(w / w.sum())
        L, Q = torch.linalg.eigh(self.covs64)                                     # Σ_k = Q diag(L) Qᵀ
        self.L64, self.Q64 = L.clamp_min(0), Q
        self.K, self.dim, self.chunk_size = K, d, chunk_size
        self._cache: dict = {}

    # -- parameters in the working dtype --------------------------------------------------------
    def _p(self, dtype, device):
        key = (dtype, device)
        if key not in self._cache:
            K, d = self.K, self.dim
            # Planar layout (eigen-direction j outer, component k inner) keeps every elementwise op
            # contiguous along K; a trailing dim of size d = 2 defeats vectorisation.
            Qjk = self.Q64.permute(2, 0, 1)                                        # [j, k, :] = Q_k[:, j]
            self._cache[key] = {
                "logw_c": (self.weights64.log()
                           - 0.5 * d * math.log(2 * math.pi)).to(dtype=dtype, device=device),
                "L": self.L64.T.contiguous().to(dtype=dtype, device=device),          # [d, K]
                "Qcat": Qjk.reshape(d * K, d).T.contiguous().to(dtype=dtype, device=device),  # [d, d·K]
                "Qaug": torch.cat([-Qjk.reshape(d * K, d).T, torch.einsum("jkc,kc->jk", Qjk, self.means64)
                                   .reshape(1, d * K)]).to(dtype=dtype, device=device),         # [d + 1, d·K]
                "means": self.means64.to(dtype=dtype, device=device),
                "covs": self.covs64.to(dtype=dtype, device=device),
                "Q": self.Q64.to(dtype=dtype, device=device),
            }
        return self._cache[key]

    def _sigma(self, sigma, x: torch.Tensor, allow_zero: bool) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [N, {self.dim}]; got {tuple(x.shape)}")
        if s.ndim > 1 or (s.ndim == 1 and s.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"sigma must be a scalar or one value per point [{x.shape[0]}]; got shape "
                             f"{tuple(s.shape)}")
        ok = (s >= 0) if allow_zero else (s > 0)
        if not torch.all(ok & torch.isfinite(s)):
            raise ValueError(f"sigma must be finite and {'>= 0' if allow_zero else '> 0'}; got "
                             f"{s.min().item()}")
        return s

    def _chunks(self, x, s):
        for i in range(0, x.shape[0], self.chunk_size):
            yield x[i:i + self.chunk_size], (s if s.ndim == 0 or s.shape[0] == 1
                                             else s[i:i + self.chunk_size])

    def _rotated(self, x, s):
        """Per component k: logit_k = log φ_k + log N(x; m_k, Σ_k + σ²I) and z_k = (Λ_k + σ²)⁻¹Q_kᵀ(m_k − x).

        x: [n, d]; s: σ, scalar or [n]. Returns logits [n, K] and z [n, d, K] (eigen-frame of Σ_k).
        Works for a σ per point; no cancellation, so exact to working precision at any σ.
        In the eigen-frame Σ_k + σ²I = Q_k diag(Λ_k + σ²) Q_kᵀ, so its inverse and log-determinant are
        elementwise on [n, d, K] (no per-point matrix algebra); the few passes run in place.
        """
        p = self._p(x.dtype, x.device)
        d, K = self.dim, self.K
        # Qᵀ(m − x) = [x, 1] @ [−Q; Qᵀm]: one matmul, no copy of a broadcast bias (the same values as
        # addmm(Qᵀm, x, Q, alpha=−1), bit for bit, here)
        u = torch.cat([x, torch.ones_like(x[:, :1])], 1).mm(p["Qaug"]).view(-1, d, K)
        s2 = s.square()
        var = p["L"] + (s2 if s.ndim == 0 else s2.view(-1, 1, 1))                     # Λ + σ²: [(n,) d, K]
        z = u / var
        # one log of the product is cheaper; it cannot underflow for d = 2 (Λ + σ² ≥ 1e-12 here)
        if s.ndim and d == 2:
            logdet = torch.mul(var[:, 0], var[:, 1]).log_()
        else:
            logdet = var.log().sum(-2)
        # Σ_j u_j z_j, then + log det, then −½· and + log φ, rounded as (u·z).sum(−2) etc. were before
        # (mul then add: addcmul fuses to an FMA, rounds differently and changes the trained
        # score-matching model); accumulated in place in u (only z is needed afterwards)
        if u.requires_grad:
            t = (u * z).sum(-2).add_(logdet)
            return t.mul_(-0.5).add_(p["logw_c"]), z
        uz = u.mul_(z)
        t = uz[:, 0]
        for j in range(1, d):
            t.add_(uz[:, j])
        t.add_(logdet)
        return torch.add(p["logw_c"], t, alpha=-0.5), z                  # −½t is exact: the same rounding

    def _expanded_weights(self, s: float, dtype, device):
        """For one scalar σ: log N(x; m_k, P_k⁻¹) = φ(x)·W_k with φ(x) = [x_i x_j (i ≤ j), x, 1],
        so all components come from one matmul; the score reads out as r @ [P m | P] (P = (Σ + σ²I)⁻¹)."""
        key = ("expanded", float(s), dtype, device)
        if key not in self._cache:
            d, K = self.dim, self.K
            P = torch.linalg.inv(self.covs64 + s * s * torch.eye(d, dtype=torch.float64))     # [K, d, d]
            Pm = (P @ self.means64[:, :, None]).squeeze(-1)
            i, j = torch.triu_indices(d, d)
            quad = -0.5 * P[:, i, j] * torch.where(i == j, 1.0, 2.0).double()
            const = (self.weights64.log() - 0.5 * (self.means64 * Pm).sum(1)
                     - 0.5 * torch.logdet(self.covs64 + s * s * torch.eye(d, dtype=torch.float64))
                     - 0.5 * d * math.log(2 * math.pi))
            W = torch.cat([quad, Pm, const[:, None]], 1).T.contiguous()                # [d(d+1)/2 + d + 1, K]
            V = torch.cat([Pm, P.reshape(K, d * d)], 1)                                # [K, d + d²]
            if len(self._cache) > 64:
                self._cache = {k: v for k, v in self._cache.items() if k[0] != "expanded"}
            self._cache[key] = (W.to(dtype=dtype, device=device), V.to(dtype=dtype, device=device),
                                (i.to(device), j.to(device)), float(torch.linalg.eigvalsh(P).max()))
        return self._cache[key]

    def _logits(self, x, s):
        """Logits [n, K] and a readout r ↦ Σ_k r_k ∇ log N_k(x) (the score for r = responsibilities).

        A scalar σ takes one matmul (`_expanded_weights`) when the expansion's cancellation error,
        about eps·‖x‖²·λ_max(P), stays below 1e-4 nats; otherwise the exact rotated form."""
        if s.ndim == 0 or s.numel() == 1:
            W, V, (i, j), lam = self._expanded_weights(float(s.reshape(())), x.dtype, x.device)
            if torch.finfo(x.dtype).eps * float(x.detach().square().sum(1).max()) * lam < 1e-4:
                feats = torch.cat([x[:, i] * x[:, j], x, torch.ones_like(x[:, :1])], 1)
                d = self.dim

                def readout(r):
                    a = r @ V
                    return a[:, :d] - (a[:, d:].view(-1, d, d) @ x[:, :, None]).squeeze(-1)
                return feats @ W, readout
        logits, z = self._rotated(x, s.reshape(()) if s.numel() == 1 else s)
        Qcat = self._p(x.dtype, x.device)["Qcat"]
        # z is ours: weight it in place (unless autograd needs it)
        return logits, lambda r: (z * r.unsqueeze(-2) if z.requires_grad else z.mul_(r.unsqueeze(-2))
                                  ).flatten(1) @ Qcat.T

    @staticmethod
    def _softmax_lse(logits):
        """Responsibilities and log-sum-exp with one fused softmax: lse = max_k logit − log max_k r
        (softmax is monotone, so both maxima sit at the same k). torch.softmax, not exp: its exp stays
        fast for arguments below −88, where torch.exp is ~40× slower here. (One max with indices and a
        gather instead of the two amax measured no faster.)"""
        r = torch.softmax(logits, -1)
        return r, logits.amax(-1) - r.amax(-1).log()

    # -- public API ------------------------------------------------------------------------------
    def logp(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log p(x; σ): [N]."""
        return self.logp_and_score(x, sigma, need_score=False)[0]

    def score(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """∇_x log p(x; σ): [N, d]."""
        return self.logp_and_score(x, sigma, _need_logp=False)[1]

    def logp_and_score(self, x: torch.Tensor, sigma=0.0, need_score: bool = True, _need_logp: bool = True):
        """(log p(x; σ) [N], ∇_x log p(x; σ) [N, d]) in one pass over the components
        (`score` skips the log-sum-exp's max pass: (None, score))."""
        s = self._sigma(sigma, x, allow_zero=True)
        lp, sc = [], []
        for xc, s_c in self._chunks(x, s):
            logits, readout = self._logits(xc, s_c)
            if _need_logp:
                r, lse = self._softmax_lse(logits)
                lp.append(lse)
            else:
                r = torch.softmax(logits, -1)
            if need_score:
                sc.append(readout(r))
        return (torch.cat(lp) if _need_logp else None), (torch.cat(sc) if need_score else None)

    def responsibilities(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """p(k | x̃; σ): [N, K]."""
        s = self._sigma(sigma, x, allow_zero=True)
        return torch.cat([torch.softmax(self._logits(xc, sc)[0], -1) for xc, sc in self._chunks(x, s)])

    def posterior(self, x: torch.Tensor, sigma) -> Posterior:
        """Exact mean and covariance of x0 given x̃ = x0 + σε (THEORY T8's target; Tweedie T13).

        Per component: E[x0 | x̃, k] = x̃ + σ²(Σ_k + σ²I)⁻¹(m_k − x̃),
        Cov[x0 | x̃, k] = σ²Σ_k(Σ_k + σ²I)⁻¹; mixed with the responsibilities.
        """
        s = self._sigma(sigma, x, allow_zero=False)
        p = self._p(x.dtype, x.device)
        means, covs = [], []
        for xc, sc in self._chunks(x, s):
            logits, z = self._rotated(xc, sc.reshape(()) if sc.numel() == 1 else sc)
            z = z.transpose(1, 2)                                                  # [n, K, d]
            r = torch.softmax(logits, -1)                                          # [n, K]
            s2 = (sc.square() if sc.ndim == 0 else sc.square().view(-1, 1, 1))
            off = s2 * torch.einsum("nkj,kij->nki", z, p["Q"])                    # E[x0|x̃,k] − x̃: [n, K, d]
            mean_off = torch.einsum("nk,nki->ni", r, off)
            L = p["L"].T                                                           # [K, d]
            shrink = s2 * L / (L + s2)                                             # eigenvalues of Cov_k
            # Σ_k r_k Q_k diag(shrink) Q_kᵀ + Σ_k r_k off offᵀ − mean_off mean_offᵀ
            within = torch.einsum("nk,nkj,kaj,kbj->nab", r, shrink.expand_as(z), p["Q"], p["Q"])
            between = (torch.einsum("nk,nka,nkb->nab", r, off, off)
                       - mean_off[:, :, None] * mean_off[:, None, :])
            means.append(xc + mean_off)
            covs.append(within + between)
        return Posterior(torch.cat(means), torch.cat(covs))

    def source_posterior(self, x: torch.Tensor, sigma) -> Posterior:
        """For x̃ = m_k + Σ_k^½ε₁ + σε₂ with x0 = m_k (the *source* mode, T3/T12):
        mean E[m_k | x̃] and covariance E[Σ_k | x̃] + Cov[m_k | x̃]. The optimum of T12 is
        μ = mean, Σ_φ = σ²I + cov."""
        r = self.responsibilities(x, sigma)
        p = self._p(x.dtype, x.device)
        mean = r @ p["means"]
        second = (torch.einsum("nk,ka,kb->nab", r, p["means"], p["means"])
                  - mean[:, :, None] * mean[:, None, :])
        within = (r @ p["covs"].flatten(1)).view(-1, self.dim, self.dim)
        return Posterior(mean, within + second)

    def sample_components(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Component indices k ~ φ: [n] (int64)."""
        check_positive("n", n, integer=True)
        u = torch.rand(n, dtype=torch.float64, generator=generator)
        return torch.searchsorted(self.weights64.cumsum(0), u).clamp_max(self.K - 1)

    def sample(self, n: int, sigma=0.0, generator: torch.Generator | None = None, dtype=torch.float32,
               return_index: bool = False):
        """n samples of p(x; σ) and each sample's component covariance Σ_k: ([n, d], [n, d, d]),
        plus the component indices k [n] when `return_index`."""
        k = self.sample_components(n, generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        s = torch.as_tensor(sigma, dtype=torch.float64)
        if s.ndim > 1 or (s.ndim == 1 and s.shape[0] not in (1, n)) or not torch.all(s >= 0):
            raise ValueError(f"sigma must be >= 0, a scalar or one value per sample [{n}]; got {sigma!r}")
        std = (self.L64[k] + (s.square() if s.ndim == 0 else s.square().view(-1, 1))).sqrt()  # [n, d]
        x = self.means64[k] + (self.Q64[k] @ (std * eps)[:, :, None]).squeeze(-1)
        if return_index:
            return x.to(dtype), self.covs64[k].to(dtype), k
        return x.to(dtype), self.covs64[k].to(dtype)

    def denoiser(self, mode: str = "point") -> ExactDenoiser:
        """The exact optimum of a training mode as a denoiser honouring the whole contract
        (see ExactDenoiser)."""
        return ExactDenoiser(self, mode)

    def moments(self):
        """Exact mean [d] and covariance [d, d] of the mixture (σ = 0)."""
        mean = self.weights64 @ self.means64
        dm = self.means64 - mean
        cov = torch.einsum("k,kab->ab", self.weights64, self.covs64 + dm[:, :, None] * dm[:, None, :])
        return mean, cov


EXACT_MODES = ("point", "source", "point-cov")


class ExactDenoiser(torch.nn.Module):
    """The exact optimum of the confidence-aware loss for each training mode, as a denoiser:
    `forward(x, σ) -> μ*` and `predict(x, σ) -> Prediction(μ*, Σ_φ*)` for σ scalar or one per point.

    point:     x0 ~ p, x̃ = x0 + σε
               → μ* = E[x0 | x̃],  Σ_φ* = σ²I + Cov[x0 | x̃] (T8)
    source:    x0 = m_k, x̃ = m_k + Σ_k^½ε₁ + σε₂
               → μ* = E[m_k | x̃], Σ_φ* = σ²I + E[Σ_k | x̃] + Cov[m_k | x̃] (T12)
    point-cov: point batches plus T12's trace term with the sample's own Σ_k (the seed's training.py)
               → μ* = E[x0 | x̃],  Σ_φ* = σ²I + E[Σ_k | x̃] + Cov[x0 | x̃]
    (Σ_src counted twice: once inside Cov[x0 | x̃], once through the trace term).
    """

    def __init__(self, mixture: GaussianMixture, mode: str = "point"):
        super().__init__()
        check_choice("mode", mode, EXACT_MODES)
        self.mixture, self.mode = mixture, mode

    def _sigma(self, x, sigma) -> torch.Tensor:
        return one_per_example(as_sigma(sigma, x), x.shape, "the exact mixture denoiser")

    def predict(self, x: torch.Tensor, sigma) -> Prediction:
        s = self._sigma(x, sigma)
        gt = self.mixture
        post = gt.source_posterior(x, s) if self.mode == "source" else gt.posterior(x, s)
        cov = post.cov
        if self.mode == "point-cov":
            r = gt.responsibilities(x, s)
            cov = cov + (r @ gt._p(x.dtype, x.device)["covs"].flatten(1)).view(-1, gt.dim, gt.dim)
        eye = torch.eye(gt.dim, dtype=x.dtype, device=x.device)
        return Prediction(x, post.mean, cov=cov + s.square()[:, None, None] * eye)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if self.mode == "source":
            return self.predict(x, sigma).mu
        s = self._sigma(x, sigma)
        # one σ for the whole batch (a sampler's step) takes the mixture's one-matmul scalar path
        one = s[:1] if len(s) and bool((s == s[0]).all()) else s
        return x + s.square()[:, None] * self.mixture.score(x, one)  # Tweedie (T13), the fast path


# ---- the tree of the autoguidance paper ---------------------------------------------------------

TREE_CLASSES = ("A", "B", "AB")


@functools.cache
def _tree_components(seed: int, depth: int, per_branch: int, origin: tuple, scale: tuple):
    """The construction of Karras et al. 2024 (autoguidance), §10: each branch is `per_branch`
    elongated Gaussians along a segment; two children per branch, angles and lengths jittered
    by a seeded N(0, 0.2²) in the same order as the paper's recursion."""
    rnd = np.random.RandomState(seed)
    scale = np.asarray(scale)
    out = {"A": [], "B": []}

    def branch(cls, level, pos, angle):
        if level >= depth:
            return
        u = np.array([np.cos(angle), np.sin(angle)])
        length = 0.292 * 0.8**level * (1 + 0.2 * rnd.randn())
        thickness = 0.2 * 0.8**level / length
        size = scale * length * 0.06
        across = np.eye(2) - np.outer(u, u)
        cov = (np.outer(u, u) + across * thickness**2) * np.outer(size, size)
        for t in np.linspace(0.07, 0.93, per_branch):
            out[cls].append((length * 0.5**level, (pos + u * length * t) * scale, cov))
        for sign in (1, -1):
            child_angle = angle + sign * 0.7**level * (1 + 0.2 * rnd.randn())
            branch(cls, level + 1, pos + u * length, child_angle)

    branch("A", 0, np.asarray(origin), np.pi * 0.25)
    branch("B", 0, np.asarray(origin), np.pi * 1.25)
    return out


def tree(classes: str = "A", *, seed: int = 2, depth: int = 7, per_branch: int = 8,
         origin=(0.0030, 0.0325), scale=(1.3136, 1.3844)) -> GaussianMixture:
    """The 2-D tree mixture: class "A", "B" or "AB" (both), 8·(2^depth − 1) components per class."""
    check_choice("classes", classes, TREE_CLASSES)
    comps = _tree_components(seed, depth, per_branch, tuple(origin), tuple(scale))
    sel = [c for cls in classes for c in comps[cls]]
    w, m, c = zip(*sel)
    return GaussianMixture(w, m, c)


class ExactClassifier(torch.nn.Module):
    """The exact noise-aware classifier of a labelled mixture: `forward(x, σ) -> logits [N, C]` with
    logit_c = log π_c + log p_c(x; σ), so softmax gives p_σ(c | x) exactly (Bayes) and autograd gives
    ∇ₓ log p_σ(c | x) = ∇ log p_c − ∇ log p (T32's guidance term). mixtures: one GaussianMixture per class;
    priors: the class probabilities π_c (default equal)."""

    def __init__(self, mixtures, priors=None):
        super().__init__()
        self.mixtures = list(mixtures)
        if not self.mixtures or len({m.dim for m in self.mixtures}) != 1:
            raise ValueError("ExactClassifier needs at least one mixture, all of one dimension")
        p = (np.full(len(self.mixtures), 1 / len(self.mixtures)) if priors is None
             else np.asarray(priors, float))
        if p.shape != (len(self.mixtures),) or not np.all(p > 0):
            raise ValueError(f"priors={priors!r} must be one probability > 0 per class "
                             f"({len(self.mixtures)})")
        self.log_priors = torch.as_tensor(np.log(p / p.sum()))
        self.num_classes, self.dim = len(self.mixtures), self.mixtures[0].dim
        self.eval()                                         # nothing to train: always in evaluation mode

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        return torch.stack([m.logp(x, s) for m in self.mixtures], 1) + self.log_priors.to(x)


def tree_classifier(**kw) -> ExactClassifier:
    """The exact p_σ(class | x) of `tree("AB", **kw)` (same keywords as `tree`): classes 0 = "A", 1 = "B",
    priors the classes' shares of the component weights, so that Σ_c π_c p_c(x; σ) is the "AB" mixture's
    density."""
    a, b, ab = tree("A", **kw), tree("B", **kw), tree("AB", **kw)
    share_a = float(ab.weights64[:a.K].sum())                      # "AB" lists A's components first
    return ExactClassifier([a, b], [share_a, 1 - share_a])


# ---- classic 2-D toys -----------------------------------------------------------------------------

def eight_gaussians(radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """Eight isotropic Gaussians on a circle: an exact mixture."""
    a = np.arange(8) * np.pi / 4
    means = radius * np.stack([np.cos(a), np.sin(a)], 1)
    return GaussianMixture(np.ones(8), means, np.tile(np.eye(2) * std**2, (8, 1, 1)))


def two_moons(n: int, noise: float = 0.05, generator=None) -> torch.Tensor:
    """Two interleaved half circles with Gaussian jitter (no closed-form density)."""
    check_positive("n", n, integer=True)
    t = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    upper = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    pts = torch.stack([x - 0.5, y - 0.25], 1)
    return (pts + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()


def swiss_roll(n: int, noise: float = 0.05, generator=None) -> torch.Tensor:
    """2-D swiss roll, scaled to about unit variance (no closed-form density)."""
    check_positive("n", n, integer=True)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 7.5
    return (pts + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()


class Checkerboard:
    """Uniform on the 8 dark squares of a 4×4 board on [−2, 2]²: exact density 1/8 there, 0 elsewhere."""

    def sample(self, n: int, generator=None) -> torch.Tensor:
        check_positive("n", n, integer=True)
        cell = torch.randint(8, (n,), generator=generator)
        row = cell // 2
        col = 2 * (cell % 2) + (row % 2)
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        return (torch.stack([col, row], 1) + u - 2).float()

    def logp(self, x: torch.Tensor) -> torch.Tensor:
        inside = (x.abs() <= 2).all(1)
        ij = torch.floor(x + 2).long().clamp(0, 3)            # [N, 2]: (column, row)
        dark = (ij[:, 0] - ij[:, 1]) % 2 == 0
        return torch.where(inside & dark, torch.full_like(x[:, 0], -math.log(8.0)),
                           torch.full_like(x[:, 0], -math.inf))
