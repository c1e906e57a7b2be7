"""Every runtime op: fast path == reference, streaming == one pass, batch invariance, gradients.

float64 on CPU. For titans_linear and dgd, chunk_size is part of the maths, so the reference is
run with the same chunk_size; for the others it is only the fast path's tile.
"""
from __future__ import annotations

import pytest
import torch

from runtime_cases import CASES, LINEAR, assert_close, state_tensors

ALL = list(CASES)


def _compare(case, ref, fast, what):
    assert_close(fast.o, ref.o, f"{what}: o")
    for a, b in zip(state_tensors(fast.final_state), state_tensors(ref.final_state)):
        assert_close(a, b, f"{what}: final_state")
    if hasattr(ref.final_state, "offset"):
        assert fast.final_state.offset == ref.final_state.offset


@pytest.mark.parametrize("T", [1, 7, 33, 100])
@pytest.mark.parametrize("name", LINEAR)
def test_chunked_equals_reference(name, T):
    """Several chunk sizes, odd lengths, T smaller than the chunk, with an initial state."""
    case = CASES[name]
    x = case.inputs(B=2, T=T, seed=T)
    for C in (1, 4, 16, 64):
        fast = case.call(x, "chunked", C)
        ref = case.call(x, "reference", C if case.chunked_semantics else 64)
        _compare(case, ref, fast, f"{name} T={T} C={C}")


@pytest.mark.parametrize("window", [None, 1, 4, 200])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_sdpa_equals_reference(T, window):
    case = CASES["softmax_attention"]
    x = case.inputs(B=2, T=T, seed=T)
    for cache in (None, x["initial_state"]):
        y = dict(x, initial_state=cache)
        ref = case.call(y, "reference", window=window)
        fast = case.call(y, "sdpa", window=window)
        _compare(case, ref, fast, f"sdpa T={T} window={window} cache={cache is not None}")


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("name", ALL)
def test_split_stream_equals_one_pass(name, impl):
    """Two calls with the carried final_state == one call: split at a chunk boundary (16), inside
    a chunk (5, 21), after one token and one before the end, and three-way."""
    case = CASES[name]
    impl = case.fast if impl == "fast" else "reference"
    T, C = 41, 16
    x = case.inputs(B=2, T=T, seed=1)
    whole = case.call(x, impl, C)

    def part(lo, hi, state):
        y = {n: (v[:, lo:hi] if n != "initial_state" else state) for n, v in x.items()}
        return case.call(y, impl, C)

    for cuts in ([1], [5], [16], [21], [40], [3, 19]):
        bounds = [0, *cuts, T]
        state, outs = x["initial_state"], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            r = part(lo, hi, state)
            outs.append(r.o)
            state = r.final_state
        assert_close(torch.cat(outs, dim=1), whole.o, f"{name} split {cuts}: o")
        for a, b in zip(state_tensors(state), state_tensors(whole.final_state)):
            assert_close(a, b, f"{name} split {cuts}: final_state")


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("name", ALL)
def test_batch_invariance(name, impl):
    """Each sequence's result does not depend on what else is in the batch."""
    case = CASES[name]
    impl = case.fast if impl == "fast" else "reference"
    x = case.inputs(B=3, T=19, seed=2)
    batch = case.call(x, impl, 8)
    for b in range(3):
        xb = {}
        for n, v in x.items():
            xb[n] = type(v)(*(t[b:b + 1] for t in v)) if isinstance(v, tuple) else v[b:b + 1]
        one = case.call(xb, impl, 8)
        assert_close(one.o, batch.o[b:b + 1], f"{name} seq {b}: o")
        for s1, sb in zip(state_tensors(one.final_state), state_tensors(batch.final_state)):
            assert_close(s1, sb[b:b + 1], f"{name} seq {b}: final_state")


