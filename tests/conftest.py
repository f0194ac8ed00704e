"""Fixtures shared by the test modules."""
import pytest
import torch

from gendiff.data.toy import tree


@pytest.fixture(scope="module")
def one_thread():
    """Modules of thousands of small ops: with another job on the 2-core machine every parallel region waits
    for a descheduled worker (measured: 25× slower). Results do not depend on it. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tree_a():
    return tree("A")


@pytest.fixture(scope="session")
def blobs_npz(tmp_path_factory):
    """240 labelled 28×28 8-bit images as an .npz: a bright square in one of four quadrants (the label)
    (tests/test_image_runs.py's `blobs`, shared)."""
    import numpy as np
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 240)
    x = np.zeros((240, 1, 28, 28), np.uint8)
    for i, k in enumerate(y):
        r, c = 3 + 12 * (k // 2), 3 + 12 * (k % 2)
        x[i, 0, r:r + 10, c:c + 10] = 180 + rng.integers(0, 75)
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, images=x, labels=y)
    return str(path)
