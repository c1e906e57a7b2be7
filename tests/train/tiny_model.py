"""A tiny hand-written NSAMModel for the training tests (no compiler needed).

``TinyAttention``: pre-norm residual blocks of causal softmax attention (torch SDPA, rotary
positions counted along the stream, the KV cache as its in-context state) and a GELU MLP;
``conv=4`` puts a short causal convolution before the attention (as Hope's q/k/v have).
``TinyRecurrent``: a per-channel gated linear recurrence (state carried across calls) and a
GELU MLP; one level of its state ``carry``s across sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nldsl.nn.layers import MLP, ShortConv, rotary
from nldsl.nn.model import Config, LevelInfo, NSAMModel


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, state=None):
        B, T, D = x.shape
        pos0 = 0 if state is None else state["k"].shape[1]
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        positions = torch.arange(pos0, pos0 + T, device=x.device)
        q, k = rotary(q, positions), rotary(k, positions)
        if state is not None:
            k = torch.cat([state["k"], k], 1)
            v = torch.cat([state["v"], v], 1)
        S = k.shape[1]
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(B, T, D)), {"k": k, "v": v}

    def new_sequence(self, state):
        return None


class AttnBlock(nn.Module):
    """rmsnorm -> [short causal conv] -> attention, residual; rmsnorm -> MLP, residual."""

    def __init__(self, config: Config, index: int):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(config.dim), nn.RMSNorm(config.dim)
        self.conv = ShortConv(config.dim, config.conv) if config.conv else None
        self.attn = _Attention(config.dim, config.heads)
        self.mlp = MLP(config.dim, 2.0)

    def forward(self, x, state=None):
        state = state or {}
        new = {}
        h = self.n1(x)
        if self.conv is not None:
            h, new["conv"] = self.conv(h, state.get("conv"))
        a, new["attn"] = self.attn(h, state.get("attn"))
        x = x + a
        x = x + self.mlp(self.n2(x))
        return x, new


class TinyAttention(NSAMModel):
    spec_file = "tests/train/tiny_model.py"
    spec_hash = "tiny-attention-v1"
    levels = (LevelInfo("pretrain", "steps", 1, "sequence", "anchor"),
              LevelInfo("fast", "tokens", 1, "sequence", "running"))
    optimizer = "AdamW"

    def __init__(self, *, vocab=256, dim=64, heads=4, layers=2, context=128, conv=0):
        super().__init__(Config(vocab=vocab, dim=dim, heads=heads, layers=layers, context=context,
                                extra={"conv": conv}), AttnBlock)


class _Recurrence(nn.Module):
    """h_t = a * h_{t-1} + (1 - a) * W x_t per channel; a carry-scoped copy too."""

    def __init__(self, dim, scope):
        super().__init__()
        self.inp = nn.Linear(dim, dim, bias=False)
        self.decay = nn.Parameter(torch.full((dim,), 2.0))
        self.out = nn.Linear(dim, dim, bias=False)
        self.scope = scope

    def forward(self, x, state=None):
        a = torch.sigmoid(self.decay)
        u = (1 - a) * self.inp(x)
        h = x.new_zeros(x.shape[0], x.shape[2]) if state is None else state
        outs = []
        for t in range(x.shape[1]):
            h = a * h + u[:, t]
            outs.append(h)
        return self.out(torch.stack(outs, 1)), h

    def new_sequence(self, state):
        return state if self.scope == "carry" else None


class RecBlock(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(config.dim), nn.RMSNorm(config.dim)
        self.fast = _Recurrence(config.dim, "sequence")
        self.slow = _Recurrence(config.dim, "carry")

    def forward(self, x, state=None):
        state = state or {}
        a, sf = self.fast(self.n1(x), state.get("fast"))
        b, ss = self.slow(self.n2(x), state.get("slow"))
        return x + a + b, {"fast": sf, "slow": ss}


class TinyRecurrent(NSAMModel):
    spec_file = "tests/train/tiny_model.py"
    spec_hash = "tiny-recurrent-v1"
    levels = (LevelInfo("pretrain", "steps", 1, "sequence", "anchor"),
              LevelInfo("fast", "tokens", 1, "sequence", "running"),
              LevelInfo("slow", "tokens", 1, "carry", "running"))

    def __init__(self, *, vocab=256, dim=32, heads=1, layers=1, context=64):
        super().__init__(Config(vocab=vocab, dim=dim, heads=heads, layers=layers, context=context), RecBlock)
