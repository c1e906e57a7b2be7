"""Helpers of the compiled-optimizer tests: the specs folder, a small model, a training loop.

(Kept apart from conftest.py so test modules can import them by a name no other test folder uses.)
"""
from __future__ import annotations

from pathlib import Path

import torch

SPECS = Path(__file__).resolve().parents[2] / "specs"


class Tiny(torch.nn.Module):
    """Parameters of several ranks: matrices (wide and tall), a vector, a 3-D tensor, a scalar."""

    def __init__(self, matrices_only: bool = False, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def p(*shape, scale=0.4):
            return torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=dtype) * scale)

        self.w1 = p(8, 6)
        self.w2 = p(3, 8)
        self.w3 = p(8, 5)
        self.matrices_only = matrices_only
        if not matrices_only:
            self.b1 = p(8, scale=0.1)
            self.k = p(5, 2, 3)
            self.s = torch.nn.Parameter(torch.tensor(1.0, dtype=dtype))

    def forward(self, x):
        h = x @ self.w1.T + x[:, :5] @ self.w3.T
        if not self.matrices_only:
            h = h + self.b1 + (x @ self.k.reshape(5, 6).T) @ self.w3.T
        h = torch.tanh(h)
        out = h @ self.w2.T
        if not self.matrices_only:
            out = out * self.s
        return out


def batches(n: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 6, generator=g, dtype=dtype)
        y = torch.randn(16, 3, generator=g, dtype=dtype)
        yield x, y


def train(model, opt, steps: int = 100, dtype=torch.float64, closure: bool = False):
    for x, y in batches(steps, dtype):
        def loss_fn():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()
    return model


def assert_params_close(a: torch.nn.Module, b: torch.nn.Module, rel: float = 1e-6):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        scale = y.detach().abs().max().clamp(min=1e-12)
        torch.testing.assert_close(x.detach(), y.detach(), rtol=rel, atol=rel * float(scale),
                                   msg=lambda m, n=name: f"parameter {n}: {m}")
