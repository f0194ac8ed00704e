"""Files: every write goes to a temporary name and is renamed into place, so no reader ever sees a
half-written file; JSON is strict (NaN/inf become null); seeds for each purpose derive from one seed."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import zlib

import numpy as np
import torch
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to `path`; on success rename it to `path`, else remove it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _strict(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def save_json(obj, path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(_strict(obj), f, indent=2, allow_nan=False)


def save_text(text: str, path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_state(state: dict, path: str, metadata: dict | None = None) -> None:
    """A state dict as safetensors (checkpoints never go through pickle)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp, metadata=metadata)


def save_figure(fig, path: str, **kw) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=os.path.splitext(path)[1].lstrip(".") or "png", **kw)


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def derive_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for `purpose` from a run's seed (numpy SeedSequence): no two
    (seed, purpose) pairs collide the way `seed + offset` schemes do."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0")
    state = np.random.SeedSequence(seed,
                                   spawn_key=(zlib.crc32(purpose.encode()),)).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, purpose))


class StackedGenerator:
    """One generator per sample, stacked (EDM2's StackedRandomGenerator): sample `i` of a run draws all of its
    noise from its own generator, seeded by (seed, i), so a sample does not depend on how the samples are
    split into batches. `randn(shape)` draws shape[1:] from each generator in turn; samplers accept it
    wherever they take a `generator`."""

    def __init__(self, seed: int, indices, purpose: str = "sample"):
        self.generators = [generator(seed, f"{purpose}-{int(i)}") for i in indices]

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"StackedGenerator of {len(self.generators)} samples asked for a batch of "
                             f"{shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in self.generators])

    def __len__(self) -> int:
        return len(self.generators)


def randn(shape, generator=None, dtype=torch.float32) -> torch.Tensor:
    """torch.randn from a torch.Generator (or the global one), or per sample from a StackedGenerator."""
    if isinstance(generator, StackedGenerator):
        return generator.randn(shape, dtype)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype)
