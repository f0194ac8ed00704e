"""Sanity of FID / precision / recall in our classifier's features, on real MNIST:
FID(train, test) against the same test images blurred or noised by growing amounts (FID must grow
monotonically), plus the classifier's test accuracy. The classifier is the cached one of `gendiff ablate
--suite images` (trained on first use). Usage: python benchmarks/fid_sanity.py [--n 10000] [--data mnist]
"""
import argparse

import torch
import torch.nn.functional as F

from gendiff.data.images import data_dir, load_mnist
from gendiff.image_metrics import fid, precision_recall
from gendiff.nets.classifier import batched, load_or_train_classifier


def blur(x, s):
    """Gaussian blur of std s pixels (separable, reflect padding)."""
    r = max(1, int(3 * s))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32).square() / (2 * s * s))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--data", default="mnist", choices=("mnist", "fashion-mnist"))
    args = ap.parse_args()
    train, test = load_mnist(args.data, "train"), load_mnist(args.data, "test")
    xtr, xte = train.to_tensor(), test.to_tensor()
    clf, info = load_or_train_classifier(args.data, xtr, torch.from_numpy(train.labels), data_dir(args.data),
                                         xte, torch.from_numpy(test.labels))
    print(f"classifier test accuracy {info['test_accuracy']:.4f} "
          f"({'cached' if info['cached'] else 'trained'})")
    g = torch.Generator().manual_seed(0)
    ref = batched(clf.features, xtr[torch.randperm(len(xtr), generator=g)[:args.n]])
    real = xte[:args.n]
    print(f"{'test images, modified':<28} {'FID':>8} {'precision':>10} {'recall':>8}")
    rows = [("unchanged", real)] + [(f"blur σ = {s} px", blur(real, s)) for s in (0.5, 1.0, 1.5, 2.0)] + \
        [(f"noise σ = {s}", (real + s * torch.randn(real.shape, generator=g)).clamp(-1, 1))
         for s in (0.1, 0.2, 0.4)]
    for name, x in rows:
        f = batched(clf.features, x)
        p, r = precision_recall(ref[:len(f)], f)
        print(f"{name:<28} {fid(ref, f):8.2f} {p:10.3f} {r:8.3f}", flush=True)


if __name__ == "__main__":
    main()
