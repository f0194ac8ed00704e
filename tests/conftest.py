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
