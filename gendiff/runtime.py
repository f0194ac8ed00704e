"""Process-wide settings for speed, applied by the CLI and the benchmarks, never by library code.

Measured on a 2-core CPU (BENCHMARKS.md): the mixture oracle allocates many MB-sized
temporaries; glibc returns them to the OS and page-faults them back on every call unless
its trim/mmap thresholds are raised, and responsibilities underflow to denormals, which
multiply ~100× slower unless flushed to zero.
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def configured(threads: int | None = None):
    """`configure()` for the duration of a block, then restore torch's thread count and denormal mode
    (so that calling the CLI in-process, as the tests do, leaves no global state behind)."""
    prev_threads = torch.get_num_threads()
    prev_flush = _flush_state()
    configure(threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.set_flush_denormal(prev_flush)


def _flush_state() -> bool:
    """Whether denormals are currently flushed to zero (torch has no getter: test with a tiny float)."""
    tiny = torch.tensor(1e-40, dtype=torch.float32)
    return bool(tiny * 1 == 0)
