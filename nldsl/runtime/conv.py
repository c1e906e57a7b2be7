r"""The short causal depthwise convolution over time that the memories' inputs pass.

    y_t = sum_{j=0}^{W-1} w_j * x_{t - W + 1 + j}          (per channel; x_{<0} from the state)

One op for both users: :class:`nldsl.nn.layers.ShortConv` (q, k, v of the linear memories,
``[B, T, C]``) and self-modifying Titans (``[B, T, H, D]`` or ``[B, T, G, H, D]``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_conv1d"]


class _CausalConv(torch.autograd.Function):
    """``y`` from the padded input ``full = [state; x]`` ``[B, W-1+T, *C]`` and ``weight [*C, W]``,
    as W shifted multiply-adds in the ``[B, T, *C]`` layout (torch's depthwise F.conv1d on the same
    memory, seen channels first, is slower on a CPU forward and backward). The backward is written
    out: autograd through the shifted slices would build one zero-filled, input-sized gradient per
    tap and add them up. Its ops are differentiable, so a double backward still works."""

    @staticmethod
    def forward(ctx, full: Tensor, weight: Tensor) -> Tensor:
        W = weight.shape[-1]
        T = full.shape[1] - (W - 1)
        taps = weight.unbind(-1)
        y = full[:, W - 1:] * taps[W - 1]
        for j in range(W - 1):
            y.addcmul_(full[:, j:j + T], taps[j])
        ctx.save_for_backward(full, weight)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        full, weight = ctx.saved_tensors
        W, T = weight.shape[-1], gy.shape[1]
        taps = weight.unbind(-1)
        twice = torch.is_grad_enabled()  # a double backward records these ops: no out= or buffers
        d_full = d_weight = None
        if ctx.needs_input_grad[0]:
            # the last tap covers rows W-1.. ; the front rows start at zero (the pad)
            if twice:
                d_full = F.pad(gy * taps[W - 1], (0, 0) * (gy.dim() - 2) + (W - 1, 0))
            else:
                d_full = torch.empty_like(full)
                d_full[:, :W - 1].zero_()
                torch.mul(gy, taps[W - 1], out=d_full[:, W - 1:])
            for j in range(W - 1):
                d_full[:, j:j + T].addcmul_(gy, taps[j])
        if ctx.needs_input_grad[1]:
            # each tap's products in one buffer (a fresh input-sized tensor per tap costs as much
            # in page faults as the products themselves)
            prod = None if twice else torch.empty_like(gy)
            d_weight = torch.stack([(gy * full[:, j:j + T] if twice else torch.mul(gy, full[:, j:j + T], out=prod))
                                    .sum((0, 1)) for j in range(W)], dim=-1)
        return d_full, d_weight


def causal_conv1d(x: Tensor, weight: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Causal depthwise convolution over time: ``y_t = sum_j weight[..., j] x_{t - W + 1 + j}``.

    x: ``[B, T, *C]``; weight: ``[*C, W]``; state: the previous ``W - 1`` inputs ``[B, W-1, *C]``
    (None = zeros). Returns ``(y [B, T, *C], new_state [B, W-1, *C])``: passing ``new_state`` to
    the next call continues the stream exactly.
    """
    B = x.shape[0]
    chans = x.shape[2:]
    W = weight.shape[-1]
    if tuple(weight.shape[:-1]) != tuple(chans):
        raise ValueError(f"causal_conv1d: weight must be [{', '.join(map(str, chans))}, W], got {tuple(weight.shape)}")
    if state is None:
        state = x.new_zeros(B, W - 1, *chans)
    full = torch.cat([state.to(x.dtype), x], dim=1)                   # [B, W-1+T, *C]
    y = _CausalConv.apply(full, weight.to(x.dtype))
    return y, full[:, full.shape[1] - (W - 1):]
