"""The fused write of a two-layer memory (hand-written backward) against the same piece composed
from torch ops and differentiated by autograd, in float64: every output and every input's
gradient, over the configurations chunk_step runs it in; and gradcheck of the function alone.
Both implementations of the fused write: the C kernel (``_mlp_write.c``, what a CPU runs) and the
torch ops (``_MlpWrite``, what a GPU runs, and a CPU with ``NLDSL_NATIVE=0``)."""
from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch
import torch.nn.functional as F

from nldsl.runtime._mlp_write import Coefficients, mlp_write, piece_coefficients
from nldsl.runtime.deep_memory import composed_write, hidden_act, piece_gates
from rtdeep_helpers import DT, assert_close, gen, rand, randn

N, L, D, HID = 4, 5, 6, 7


def piece(seed, *, momentum, retention, mid_chunk, signal, N=N, L=L, D=D, HID=HID):
    g = gen(seed)
    w = [randn(g, N, HID, D, scale=0.4), randn(g, N, D, HID, scale=0.4)]
    x = dict(
        ws=w,
        anchor=[randn(g, N, HID, D, scale=0.4), randn(g, N, D, HID, scale=0.4)] if mid_chunk else w,
        ms=[randn(g, N, HID, D, scale=0.1), randn(g, N, D, HID, scale=0.1)] if momentum else None,
        k=F.normalize(randn(g, N, L, D), dim=-1),
        v=randn(g, N, L, D) if signal == "values" else F.normalize(randn(g, N, L, D), dim=-1),
        eta=rand(g, N, L, lo=0.05, hi=0.4),
        alpha=rand(g, N, L, lo=0.7, hi=1.0) if retention else None,
        beta=rand(g, N, L, lo=0.0, hi=0.8) if momentum else None,
    )
    return x


def composed_coefficients(g, dgd: bool) -> Coefficients:
    """mlp_write's coefficients taken from the gates composed by autograd (``piece_gates``)."""
    end = lambda x: None if x is None else x[..., -1]  # noqa: E731  (the piece's last step)
    row = lambda x: None if x is None else x[..., -1, :]  # noqa: E731
    return Coefficients(
        A=end(g.A), cl=row(g.c), mL=end(g.m), bL=end(g.Bv), bl=row(g.Db),
        dl=row(g.Da) if dgd else None, p0=g.Pa[..., :-1, 0] if dgd else None,
        Pp=g.Pa[..., :-1, 1:] if dgd else None, Cp=g.c_prev if dgd else None, mp=g.m_prev if dgd else None)


def leaves_of(x):
    out = [*x["ws"], *x["anchor"]] if x["anchor"] is not x["ws"] else [*x["ws"]]
    out += [*(x["ms"] or []), x["k"], x["v"], x["eta"]]
    return out + [t for t in (x["alpha"], x["beta"]) if t is not None]


def coefficients(rc) -> list:
    """A running read's coefficients (not the segment products the C kernel's are views of)."""
    return [t for t in (rc.A, rc.Da, rc.c, rc.m) if t is not None]


def both(x, residual, **cfg):
    """(fused, composed) results: the end state and what a running read takes from the piece (its
    gate coefficients included; the fused write makes them from alpha and beta, the composed
    write takes them from ``piece_gates``)."""
    results = []
    g = piece_gates(x["alpha"], x["beta"], L, x["k"], momentum=x["ms"] is not None)
    read_ref = [g.A, g.Da, g.c] + ([g.m] if x["ms"] is not None else [])
    for fused in (True, False):
        args = (x["ws"], x["ms"], x["anchor"], x["k"], x["v"], x["eta"])
        if fused:
            ws, ms, U1, U2, hs, Sk, rc = mlp_write(*args, x["alpha"], x["beta"], residual=residual, read=True, **cfg)
            lefts = [U1, U2] + ([hs] if hs is not None else [])
            read = coefficients(rc)
        else:
            ins, pairs, ws, ms = composed_write(*args, g, residual=residual, kernel=None, **cfg)
            Sk = ins[1]
            lefts = [pairs[0][0][1], pairs[1][0][1]] + ([pairs[0][1][1]] if len(pairs[0]) > 1 else [])
            read = [t.expand_as(f) for t, f in zip(read_ref, results[0][-len(read_ref):])]
        results.append(list(ws) + list(ms or []) + lefts + [Sk] + read)
    return results


