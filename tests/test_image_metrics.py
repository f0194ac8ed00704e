"""Image metrics and the feature classifier against closed forms and constructed cases.

Breakages tried (each made the named test fail, then was reverted):
- frechet_distance: root = cov1 @ cov2 (no sqrtm) → fd_diagonal_closed_form; mean term dropped → the same;
  the ε·I retry removed → fd_non_finite_root_is_retried_with_eps_offset.
- feature_stats: biased covariance (np.cov bias=True) → fd_singular_covariance_...; fid taking both
  statistics from features_a → the same (FD 0 instead of > 0).
- precision_recall: (recall, precision) returned → precision_recall_self_far_and_subset; k-NN radius counting
  the point itself → the same; k ≥ N check off by one → the same; open ball (< radius) → the same.
- class_counts: argmin for argmax → class_counts_and_mode_coverage; entropy sign flipped → the same.
- train_classifier: no optimizer step → classifier_trains_on_blobs; random_shift using dx for rows too →
  random_shift_moves_each_image_by_its_own_offset.
- load_or_train_classifier: checksum not compared → cache_round_trip_... (the flipped byte lies in tensor
  data, which safetensors loads without complaint); configuration not compared → the same.
- image_grid: row/column stride without the padding → image_grid_and_uncertainty_grid_write_pngs.
- fid_with_sd: resampling without replacement (sd 0) → fid_of_large_samples_is_the_closed_form_...;
  resampling the reference instead of the generated set, or resamples of N/4 rows →
  fid_bootstrap_sd_is_the_spread_of_independent_draws_...
"""
import hashlib
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from gendiff.image_metrics import (class_counts, feature_stats, fid, fid_with_sd, frechet_distance,
                                   image_grid, mode_coverage, precision_recall, uncertainty_grid)
from gendiff.nets.classifier import accuracy, load_or_train_classifier, random_shift, train_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- Fréchet distance


def test_fd_diagonal_closed_form():
    r = rng(0)
    mu1, mu2 = r.normal(size=6), r.normal(size=6)
    a, b = r.uniform(0.1, 3, 6), r.uniform(0.1, 3, 6)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)


def test_fd_full_covariance_two_ways():
    """Commuting pair Σ = Q diag(·) Qᵀ: tr √(Σ1Σ2) = Σ √(a_i b_i). A general pair: tr √(Σ1Σ2) =
    tr √(Σ1^½ Σ2 Σ1^½) (similar matrices), the symmetric root by eigendecomposition."""
    r = rng(1)
    q, _ = np.linalg.qr(r.normal(size=(5, 5)))
    a, b = r.uniform(0.2, 2, 5), r.uniform(0.2, 2, 5)
    c1, c2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(np.zeros(5), c1, np.zeros(5), c2) == pytest.approx(
        a.sum() + b.sum() - 2 * np.sqrt(a * b).sum(), rel=1e-9)

    m1, m2 = r.normal(size=(5, 5)), r.normal(size=(5, 5))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    w, v = np.linalg.eigh(c1)
    s1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_root = np.sqrt(np.linalg.eigvalsh(s1 @ c2 @ s1)).sum()
    mu1, mu2 = r.normal(size=5), r.normal(size=5)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr_root
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-9)


