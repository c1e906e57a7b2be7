"""group_read (the anchor read of stacked generating memories, one autograd function) equals
the composed ops it replaces, values and every input's gradient, in float64; both
implementations, the C kernel and the torch ops (the ``impl`` fixture)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from nldsl.runtime._group_read import group_read
from nldsl.runtime.deep_memory import mlp_forward
from rtdeep_helpers import gen, randn

N, L, D, Hd = 3, 5, 6, 4


def composed(weights, x, *, act, residual, names, units, logits, eta_max, eta_bias, alpha_bias):
    out = mlp_forward(weights, x, act, residual)[0]
    res = []
    for j, (n, unit, z) in enumerate(zip(names, units, logits)):
        rows = out[j * N:(j + 1) * N]
        if n in ("eta", "alpha"):
            pre = rows[..., 0] if z is None else rows[..., 0] + z
            res.append(eta_max * torch.sigmoid(pre + eta_bias) if n == "eta" else torch.sigmoid(pre + alpha_bias))
        else:
            res.append(F.normalize(rows, dim=-1) if unit else rows)
    return res


def case(seed, names, *, act, mask, tensor_gates, logits_on, zero_row=False):
    g = gen(seed)
    G = len(names)
    W1, W2 = randn(g, G * N, Hd, D, scale=0.6), randn(g, G * N, D, Hd, scale=0.6)
    for j, n in enumerate(names):  # a scalar memory's output matrix is zero-padded to D rows
        if n in ("eta", "alpha"):
            W2[j * N:(j + 1) * N, 1:] = 0
    x = randn(g, G * N, L, D)
    if zero_row:  # M_k reads x itself, and one k row is tiny: F.normalize clamps its norm
        W1[:N, :, :] = 0
        x[:N, 0] *= 1e-14
    vec = [n not in ("eta", "alpha") for n in names]
    residual = torch.tensor(vec, dtype=torch.float64).repeat_interleave(N) if mask else all(vec)
    scalar = lambda v: torch.tensor(v, dtype=torch.float64) if tensor_gates else v  # noqa: E731
    kw = dict(act=act, residual=residual, names=names, units=[n != "v" for n in names],
              logits=[randn(g, N, L) if (logits_on and n in ("eta", "alpha")) else None for n in names],
              eta_max=scalar(0.3), eta_bias=scalar(0.2), alpha_bias=scalar(2.0))
    return [W1, W2], x, kw


@pytest.mark.parametrize("act,mask,tensor_gates,logits_on",
                         list(itertools.product(("gelu+l2", "silu"), (True, False), (True, False), (True, False))))
def test_group_read_equals_composed_with_gradients(impl, act, mask, tensor_gates, logits_on):
    names = ("k", "v", "q", "eta", "alpha") if mask else ("k", "v", "q")
    ws, x, kw = case(0, names, act=act, mask=mask, tensor_gates=tensor_gates, logits_on=logits_on,
                     zero_row=not tensor_gates)
    leaves = ws + [x] + [z for z in kw["logits"] if z is not None]
    if tensor_gates:
        leaves += [kw["eta_max"], kw["eta_bias"], kw["alpha_bias"]]
    for t in leaves:
        t.requires_grad_(True)
    got, want = group_read(ws, x, **kw), composed(ws, x, **kw)
    assert type(got[0].grad_fn).__name__ == ("_NativeGroupReadBackward" if impl == "native" else "_GroupReadBackward")
    probes = [torch.randn_like(t) for t in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # every output's gradient, and some outputs without one (None gradients)
    for used in (range(len(names)), range(0, len(names), 2)):
        ga = torch.autograd.grad(sum((got[i] * probes[i]).sum() for i in used), leaves, retain_graph=True,
                                 allow_unused=True)
        gb = torch.autograd.grad(sum((want[i] * probes[i]).sum() for i in used), leaves, retain_graph=True,
                                 allow_unused=True)
        for a, b in zip(ga, gb):
            if b is None:
                assert a is None or not a.abs().any()
            else:
                torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_group_read_gradcheck(impl):
    ws, x, kw = case(1, ("k", "eta", "v", "alpha"), act="gelu+l2", mask=True, tensor_gates=True, logits_on=True)
    kw["residual"] = kw["residual"].detach()
    leaves = ws + [x, kw["eta_bias"], kw["alpha_bias"]]
    for t in leaves:
        t.requires_grad_(True)

    def f(W1, W2, x, eb, ab):
        return tuple(group_read([W1, W2], x, **{**kw, "eta_bias": eb, "alpha_bias": ab}))
    assert torch.autograd.gradcheck(f, tuple(leaves))


def test_the_c_kernel_equals_the_torch_ops_in_float32_at_hopes_sizes(monkeypatch):
    """At Hope's sizes (five memories of 16 rows, 32 wide, 8 tokens, an L2-normalised GELU, a
    residual mask), where the kernel's products run in whole vectors and its float32 activation is
    its own: outputs and every gradient against the torch ops to float32's precision."""
    g = gen(3)
    names = ("k", "v", "q", "eta", "alpha")
    n, length, width = 16, 8, 32
    W1, W2 = randn(g, 5 * n, width, width, scale=0.3), randn(g, 5 * n, width, width, scale=0.3)
    W2[3 * n:, 1:] = 0  # the scalar memories' output rows
    x = randn(g, 5 * n, length, width)
    logits = [None, None, None, randn(g, n, length), randn(g, n, length)]
    kw = dict(act="gelu+l2", residual=torch.tensor([1.0, 1, 1, 0, 0]).repeat_interleave(n), names=names,
              units=[True, False, True, False, False], eta_max=0.125, eta_bias=0.0,
              alpha_bias=torch.tensor(2.0))
    probes = [randn(g, n, length, width) if i < 3 else randn(g, n, length) for i in range(5)]
    results = []
    for native in ("1", "0"):
        monkeypatch.setenv("NLDSL_NATIVE", native)
        leaves = [t.float().requires_grad_() for t in (W1, W2, x, logits[3], logits[4], kw["alpha_bias"])]
        outs = group_read(leaves[:2], leaves[2], **{**kw, "logits": [None, None, None, *leaves[3:5]],
                                                    "residual": kw["residual"].float(), "alpha_bias": leaves[5]})
        assert type(outs[0].grad_fn).__name__ == ("_NativeGroupReadBackward" if native == "1" else "_GroupReadBackward")
        grads = torch.autograd.grad(sum((o * p.float()).sum() for o, p in zip(outs, probes)), leaves)
        results.append([t.double() for t in (*outs, *grads)])
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"result {i}: {m}")


