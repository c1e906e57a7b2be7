"""mlp_memory: chunked == reference (outputs, states, gradients), exact streaming, batch invariance,
detached writes, and a cross-check of the depth-1 case against the matrix-memory DGD op."""
from __future__ import annotations

import itertools

import pytest
import torch

from nldsl.runtime.deep_memory import DeepMemoryState, decay_write, mlp_apply, mlp_memory
from rtdeep_helpers import DT, assert_close, grads, memory_inputs, requires_grad


def run(x, impl, *, retention=True, momentum=True, **kw):
    kw.setdefault("chunk_size", 5)
    return mlp_memory(
        x["q"], x["k"], x["v"], x["eta"],
        x["alpha"] if retention else None,
        x["beta"] if momentum else None,
        params=x["params"], impl=impl, output_final_state=True, **kw,
    )


CONFIGS = [
    dict(read=r, rule=u, momentum=m, retention=a, signal=s, objective=o)
    for r, u, (m, a), s, o in itertools.product(
        ("anchor", "running"), ("gd", "dgd"), ((False, False), (True, True), (False, True)),
        ("values", "self"), ("l2", "dot"),
    )
    if not (o == "dot" and (s == "self" or m is False and a is False))  # keep the grid small
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_chunked_matches_reference(cfg):
    x = memory_inputs(T=23, seed=1)
    for C in (1, 4, 16):
        ref = run(x, "reference", chunk_size=C, **cfg)
        fast = run(x, "chunked", chunk_size=C, **cfg)
        assert_close(fast.o, ref.o, what=f"o C={C}")
        assert_close(fast.final_state, ref.final_state, what=f"state C={C}")
        assert fast.final_state.offset == ref.final_state.offset == 23 % C


@pytest.mark.parametrize("objective, kw", [("l1", {}), ("lp", {"p": 1.5}), ("huber", {"delta": 0.3})])
@pytest.mark.parametrize("read", ["anchor", "running"])
def test_robust_objectives(objective, kw, read):
    """The Miras family's l1, lp and huber: the chunked writes (their derivatives at the output,
    composed from torch ops) equal the reference (torch.func.grad of the losses as written) in
    outputs, states and gradients, with DGD, momentum, retention and a split inside a chunk."""
    x = requires_grad(memory_inputs(T=13, seed=6))
    wrt = [x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"], x["params"]]
    for rule in ("gd", "dgd"):
        cfg = dict(read=read, rule=rule, objective=objective, chunk_size=4, **kw)
        ref, fast = run(x, "reference", **cfg), run(x, "chunked", **cfg)
        assert_close(fast, ref, what=f"{rule}")
        assert_close(grads(fast.o, wrt), grads(ref.o, wrt), what=f"{rule} grads")
        first = run({**x, **{n: x[n][:, :6] for n in ("q", "k", "v", "eta", "alpha", "beta")}}, "chunked", **cfg)
        second = mlp_memory(x["q"][:, 6:], x["k"][:, 6:], x["v"][:, 6:], x["eta"][:, 6:], x["alpha"][:, 6:],
                            x["beta"][:, 6:], impl="chunked", initial_state=first.final_state, **cfg)
        assert_close(torch.cat([first.o, second.o], 1), fast.o, what=f"{rule} split")
    with pytest.raises(ValueError, match="Triton kernel takes the l2 or dot"):
        run(x, "triton", objective=objective, **kw)


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("read", ["anchor", "running"])
def test_other_depths(depth, read):
    x = memory_inputs(T=17, seed=2, depth=depth)
    for rule in ("gd", "dgd"):
        ref = run(x, "reference", read=read, rule=rule, chunk_size=6, activation="silu")
        fast = run(x, "chunked", read=read, rule=rule, chunk_size=6, activation="silu")
        assert_close(fast, ref)


def test_sequence_shorter_than_chunk():
    x = memory_inputs(T=3, seed=3)
    for read in ("anchor", "running"):
        ref = run(x, "reference", read=read, rule="dgd", chunk_size=16)
        fast = run(x, "chunked", read=read, rule="dgd", chunk_size=16)
        assert_close(fast, ref)
        assert fast.final_state.offset == 3
        # no chunk boundary was crossed: the anchor is still the initial state
        assert_close(fast.final_state.anchor, [p.unsqueeze(0).expand(2, *p.shape) for p in x["params"]])
    # an anchor read inside the first chunk is the static MLP of the initial weights
    o = run(x, "chunked", read="anchor", chunk_size=16).o
    W = [p.unsqueeze(0) for p in x["params"]]            # [1, H, d_out, d_in]
    o_static = mlp_apply(W, x["q"].transpose(1, 2)).transpose(1, 2)
    assert_close(o, o_static)


@pytest.mark.parametrize("read", ["anchor", "running"])
@pytest.mark.parametrize("rule", ["gd", "dgd"])
def test_gradients_agree(read, rule):
    x = requires_grad(memory_inputs(T=13, seed=4))
    wrt = [x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"], x["params"]]
    for signal in ("values", "self"):
        ref = run(x, "reference", read=read, rule=rule, signal=signal, chunk_size=4)
        fast = run(x, "chunked", read=read, rule=rule, signal=signal, chunk_size=4)
        # through the outputs and through the carried state
        gr = grads(ref.o, wrt)
        gf = grads(fast.o, wrt)
        assert_close(gf, gr, atol=1e-9, what=f"grad o {signal}")
        assert all(g.abs().sum() > 0 for g in gf)  # every input reaches the output
        gr = grads(ref.final_state.weights[0], wrt)
        gf = grads(fast.final_state.weights[0], wrt)
        assert_close(gf, gr, atol=1e-9, what=f"grad state {signal}")


def test_gradcheck_chunked():
    x = memory_inputs(T=5, seed=5)
    small = {k: (v[:1] if k not in ("params",) else [p[:1] for p in v]) for k, v in x.items()}
    small = {k: (v[:, :, :1] if k in ("q", "k", "v", "eta", "alpha", "beta") else v) for k, v in small.items()}
    q, k, v, eta, alpha, beta = (small[n].clone().requires_grad_() for n in ("q", "k", "v", "eta", "alpha", "beta"))
    W = [p.clone().requires_grad_() for p in small["params"]]

    def f(k, eta, alpha, beta, W0, W1):
        return mlp_memory(q, k, v, eta, alpha, beta, params=[W0, W1], chunk_size=4, rule="dgd",
                          read="running", impl="chunked").o

    assert torch.autograd.gradcheck(f, (k, eta, alpha, beta, *W))



@pytest.mark.parametrize("momentum", [True, False])
def test_decay_write_is_its_formula_with_gradients(momentum):
    """The end-of-piece state update's hand-written backward, against autograd through
    ``A W + m M + left^T a`` in float64, to second order (outer gradients of a deep memory
    pass through it)."""
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=DT).requires_grad_()  # noqa: E731
    W, A, left, a = rnd(3, 4, 5), rnd(3, 1, 1), rnd(3, 6, 4), rnd(3, 6, 5)
    M, m = (rnd(3, 4, 5), rnd(3, 1, 1)) if momentum else (None, None)
    want = A * W + left.transpose(-1, -2) @ a + (m * M if momentum else 0)
    assert_close(decay_write(W, A, M, m, left, a), want)
    args = (W, A, M, m, left, a) if momentum else (W, A, left, a)
    f = (lambda W, A, M, m, left, a: decay_write(W, A, M, m, left, a)) if momentum else (  # noqa: E731
        lambda W, A, left, a: decay_write(W, A, None, None, left, a))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)
    # a scalar without a row axis (no retention gate) and inputs that need no gradient
    const = torch.tensor([[0.5]], dtype=DT)
    out = decay_write(W.detach(), const, None, None, left, a.detach())
    (d_left,) = torch.autograd.grad(out.square().sum(), [left])
    (want_left,) = torch.autograd.grad((0.5 * W.detach() + left.transpose(-1, -2) @ a.detach()).square().sum(), [left])
    assert_close(d_left, want_left)


SPLITS = [[23], [1, 22], [3, 2, 9, 9], [7, 1, 1, 14], [11, 12]]


@pytest.mark.parametrize("read", ["anchor", "running"])
@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_split_stream_equals_one_pass(read, impl):
    x = requires_grad(memory_inputs(T=23, seed=6))
    full = run(x, impl, read=read, rule="dgd", chunk_size=5)
    for splits in SPLITS:
        outs, state, t = [], None, 0
        for n in splits:
            sl = slice(t, t + n)
            o, state = mlp_memory(
                x["q"][:, sl], x["k"][:, sl], x["v"][:, sl], x["eta"][:, sl], x["alpha"][:, sl],
                x["beta"][:, sl], params=x["params"], chunk_size=5, read=read, rule="dgd",
                initial_state=state, output_final_state=True, impl=impl,
            )
            outs.append(o)
            t += n
        assert_close(torch.cat(outs, dim=1), full.o, what=str(splits))
        assert_close(state, full.final_state, what=str(splits))
        # and the gradients through the carried state are those of the one pass
        assert_close(grads(torch.cat(outs, 1), x["params"]), grads(full.o, x["params"]), atol=1e-9)


def test_split_mixes_implementations():
    x = memory_inputs(T=19, seed=7)
    full = run(x, "chunked", read="running", rule="dgd", chunk_size=6)
    a = mlp_memory(x["q"][:, :8], x["k"][:, :8], x["v"][:, :8], x["eta"][:, :8], x["alpha"][:, :8],
                   x["beta"][:, :8], params=x["params"], chunk_size=6, read="running", rule="dgd",
                   output_final_state=True, impl="reference")
    b = mlp_memory(x["q"][:, 8:], x["k"][:, 8:], x["v"][:, 8:], x["eta"][:, 8:], x["alpha"][:, 8:],
                   x["beta"][:, 8:], initial_state=a.final_state, chunk_size=6, read="running",
                   rule="dgd", output_final_state=True, impl="chunked")
    assert_close(torch.cat([a.o, b.o], 1), full.o)
    assert_close(b.final_state, full.final_state)


@pytest.mark.parametrize("per_batch", [False, True])
def test_batch_invariance(per_batch):
    x = memory_inputs(T=15, seed=8, per_batch_params=per_batch)
    full = run(x, "chunked", read="running", rule="dgd", chunk_size=4)
    for b in range(2):
        xb = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
        if per_batch:
            xb["params"] = [p[b:b + 1] for p in x["params"]]
        one = run(xb, "chunked", read="running", rule="dgd", chunk_size=4)
        assert_close(one.o, full.o[b:b + 1])
        assert_close([w[b:b + 1] for w in full.final_state.weights], one.final_state.weights)


def test_state_is_per_sequence():
    """Different sequences in the batch end in different fast weights (never a shared state)."""
    x = memory_inputs(T=10, seed=9)
    st = run(x, "chunked", chunk_size=3).final_state
    assert not torch.allclose(st.weights[0][0], st.weights[0][1])
    assert all(not isinstance(w, torch.nn.Parameter) for w in st.weights)


@pytest.mark.parametrize("read", ["anchor", "running"])
def test_detach(read):
    x = requires_grad(memory_inputs(T=12, seed=10))
    live = run(x, "chunked", read=read, rule="dgd", chunk_size=4)
    for impl in ("chunked", "reference"):
        det = run(x, impl, read=read, rule="dgd", chunk_size=4, detach=True)
        assert_close(det.o, live.o)                       # same values
        gq, gk, gv, geta, galpha, gbeta, *gW = grads(
            det.o, [x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"], x["params"]])
        for g in (gk, gv, geta, galpha, gbeta):           # no gradient through any write
            assert torch.count_nonzero(g) == 0
        assert gq.abs().sum() > 0
        # first order: the initial weights get the gradient of the reads, as if W_t = W_0 + const
        gW_live = grads(live.o, x["params"])
        assert all(g.abs().sum() > 0 for g in gW)
        assert not all(torch.allclose(a, b) for a, b in zip(gW, gW_live))
        if impl == "chunked":
            gW_chunked = gW
        else:
            assert_close(gW, gW_chunked)
        # the final state carries no graph back into the inputs
        assert not det.final_state.weights[0].requires_grad
    # detached initial weights: no gradient reaches them at all
    params = [p.detach() for p in x["params"]]
    o = mlp_memory(x["q"], x["k"], x["v"], x["eta"], params=params, chunk_size=4, detach=True).o
    assert o.requires_grad  # through q only


def test_depth1_equals_matrix_dgd_op():
    """A depth-1, non-residual, identity memory with rule=dgd is the matrix memory of
    nldsl.runtime.dgd (state S = W^T): an independent implementation of Eq. 93."""
    from nldsl.runtime.dgd import dgd

    x = memory_inputs(T=21, seed=11, depth=1)
    W0 = x["params"][0]                                  # [H, V, K]
    S0 = W0.transpose(-1, -2).unsqueeze(0).expand(2, *W0.shape).contiguous()
    for read in ("anchor", "running"):
        for C in (1, 5):
            o = mlp_memory(x["q"], x["k"], x["v"], x["eta"], x["alpha"], params=[W0], chunk_size=C,
                           rule="dgd", read=read, residual=False, activation="identity").o
            if C == 1 and read == "anchor":
                continue  # the matrix op's C=1 "anchor" read is the same state; covered by C=5
            o2 = dgd(x["q"], x["k"], x["v"], x["eta"], x["alpha"], scale=1.0, initial_state=S0,
                     chunk_size=C, read=read).o
            assert_close(o, o2, what=f"{read} C={C}")


def test_low_precision_keeps_fp32_state():
    x = memory_inputs(T=9, seed=12)
    xb = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else [p.float() for p in v])
          for k, v in x.items()}
    o, st = run(xb, "chunked", read="running", rule="dgd", chunk_size=4)
    assert o.dtype == torch.bfloat16
    assert st.weights[0].dtype == torch.float32
    o64 = run(x, "chunked", read="running", rule="dgd", chunk_size=4).o
    assert (o.to(DT) - o64).abs().max() < 0.1


def test_errors():
    x = memory_inputs(T=4, seed=13)
    with pytest.raises(ValueError, match="valid impl"):
        run(x, "fused")
    with pytest.raises(ValueError, match="read"):
        run(x, "chunked", read="later")
    with pytest.raises(ValueError, match="initial weights"):
        mlp_memory(x["q"], x["k"], x["v"], 0.1, chunk_size=2)
    bad = DeepMemoryState(tuple(x["params"]), tuple(x["params"]), None, 7)
    with pytest.raises(ValueError, match="offset"):
        mlp_memory(x["q"], x["k"], x["v"], 0.1, chunk_size=2, initial_state=bad)
    with pytest.raises(ValueError, match="input dim"):
        mlp_memory(x["q"], x["k"], x["v"], 0.1, chunk_size=2, params=list(reversed(x["params"])))


@pytest.mark.parametrize("read", ["anchor", "running"])
@pytest.mark.parametrize("rule", ["gd", "dgd"])
def test_hidden_norm_matches_reference_with_gradients(read, rule):
    """``hidden_norm="l2"``: the closed-form backward through the normalised hidden layer (and
    the running read's coefficient form) equals torch.func's gradient of the same MLP."""
    x = requires_grad(memory_inputs(T=13, seed=14, depth=3))
    wrt = [x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"], x["params"]]
    ref = run(x, "reference", read=read, rule=rule, chunk_size=4, hidden_norm="l2")
    fast = run(x, "chunked", read=read, rule=rule, chunk_size=4, hidden_norm="l2")
    assert_close(fast, ref)
    assert_close(grads(fast.o, wrt), grads(ref.o, wrt), atol=1e-9)


def test_hidden_norm_bounds_the_layer_inputs():
    """Every hidden activation has unit norm, so scaling the input-side weights changes nothing
    downstream of the normalisation (a read at the initial weights is scale invariant)."""
    x = memory_inputs(T=6, seed=15)
    W0, W1 = x["params"]
    o1 = run(x, "chunked", chunk_size=16, hidden_norm="l2", activation="relu").o
    x2 = dict(x, params=[W0 * 7.0, W1])
    o2 = run(x2, "chunked", chunk_size=16, hidden_norm="l2", activation="relu").o
    assert_close(o1, o2)  # relu is positively homogeneous: norm(relu(7 h)) = norm(relu(h))
    with pytest.raises(ValueError, match="hidden_norm"):
        run(x, "chunked", hidden_norm="layer")


def _omega_inputs(T, seed, **kw):
    """Each token's gradient is applied up to `window` times: steps a third of the usual keep the
    memory bounded with windows of 3-4."""
    x = memory_inputs(T=T, seed=seed, **kw)
    x["eta"] = x["eta"] / 3
    return x


@pytest.mark.parametrize("read", ["anchor", "running"])
@pytest.mark.parametrize("momentum", [False, True])
def test_omega_rule_matches_reference(read, momentum):
    """The Omega rule (NL Eq. 68 with Atlas' gradient at the anchor): each step sums the gradients
    of its window's tokens, those before the chunk included, all taken at the chunk's anchor. The
    chunked path (the window's band in the coefficients) equals the token loop (torch.func.grad per
    window token) in outputs, states and gradients, also on a robust objective; window 1 is the
    gd rule."""
    x = requires_grad(_omega_inputs(T=19, seed=21))
    wrt = [x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"], x["params"]]
    for C in (1, 4, 16):
        for signal in ("values", "self"):
            cfg = dict(read=read, momentum=momentum, rule="omega", window=3, chunk_size=C, signal=signal)
            ref, fast = run(x, "reference", **cfg), run(x, "chunked", **cfg)
            assert_close(fast, ref, what=f"C={C} {signal}")
            if C == 4:
                assert_close(grads(fast.o, wrt), grads(ref.o, wrt), what=f"grads {signal}")
    robust = dict(read=read, momentum=momentum, rule="omega", window=3, chunk_size=4, objective="lp", p=1.5)
    assert_close(run(x, "chunked", **robust), run(x, "reference", **robust), what="lp")
    gd = dict(read=read, momentum=momentum, chunk_size=4)
    assert_close(run(x, "chunked", rule="omega", window=1, **gd).o, run(x, "chunked", rule="gd", **gd).o)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_omega_split_stream_equals_one_pass(impl):
    """The window's last tokens travel in the state (``DeepMemoryState.window``): a stream split
    anywhere, inside a chunk or inside a window, is one pass, gradients included."""
    x = requires_grad(_omega_inputs(T=23, seed=22))
    cfg = dict(chunk_size=5, read="running", rule="omega", window=4, impl=impl, output_final_state=True)
    full = mlp_memory(x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"], params=x["params"], **cfg)
    for splits in SPLITS:
        outs, state, t = [], None, 0
        for n in splits:
            sl = slice(t, t + n)
            o, state = mlp_memory(x["q"][:, sl], x["k"][:, sl], x["v"][:, sl], x["eta"][:, sl], x["alpha"][:, sl],
                                  x["beta"][:, sl], params=x["params"], initial_state=state, **cfg)
            outs.append(o)
            t += n
        assert_close(torch.cat(outs, dim=1), full.o, what=str(splits))
        assert_close(state, full.final_state, what=str(splits))
        assert_close(grads(torch.cat(outs, 1), x["params"]), grads(full.o, x["params"]), atol=1e-9)
    assert [tuple(t.shape) for t in full.final_state.window] == [(2, 3, 2, 8), (2, 3, 2, 8), (2, 3, 2)]


def test_omega_depth1_equals_linear_omega_op():
    """A depth-1, non-residual, identity memory under the Omega rule at chunk 1 is the matrix
    memory of nldsl.runtime.omega_rule (state S = W^T), an independent implementation (the erase
    engine's triangular systems over the window's virtual tokens)."""
    from nldsl.runtime.omega import omega_rule

    x = _omega_inputs(T=21, seed=23, depth=1)
    W0 = x["params"][0]
    S0 = W0.transpose(-1, -2).unsqueeze(0).expand(2, *W0.shape).contiguous()
    for window in (2, 5):
        o = mlp_memory(x["q"], x["k"], x["v"], x["eta"], x["alpha"], params=[W0], chunk_size=1, rule="omega",
                       window=window, read="running", residual=False, activation="identity").o
        o2 = omega_rule(x["q"], x["k"], x["v"], x["eta"], x["alpha"], window=window, scale=1.0, initial_state=S0).o
        assert_close(o, o2, what=f"window {window}")


def test_omega_errors():
    x = _omega_inputs(T=6, seed=24)
    with pytest.raises(ValueError, match="window=3 is the Omega rule's"):
        run(x, "chunked", rule="gd", window=3)
    with pytest.raises(ValueError, match="Triton kernel takes one token a step"):
        run(x, "triton", rule="omega", window=3)
    plain = run(x, "chunked", chunk_size=4).final_state
    with pytest.raises(ValueError, match="pass them with window=3"):
        run(x, "chunked", chunk_size=4, rule="omega", window=3, initial_state=plain)
    windowed = run(x, "chunked", chunk_size=4, rule="omega", window=3).final_state
    with pytest.raises(ValueError, match=r"initial_state.window keys must have shape \(2, 1, 2, 8\)"):
        run(x, "chunked", chunk_size=4, rule="omega", window=2, initial_state=windowed)
