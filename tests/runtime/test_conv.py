"""causal_conv1d against torch's depthwise F.conv1d (an independent reference), in float64 with
gradients for the input, the weights and the carried state; streaming; ShortConv runs it. Both
implementations: the C kernel (a CPU's) and the torch ops (the ``impl`` fixture)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nldsl.nn.layers import ShortConv
from nldsl.runtime import conv
from nldsl.runtime.conv import causal_conv1d

DT = torch.float64


@pytest.fixture(params=["native", "torch"], autouse=True)
def impl(request, monkeypatch):
    """Which implementation runs: the C kernel or the torch ops."""
    monkeypatch.setenv("NLDSL_NATIVE", "1" if request.param == "native" else "0")
    if request.param == "native":
        assert conv._library(DT) is not None, "the C kernel did not build (is a C compiler installed?)"
    return request.param


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT, requires_grad=True)


def _reference(x, weight, state):
    """F.conv1d over ``[state; x]`` with one group per channel, channels first (conv1d computes a
    cross-correlation: ``y_t = sum_j w_j [state; x]_{t+j}``)."""
    B, T, *chans = x.shape
    C, W = weight[..., 0].numel(), weight.shape[-1]
    full = torch.cat([state, x], dim=1).reshape(B, T + W - 1, C).transpose(1, 2)
    y = F.conv1d(full, weight.reshape(C, 1, W), groups=C)
    return y.transpose(1, 2).reshape(B, T, *chans)


@pytest.mark.parametrize("chans", [(5,), (2, 3), (3, 2, 4)], ids=["C", "HD", "GHD"])
@pytest.mark.parametrize("W,T", [(4, 9), (4, 2), (2, 5), (1, 3)])
def test_matches_conv1d_with_gradients(chans, W, T):
    x, w, s = _rand(2, T, *chans, seed=1), _rand(*chans, W, seed=2), _rand(2, W - 1, *chans, seed=3)
    y, new_state = causal_conv1d(x, w, s)
    ref = _reference(x, w, s)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(new_state, torch.cat([s, x], 1)[:, T:])
    g = torch.randn_like(y)
    want = torch.autograd.grad(ref, (x, w, s), g)
    torch.testing.assert_close(torch.autograd.grad(y, (x, w, s), g), want)
    # float32 (the kernel's other build) to float32's precision
    x32, w32, s32 = (t.detach().float().requires_grad_() for t in (x, w, s))
    y32, _ = causal_conv1d(x32, w32, s32)
    torch.testing.assert_close(y32.double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(y32, (x32, w32, s32), g.float()), want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_zero_state_and_double_backward():
    x, w = _rand(2, 6, 3, seed=4), _rand(3, 4, seed=5)
    y, _ = causal_conv1d(x, w)
    torch.testing.assert_close(y, _reference(x, w, torch.zeros(2, 3, 3, dtype=DT)))
    torch.testing.assert_close(y[:, 0], x[:, 0] * w[:, -1])            # causal: only the current input
    assert torch.autograd.gradcheck(lambda a, b: causal_conv1d(a, b)[0], (x, w))
    assert torch.autograd.gradgradcheck(lambda a, b: causal_conv1d(a, b)[0], (x, w))


def test_split_stream_equals_one_pass():
    x, w = _rand(2, 9, 2, 3, seed=6), _rand(2, 3, 4, seed=7)
    y, _ = causal_conv1d(x, w)
    y1, s = causal_conv1d(x[:, :2], w)                                  # a split shorter than the width
    y2, s = causal_conv1d(x[:, 2:3], w, s)
    y3, _ = causal_conv1d(x[:, 3:], w, s)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y)


def test_weight_shape_is_checked():
    with pytest.raises(ValueError, match=r"weight must be \[2, 3, W\]"):
        causal_conv1d(torch.zeros(1, 4, 2, 3), torch.zeros(3, 2, 4))


def test_short_conv_uses_it():
    conv = ShortConv(5, 4).double()
    x = _rand(2, 7, 5, seed=8)
    y, state = conv(x)
    torch.testing.assert_close(y, _reference(x, conv.weight, torch.zeros(2, 3, 5, dtype=DT)))
    torch.testing.assert_close(state, x[:, -3:])


@pytest.mark.parametrize("dtype", [torch.float32, DT], ids=["float32", "float64"])
def test_the_same_bits_on_any_thread_count(impl, dtype):
    """The C kernel splits the channels over torch's threads, a channel's sums on one thread:
    output and gradients are bit for bit the same on 1, 2 and 3 threads (40 channels: vectors
    split unevenly, and a last range shorter than a vector)."""
    x, w, s = (t.detach().to(dtype).requires_grad_() for t in (_rand(3, 11, 5, 8, seed=9), _rand(5, 8, 4, seed=10),
                                                                _rand(3, 3, 5, 8, seed=11)))
    g = torch.randn(3, 11, 5, 8, generator=torch.Generator().manual_seed(12), dtype=dtype)
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y, _ = causal_conv1d(x, w, s)
            results.append([y, *torch.autograd.grad(y, (x, w, s), g)])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
