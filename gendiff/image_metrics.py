"""Metrics for image diffusion: FID and precision/recall in a classifier's feature space, predicted-class
coverage, and PNG grids (the per-pixel calibration of σ_φ is calibration.py's).

FID (Heusel et al. 2017) here uses `gendiff.nets.classifier.Classifier` features, not Inception's: numbers
are comparable between runs of this framework, not with published FIDs."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import linalg

from .checks import check_positive
from .io import atomic_path, save_figure

FD_EPS = 1e-6   # the ε·I added to both covariances when √(Σ1Σ2) comes out non-finite (singular product)


def _f64(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], float64."""
    f = _f64(feats)
    if f.ndim != 2:
        raise ValueError(f"feats has shape {f.shape}; allowed: [N, D]")
    if len(f) < 2:
        raise ValueError(f"feats has {len(f)} sample(s); a covariance needs at least 2")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _imaginary(root) -> float:
    """The largest imaginary part of a matrix root relative to its real scale (0 for a real root)."""
    if not np.iscomplexobj(root) or not np.isfinite(root).all():
        return 0.0
    return float(np.abs(root.imag).max() / max(np.abs(root.real).max(), 1e-12))


def frechet_distance(mu1, cov1, mu2, cov2, eps: float = FD_EPS) -> float:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2): ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) (Heusel et al.
    2017), in float64 with scipy's `sqrtm`. When Σ1Σ2 is singular (fewer samples than dimensions) and the root
    comes out non-finite or with an imaginary part above 1e-3 of its scale, it is recomputed with ε·I added to
    both covariances. Round-off gives the root tiny imaginary parts, which are dropped; an imaginary part
    above 1e-3 of the root's scale even then is a ValueError. Not clipped at 0: identical statistics give
    ±round-off."""
    mu1, mu2, cov1, cov2 = _f64(mu1), _f64(mu2), _f64(cov1), _f64(cov2)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, v, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)), ("cov1", cov1, (d, d)),
                           ("cov2", cov2, (d, d))):
        if d < 1 or v.shape != shape:
            raise ValueError(f"{name} has shape {v.shape}; allowed: mu1, mu2 of shape [D] and cov1, cov2 "
                             f"[D, D] with one D (mu1 has shape {mu1.shape})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # singular products: handled below
        root = linalg.sqrtm(cov1 @ cov2)
        if not np.isfinite(root).all() or _imaginary(root) > 1e-3:
            off = eps * np.eye(d)
            root = linalg.sqrtm((cov1 + off) @ (cov2 + off))
    if np.iscomplexobj(root):
        imag = np.abs(root.imag).max()
        if _imaginary(root) > 1e-3:
            raise ValueError(f"sqrtm(cov1 @ cov2) has an imaginary part {imag:.3g}: the covariances are not "
                             "positive semi-definite")
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(root))


def fid(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] and [M, D]."""
    a, b = _f64(features_a), _f64(features_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a has shape {a.shape} and features_b {b.shape}; allowed: [N, D] and "
                         "[M, D] with the same D")
    return frechet_distance(*feature_stats(a), *feature_stats(b))


FID_BOOTSTRAP = 100   # bootstrap resamples behind `fid_with_sd`'s standard deviation


def fid_with_sd(features_ref, features_gen, *, boot: int = FID_BOOTSTRAP,
                seed: int = 0) -> tuple[float, float]:
    """(FID, its bootstrap standard deviation): FID of the generated features [N, D] against the reference
    features [M, D] (`fid`), and the std of the FID over `boot` resamples of the N generated rows with
    replacement, each against the same, fixed reference statistics (mean and covariance computed once).
    Resamples are drawn from numpy's generator seeded with `seed`: the same call gives the same sd.

    What the sd covers: the sampling noise of a set of N generated images, the error of one FID draw at this
    N; not the reference set's own noise (fixed), and not FID's upward bias at finite N (of order D/N),
    which rows at one N share: compare rows at the same N. At a fixed true distance > 0 the sd falls as 1/√N
    (tests/test_image_metrics: against the spread of independent draws, and n against 4n)."""
    ref, gen = _f64(features_ref), _f64(features_gen)
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"features_ref has shape {ref.shape} and features_gen {gen.shape}; allowed: [M, D] "
                         "and [N, D] with the same D")
    check_positive("boot", boot, integer=True)
    if boot < 2:
        raise ValueError(f"boot={boot} must be >= 2 (a standard deviation needs two resamples)")
    mu_r, cov_r = feature_stats(ref)
    value = frechet_distance(mu_r, cov_r, *feature_stats(gen))
    idx = np.random.default_rng(seed).integers(0, len(gen), size=(boot, len(gen)))
    draws = [frechet_distance(mu_r, cov_r, *feature_stats(gen[i])) for i in idx]
    return value, float(np.std(draws, ddof=1))


