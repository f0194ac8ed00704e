"""A small CNN classifier for 28×28 images in [−1, 1] (MNIST, Fashion-MNIST): its penultimate features
stand in for Inception's in FID and precision/recall (no Inception weights ship here), its predictions
count generated classes. Weights are cached as safetensors + a JSON record with their sha256."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from ..checks import check_positive
from ..io import derive_seed, file_sha256, generator, save_json, save_state


class Classifier(nn.Module):
    """Three conv blocks (32, 64, 128 channels; 3×3 conv, GroupNorm, ReLU, 2×2 max-pool: 28 → 14 → 7 → 3),
    a `feature_dim` penultimate layer (`features`) and a linear head to `num_classes` logits. GroupNorm,
    not BatchNorm, so that train and eval modes compute the same function and the weights are the whole
    state."""

    def __init__(self, img_channels: int = 1, img_resolution: int = 28, num_classes: int = 10,
                 feature_dim: int = 128):
        super().__init__()
        for name, v in (("img_channels", img_channels), ("img_resolution", img_resolution),
                        ("num_classes", num_classes), ("feature_dim", feature_dim)):
            check_positive(name, v, integer=True)
        if img_resolution < 8:
            raise ValueError(f"img_resolution={img_resolution} must be >= 8 (three 2× poolings)")
        self.config = dict(img_channels=img_channels, img_resolution=img_resolution, num_classes=num_classes,
                           feature_dim=feature_dim)
        blocks, c = [], img_channels
        for w in (32, 64, 128):
            blocks += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(8, w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*blocks, nn.Flatten())
        self.feature = nn.Linear(128 * (img_resolution // 8) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def _check(self, x: torch.Tensor) -> None:
        c, r = self.config["img_channels"], self.config["img_resolution"]
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, r, r):
            raise ValueError(f"x has shape {tuple(x.shape)}; allowed: [N, {c}, {r}, {r}]")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim] (after the ReLU)."""
        self._check(x)
        return F.relu(self.feature(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """fn over x in chunks of `batch`, without gradients (features or logits of a whole data set)."""
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = float((batched(model, images).argmax(1) == labels.to(torch.long)).double().mean())
    model.train(was)
    return acc


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image translated by an independent integer offset in [−max_shift, max_shift]² (edge pixels
    repeated into the gap: the background of MNIST-like digits)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    p = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]          # [n, h, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]          # [n, 1, w]
    return p[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


def _check_data(images: torch.Tensor, labels: torch.Tensor, what: str = "images") -> None:
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"{what} has shape {tuple(images.shape)}; allowed: [N, C, H, W] with H == W")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels for {what} have shape {tuple(labels.shape)}; allowed: [{images.shape[0]}]")


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, steps: int = 1500, batch: int = 128,
                     lr: float = 2e-3, seed: int = 0, augment: bool = True, feature_dim: int = 128,
                     num_classes: int | None = None, progress: bool = False) -> Classifier:
    """Adam on cross-entropy over `steps` random minibatches (with replacement across steps), the learning
    rate decayed by cosine to 0, images shifted by ±2 px when `augment`. Deterministic under `seed` (initial
    weights, batches and shifts each from their own derived seed). Returns the model in eval mode.
    The defaults reach 99.36% test accuracy on MNIST (89.9% on Fashion-MNIST) in ~3.3 min on one CPU
    thread."""
    _check_data(images, labels)
    check_positive("steps", steps, integer=True)
    check_positive("batch", batch, integer=True)
    check_positive("lr", lr)
    labels = labels.to(torch.long)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels range over [{int(labels.min())}, {int(labels.max())}]; "
                         f"allowed: [0, {num_classes})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "classifier-init"))
        model = Classifier(images.shape[1], images.shape[2], num_classes, feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g_batch, g_aug = generator(seed, "classifier-batches"), generator(seed, "classifier-augment")
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(images), (min(batch, len(images)),), generator=g_batch)
        x = images[idx].float()
        x = random_shift(x, 2, g_aug) if augment else x
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 100 == 0 or step == steps - 1):
            print(f"classifier step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)",
                  flush=True)
    return model.eval()


