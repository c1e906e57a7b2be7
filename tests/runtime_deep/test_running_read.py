"""The running read of a piece of a two-layer memory (hand-written backward) against the same
formulas composed from torch ops and differentiated by autograd, in float64: the output and
every input's gradient, over the configurations chunk_step runs it in; and gradcheck."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from nldsl.runtime._activations import hidden
from nldsl.runtime._mlp_write import ReadCoefficients
from nldsl.runtime._running_read import running_read
from nldsl.runtime.deep_memory import hidden_act
from rtdeep_helpers import DT, assert_close, gen, rand, randn

N, L, D, HID = 3, 5, 6, 7


def piece(seed, *, momentum, dgd):
    g = gen(seed)
    x = dict(
        q=F.normalize(randn(g, N, L, D), dim=-1),
        ws=[randn(g, N, HID, D, scale=0.4), randn(g, N, D, HID, scale=0.4)],
        ms=[randn(g, N, HID, D, scale=0.1), randn(g, N, D, HID, scale=0.1)] if momentum else None,
        k=F.normalize(randn(g, N, L, D), dim=-1),
        Sk=randn(g, N, L, HID, scale=0.5),
        U1=randn(g, N, L, HID, scale=0.3), U2=randn(g, N, L, D, scale=0.3),
        hs=randn(g, N, L, HID, scale=0.3) if dgd else None,
        rc=ReadCoefficients(A=rand(g, N, L, lo=0.5, hi=1.0), Da=rand(g, N, L, L, lo=0.0, hi=1.0).tril(),
                            c=rand(g, N, L, L, lo=-0.5, hi=0.5).tril(),
                            m=rand(g, N, L, lo=0.0, hi=0.6) if momentum else None),
    )
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