def test_fd_singular_covariance_is_finite_and_errors_name_the_argument():
    r = rng(2)
    fa, fb = r.normal(size=(8, 20)), r.normal(size=(8, 20)) + 0.5   # 8 samples in 20 dimensions: rank 7
    d = fid(fa, fb)
    assert math.isfinite(d) and d > 0
    with pytest.raises(ValueError, match="features_a"):
        fid(fa, fb[:, :10])
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(fa[:1])
    with pytest.raises(ValueError, match="cov2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="imaginary"):                    # not a covariance: √(−1) = i
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    mu, cov = feature_stats(np.array([[0.0], [2.0]]))                     # unbiased: (x − y)²/2
    assert mu.tolist() == [1.0] and cov.tolist() == [[2.0]]


def test_fd_non_finite_root_is_retried_with_eps_offset(monkeypatch):
    """Where sqrtm fails on a singular product, the ε·I-regularised pair is used instead."""
    import gendiff.image_metrics as im
    calls, real_sqrtm = [], im.linalg.sqrtm

    def sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(im.linalg, "sqrtm", sqrtm)
    a, b, eps = np.array([1.0, 0.0]), np.array([0.0, 4.0]), 1e-3   # Σ1Σ2 = 0: singular
    got = frechet_distance(np.zeros(2), np.diag(a), np.zeros(2), np.diag(b), eps=eps)
    assert len(calls) == 2 and np.allclose(calls[1], np.diag((a + eps) * (b + eps)))
    assert got == pytest.approx(a.sum() + b.sum() - 2 * np.sqrt((a + eps) * (b + eps)).sum(), rel=1e-12)


def test_fid_self_is_zero_shift_is_the_squared_mean_shift_and_monotone():
    r = rng(3)
    feats = r.normal(size=(400, 12)) @ r.normal(size=(12, 12))
    scale = np.trace(np.cov(feats, rowvar=False))
    assert abs(fid(feats, feats)) < 1e-6 * scale
    direction = r.normal(size=12)
    direction /= np.linalg.norm(direction)
    shifts = [0.1, 0.5, 1.0, 2.0, 4.0]
    ds = [fid(feats, feats + s * direction) for s in shifts]
    for s, d in zip(shifts, ds):              # a constant shift leaves the covariance: FD = s² exactly
        assert d == pytest.approx(s * s, rel=1e-6, abs=1e-6 * scale)
    assert all(x < y for x, y in zip(ds, ds[1:]))
    # a change of spread is seen too: FD of N(0, I) vs N(0, 4I) samples ≈ D·(2 − 1)² = 12
    g = r.normal(size=(4000, 12))
    assert fid(g, 2 * r.normal(size=(4000, 12))) == pytest.approx(12, rel=0.1)


# ---------------------------------------------------------------- FID's bootstrap standard deviation


def two_gaussians(seed=4):
    """N(μ1, Σ1) and N(μ2, Σ2) in 3-D with commuting covariances Σ = Q diag(·) Qᵀ: the Fréchet distance in
    closed form, ‖μ1 − μ2‖² + Σ(√a_i − √b_i)², and samplers x = μ + Q diag(√·) z."""
    r = rng(seed)
    q, _ = np.linalg.qr(r.normal(size=(3, 3)))
    mu1, mu2 = np.zeros(3), np.array([0.6, -0.3, 0.2])
    a, b = np.array([1.0, 0.5, 2.0]), np.array([1.5, 0.4, 1.0])
    fd = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    draw = lambda mu, v, n, g: mu + (g.normal(size=(n, 3)) * np.sqrt(v)) @ q.T  # noqa: E731
    return fd, (lambda n, g: draw(mu1, a, n, g)), (lambda n, g: draw(mu2, b, n, g))


def test_fid_of_large_samples_is_the_closed_form_frechet_distance():
    """Reference 200 000 draws of N1, generated 20 000 of N2: FID within 4 bootstrap sds of the closed-form
    Fréchet distance (FID's finite-N bias, O(D/N) ≈ 1e-4 here, is far below the sd); the same seed gives the
    same sd."""
    fd, ref_of, gen_of = two_gaussians()
    g = rng(5)
    ref, gen = ref_of(200_000, g), gen_of(20_000, g)
    value, sd = fid_with_sd(ref, gen, seed=1)
    assert value == pytest.approx(fid(ref, gen), rel=1e-12)
    assert 0 < sd < 0.05 * fd and abs(value - fd) < 4 * sd, (value, fd, sd)
    assert fid_with_sd(ref, gen, seed=1)[1] == sd != fid_with_sd(ref, gen, seed=2)[1]
    with pytest.raises(ValueError, match="boot=1"):
        fid_with_sd(ref, gen, boot=1)
    with pytest.raises(ValueError, match="features_ref"):
        fid_with_sd(ref, gen[:, :2])


def test_fid_bootstrap_sd_is_the_spread_of_independent_draws_and_falls_as_one_over_root_n():
    """Against one fixed reference: the sd of FID over 40 independent sets of n = 2000 generated samples is
    within a factor 2 of the bootstrap sd (mean over the sets); the bootstrap sd at 4n is about half that
    at n (1/√N: the FD is > 0, so its first-order noise dominates)."""
    _, ref_of, gen_of = two_gaussians()
    g = rng(6)
    ref = ref_of(100_000, g)
    draws = [fid_with_sd(ref, gen_of(2000, g), boot=60, seed=i) for i in range(40)]
    spread = float(np.std([d[0] for d in draws], ddof=1))
    boot_sd = float(np.mean([d[1] for d in draws]))
    assert 0.5 < spread / boot_sd < 2.0, (spread, boot_sd)
    sd_n = np.mean([fid_with_sd(ref, gen_of(2000, g), seed=i)[1] for i in range(5)])
    sd_4n = np.mean([fid_with_sd(ref, gen_of(8000, g), seed=i)[1] for i in range(5)])
    assert 1.6 < sd_n / sd_4n < 2.5, (sd_n, sd_4n)


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_self_far_and_subset():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]], dtype=torch.float64)
    real = centers[torch.arange(800) % 4] + torch.randn(800, 3, generator=g, dtype=torch.float64)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    # generated = only the first of the four real modes: all of it is realistic, a quarter of real is covered
    fake = centers[0] + torch.randn(300, 3, generator=g, dtype=torch.float64)
    p, rec = precision_recall(real, fake, k=3, chunk=97)
    assert p > 0.9 and 0.2 < rec < 0.3
    # the ball is closed (‖f − r‖ ≤ radius): real {0, 1} with k = 1 has radii 1, so fake 2 is inside, 5 is not
    assert precision_recall([[0.0], [1.0]], [[2.0], [5.0]], k=1) == (0.5, 1.0)
    with pytest.raises(ValueError, match="k=5"):
        precision_recall(real, fake[:5], k=5)
    with pytest.raises(ValueError, match="real_feats has 3 features"):
        precision_recall(real, fake[:, :2])


