"""Deep-memory runtime tests run single-threaded: the ops are many small kernels, and on a shared
2-core machine intra-op threads only add contention."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