@pytest.mark.parametrize("name", ALL)
def test_gradients_agree(name):
    """d(random projection of o and final state) / d(q, k, v, gates, initial_state) agree."""
    case = CASES[name]
    T, C = 23, 8
    grads = {}
    for impl in ("reference", case.fast):
        x = case.inputs(B=2, T=T, seed=3, requires_grad=True)
        r = case.call(x, impl, C)
        gen = torch.Generator().manual_seed(4)
        outs = [r.o, *state_tensors(r.final_state)]
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in outs)
        leaves = case.grad_leaves(x)
        g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads[impl] = dict(zip(leaves, g))
    ref, fast = grads["reference"], grads[case.fast]
    for n in ref:
        assert ref[n] is not None, f"{name}: no gradient reaches {n}"
        assert fast[n] is not None, f"{name} ({case.fast}): no gradient reaches {n}"
        assert_close(fast[n], ref[n], f"{name}: d/d{n}", rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", ["titans_linear", "dgd"])
def test_anchor_read_and_mid_chunk_state(name):
    """read='anchor' agrees between impls, also when resuming mid-chunk from a carried state."""
    case = CASES[name]
    x = case.inputs(B=2, T=30, seed=5)
    for C in (1, 6):
        ref = case.call(x, "reference", C, read="anchor")
        fast = case.call(x, "chunked", C, read="anchor")
        _compare(case, ref, fast, f"{name} read=anchor C={C}")
        first = case.call({n: (v[:, :9] if n != "initial_state" else v) for n, v in x.items()}, "chunked", C,
                          read="anchor")
        rest = case.call({n: (v[:, 9:] if n != "initial_state" else first.final_state) for n, v in x.items()},
                         "reference", C, read="anchor")
        assert_close(torch.cat([first.o, rest.o], 1), ref.o, f"{name} mixed impl split")


def _carried_state(case, x, C, split):
    """The reference's state after `split` tokens (mid-chunk for split % C != 0), made a leaf."""
    first = case.call({n: (v[:, :split] if n != "initial_state" else v) for n, v in x.items()}, "reference", C)
    st = first.final_state
    return type(st)(*(t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in st))


@pytest.mark.parametrize("name", ["titans_linear", "dgd", "omega_rule"])
def test_gradients_into_a_carried_state(name):
    """Gradients reach every tensor of a carried (mid-chunk) state, identically in both impls."""
    case = CASES[name]
    C = 6
    x = case.inputs(B=2, T=30, seed=6)
    state = _carried_state(case, x, C, 9)
    rest = {n: (v[:, 9:] if n != "initial_state" else state) for n, v in x.items()}
    grads = []
    for impl in ("reference", "chunked"):
        r = case.call(rest, impl, C)
        gen = torch.Generator().manual_seed(7)
        outs = [r.o, *state_tensors(r.final_state)]
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in outs)
        grads.append(torch.autograd.grad(loss, state_tensors(state)))
    for a, b in zip(*grads):
        assert_close(a, b, f"{name}: d/d(carried state)", rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_gates_at_their_limits_are_exact_and_differentiable(impl):
    """Titans with eta = 0 (no momentum) and alpha = 1 (memory wiped every token), DGD with
    alpha = 0: segment products are cumulative products, not logs, so nothing is inf or nan."""
    case = CASES["titans_linear"]
    x = case.inputs(B=1, T=10, seed=8, requires_grad=True)
    x["eta"] = torch.zeros_like(x["eta"], requires_grad=True)
    x["alpha"] = torch.ones_like(x["alpha"], requires_grad=True)
    r = case.call(x, impl, 4)
    g = torch.autograd.grad(r.o.sum() + r.final_state.memory.sum(), list(case.grad_leaves(x).values()))
    assert all(t.isfinite().all() for t in g)
    case = CASES["dgd"]
    y = case.inputs(B=1, T=10, seed=8, requires_grad=True)
    y["alpha"] = torch.zeros_like(y["alpha"], requires_grad=True)
    r = case.call(y, impl, 4)
    g = torch.autograd.grad(r.o.sum(), list(case.grad_leaves(y).values()))
    assert all(t.isfinite().all() for t in g)