# ---------------------------------------------------------------- class counts / mode coverage


class ArgmaxPixel(torch.nn.Module):
    """Stub: logits = the first `k` pixels, so the predicted class is the brightest of them."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x.flatten(1)[:, :self.k]


def test_class_counts_and_mode_coverage():
    labels = torch.tensor([0, 0, 0, 2, 0, 2])
    x = -torch.ones(6, 1, 4, 4)
    x.view(6, -1)[torch.arange(6), labels] = 1.0
    counts = class_counts(ArgmaxPixel(3), x, 3, batch=4)
    assert counts.tolist() == [4, 0, 2]
    with pytest.raises(ValueError, match="num_classes=4"):
        class_counts(ArgmaxPixel(3), x, 4)
    m = mode_coverage(counts, reference=[1, 1, 1])
    p = np.array([4, 2]) / 6
    assert m["classes_hit"] == 2 and m["max_min_ratio"] == math.inf
    assert m["entropy"] == pytest.approx(-(p * np.log(p)).sum())
    assert m["kl_uniform"] == pytest.approx(m["kl_reference"]) and m["tv_reference"] == pytest.approx(1 / 3)
    u = mode_coverage([5, 5, 5])
    assert u["max_min_ratio"] == 1 and u["entropy_fraction"] == pytest.approx(1)
    assert u["kl_uniform"] == pytest.approx(0)


# ---------------------------------------------------------------- classifier


def blobs(n, seed):
    """4 classes: a bright 8×8 square in one quadrant of a 28×28 image with background −1, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = -torch.ones(n, 1, 28, 28) + 0.3 * torch.randn(n, 1, 28, 28, generator=g)
    for c, (r0, c0) in enumerate([(3, 3), (3, 17), (17, 3), (17, 17)]):
        x[y == c, :, r0:r0 + 8, c0:c0 + 8] += 2.0
    return x.clamp(-1, 1), y


def test_random_shift_moves_each_image_by_its_own_offset():
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    pos = out.flatten(1).argmax(1)
    dr, dc = pos // 9 - 4, pos % 9 - 4
    assert out.sum().item() == 64 and dr.abs().max() == 2 and dc.abs().max() == 2
    assert len(set(zip(dr.tolist(), dc.tolist()))) > 15 and (dr != dc).any()


def test_classifier_trains_on_blobs():
    x, y = blobs(256, 0)
    xt, yt = blobs(200, 1)
    model = train_classifier(x, y, steps=30, batch=32, lr=3e-3, seed=0, feature_dim=16)
    assert accuracy(model, xt, yt) > 0.95
    assert model.features(xt[:3]).shape == (3, 16) and model(xt[:3]).shape == (3, 4)
    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        model(torch.zeros(2, 1, 32, 32))


class _Boom:
    def __reduce__(self):
        return (_boom, ())


def _boom():
    raise AssertionError("a pickle in the classifier cache was unpickled")


