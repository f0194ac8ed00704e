"""Time of the MMD kernel sum (mixture_metrics.kernel_sum) at 16,384 × 16,384 float64 points against its row
block size, in one process; the sums agree to float64 rounding. Usage: python benchmarks/mmd_chunks.py"""
import time

import torch

from gendiff.mixture_metrics import kernel_sum
from gendiff.runtime import configure

configure(2)
g = torch.Generator().manual_seed(0)
x, y = (torch.randn(16384, 2, dtype=torch.float64, generator=g) for _ in range(2))
ref = None
for chunk in (2048, 1024, 512, 256):
    t = time.perf_counter()
    v = kernel_sum(x, y, False, chunk=chunk)
    dt = time.perf_counter() - t
    ref = v if ref is None else ref
    print(f"chunk {chunk:5d}: {dt:.2f} s, sum {v!r} (relative to chunk 2048: {abs(v - ref) / ref:.1e})")