def _fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256(images.detach().float().contiguous().numpy().tobytes())
    h.update(labels.detach().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_cached(weights: str, record: str, config: dict) -> tuple[Classifier, dict] | None:
    """The cached model, or None when there is none or it is unusable (a warning says why)."""
    if not (os.path.exists(weights) and os.path.exists(record)):
        return None
    try:
        with open(record) as f:
            info = json.load(f)
        if info.get("config") != config:
            warnings.warn(f"classifier cache {weights} was trained with another configuration or data; "
                          "retraining")
            return None
        if file_sha256(weights) != info.get("sha256"):
            raise ValueError(f"sha256 of {weights} does not match {record}")
        keys = ("img_channels", "img_resolution", "num_classes", "feature_dim")
        model = Classifier(*(config[k] for k in keys))
        model.load_state_dict(load_file(weights))        # safetensors: no pickle is ever read
        return model.eval(), info
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, json.JSONDecodeError) as e:
        warnings.warn(f"classifier cache {weights} is unusable ({e}); retraining")
        return None


def load_or_train_classifier(data_name: str, images: torch.Tensor, labels: torch.Tensor, cache_dir: str,
                             test_images: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
                             **train_kw) -> tuple[Classifier, dict]:
    """The classifier for `data_name` from `cache_dir`, trained (`train_classifier(**train_kw)`) and cached
    when absent, corrupt (sha256 mismatch, unreadable) or made with another configuration or training set.

    Files: `classifier-<data_name>.safetensors` and `classifier-<data_name>.json` (config including a sha256
    of the training data, the weights' sha256, test accuracy, training time), both written atomically.
    info: that record plus `cached` (bool) and `path`. Test accuracy is measured when test data is given.
    """
    if not data_name or not all(ch.isalnum() or ch in "-_." for ch in data_name):
        raise ValueError(f"data_name={data_name!r} must be a non-empty name of letters, digits, "
                         "'-', '_', '.'")
    _check_data(images, labels)
    if (test_images is None) != (test_labels is None):
        raise ValueError("test_images and test_labels must be given together")
    defaults = dict(steps=1500, batch=128, lr=2e-3, seed=0, augment=True, feature_dim=128)
    kw = dict(defaults, num_classes=int(labels.max()) + 1)
    unknown = set(train_kw) - set(kw) - {"progress"}
    if unknown:
        raise ValueError(f"unknown training options {sorted(unknown)}; allowed: {sorted(kw) + ['progress']}")
    progress = train_kw.pop("progress", False)
    kw.update(train_kw)
    config = dict(kw, img_channels=images.shape[1], img_resolution=images.shape[2], n_train=len(images),
                  train_data_sha256=_fingerprint(images, labels))
    os.makedirs(cache_dir, exist_ok=True)
    # the default recipe keeps the plain name; another one (a smoke test's few steps) gets its own files, so
    # that it never replaces the classifier every FID so far was measured with
    changed = {k: kw[k] for k in defaults if kw[k] != defaults[k]}
    tag = ("" if not changed
           else "-" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8])
    weights = os.path.join(cache_dir, f"classifier-{data_name}{tag}.safetensors")
    record = os.path.join(cache_dir, f"classifier-{data_name}{tag}.json")
    cached = _load_cached(weights, record, config)
    if cached is not None:
        model, info = cached
        if info.get("test_accuracy") is None and test_images is not None:
            info.update(test_accuracy=accuracy(model, test_images, test_labels), n_test=len(test_images))
        return model, dict(info, cached=True, path=weights)
    t0 = time.time()
    model = train_classifier(images, labels, progress=progress, **kw)
    seconds = time.time() - t0
    info = dict(data=data_name, config=config, train_seconds=seconds,
                test_accuracy=None if test_images is None else accuracy(model, test_images, test_labels),
                n_test=None if test_images is None else len(test_images))
    save_state(model.state_dict(), weights)
    info["sha256"] = file_sha256(weights)
    save_json(info, record)
    return model, dict(info, cached=False, path=weights)
