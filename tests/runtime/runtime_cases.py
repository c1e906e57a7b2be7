"""Test harness for nldsl.runtime: one `OpCase` per op that knows how to build random inputs,
call the op with an impl, and list what gradients should flow to.

Inputs are float64 on CPU and small (H=2, K=8, V=6 unless a test says otherwise), with
gates drawn in the ranges where each rule is a contraction, so long streams stay bounded.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F

import nldsl.runtime as rt

DT = torch.float64


@dataclasses.dataclass
class OpCase:
    name: str
    fast: str                       # the fast impl's name
    gates: tuple[str, ...]          # positional per-token gates after q, k, v
    kwargs: dict                    # fixed keyword arguments (window, ...)
    gate_init: Callable[[str, torch.Generator, tuple], torch.Tensor]
    chunked_semantics: bool = False  # chunk_size is part of the maths (reference takes it too)
    has_chunk: bool = True           # accepts chunk_size at all

    @property
    def fn(self):
        return getattr(rt, self.name)

    def inputs(self, B: int, T: int, H: int = 2, K: int = 8, V: int = 6, seed: int = 0,
               requires_grad: bool = False) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(seed)
        x = {
            "q": torch.randn(B, T, H, K, generator=gen, dtype=DT),
            "k": F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=DT), dim=-1),
            "v": torch.randn(B, T, H, V, generator=gen, dtype=DT),
        }
        for g in self.gates:
            x[g] = self.gate_init(g, gen, (B, T, H))
        if self.name == "softmax_attention":
            L = 3
            x["initial_state"] = rt.KVCache(
                torch.randn(B, L, H, K, generator=gen, dtype=DT), torch.randn(B, L, H, V, generator=gen, dtype=DT)
            )
        else:
            x["initial_state"] = 0.5 * torch.randn(B, H, K, V, generator=gen, dtype=DT)
        if requires_grad:
            for key, val in x.items():
                if isinstance(val, torch.Tensor):
                    val.requires_grad_(True)
                elif isinstance(val, tuple):
                    for t in val:
                        t.requires_grad_(True)
        return x

    def call(self, x: dict, impl: str, chunk_size: int | None = None, **extra) -> rt.MemoryOutput:
        args = [x["q"], x["k"], x["v"]]
        kw = dict(self.kwargs)
        kw.update({g: x[g] for g in self.gates})
        kw.update(initial_state=x.get("initial_state"), output_final_state=True, impl=impl)
        if chunk_size is not None and self.has_chunk:
            kw["chunk_size"] = chunk_size
        kw.update(extra)
        return self.fn(*args, **kw)

    def grad_leaves(self, x: dict) -> dict[str, torch.Tensor]:
        leaves = {n: x[n] for n in ("q", "k", "v", *self.gates)}
        s = x.get("initial_state")
        if isinstance(s, torch.Tensor):
            leaves["initial_state"] = s
        elif isinstance(s, tuple):
            for i, t in enumerate(s):
                leaves[f"initial_state[{i}]"] = t
        return leaves


def state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a final state (a tensor or a NamedTuple of tensors and ints)."""
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for t in state if isinstance(t, torch.Tensor)]


def _gate(name: str, gen: torch.Generator, shape: tuple) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, dtype=DT)
    return {
        "g": -0.3 * u,                 # log retention in [-0.3, 0]
        "beta": 0.1 + 0.9 * u,         # delta step in [0.1, 1]
        "theta": 0.1 + 0.5 * u,        # Titans learning rate
        "eta": 0.9 * u,                # Titans momentum decay / DGD step (scaled below)
        "alpha": 0.2 * u,              # Titans forget gate
        "gamma": 0.05 + 0.25 * u,      # Omega step per token
    }[name]


def _dgd_gate(name, gen, shape):
    u = torch.rand(shape, generator=gen, dtype=DT)
    return 0.05 + 0.35 * u if name == "eta" else 0.8 + 0.2 * u   # eta <= alpha / 2


