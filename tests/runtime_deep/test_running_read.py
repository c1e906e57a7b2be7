"""The running read of a piece of a two-layer memory (hand-written backward) against the same
formulas composed from torch ops and differentiated by autograd, in float64: the output and
every input's gradient, over the configurations chunk_step runs it in; and gradcheck. Its C
kernel against the torch ops (float64 with gradients, gradcheck, float32 at Hope's sizes, the
same bits on any thread count)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from nldsl.runtime._activations import hidden
from nldsl.runtime._mlp_write import ReadCoefficients, _read_coefficients
from nldsl.runtime._running_read import running_read
from nldsl.runtime.deep_memory import hidden_act
from rtdeep_helpers import DT, assert_close, gen, rand, randn

N, L, D, HID = 3, 5, 6, 7


def terms(g, *, momentum, dgd, n=N, length=L, d=D, hid=HID) -> dict:
    """A piece's queries, weights and write terms (everything a read takes but its coefficients)."""
    return dict(
        q=F.normalize(randn(g, n, length, d), dim=-1),
        ws=[randn(g, n, hid, d, scale=0.4), randn(g, n, d, hid, scale=0.4)],
        ms=[randn(g, n, hid, d, scale=0.1), randn(g, n, d, hid, scale=0.1)] if momentum else None,
        k=F.normalize(randn(g, n, length, d), dim=-1),
        Sk=randn(g, n, length, hid, scale=0.5),
        U1=randn(g, n, length, hid, scale=0.3), U2=randn(g, n, length, d, scale=0.3),
        hs=randn(g, n, length, hid, scale=0.3) if dgd else None,
    )


def piece(seed, *, momentum, dgd):
    g = gen(seed)
    x = terms(g, momentum=momentum, dgd=dgd)
    x["rc"] = ReadCoefficients(A=rand(g, N, L, lo=0.5, hi=1.0), Da=rand(g, N, L, L, lo=0.0, hi=1.0).tril(),
                               c=rand(g, N, L, L, lo=-0.5, hi=0.5).tril(),
                               m=rand(g, N, L, lo=0.0, hi=0.6) if momentum else None)
    return x


def leaves_of(x):
    out = [x["q"], *x["ws"], *(x["ms"] or []), x["k"], x["Sk"], x["U1"], x["U2"]]
    return out + [t for t in (x["hs"], *x["rc"]) if t is not None]


def composed(x, act, residual):
    """The read of chunk_step's composed path: per layer, the entering weights and momentum
    scaled per token plus every write term weighted by its coefficient."""
    rc, z = x["rc"], x["q"]
    ins = [x["k"], x["Sk"]]
    pairs = [[(rc.c, x["U1"])] + ([(rc.Da, x["hs"])] if x["hs"] is not None else []), [(rc.c, x["U2"])]]
    for i, a in enumerate(ins):
        pre = rc.A.unsqueeze(-1) * (z @ x["ws"][i].transpose(-1, -2))
        za = z @ a.transpose(-1, -2)
        for coef, left in pairs[i]:
            pre = pre + (coef * za) @ left
        if x["ms"] is not None:
            pre = pre + rc.m.unsqueeze(-1) * (z @ x["ms"][i].transpose(-1, -2))
        z = hidden(pre, act) if i == 0 else pre
    r = residual.view(-1, 1, 1) if isinstance(residual, torch.Tensor) else float(residual)
    return z + r * x["q"]


CASES = list(itertools.product((False, True), (False, True)))


@pytest.mark.parametrize("momentum,dgd", CASES)
def test_running_read_equals_composed_with_gradients(momentum, dgd):
    seed = CASES.index((momentum, dgd))
    for act, norm, residual in (("gelu", "l2", True), ("silu", "none", False), ("tanh", "l2", "mask")):
        x = piece(seed, momentum=momentum, dgd=dgd)
        leaves = leaves_of(x)
        for t in leaves:
            t.requires_grad_(True)
        res = torch.tensor([1.0, 0.0, 1.0], dtype=DT) if residual == "mask" else residual
        a = hidden_act(norm, act)
        fused = running_read(x["q"], x["ws"], x["ms"], x["k"], x["Sk"], x["U1"], x["U2"], x["hs"], x["rc"],
                             act=a, residual=res)
        ref = composed(x, a, res)
        what = f"{act}+{norm} residual={residual}"
        assert_close(fused, ref, what=what)
        w = randn(gen(seed + 1), *fused.shape)
        got = torch.autograd.grad((fused * w).sum(), leaves, allow_unused=True)
        want = torch.autograd.grad((ref * w).sum(), leaves, allow_unused=True)
        for i, (g1, g2) in enumerate(zip(got, want)):
            if g1 is None or g2 is None:  # Da without DGD's erase: read by neither
                assert g1 is None and g2 is None and not dgd, f"{what} leaf {i}"
                continue
            torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-9, msg=lambda m: f"{what} leaf {i}: {m}")


def test_running_read_gradcheck():
    x = piece(5, momentum=True, dgd=True)
    res = torch.tensor([1.0, 0.0, 1.0], dtype=DT)

    def f(q, W1, W2, M1, M2, k, Sk, U1, U2, hs, A, Da, c, m):
        return running_read(q, (W1, W2), (M1, M2), k, Sk, U1, U2, hs, ReadCoefficients(A, Da, c, m),
                            act=hidden_act("l2", "gelu"), residual=res)

    leaves = [t.clone().requires_grad_() for t in leaves_of(x)]
    assert len(leaves) == 14
    assert torch.autograd.gradcheck(f, leaves)


