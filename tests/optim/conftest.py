"""Fixtures of the compiled-optimizer tests (their helpers: optim_support.py)."""
from __future__ import annotations

import pytest
import torch

from nldsl.codegen import compile_spec
from optim_support import SPECS


@pytest.fixture(autouse=True)
def one_thread():
    """These tests use tiny tensors: intra-op threads only add overhead (and noise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def compiled():
    """``compiled("adam.nl")`` -> the generated module (compiled once per session)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = compile_spec(SPECS / name)
        return cache[name]

    return get
