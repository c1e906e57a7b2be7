"""The kernel tests run the generated Triton kernels on the GPU when there is one, else on CPU in
Triton's interpreter. The interpreter is chosen when a kernel is defined (``@triton.jit`` reads
TRITON_INTERPRET), so it is switched on here, before any test imports generated kernels."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and noise on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def full_float32():
    """No TF32 in torch's own float32 matmuls and convolutions (the kernels follow the first)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
