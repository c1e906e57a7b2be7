"""Deep-memory runtime tests run single-threaded: the ops are many small kernels, and on a shared
2-core machine intra-op threads only add contention. ``impl``: a test's run of each implementation
of the fused ops, the C kernels (what a CPU runs) and the torch ops (what a GPU runs)."""
from __future__ import annotations

import pytest
import torch

from nldsl.runtime import _group_read, _mlp_write, _running_read
from rtdeep_helpers import DT


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["native", "torch"])
def impl(request, monkeypatch):
    """Which fused ops run: the C kernels or the torch ops."""
    native = request.param == "native"
    monkeypatch.setenv("NLDSL_NATIVE", "1" if native else "0")
    if native:
        for module in (_mlp_write, _group_read, _running_read):
            assert module._library(DT) is not None, "a C kernel did not build (is a C compiler installed?)"
    return request.param
