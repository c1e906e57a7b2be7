"""Persistent building blocks of compiled models: norms, MLPs, a causal short convolution,
rotary position embedding. These are the outer level's memories: the outer optimizer trains
them, and inside a sequence they do not change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nldsl.runtime.conv import causal_conv1d


def make_norm(kind: str, dim: int) -> nn.Module:
    """``norm`` and ``rmsnorm`` are RMSNorm; ``layernorm`` is LayerNorm."""
    if kind in ("norm", "rmsnorm"):
        return nn.RMSNorm(dim, eps=1e-6)
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    raise ValueError(f"unknown norm {kind!r}")


class SwiGLU(nn.Module):
    """The gated MLP of Transformer++: w2(silu(w1 x) * w3 x), hidden width 8/3 dim (rounded)."""

    def __init__(self, dim: int, expansion: float = 8 / 3, multiple_of: int = 8):
        super().__init__()
        hidden = int(dim * expansion)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MLP(nn.Module):
    """A plain two-layer GELU MLP with hidden width ``expansion * dim``."""

    def __init__(self, dim: int, expansion: float = 4.0):
        super().__init__()
        hidden = int(dim * expansion)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class ShortConv(nn.Module):
    """A causal depthwise convolution over time (width ``width``) with a streaming state
    (:func:`nldsl.runtime.conv.causal_conv1d`).

    The state is the last ``width - 1`` inputs, so a sequence split across calls gives the
    same output as one call.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, width))
        with torch.no_grad():  # start near the identity: the newest input passes through
            self.weight[:, -1] = 1.0
            self.weight.add_(torch.randn_like(self.weight) * 0.02)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return causal_conv1d(x, self.weight, state)


def rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding on the last dim of ``x`` [B, T, H, D] at ``positions`` [T]."""
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * inv[None, :]  # [T, half]
    cos = angles.cos().to(x.dtype)[None, :, None, :]
    sin = angles.sin().to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half: 2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    if d % 2:
        out = torch.cat([out, x[..., -1:]], dim=-1)
    return out
