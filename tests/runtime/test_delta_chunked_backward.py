"""The chunked delta / gated delta rule's hand-written backward (``_ChunkedDeltaRule``).

float64 on CPU. The consistency tests (test_ops_consistency.py) already compare the chunked path
with the token-by-token reference; these cover what is particular to the custom Function: its
gradients by finite differences (``torch.autograd.gradcheck``), every grouping of chunks into
batches of ops (one chunk, a ragged last group, the whole sequence), the no-grad path's
one-group buffers, losses on only one of the two outputs, leaves of which only some require
grad, strong retention, low-precision inputs, and its refusal to be differentiated twice.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import nldsl.runtime as rt
from runtime_cases import assert_close

delta_module = importlib.import_module("nldsl.runtime.delta_rule")
F64 = torch.float64
OPS = ["delta_rule", "gated_delta_rule"]


def _inputs(op, B=2, T=11, H=2, K=3, V=2, seed=0, g_scale=0.3, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = {
        "q": torch.randn(B, T, H, K, generator=gen, dtype=F64),
        "k": F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=F64), dim=-1),
        "v": torch.randn(B, T, H, V, generator=gen, dtype=F64),
        "beta": 0.1 + 0.9 * torch.rand(B, T, H, generator=gen, dtype=F64),
    }
    if op == "gated_delta_rule":
        x["g"] = -g_scale * torch.rand(B, T, H, generator=gen, dtype=F64)
    x["initial_state"] = 0.5 * torch.randn(B, H, K, V, generator=gen, dtype=F64)
    return {n: t.to(dtype).requires_grad_(True) for n, t in x.items()}


def _call(op, x, impl, chunk_size=4, output_final_state=True):
    gates = [x["beta"]] + ([x["g"]] if op == "gated_delta_rule" else [])
    return getattr(rt, op)(x["q"], x["k"], x["v"], *gates, initial_state=x["initial_state"],
                           output_final_state=output_final_state, impl=impl, chunk_size=chunk_size)


def _grads(op, x, impl, chunk_size=4, use=("o", "S")):
    """Gradients of a random projection of the outputs named in `use` w.r.t. every leaf that
    requires grad (None where no gradient flows)."""
    r = _call(op, x, impl, chunk_size)
    gen = torch.Generator().manual_seed(1)
    outs = [t for n, t in (("o", r.o), ("S", r.final_state)) if n in use]
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=F64).to(t.dtype)).sum() for t in outs)
    leaves = {n: t for n, t in x.items() if t.requires_grad}
    return r, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))


@pytest.fixture
def chunk_group(monkeypatch):
    """Set how many chunks the chunked path batches together (normally a cache-size choice)."""
    def set_group(n):
        monkeypatch.setattr(delta_module, "_chunk_group", lambda q, BH, C: n)
    return set_group


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op, group, chunk_group):
    """Finite differences of every input, T=11 in chunks of 4 (the last one padded), with an
    initial state, one chunk per group, a ragged last group and one group for the sequence."""
    chunk_group(group)
    x = _inputs(op, B=1, T=11, H=2)
    names = list(x)

    def f(*leaves):
        r = _call(op, dict(zip(names, leaves)), "chunked")
        return r.o, r.final_state

    assert torch.autograd.gradcheck(f, tuple(x.values()), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 2, 100])
@pytest.mark.parametrize("op", OPS)
def test_every_grouping_equals_reference(op, group, chunk_group):
    """Outputs, final state and every gradient equal the token-by-token reference's, for any
    number of chunks per group (T=37 in chunks of 8: 5 chunks, the last one padded)."""
    chunk_group(group)
    x = _inputs(op, B=2, T=37, H=3, K=5, V=4, seed=2)
    ref, gref = _grads(op, x, "reference", 8)
    fast, gfast = _grads(op, x, "chunked", 8)
    assert_close(fast.o, ref.o, f"{op} group={group}: o")
    assert_close(fast.final_state, ref.final_state, f"{op} group={group}: final_state")
    for n in gref:
        assert_close(gfast[n], gref[n], f"{op} group={group}: d/d{n}", rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("op", OPS)
def test_no_grad_path_keeps_one_group(op, group, chunk_group):
    """Without gradients, the per-chunk buffers hold one group at a time (the state carried from
    group to group): same outputs and final state as the reference."""
    chunk_group(group)
    x = {n: t.detach() for n, t in _inputs(op, T=29, seed=3).items()}
    ref = _call(op, x, "reference")
    with torch.no_grad():
        fast = _call(op, x, "chunked", chunk_size=4)
    assert_close(fast.o, ref.o, f"{op}: o")
    assert_close(fast.final_state, ref.final_state, f"{op}: final_state")


@pytest.mark.parametrize("use", [("o",), ("S",)])
@pytest.mark.parametrize("op", OPS)
def test_loss_on_one_output(op, use):
    """A loss on o alone (the final state's gradient never materialised) or on the final state
    alone (o's gradient absent) gives the reference's gradients."""
    x = _inputs(op, T=13, seed=4)
    _, gref = _grads(op, x, "reference", use=use)
    _, gfast = _grads(op, x, "chunked", use=use)
    for n in gref:
        assert_close(gfast[n], gref[n], f"{op} loss on {use}: d/d{n}", rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("op", OPS)
def test_some_leaves_without_grad(op):
    """Only v and the gates require grad (detached keys and queries, a constant initial state):
    their gradients equal the reference's and no gradient reaches the others."""
    x = _inputs(op, T=13, seed=5)
    for n in ("q", "k", "initial_state"):
        x[n] = x[n].detach()
    _, gref = _grads(op, x, "reference")
    _, gfast = _grads(op, x, "chunked")
    assert set(gfast) == {n for n in x if n not in ("q", "k", "initial_state")}
    for n in gref:
        assert_close(gfast[n], gref[n], f"{op}: d/d{n}", rtol=1e-8, atol=1e-8)


def test_strong_retention_is_finite_and_exact():
    """g = -40 per token (exp(b_t - b_j) underflows across a chunk, exp(-b_j) alone would
    overflow): outputs and gradients finite and equal to the reference's."""
    x = _inputs("gated_delta_rule", T=21, seed=6, g_scale=40.0)
    ref, gref = _grads("gated_delta_rule", x, "reference", 8)
    fast, gfast = _grads("gated_delta_rule", x, "chunked", 8)
    assert_close(fast.o, ref.o, "o")
    for n in gref:
        assert gfast[n].isfinite().all(), n
        assert_close(gfast[n], gref[n], f"d/d{n}", rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("op", OPS)
def test_bfloat16_inputs_get_bfloat16_gradients(op):
    """bf16 q, k, v: the state and the arithmetic stay float32, each gradient comes back in its
    leaf's dtype, close to the float64 reference's."""
    x64 = _inputs(op, T=19, seed=7)
    _, gref = _grads(op, x64, "reference", 8)
    x = {n: (t.detach().to(torch.bfloat16) if n in ("q", "k", "v") else t.detach().float()).requires_grad_(True)
         for n, t in x64.items()}
    _, g = _grads(op, x, "chunked", 8)
    for n in g:
        assert g[n].dtype == x[n].dtype, n
        scale = gref[n].abs().max()
        assert (g[n].double() - gref[n]).abs().max() <= 0.02 * scale, n


def test_not_twice_differentiable():
    """The backward is hand-written, not itself differentiable: asking for a second derivative
    is an error, not a silently wrong number."""
    x = _inputs("delta_rule", T=9)
    r = _call("delta_rule", x, "chunked")
    (gq,) = torch.autograd.grad(r.o.square().sum(), [x["q"]], create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        gq.sum().backward()


def test_default_chunk_size(monkeypatch):
    """chunk_size=None is 32 for impl='chunked' on a CPU, and explicit chunk sizes still work
    (results do not depend on the tile)."""
    x = {n: t.detach() for n, t in _inputs("gated_delta_rule", T=70, seed=8).items()}
    seen = []
    real = delta_module._chunked

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(delta_module, "_chunked", spy)
    default = rt.gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"])
    assert seen == [32]
    tile64 = _call("gated_delta_rule", x, "chunked", chunk_size=64, output_final_state=False)
    assert seen == [32, 64]
    assert_close(default.o, tile64.o, "default tile vs 64")