def test_shared_coefficients_get_both_gradients():
    """Without momentum the write and erase coefficients are one tensor (c is Da): both uses
    reach it."""
    x = piece(9, momentum=False, dgd=True)
    shared = x["rc"].Da.clone().requires_grad_()
    x["rc"] = x["rc"]._replace(c=shared, Da=shared)
    a = hidden_act("l2", "gelu")
    args = (x["q"], x["ws"], x["ms"], x["k"], x["Sk"], x["U1"], x["U2"], x["hs"], x["rc"])
    (g1,) = torch.autograd.grad(running_read(*args, act=a, residual=True).sum(), shared)
    (g2,) = torch.autograd.grad(composed(x, a, True).sum(), shared)
    assert_close(g1, g2)


def segment_piece(seed, *, momentum, dgd, n=N, length=L, d=D, hid=HID):
    """A piece whose read coefficients are views of segment products ``Pa``, ``C`` (``[n, L+1,
    L+1]``, as the write's C kernel returns them; C only with momentum, else c is Da): what the
    read's C kernel takes."""
    g = gen(seed)
    x = terms(g, momentum=momentum, dgd=dgd, n=n, length=length, d=d, hid=hid)
    Pa = rand(g, n, length + 1, length + 1, lo=0.0, hi=1.0)
    C = rand(g, n, length + 1, length + 1, lo=-0.5, hi=0.5) if momentum else None
    m = rand(g, n, length, lo=0.0, hi=0.6) if momentum else None
    x["segments"] = (Pa, C, m)
    return x


def read_of(x, leaves, act, residual):
    """running_read on ``leaves`` (those of :func:`segment_leaves`), its coefficients views of them."""
    it = iter(leaves)
    q, W1, W2 = next(it), next(it), next(it)
    ms = (next(it), next(it)) if x["ms"] is not None else None
    k, Sk, U1, U2 = next(it), next(it), next(it), next(it)
    hs = next(it) if x["hs"] is not None else None
    Pa = next(it)
    C, m = (next(it), next(it)) if x["ms"] is not None else (None, None)
    rc = _read_coefficients(Pa, C, m)
    return running_read(q, (W1, W2), ms, k, Sk, U1, U2, hs, rc, act=act, residual=residual)


def segment_leaves(x, dtype=DT):
    Pa, C, m = x["segments"]
    out = [x["q"], *x["ws"], *(x["ms"] or []), x["k"], x["Sk"], x["U1"], x["U2"], x["hs"], Pa, C, m]
    return [t.to(dtype).clone().requires_grad_() for t in out if t is not None]


@pytest.mark.parametrize("momentum,dgd", CASES)
def test_the_c_kernel_equals_the_torch_ops_with_gradients(monkeypatch, momentum, dgd):
    """The read's C kernel (on the write's segment products, their gradients in place) against
    the torch ops on the views of them, in float64: the output and every gradient."""
    seed = 20 + CASES.index((momentum, dgd))
    for act, norm, residual in (("gelu", "l2", True), ("silu", "none", False), ("tanh", "l2", "mask")):
        x = segment_piece(seed, momentum=momentum, dgd=dgd)
        res = torch.tensor([1.0, 0.0, 1.0], dtype=DT) if residual == "mask" else residual
        a = hidden_act(norm, act)
        results = []
        for native in ("1", "0"):
            monkeypatch.setenv("NLDSL_NATIVE", native)
            leaves = segment_leaves(x)
            o = read_of(x, leaves, a, res)
            name = type(o.grad_fn).__name__
            assert name == ("_NativeRunningReadBackward" if native == "1" else "_RunningReadBackward"), name
            w = randn(gen(seed + 1), *o.shape)
            results.append([o, *torch.autograd.grad((o * w).sum(), leaves)])
        for i, (got, want) in enumerate(zip(*results)):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9,
                                       msg=lambda msg: f"{act}+{norm} residual={residual} result {i}: {msg}")


def test_the_c_kernel_gradcheck(monkeypatch):
    monkeypatch.setenv("NLDSL_NATIVE", "1")
    x = segment_piece(31, momentum=True, dgd=True)
    res = torch.tensor([1.0, 0.0, 1.0], dtype=DT)
    leaves = segment_leaves(x)
    assert type(read_of(x, leaves, hidden_act("l2", "gelu"), res).grad_fn).__name__ == "_NativeRunningReadBackward"
    assert torch.autograd.gradcheck(lambda *t: read_of(x, t, hidden_act("l2", "gelu"), res), tuple(leaves))


def test_the_c_kernel_in_float32_at_hopes_sizes_and_on_any_thread_count(monkeypatch):
    """At Hope's main memory (16 rows, 32 tokens, 32 wide, momentum, DGD, an L2-normalised GELU):
    float32 against the torch ops to float32's precision, and the same bits on 1, 2 and 3 threads."""
    x = segment_piece(33, momentum=True, dgd=True, n=16, length=32, d=32, hid=32)
    a = hidden_act("l2", "gelu")
    results = {}
    for native, threads in (("0", 1), ("1", 1), ("1", 2), ("1", 3)):
        monkeypatch.setenv("NLDSL_NATIVE", native)
        torch.set_num_threads(threads)
        leaves = segment_leaves(x, torch.float32)
        o = read_of(x, leaves, a, True)
        w = randn(gen(34), *o.shape).float()
        results[native, threads] = [o, *torch.autograd.grad((o * w).sum(), leaves)]
    for i, (got, want) in enumerate(zip(results["1", 1], results["0", 1])):
        torch.testing.assert_close(got.double(), want.double(), atol=2e-5, rtol=1e-4, msg=lambda m: f"result {i}: {m}")
    for threads in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(results["1", 1], results["1", threads]))