def _omega_gate(name, gen, shape):
    u = torch.rand(shape, generator=gen, dtype=DT)
    return 0.05 + 0.25 * u if name == "gamma" else 0.8 + 0.2 * u


CASES = {
    "linear_attention": OpCase("linear_attention", "chunked", ("g",), {}, _gate),
    "linear_attention_const": OpCase("linear_attention", "chunked", (), {"decay": 0.9}, _gate),
    "linear_attention_anchor": OpCase("linear_attention", "chunked", ("g",), {"read": "anchor"}, _gate),
    "delta_rule": OpCase("delta_rule", "chunked", ("beta",), {}, _gate),
    "gated_delta_rule": OpCase("gated_delta_rule", "chunked", ("beta", "g"), {}, _gate),
    "titans_linear": OpCase("titans_linear", "chunked", ("theta", "eta", "alpha"), {}, _gate, chunked_semantics=True),
    "titans_linear_anchor": OpCase("titans_linear", "chunked", ("theta", "eta", "alpha"), {"read": "anchor"}, _gate,
                                   chunked_semantics=True),
    # the Hebbian objective: momentum and the anchor read, which linear_attention does not have
    "titans_linear_dot": OpCase("titans_linear", "chunked", ("theta", "eta", "alpha"),
                                {"objective": "dot", "read": "anchor"}, _gate, chunked_semantics=True),
    # the robust objectives of the Miras family (section 5); lp with p < 2, whose step grows slower
    # than the residual (with p = 3 the memory runs away over the cases' 100 tokens)
    "titans_linear_lp": OpCase("titans_linear", "chunked", ("theta", "eta", "alpha"), {"objective": "lp", "p": 1.5},
                               _gate, chunked_semantics=True),
    "titans_linear_huber": OpCase("titans_linear", "chunked", ("theta", "eta", "alpha"),
                                  {"objective": "huber", "delta": 0.5, "read": "anchor"}, _gate,
                                  chunked_semantics=True),
    "dgd": OpCase("dgd", "chunked", ("eta", "alpha"), {}, _dgd_gate, chunked_semantics=True),
    "dgd_dot": OpCase("dgd", "chunked", ("eta", "alpha"), {"objective": "dot", "read": "anchor"}, _dgd_gate,
                      chunked_semantics=True),
    "omega_rule": OpCase("omega_rule", "chunked", ("gamma", "alpha"), {"window": 3}, _omega_gate),
    "omega_rule_dot": OpCase("omega_rule", "chunked", ("gamma", "alpha"), {"window": 3, "objective": "dot"},
                             _omega_gate),
    # the read before the write (nldsl's anchor read at period 1)
    "omega_rule_anchor": OpCase("omega_rule", "chunked", ("gamma", "alpha"), {"window": 3, "read": "anchor"},
                                _omega_gate),
    "omega_rule_dot_anchor": OpCase("omega_rule", "chunked", ("gamma", "alpha"),
                                    {"window": 2, "objective": "dot", "read": "anchor"}, _omega_gate),
    "softmax_attention": OpCase("softmax_attention", "sdpa", (), {"window": 5}, _gate, has_chunk=False),
}

LINEAR = [n for n in CASES if n != "softmax_attention"]


def assert_close(a, b, what: str = "", rtol: float = 1e-9, atol: float = 1e-9):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def load_fla_naive(relpath: str):
    """Import one of flash-linear-attention's pure-torch naive modules by file path.

    ``import fla.ops.X.naive`` runs ``fla/ops/__init__.py``, which needs triton; the naive files
    themselves need only torch and einops. Returns None when fla (or einops) is missing.
    """
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("fla")
    if spec is None or spec.submodule_search_locations is None:
        return None
    try:
        import einops  # noqa: F401
    except ImportError:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "ops" / relpath
    if not path.exists():
        return None
    mspec = importlib.util.spec_from_file_location(f"_fla_naive_{relpath.replace('/', '_')[:-3]}", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod
