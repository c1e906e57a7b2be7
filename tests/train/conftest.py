"""Fixtures of the training tests."""
from __future__ import annotations

import pytest
import torch
from train_support import small

# One thread: these models are tiny, and on a busy 2-core machine two spinning threads make
# every small matmul tens of times slower.
torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(**kw):
        kw.setdefault("out", str(tmp_path / "run"))
        return small(**kw)

    return make