def test_classifier_cache_round_trip_corruption_and_no_pickle(tmp_path):
    x, y = blobs(64, 0)
    xt, yt = blobs(40, 1)
    kw = dict(steps=3, batch=16, feature_dim=8, seed=1)
    d = str(tmp_path)
    with open(os.path.join(d, "classifier-blobs.pt"), "wb") as f:       # a pickle next to it is never read
        pickle.dump(_Boom(), f)
    m1, info1 = load_or_train_classifier("blobs", x, y, d, xt, yt, **kw)
    m2, info2 = load_or_train_classifier("blobs", x, y, d, xt, yt, **kw)
    assert not info1["cached"] and info2["cached"] and info2["sha256"] == info1["sha256"]
    assert info2["test_accuracy"] == info1["test_accuracy"] is not None
    assert torch.equal(m1(xt), m2(xt))

    path = info1["path"]
    blob = bytearray(open(path, "rb").read())
    blob[-5] ^= 0xFF                                                 # inside the tensor data
    open(path, "wb").write(bytes(blob))
    with pytest.warns(UserWarning, match="sha256"):
        m3, info3 = load_or_train_classifier("blobs", x, y, d, **kw)
    assert not info3["cached"] and torch.equal(m3(xt), m1(xt))       # retrained, deterministically

    # weights replaced by a pickle whose checksum is recorded: still refused (safetensors cannot parse it)
    with open(path, "wb") as f:
        pickle.dump(_Boom(), f)
    rec = path[:-len(".safetensors")] + ".json"
    info = json.load(open(rec))
    info["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    json.dump(info, open(rec, "w"))
    with pytest.warns(UserWarning, match="unusable"):
        _, info4 = load_or_train_classifier("blobs", x, y, d, **kw)
    assert not info4["cached"]

    with pytest.warns(UserWarning, match="another configuration"):             # other training data
        _, info5 = load_or_train_classifier("blobs", xt, yt, d, **kw)
    assert not info5["cached"] and info5["path"] == path
    # another recipe gets its own files: it never replaces the default one (the classifier FIDs were measured
    # with), which keeps the plain name
    _, info6 = load_or_train_classifier("blobs", x, y, d, **dict(kw, steps=4))
    _, info7 = load_or_train_classifier("blobs", xt, yt, d, **kw)
    assert not info6["cached"] and info6["path"] != path and info7["cached"]
    with pytest.raises(ValueError, match="unknown training options"):
        load_or_train_classifier("blobs", x, y, d, stepz=3)
    tags = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    assert len(tags) == 2 and all(f.startswith("classifier-blobs-") for f in tags)
    assert "classifier-blobs.pt" in os.listdir(d)


def test_the_default_recipe_keeps_the_plain_cache_name(tmp_path, monkeypatch):
    import gendiff.nets.classifier as C
    x, y = blobs(16, 0)
    quick = C.train_classifier
    monkeypatch.setattr(C, "train_classifier", lambda *a, **k: quick(*a, **dict(k, steps=1)))
    _, info = C.load_or_train_classifier("blobs", x, y, str(tmp_path))
    assert os.path.basename(info["path"]) == "classifier-blobs.safetensors"


# ---------------------------------------------------------------- grids


def test_image_grid_and_uncertainty_grid_write_pngs(tmp_path):
    imgs = torch.zeros(5, 1, 28, 28)
    imgs[0], imgs[1] = -1.0, 1.0
    p = str(tmp_path / "grid.png")
    image_grid(p, imgs, nrow=3)
    with Image.open(p) as im:
        im.load()
        assert im.format == "PNG" and im.size == (3 * 30 + 2, 2 * 30 + 2)
        a = np.asarray(im)
    assert a[2 + 10, 2 + 10] == 0 and a[2 + 10, 32 + 10] == 255 and a[32 + 10, 2 + 10] == 128 and a[0, 0] == 0
    assert a[12, 31] == 0 and a[12, 32] == 255 and a[31, 12] == 0 and a[32, 12] == 128   # 2 px gaps
    rgb = str(tmp_path / "rgb.png")
    image_grid(rgb, torch.zeros(2, 3, 8, 8), nrow=4)
    with Image.open(rgb) as im:
        assert im.mode == "RGB" and im.size == (2 * 10 + 2, 12)
    with pytest.raises(ValueError, match="images"):
        image_grid(p, torch.zeros(2, 2, 8, 8))

    x0 = imgs[:3]
    mu = x0 + 0.1
    q = str(tmp_path / "unc.png")
    panels = {"noisy": x0 + 0.5 * torch.randn_like(x0), "mu": mu, "sigma_phi": torch.full_like(x0, 0.2),
              "|mu - x0|": (mu - x0).abs(), "x0": x0}
    uncertainty_grid(q, panels, row_labels=["σ=0.1", "σ=0.5", "σ=1"])
    with Image.open(q) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > im.size[1]
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "rgb.png", "unc.png"]   # no temporary files left
