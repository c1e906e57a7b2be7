"""mlp_memory with Newton-Schulz steps (Muon as the inner optimizer, Atlas Eq. 32-33): the batched
iteration equals the optimizer's per-matrix one, one token from a fresh momentum is its closed
form, chunked == the token loop (reads, momentum, chunks, depths, signals, the Omega rule,
gradients), and a split stream equals one pass."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nldsl.optim.newton_schulz import DEFAULT_COEFFICIENTS, orthogonalize
from nldsl.runtime._preconditioned import orthogonalize_batch
from nldsl.runtime.deep_memory import mlp_memory
from rtdeep_helpers import DT, assert_close, gen, grads, memory_inputs, randn, requires_grad

NS = (5, DEFAULT_COEFFICIENTS)


def run(x, impl, *, momentum=True, retention=True, **kw):
    kw.setdefault("chunk_size", 5)
    kw.setdefault("precondition", NS)
    return mlp_memory(x["q"], x["k"], x["v"], x["eta"], x["alpha"] if retention else None,
                      x["beta"] if momentum else None, params=x["params"], impl=impl,
                      output_final_state=True, **kw)


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4), (1, 6)])
def test_batched_iteration_is_the_optimizers_per_matrix(shape):
    g = gen(0)
    x = randn(g, 7, *shape)
    for steps, coefficients in ((5, DEFAULT_COEFFICIENTS), (3, (2.0, -1.5, 0.5))):
        want = torch.stack([orthogonalize(m, steps=steps, coefficients=coefficients, dtype=DT) for m in x])
        assert_close(orthogonalize_batch(x, steps, coefficients), want, atol=1e-12)


def test_one_token_is_the_closed_form():
    """From a fresh momentum: W_1 = alpha W_0 + eta NS(-grad), the gradient of
    0.5 ||x + W_2 gelu(W_1 k) - v||^2 by autograd, NS the optimizer's iteration per matrix."""
    x = memory_inputs(T=1, seed=3)
    out = run(x, "chunked", chunk_size=4)
    for b in range(x["k"].shape[0]):
        for h in range(x["k"].shape[2]):
            W1, W2 = (w[h].clone().requires_grad_(True) for w in x["params"])
            k, v = x["k"][b, 0, h], x["v"][b, 0, h]
            y = k + W2 @ F.gelu(W1 @ k)
            g1, g2 = torch.autograd.grad(0.5 * ((y - v) ** 2).sum(), (W1, W2))
            eta, alpha = x["eta"][b, 0, h], x["alpha"][b, 0, h]
            for W, g, got in zip((W1, W2), (g1, g2), out.final_state.weights):
                want = alpha * W.detach() + eta * orthogonalize(-g, dtype=DT)
                assert_close(got[b, h], want, atol=1e-12)


@pytest.mark.parametrize("read", ["anchor", "running"])
@pytest.mark.parametrize("momentum, retention", [(True, True), (False, True), (True, False)])
def test_chunked_matches_reference(read, momentum, retention):
    x = memory_inputs(T=17, seed=4)
    for C in (1, 4, 16):
        ref = run(x, "reference", read=read, momentum=momentum, retention=retention, chunk_size=C)
        fast = run(x, "chunked", read=read, momentum=momentum, retention=retention, chunk_size=C)
        assert_close(fast.o, ref.o, what=f"o C={C}")
        assert_close(fast.final_state, ref.final_state, what=f"state C={C}")
    plain = run(x, "chunked", read=read, momentum=momentum, retention=retention, precondition=None)
    assert (plain.o - fast.o).abs().max() > 1e-3  # the preconditioner does something


@pytest.mark.parametrize("depth, signal, objective", [(1, "values", "l2"), (3, "values", "huber"),
                                                     (2, "self", "l2"), (2, "values", "dot")])