def _as_feats(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu().double()
    if t.ndim != 2:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; allowed: [N, D]")
    return t


def knn_radii(feats: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row, [N] (the point itself excluded)."""
    out = [torch.cdist(feats[i:i + chunk], feats).topk(k + 1, dim=1, largest=False).values[:, k]
           for i in range(0, len(feats), chunk)]
    return torch.cat(out)


def _covered(queries: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of queries inside at least one ball B(ref_j, radii_j)."""
    hits = sum(int((torch.cdist(queries[i:i + chunk], ref) <= radii).any(1).sum())
               for i in range(0, len(queries), chunk))
    return hits / len(queries)


def precision_recall(real_feats, fake_feats, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
    around its points with radius the distance to the k-th nearest neighbour in the same set. Precision:
    fraction of fake samples inside the real manifold (fidelity); recall: fraction of real samples inside
    the fake manifold (coverage). float64 distances, `chunk` query rows at a time (memory chunk × N)."""
    real, fake = _as_feats(real_feats, "real_feats"), _as_feats(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real_feats has {real.shape[1]} features and fake_feats {fake.shape[1]}; "
                         "they must match")
    check_positive("k", k, integer=True)
    check_positive("chunk", chunk, integer=True)
    for name, t in (("real_feats", real), ("fake_feats", fake)):
        if k >= len(t):
            raise ValueError(f"k={k} needs more than k samples in {name}, which has {len(t)}; "
                             f"allowed: k < {len(t)}")
    precision = _covered(fake, real, knn_radii(real, k, chunk), chunk)
    recall = _covered(real, fake, knn_radii(fake, k, chunk), chunk)
    return precision, recall


@torch.no_grad()
def class_counts(classifier, images: torch.Tensor, num_classes: int, batch: int = 1000) -> np.ndarray:
    """Histogram [num_classes] of the classifier's predicted labels (argmax of its logits) over images."""
    check_positive("num_classes", num_classes, integer=True)
    counts = np.zeros(num_classes, dtype=np.int64)
    for i in range(0, len(images), batch):
        logits = classifier(images[i:i + batch])
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise ValueError(f"the classifier returned logits of shape {tuple(logits.shape)}; "
                             f"num_classes={num_classes} needs [N, {num_classes}]")
        counts += np.bincount(logits.argmax(1).cpu().numpy(), minlength=num_classes)
    return counts


def mode_coverage(counts, reference=None) -> dict:
    """Summary of a predicted-class histogram: classes hit, max/min count ratio (inf when a class is never
    hit), entropy in nats and as a fraction of log K, KL(p ‖ uniform); with `reference` counts (the real
    data's classes) also KL(p ‖ p_ref) and the total variation distance. KL(p ‖ q) = Σ p log(p/q), finite
    when p misses classes (q > 0 assumed)."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or len(c) < 2 or (c < 0).any() or c.sum() <= 0:
        raise ValueError(f"counts={c.tolist()} must be >= 2 non-negative class counts with a positive total")
    p, k = c / c.sum(), len(c)
    nz = p > 0
    entropy = float(-(p[nz] * np.log(p[nz])).sum())
    out = dict(n=int(c.sum()), classes_hit=int(nz.sum()), num_classes=k,
               max_min_ratio=float(c.max() / c.min()) if c.min() > 0 else math.inf,
               entropy=entropy, entropy_fraction=entropy / math.log(k), kl_uniform=math.log(k) - entropy)
    if reference is not None:
        r = np.asarray(reference, dtype=np.float64)
        if r.shape != c.shape or (r <= 0).any():
            raise ValueError(f"reference={r.tolist()} must hold {k} positive class counts")
        q = r / r.sum()
        out.update(kl_reference=float((p[nz] * np.log(p[nz] / q[nz])).sum()),
                   tv_reference=float(0.5 * np.abs(p - q).sum()))
    return out


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def image_grid(path: str, images: torch.Tensor, nrow: int = 8, pad: int = 2) -> None:
    """A PNG of images [N, C, H, W] in [−1, 1] (C = 1 or 3), `nrow` per row, `pad` black pixels between
    them; written atomically with Pillow."""
    from PIL import Image

    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images has shape {tuple(images.shape)}; allowed: [N >= 1, 1 or 3, H, W]")
    check_positive("nrow", nrow, integer=True)
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    cols = min(nrow, n)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(_to_uint8(images)):
        y, x = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[y:y + h, x:x + w] = img.transpose(1, 2, 0)
    with atomic_path(path) as tmp:
        Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format="PNG")


def uncertainty_grid(path: str, rows, row_labels=None, heat=None) -> None:
    """A PNG figure: one figure row per example, one column per panel.

    rows: the panels as column title → tensor [N, C, H, W] (a dict or a list of (title, tensor)), N examples
    each, e.g. noisy input, denoised μ, σ_φ, |μ − x0|, clean x0; stack examples at several σ into N and name
    them with `row_labels` (N strings, e.g. "σ=0.5"). Columns in `heat` (default: those whose values are all
    ≥ 0, i.e. σ_φ and error maps, since images in [−1, 1] have a −1 background) are drawn as heat maps sharing
    one colour scale per row, so σ_φ and the actual error are comparable (one channel each); the others are
    images in [−1, 1], grey (C = 1) or colour (C = 3)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(rows.items()) if isinstance(rows, dict) else list(rows)
    if not panels:
        raise ValueError("rows is empty; allowed: one or more (title, tensor [N, C, H, W])")
    n = len(panels[0][1])
    for title, t in panels:
        if t.ndim != 4 or t.shape[1] not in (1, 3) or len(t) != n:
            raise ValueError(f"panel {title!r} has shape {tuple(t.shape)}; allowed: [{n}, 1 or 3, H, W] like "
                             "the first")
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"row_labels has {len(row_labels)} entries; allowed: one per example ({n})")
    heat = {t for t, v in panels if bool((v >= 0).all())} if heat is None else set(heat)
    for title, t in panels:
        if title in heat and t.shape[1] != 1:
            raise ValueError(f"panel {title!r} is a heat map with {t.shape[1]} channels; allowed: one (e.g. "
                             "the root mean square over channels)")
    fig, axes = plt.subplots(n, len(panels), figsize=(1.6 * len(panels) + 0.6, 1.6 * n), squeeze=False)
    try:
        for r in range(n):
            vmax = max([float(v[r].max()) for t, v in panels if t in heat] + [1e-12])
            im = None
            for c, (title, v) in enumerate(panels):
                ax = axes[r, c]
                img = v[r].detach().cpu().float().permute(1, 2, 0).numpy()
                if title in heat:
                    im = ax.imshow(img[..., 0], cmap="magma", vmin=0, vmax=vmax)
                elif img.shape[-1] == 1:
                    ax.imshow(img[..., 0], cmap="gray", vmin=-1, vmax=1)
                else:
                    ax.imshow((img.clip(-1, 1) + 1) / 2)
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0:
                    ax.set_title(title, fontsize=8)
                if c == 0 and row_labels is not None:
                    ax.set_ylabel(row_labels[r], fontsize=8)
            if im is not None:
                fig.colorbar(im, ax=list(axes[r]), fraction=0.02, pad=0.01).ax.tick_params(labelsize=6)
        save_figure(fig, path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