def test_the_c_kernel_gives_the_same_bits_on_any_thread_count(monkeypatch):
    """The C kernel splits its rows over torch's threads: outputs and gradients are bit for bit
    the same on 1, 2 and 3 threads (an odd split of the rows included)."""
    monkeypatch.setenv("NLDSL_NATIVE", "1")
    g = gen(5)
    names = ("k", "v", "q", "eta", "alpha")
    n, length, width = 7, 5, 6
    W1, W2 = randn(g, 5 * n, width, width, scale=0.3), randn(g, 5 * n, width, width, scale=0.3)
    x = randn(g, 5 * n, length, width)
    logits = [randn(g, n, length), randn(g, n, length)]
    probes = [randn(g, n, length, width) if i < 3 else randn(g, n, length) for i in range(5)]
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        leaves = [t.clone().requires_grad_() for t in (W1, W2, x, *logits)]
        mask = torch.tensor([1.0, 1, 1, 0, 0], dtype=x.dtype).repeat_interleave(n)
        outs = group_read(leaves[:2], leaves[2], act="gelu+l2", residual=mask, names=names,
                          units=[True, False, True, False, False], logits=[None, None, None, *leaves[3:]],
                          eta_max=0.125, eta_bias=0.0, alpha_bias=1.0)
        assert type(outs[0].grad_fn).__name__ == "_NativeGroupReadBackward"
        grads = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outs, probes)), leaves)
        results.append([*outs, *grads])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
