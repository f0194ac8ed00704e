"""Process-wide settings for speed, applied by the CLI and the benchmarks, never by library code.

Measured on a 2-core CPU (BENCHMARKS.md): the mixture oracle allocates many MB-sized
temporaries; glibc returns them to the OS and page-faults them back on every call unless
its trim/mmap thresholds are raised, and responsibilities underflow to denormals, which
multiply ~100× slower unless flushed to zero.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def configure(threads: int | None = None) -> None:
    torch.set_flush_denormal(True)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
