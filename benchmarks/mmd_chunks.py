"""Time of the MMD kernel sum (mixture_metrics.kernel_sum) at 16,384 × 16,384 float64 points, in one process:
against its row block size (the sums agree to float64 rounding), and the self-sum Σ_{i≠j} k(x_i, x_j) over
all pairs (the form before issue 17's symmetric one) against the symmetric form (each pair once, doubled).
Usage: python benchmarks/mmd_chunks.py [--threads N]"""
import argparse
import time

import torch

from gendiff.mixture_metrics import MMD_BANDWIDTHS, kernel_sum
from gendiff.runtime import configure

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
configure(ap.parse_args().threads)
print(f"{torch.get_num_threads()} threads")
g = torch.Generator().manual_seed(0)
x, y = (torch.randn(16384, 2, dtype=torch.float64, generator=g) for _ in range(2))


def timed(f):
    t = time.perf_counter()
    v = f()
    return v, time.perf_counter() - t


ref = None
for chunk in (2048, 1024, 512, 256, 128):
    v, dt = timed(lambda: kernel_sum(x, y, chunk=chunk))
    ref = v if ref is None else ref
    print(f"cross sum, chunk {chunk:5d}: {dt:.2f} s, sum {v!r} "
          f"(relative to chunk 2048: {abs(v - ref) / ref:.1e})")
for rnd in range(2):
    full, t_full = timed(lambda: kernel_sum(x, x.clone()) - MMD_BANDWIDTHS * len(x))   # all ordered pairs
    sym, t_sym = timed(lambda: kernel_sum(x))
    print(f"self sum, round {rnd}: all pairs {t_full:.2f} s, symmetric {t_sym:.2f} s, "
          f"ratio {t_full / t_sym:.2f}x; relative difference {abs(sym - full) / full:.1e}")