def test_depths_signals_objectives_with_gradients(depth, signal, objective):
    x = requires_grad(memory_inputs(T=11, seed=5, depth=depth))
    wrt = [x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"], x["params"]]
    for read in ("anchor", "running"):
        ref = run(x, "reference", read=read, signal=signal, objective=objective, chunk_size=4)
        fast = run(x, "chunked", read=read, signal=signal, objective=objective, chunk_size=4)
        assert_close(fast.o, ref.o, what=read)
        assert_close(grads(fast.o, wrt), grads(ref.o, wrt), atol=1e-9, what=f"{read} grads")


def test_split_stream_equals_one_pass():
    x = requires_grad(memory_inputs(T=19, seed=6))
    full = run(x, "chunked", read="running")
    outs, state, t = [], None, 0
    for n in (3, 9, 7):
        sl = slice(t, t + n)
        o, state = mlp_memory(x["q"][:, sl], x["k"][:, sl], x["v"][:, sl], x["eta"][:, sl], x["alpha"][:, sl],
                              x["beta"][:, sl], params=x["params"], chunk_size=5, read="running",
                              precondition=NS, initial_state=state, output_final_state=True)
        outs.append(o)
        t += n
    assert_close(torch.cat(outs, 1), full.o)
    assert_close(state, full.final_state)
    assert_close(grads(torch.cat(outs, 1), x["params"]), grads(full.o, x["params"]), atol=1e-9)


def test_errors():
    x = memory_inputs(T=4, seed=7)
    with pytest.raises(ValueError, match="takes rule 'gd' or 'omega', not 'dgd'"):
        run(x, "chunked", rule="dgd")
    with pytest.raises(ValueError, match="Triton kernel computes plain steps"):
        run(x, "triton")
    with pytest.raises(ValueError, match=r"precondition must be \(steps, \(a, b, c\)\)"):
        run(x, "chunked", precondition=5)
    with pytest.raises(ValueError, match=r"steps >= 0"):
        run(x, "chunked", precondition=(-1, DEFAULT_COEFFICIENTS))


def test_detached_writes_match_reference():
    """`writes detached`: the steps are constants for autograd, the reads' straight-through
    terms carry the outer gradient to the initial weights (as without a preconditioner)."""
    x = requires_grad(memory_inputs(T=9, seed=8))
    for read in ("anchor", "running"):
        ref = run(x, "reference", read=read, detach=True, chunk_size=4)
        fast = run(x, "chunked", read=read, detach=True, chunk_size=4)
        assert_close(fast.o, ref.o, what=read)
        assert_close(grads(fast.o, x["params"]), grads(ref.o, x["params"]), atol=1e-9, what=read)


@pytest.mark.parametrize("read", ["anchor", "running"])
def test_omega_rule_matches_reference_with_gradients(read):
    """Atlas proper: each step orthogonalises the momentum of its window's summed gradients (the
    window's tokens before a chunk taken at the chunk's anchor too); window 1 is rule gd."""
    x = requires_grad(memory_inputs(T=14, seed=10))
    wrt = [x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"], x["params"]]
    for C in (1, 4, 16):
        ref = run(x, "reference", read=read, rule="omega", window=3, chunk_size=C)
        fast = run(x, "chunked", read=read, rule="omega", window=3, chunk_size=C)
        assert_close(fast, ref, what=f"C={C}")
    assert_close(grads(fast.o, wrt), grads(ref.o, wrt), atol=1e-9)
    assert_close(run(x, "chunked", read=read, rule="omega", window=1).o, run(x, "chunked", read=read).o)


def test_omega_rule_split_stream_equals_one_pass():
    x = memory_inputs(T=17, seed=11)
    full = run(x, "chunked", read="running", rule="omega", window=4)
    outs, state, t = [], None, 0
    for n in (2, 8, 7):  # splits inside chunks and inside the window
        sl = slice(t, t + n)
        o, state = mlp_memory(x["q"][:, sl], x["k"][:, sl], x["v"][:, sl], x["eta"][:, sl], x["alpha"][:, sl],
                              x["beta"][:, sl], params=x["params"], chunk_size=5, read="running", rule="omega",
                              window=4, precondition=NS, initial_state=state, output_final_state=True)
        outs.append(o)
        t += n
    assert_close(torch.cat(outs, 1), full.o)
    assert_close(state, full.final_state)