CASES = list(itertools.product(
    ("gd", "dgd"), (False, True), (False, True), (False, True), ("values", "self"), ("l2", "dot")))


@pytest.mark.parametrize("rule,momentum,retention,mid_chunk,signal,objective", CASES)
def test_fused_write_equals_composed_with_gradients(impl, rule, momentum, retention, mid_chunk, signal, objective):
    seed = CASES.index((rule, momentum, retention, mid_chunk, signal, objective))
    for act, norm, residual in (("gelu", "l2", True), ("silu", "none", False), ("tanh", "l2", "mask")):
        x = piece(seed, momentum=momentum, retention=retention, mid_chunk=mid_chunk, signal=signal)
        for t in leaves_of(x):
            t.requires_grad_(True)
        res = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=DT) if residual == "mask" else residual
        cfg = dict(objective=objective, signal=signal, rule=rule, act=hidden_act(norm, act))
        fused, composed = both(x, res, **cfg)
        what = f"{act}+{norm} residual={residual}"
        assert_close(fused, composed, what=what)
        # a random projection of every output (one left out: a None gradient reaches the write)
        g = gen(seed + 1)
        ws = [randn(g, *t.shape) for t in fused]
        ws[len(ws) // 2] = None
        leaves = leaves_of(x)
        grads = [torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, ws) if w is not None), leaves,
                                     allow_unused=True) for outs in (fused, composed)]
        for i, (a, b) in enumerate(zip(*grads)):
            if a is None or b is None:
                assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0), f"{what} leaf {i}"
            else:
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=lambda m: f"{what} leaf {i}: {m}")


@pytest.mark.parametrize("norm", ["none", "l2"])
def test_fused_write_gradcheck(impl, norm):
    """Both hand-written backwards (the gate coefficients' and the write's) against finite
    differences (momentum, DGD, self-generated targets, a residual mask, a piece that starts
    after its anchor)."""
    x = piece(7, momentum=True, retention=True, mid_chunk=True, signal="self")
    res = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=DT)

    def f(*leaves):
        ws, anchor, ms = list(leaves[0:2]), list(leaves[2:4]), list(leaves[4:6])
        k, v, eta, alpha, beta = leaves[6:]
        out = mlp_write(ws, ms, anchor, k, v, eta, alpha, beta, objective="l2", signal="self",
                        rule="dgd", act=hidden_act(norm, "gelu"), residual=res, read=True)
        return (*out[0], *out[1], *out[2:6], *coefficients(out[6]))

    leaves = [t.clone().requires_grad_() for t in leaves_of(x)]
    assert len(leaves) == 11
    assert torch.autograd.gradcheck(f, leaves)


def _write(x, L, dtype, res, **cfg):
    """mlp_write's outputs (flattened) for the piece ``x``, in ``dtype``."""
    x = {n: None if t is None else ([w.to(dtype) for w in t] if isinstance(t, list) else t.to(dtype))
         for n, t in x.items()}
    ws, ms, *rest, rc = mlp_write(x["ws"], x["ms"], x["anchor"] if x["anchor"] is not None else x["ws"], x["k"],
                                  x["v"], x["eta"], x["alpha"], x["beta"], residual=res, read=True, **cfg)
    return [*ws, *(ms or []), *(t for t in rest if t is not None), *coefficients(rc)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rule,momentum,mid_chunk,signal", list(itertools.product(
    ("gd", "dgd"), (False, True), (False, True), ("values", "self"))))
