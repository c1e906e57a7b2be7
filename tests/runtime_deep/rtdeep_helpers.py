"""Builders and comparison helpers shared by the deep-memory / CMS / self-modifying tests.

Everything is float64 on CPU with small shapes (B=2, H=2, D=8, hidden 16) and gates in the
ranges where the in-context updates stay bounded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DT = torch.float64
B, H, D, HID = 2, 2, 8, 16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=g, dtype=DT)


def rand(g, *shape, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=DT)


def memory_inputs(T: int, seed: int = 0, depth: int = 2, Bn: int = B, per_batch_params: bool = False):
    """Inputs of mlp_memory: q, k (unit), v, eta, alpha, beta, params (application order)."""
    g = gen(seed)
    x = {
        "q": randn(g, Bn, T, H, D),
        "k": F.normalize(randn(g, Bn, T, H, D), dim=-1),
        "v": randn(g, Bn, T, H, D),
        "eta": rand(g, Bn, T, H, lo=0.05, hi=0.35),
        "alpha": rand(g, Bn, T, H, lo=0.85, hi=1.0),
        "beta": rand(g, Bn, T, H, lo=0.0, hi=0.6),
    }
    dims = [D] + [HID] * (depth - 1) + [D]
    lead = (Bn, H) if per_batch_params else (H,)
    x["params"] = [randn(g, *lead, dims[i + 1], dims[i], scale=0.3) for i in range(depth)]
    return x


def cms_inputs(T: int, n_levels: int = 3, seed: int = 0, Bn: int = B):
    g = gen(seed)
    return {
        "x": randn(g, Bn, T, D),
        "params": [[randn(g, HID, D, scale=0.3), randn(g, D, HID, scale=0.3)] for _ in range(n_levels)],
        "delta": randn(g, Bn, T, D),
        "targets": [randn(g, Bn, T, D) for _ in range(n_levels)],
        "agg": torch.tensor([0.7, 1.0, -0.4][:n_levels], dtype=DT),
    }


def selfmod_params(g, generated=("k", "v", "q", "eta", "alpha"), scale=0.15, lead=(H,)):
    p = {"memory": (randn(g, *lead, HID, D, scale=scale), randn(g, *lead, D, HID, scale=scale))}
    for n in generated:
        out = D if n in ("k", "v", "q") else 1
        p[n] = (randn(g, *lead, HID, D, scale=scale), randn(g, *lead, out, HID, scale=scale))
    return p


def leaves(obj):
    """Every tensor inside nested lists/tuples/dicts (in a stable order)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for key in sorted(obj) for t in leaves(obj[key])]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in leaves(o)]
    return []


def requires_grad(obj):
    for t in leaves(obj):
        t.requires_grad_(True)
    return obj


def assert_close(a, b, atol=1e-10, rtol=1e-9, what=""):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb), what
    for i, (x, y) in enumerate(zip(la, lb)):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"{what} [{i}]: {m}")


def grads(out: torch.Tensor, wrt, seed: int = 123):
    """Gradient of a random projection of ``out`` w.r.t. every tensor of ``wrt`` (zeros where none
    flows)."""
    w = torch.randn(out.shape, generator=gen(seed), dtype=out.dtype)
    ts = leaves(wrt)
    gs = torch.autograd.grad((out * w).sum(), ts, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(ts, gs)]