def test_native_write_equals_torch_ops_at_vector_widths(monkeypatch, dtype, rule, momentum, mid_chunk, signal):
    """The C kernel against the torch ops at widths its products run in whole vectors and in
    4-row blocks (the cases above run its scalar tails): float64 to 1e-10, and float32 at Hope's
    sizes (32 wide, 8 tokens, a residual mask) to float32's precision; outputs and gradients.
    One case runs a piece longer than its widths (L x L temporaries larger than width x width)."""
    wide = dtype == torch.float64
    n, l, d, hid = (6, 5, 16, 24) if wide else (10, 8, 32, 32)
    if rule == "dgd" and mid_chunk and momentum:  # and a piece longer than the widths (demo sizes)
        n, l, d, hid = (3, 12, 4, 3) if wide else (3, 32, 4, 4)
    x = piece(3, momentum=momentum, retention=True, mid_chunk=mid_chunk, signal=signal, N=n, L=l, D=d, HID=hid)
    res = (torch.arange(n) % 3 != 2).to(DT)
    cfg = dict(objective="l2", signal=signal, rule=rule, act=hidden_act("l2", "gelu"))
    leaves = leaves_of(x)
    for t in leaves:
        t.requires_grad_(True)
    results = []
    for native in ("1", "0"):
        monkeypatch.setenv("NLDSL_NATIVE", native)
        out = _write(x, l, dtype, res.to(dtype), **cfg)
        ran = type(out[0].grad_fn).__name__
        assert ran == ("_NativeMlpWriteBackward" if native == "1" else "_MlpWriteBackward"), ran
        ws = [randn(gen(5 + i), *t.shape).to(dtype) for i, t in enumerate(out)]
        grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, ws)), leaves)
        results.append([t.double() for t in out] + list(grads))
    tol = dict(atol=1e-10, rtol=1e-9) if wide else dict(atol=2e-5, rtol=1e-4)
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("dgd,read", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("gates", ["alpha", "beta", "both"])
def test_piece_coefficients_equal_composed_gates_with_gradients(dgd, read, gates):
    """The gate coefficients with their written-out backward against the segment products
    composed by autograd, gates exactly 0 and 1 included."""
    g = gen(11)
    alpha = rand(g, N, L, lo=0.3, hi=1.0) if gates != "beta" else None
    beta = rand(g, N, L, lo=0.0, hi=0.9) if gates != "alpha" else None
    for t in (alpha, beta):
        if t is not None:
            t[0, 2], t[1, 0], t[2, L - 1] = 0.0, 1.0, 0.0
            t.requires_grad_(True)
    like = torch.zeros(N, L, D, dtype=DT)
    coef, rc = piece_coefficients(alpha, beta, L, like, dgd=dgd, read=read)
    ref = piece_gates(alpha, beta, L, like, momentum=beta is not None)
    want = composed_coefficients(ref, dgd)
    got = [(name, a, b) for name, a, b in zip(coef._fields, coef, want) if b is not None]
    assert all(a is not None for _, a, _ in got) and sum(a is not None for a in coef) == len(got)
    if read:
        got += [("read A", rc.A, ref.A), ("read Da", rc.Da, ref.Da), ("read c", rc.c, ref.c)]
        if beta is not None:
            got.append(("read m", rc.m, ref.m))
    for name, a, b in got:
        torch.testing.assert_close(a, b.expand_as(a), atol=1e-12, rtol=1e-12, msg=lambda m: f"{name}: {m}")
    leaves = [t for t in (alpha, beta) if t is not None]
    ws = [randn(g, *a.shape) for _, a, _ in got]
    mine = torch.autograd.grad(sum((a * w).sum() for (_, a, _), w in zip(got, ws)), leaves)
    theirs = torch.autograd.grad(sum((b * w).sum() for (_, _, b), w in zip(got, ws)), leaves)
    assert_close(list(mine), list(theirs), atol=1e-12)


def test_piece_coefficients_gradcheck():
    g = gen(12)
    alpha = rand(g, 3, 4, lo=0.2, hi=1.0).requires_grad_()
    beta = rand(g, 3, 4, lo=0.1, hi=0.9).requires_grad_()
    like = torch.zeros(3, 4, 2, dtype=DT)
    assert torch.autograd.gradcheck(
        lambda a, b: tuple(t for part in piece_coefficients(a, b, 4, like, dgd=True, read=True) for t in part
                           if t is not None),
        (alpha, beta))


@pytest.mark.parametrize("backward", [False, True])
def test_a_write_leaves_no_reference_cycle(impl, backward):
    """Once the caller drops the outputs, reference counting frees them and the graph. A tensor
    kept on the function's ctx that is (or views) an output ties the node and the output in a
    cycle that only the cyclic collector frees, which seldom runs while a training step allocates
    few Python objects and much tensor memory (the demo reached 12 GB after 360 steps)."""
    x = piece(31, momentum=True, retention=True, mid_chunk=False, signal="self")
    for t in leaves_of(x):
        t.requires_grad_(True)
    gc.collect()
    gc.disable()
    try:
        ws, ms, *rest, rc = mlp_write(x["ws"], x["ms"], x["anchor"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"],
                                      objective="l2", signal="self", rule="dgd", act=hidden_act("l2", "gelu"),
                                      residual=True, read=True)
        out = [*ws, *ms, *rest, *coefficients(rc)]
        probes = [weakref.ref(t) for t in out]
        if backward:
            sum(t.sum() for t in out).backward()
        del out, ws, ms, rest, rc
        assert all(p() is None for p in probes)
    finally:
        gc.enable()


@pytest.mark.parametrize("momentum,signal", [(True, "self"), (False, "values")])
def test_inputs_shared_by_groups_of_rows_equal_their_copies(impl, momentum, signal):
    """Stacked memories (self-modifying Titans' generating memories) write on common inputs: k,
    v, eta, alpha, beta with N / G rows, row r of the memories reading row r mod N / G. The same
    as the inputs repeated G times, outputs and gradients (the shared rows' summed over the
    groups; the C kernel reads and sums them in place, the torch ops repeat them)."""
    G, n = 3, 2
    x = piece(41, momentum=momentum, retention=True, mid_chunk=True, signal=signal, N=G * n)
    shared = {name: (None if x[name] is None else x[name][:n].clone()) for name in ("k", "v", "eta", "alpha", "beta")}
    results = []
    for repeat in (False, True):
        ins = {name: None if t is None else t.clone().requires_grad_() for name, t in shared.items()}
        given = {name: None if t is None else (t.repeat(G, *([1] * (t.dim() - 1))) if repeat else t)
                 for name, t in ins.items()}
        out = mlp_write(x["ws"], x["ms"], x["anchor"], given["k"], given["v"], given["eta"], given["alpha"],
                        given["beta"], objective="l2", signal=signal, rule="dgd", act=hidden_act("l2", "gelu"),
                        residual=True)
        flat = [*out[0], *(out[1] or []), *(t for t in out[2:6] if t is not None)]
        probes = [randn(gen(7 + i), *t.shape) for i, t in enumerate(flat)]
        leaves = [t for t in ins.values() if t is not None]
        grads = torch.autograd.grad(sum((o * p).sum() for o, p in zip(flat, probes)), leaves)
        results.append(flat + list(grads))
    assert_close(results[0], results[1])


def test_inputs_shared_by_rows_must_divide_them(impl):
    x = piece(42, momentum=False, retention=False, mid_chunk=False, signal="self", N=5)
    with pytest.raises(ValueError, match="2 rows of inputs cannot be shared by 5 memory rows"):
        mlp_write(x["ws"], None, x["ws"], x["k"][:2], x["v"][:2], x["eta"][:2], None, None, objective="l2",
                  signal="self", rule="dgd", act="gelu", residual=True)


@pytest.mark.parametrize("dtype", [torch.float32, DT], ids=["float32", "float64"])
def test_the_c_kernel_gives_the_same_bits_on_any_thread_count(monkeypatch, dtype):
    """The C kernel splits its rows over torch's threads, and every row whose k, v, ... are shared
    runs on the thread that sums their gradients: outputs and gradients are bit for bit the same
    on 1, 2 and 3 threads (an odd split of the rows included)."""
    monkeypatch.setenv("NLDSL_NATIVE", "1")
    G, n = 3, 5
    x = piece(43, momentum=True, retention=True, mid_chunk=True, signal="self", N=G * n)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        ws, ms, anchor = ([t.to(dtype).detach().requires_grad_() for t in x[name]] for name in ("ws", "ms", "anchor"))
        shared = [x[name][:n].to(dtype).detach().requires_grad_() for name in ("k", "v", "eta", "alpha", "beta")]
        out = mlp_write(ws, ms, anchor, *shared, objective="l2", signal="self", rule="dgd",
                        act=hidden_act("l2", "gelu"), residual=True, read=True)
        assert type(out[0][0].grad_fn).__name__ == "_NativeMlpWriteBackward"
        flat = [*out[0], *out[1], *(t for t in out[2:6] if t is not None), *(t for t in out[6] if t is not None)]
        loss = sum((o * randn(gen(7 + i), *o.shape).to(dtype)).sum() for i, o in enumerate(flat))
        results.append(flat + list(torch.autograd.grad(loss, [*ws, *ms, *anchor, *shared])))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
