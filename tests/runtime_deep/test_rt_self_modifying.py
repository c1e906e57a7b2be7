"""self_modifying_titans: chunked == reference (both chunk sizes, static/generated inputs, both
read modes), gradients, exact streaming with the convolution's state, batch invariance, detach."""
from __future__ import annotations

import gc
import io
import itertools

import pytest
import torch
import torch.nn.functional as F

from nldsl.nn.model import map_state
from nldsl.runtime.self_modifying import GENERATED as GEN
from nldsl.runtime.conv import causal_conv1d
from nldsl.runtime.self_modifying import _STACKS, _valid_stacks, self_modifying_titans
from rtdeep_helpers import B, D, H, HID, assert_close, gen, grads, rand, randn, requires_grad, selfmod_params


def inputs(T, seed=0, generated=("k", "v", "q", "eta", "alpha"), Bn=B):
    g = gen(seed)
    x = {
        "x": randn(g, Bn, T, H, D),
        "params": selfmod_params(g, generated),
        "conv": randn(g, H, D, 4, scale=0.5),
        "beta": rand(g, Bn, T, H, lo=0.0, hi=0.6),
        "static": {
            "q": randn(g, Bn, T, H, D), "k": randn(g, Bn, T, H, D), "v": randn(g, Bn, T, H, D),
            "eta_logits": randn(g, Bn, T, H), "alpha_logits": randn(g, Bn, T, H),
        },
    }
    return x


def run(x, impl, *, momentum=True, chunk_size=4, gen_chunk_size=3, **kw):
    static = {}
    for n, key in (("k", "k"), ("v", "v"), ("q", "q"), ("eta", "eta_logits"), ("alpha", "alpha_logits")):
        if n not in x["params"] and not (n == "alpha" and kw.get("retention", True) is False):
            static[key] = x["static"][key]
    return self_modifying_titans(
        x["x"], params=x["params"], chunk_size=chunk_size, gen_chunk_size=gen_chunk_size,
        beta_momentum=x["beta"] if momentum else None, eta_max=0.05, alpha_bias=3.0,
        conv_weight=x["conv"], impl=impl, output_final_state=True, **static, **kw,
    )


@pytest.mark.parametrize(
    "read,rule,momentum", list(itertools.product(("anchor", "running"), ("dgd", "gd"), (True, False)))
)
def test_chunked_matches_reference(read, rule, momentum):
    x = inputs(T=19)
    for Cm, Cg in ((1, 1), (4, 3), (8, 2), (32, 32)):
        ref = run(x, "reference", read=read, rule=rule, momentum=momentum, chunk_size=Cm, gen_chunk_size=Cg)
        fast = run(x, "chunked", read=read, rule=rule, momentum=momentum, chunk_size=Cm, gen_chunk_size=Cg)
        assert_close(fast.o, ref.o, what=f"o {Cm},{Cg}")
        assert_close(fast.final_state, ref.final_state, what=f"state {Cm},{Cg}")
        assert (fast.final_state.offset_gen, fast.final_state.offset_memory) == (19 % Cg, 19 % Cm)


@pytest.mark.parametrize("objective, kw", [("l1", {}), ("lp", {"p": 1.5}), ("huber", {"delta": 0.3})])
def test_robust_objectives(objective, kw):
    """The Miras family's objectives for every memory of self-modifying Titans: the chunked writes
    (composed from torch ops, the objective's derivative at each output) equal the reference
    (torch.func.grad of the losses as written) in outputs, states and gradients, and a split
    stream is one pass."""
    x = requires_grad(inputs(T=13, seed=9))
    wrt = [x["x"], x["conv"], x["beta"], x["params"]]
    for read, rule in (("anchor", "dgd"), ("running", "gd")):
        cfg = dict(read=read, rule=rule, objective=objective, chunk_size=4, gen_chunk_size=3, **kw)
        ref, fast = run(x, "reference", **cfg), run(x, "chunked", **cfg)
        assert_close(fast, ref, what=f"{read} {rule}")
        assert_close(grads(fast.o, wrt), grads(ref.o, wrt), atol=1e-9, what=f"{read} {rule} grads")
    cfg = dict(read="running", objective=objective, chunk_size=4, gen_chunk_size=3, **kw)
    full = run(x, "chunked", **cfg)
    first = run({**x, "x": x["x"][:, :6], "beta": x["beta"][:, :6]}, "chunked", **cfg)
    second = run({**x, "x": x["x"][:, 6:], "beta": x["beta"][:, 6:]}, "chunked", initial_state=first.final_state,
                 **cfg)
    assert_close(torch.cat([first.o, second.o], 1), full.o, what="split")
    with pytest.raises(ValueError, match="Triton kernel takes the l2 or dot"):
        run(x, "triton", objective=objective, **kw)


@pytest.mark.parametrize("generated", [("k", "v", "eta", "alpha"), ("v",), ("k", "q", "eta"), ()])
def test_static_inputs(generated):
    x = inputs(T=13, seed=1, generated=generated)
    for retention in (True, False):
        if not retention and "alpha" in generated:
            continue
        ref = run(x, "reference", retention=retention, read="running")
        fast = run(x, "chunked", retention=retention, read="running")
        assert_close(fast, ref)


def test_gradients_agree():
    x = requires_grad(inputs(T=11, seed=2))
    eta_bias = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    wrt = [x["x"], x["conv"], x["beta"], x["params"], eta_bias]
    for read in ("anchor", "running"):
        ref = run(x, "reference", read=read, eta_bias=eta_bias)
        fast = run(x, "chunked", read=read, eta_bias=eta_bias)
        g_fast = grads(fast.o, wrt)
        assert_close(g_fast, grads(ref.o, wrt), atol=1e-9, what=read)
        assert all(g.abs().sum() > 0 for g in g_fast)      # every memory's initial state is meta-learned
        w_state = [x["params"]["k"], x["params"]["alpha"]]
        assert_close(grads(fast.final_state.weights["memory"][0], w_state),
                     grads(ref.final_state.weights["memory"][0], w_state), atol=1e-9)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_split_stream_equals_one_pass(impl):
    x = inputs(T=21, seed=3)
    full = run(x, impl, chunk_size=6, gen_chunk_size=4)
    for splits in ([1, 20], [5, 2, 9, 5], [10, 11]):
        outs, state, t = [], None, 0
        for n in splits:
            sl = slice(t, t + n)
            o, state = self_modifying_titans(
                x["x"][:, sl], params=x["params"], chunk_size=6, gen_chunk_size=4,
                beta_momentum=x["beta"][:, sl], eta_max=0.05, alpha_bias=3.0, conv_weight=x["conv"],
                initial_state=state, output_final_state=True, impl=impl,
            )
            outs.append(o)
            t += n
        assert_close(torch.cat(outs, 1), full.o, what=str(splits))
        assert_close(state, full.final_state, what=str(splits))



def _continue(x, state, sl, impl="chunked"):
    return self_modifying_titans(
        x["x"][:, sl], params=x["params"], chunk_size=6, gen_chunk_size=4, beta_momentum=x["beta"][:, sl],
        eta_max=0.05, alpha_bias=3.0, conv_weight=x["conv"], initial_state=state, output_final_state=True,
        impl=impl)


def test_split_stream_gradients_equal_one_pass():
    """A continuing call runs on the stacks the previous one left (no re-stacking); the
    gradients through them equal those of one pass."""
    x = requires_grad(inputs(T=21, seed=3))
    wrt = [x["x"], x["params"], x["beta"]]
    full = run(x, "chunked", chunk_size=6, gen_chunk_size=4)
    first = _continue(x, None, slice(0, 9))
    assert _valid_stacks(first.final_state, GEN, torch.float64, B * H) is not None
    second = _continue(x, first.final_state, slice(9, 21))
    loss = lambda o: (o * torch.linspace(-1, 1, o.shape[1], dtype=o.dtype)[None, :, None, None]).sum()  # noqa: E731
    assert_close(grads(loss(torch.cat([first.o, second.o], 1)), wrt), grads(loss(full.o), wrt), atol=1e-9)


def test_an_edited_or_detached_state_is_restacked():
    """The stacks stand for the state only while its tensors are the ones they were made with."""
    x = inputs(T=21, seed=4)
    state = _continue(x, None, slice(0, 9)).final_state
    edited = state._replace(weights={**state.weights, "v": tuple(W * 1.5 for W in state.weights["v"])})
    detached = map_state(state, lambda t: t.detach())
    assert _valid_stacks(edited, GEN, torch.float64, B * H) is None
    assert _valid_stacks(detached, GEN, torch.float64, B * H) is None
    assert _valid_stacks(state, GEN, torch.float32, B * H) is None          # another compute dtype
    rest = slice(9, 21)
    assert_close(_continue(x, edited, rest).o, _continue(x, edited, rest, "reference").o)
    assert not torch.allclose(_continue(x, edited, rest).o, _continue(x, state, rest).o)
    buf = io.BytesIO()  # the state carries nothing extra: it saves and loads, and continues the same
    torch.save(state, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert _valid_stacks(loaded, GEN, torch.float64, B * H) is None
    assert_close(_continue(x, loaded, rest).o, _continue(x, state, rest).o, atol=0, rtol=0)


def test_stacks_go_with_their_state():
    """The stacks are kept by the state's first tensor, weakly: freeing the state frees them."""
    x = requires_grad(inputs(T=13, seed=5))
    gc.collect()
    gc.disable()  # reference counting alone must free them (a cycle would wait for the collector)
    try:
        before = len(_STACKS)
        state = _continue(x, None, slice(0, 13)).final_state
        assert len(_STACKS) == before + 1
        del state
        assert len(_STACKS) == before
    finally:
        gc.enable()

def test_batch_invariance():
    x = inputs(T=12, seed=4)
    full = run(x, "chunked")
    for b in range(2):
        xb = dict(x, x=x["x"][b:b + 1], beta=x["beta"][b:b + 1])
        one = run(xb, "chunked")
        assert_close(one.o, full.o[b:b + 1])
        assert_close(one.final_state.weights["k"], [w[b:b + 1] for w in full.final_state.weights["k"]])


def test_first_token_is_the_initial_memory():
    """Read-before-write: token 0 reads M_memory,0(q_0) with q_0 = M_q,0(conv(x)_0) normalised."""
    x = inputs(T=5, seed=5)
    o = run(x, "chunked").o
    xc, _ = causal_conv1d(x["x"], x["conv"])
    W2, W1 = x["params"]["q"]
    z = xc[:, 0]                                            # [B, H, D]
    q0 = z + torch.einsum("hdj,bhj->bhd", W1, F.gelu(torch.einsum("hjd,bhd->bhj", W2, z)))
    q0 = F.normalize(q0, dim=-1)
    M2, M1 = x["params"]["memory"]
    y0 = q0 + torch.einsum("hdj,bhj->bhd", M1, F.gelu(torch.einsum("hjd,bhd->bhj", M2, q0)))
    assert_close(o[:, 0], y0)


def test_detach():
    x = requires_grad(inputs(T=10, seed=7))
    live = run(x, "chunked")
    for impl in ("chunked", "reference"):
        det = run(x, impl, detach=True)
        assert_close(det.o, live.o)
        p = x["params"]
        g_k, g_eta, g_mem, g_q, g_beta = (grads(det.o, [t]) for t in (p["k"], p["eta"], p["memory"], p["q"], x["beta"]))
        for g in g_k + g_eta + g_beta:                      # only used by writes: no gradient
            assert torch.count_nonzero(g) == 0
        for g in g_mem + g_q:                              # the output path, straight through
            assert g.abs().sum() > 0


def test_errors():
    x = inputs(T=4, seed=8)
    with pytest.raises(ValueError, match="exactly one source"):
        self_modifying_titans(x["x"], params=x["params"], chunk_size=2, gen_chunk_size=2, q=x["static"]["q"])
    params = {k: v for k, v in x["params"].items() if k != "k"}
    with pytest.raises(ValueError, match="exactly one source"):
        self_modifying_titans(x["x"], params=params, chunk_size=2, gen_chunk_size=2)
    with pytest.raises(ValueError, match="valid impl"):
        run(x, "fused")


def test_memories_of_different_widths():
    """M_memory wider than the generating memories (two stacks inside the chunked path)."""
    x = inputs(T=14, seed=9)
    g = gen(10)
    x["params"]["memory"] = (randn(g, H, 24, D, scale=0.15), randn(g, H, D, 24, scale=0.15))
    x["params"]["eta"] = (randn(g, H, 12, D, scale=0.15), randn(g, H, 1, 12, scale=0.15))
    for read in ("anchor", "running"):
        assert_close(run(x, "chunked", read=read), run(x, "reference", read=read))


def test_v_norm_and_hidden_norm_match_reference_with_gradients():
    """The stabilising options (unit values, unit hidden activations) keep chunked == reference,
    gradients included, and do change the result."""
    x = requires_grad(inputs(T=11, seed=7))
    wrt = [x["x"], x["conv"], x["beta"], x["params"]]
    for read in ("anchor", "running"):
        ref = run(x, "reference", read=read, v_norm=True, hidden_norm="l2")
        fast = run(x, "chunked", read=read, v_norm=True, hidden_norm="l2")
        assert_close(fast, ref)
        assert_close(grads(fast.o, wrt), grads(ref.o, wrt), atol=1e-9, what=read)
    plain = run(x, "chunked", read="anchor")
    assert (plain.o - run(x, "chunked", read="anchor", v_norm=True).o).abs().max() > 1e-6


def per_memory_inputs(T, seed, generated=("k", "v", "q", "eta", "alpha")):
    """One input (and convolution) per generating memory: x [B, T, G, H, D], conv [G, H, D, 4]."""
    x = inputs(T, seed=seed, generated=generated)
    g = gen(seed + 100)
    G = len(generated)
    return dict(x, x=randn(g, B, T, G, H, D), conv=randn(g, G, H, D, 4, scale=0.5))


def test_per_memory_inputs_match_reference_with_gradients():
    x = requires_grad(per_memory_inputs(T=13, seed=11))
    wrt = [x["x"], x["conv"], x["params"]]
    for read in ("anchor", "running"):
        ref = run(x, "reference", read=read, chunk_size=4, gen_chunk_size=3)
        fast = run(x, "chunked", read=read, chunk_size=4, gen_chunk_size=3)
        assert_close(fast, ref, what=read)
        assert_close(grads(fast.o, wrt), grads(ref.o, wrt), atol=1e-9, what=read)
    assert fast.final_state.conv.shape == (B, 3, 5, H, D)


def test_per_memory_inputs_are_routed_by_name():
    """Token 0 reads M_memory,0(q_0), q_0 = M_q,0(conv(x_q)_0): only q's input reaches it, and the
    closed form holds; the same input repeated G times equals the shared-input form."""
    x = per_memory_inputs(T=5, seed=12, generated=("k", "v", "q"))
    o = run(x, "chunked", retention=False).o
    xc, _ = causal_conv1d(x["x"], x["conv"])
    W2, W1 = x["params"]["q"]
    z = xc[:, 0, 2]                                          # q is the third generated input
    q0 = F.normalize(z + torch.einsum("hdj,bhj->bhd", W1, F.gelu(torch.einsum("hjd,bhd->bhj", W2, z))), dim=-1)
    M2, M1 = x["params"]["memory"]
    assert_close(o[:, 0], q0 + torch.einsum("hdj,bhj->bhd", M1, F.gelu(torch.einsum("hjd,bhd->bhj", M2, q0))))
    bumped = x["x"].clone()
    bumped[:, :, 0] += 1.0                                   # k's input: written, not read at token 0
    o2 = run(dict(x, x=bumped), "chunked", retention=False).o
    assert_close(o2[:, 0], o[:, 0])
    assert (o2 - o).abs().max() > 1e-6
    shared = run(dict(x, x=x["x"][:, :, 0], conv=x["conv"][0]), "chunked", retention=False)
    same = dict(x, x=x["x"][:, :, :1].expand(-1, -1, 3, -1, -1), conv=x["conv"][:1].expand(3, -1, -1, -1))
    assert_close(run(same, "chunked", retention=False).o, shared.o)


def test_per_memory_inputs_stream_and_errors():
    x = per_memory_inputs(T=15, seed=13)
    full = run(x, "chunked", chunk_size=6, gen_chunk_size=4)
    outs, state = [], None
    for sl in (slice(0, 7), slice(7, 15)):
        o, state = self_modifying_titans(
            x["x"][:, sl], params=x["params"], chunk_size=6, gen_chunk_size=4, beta_momentum=x["beta"][:, sl],
            eta_max=0.05, alpha_bias=3.0, conv_weight=x["conv"], initial_state=state, output_final_state=True)
        outs.append(o)
    assert_close(torch.cat(outs, 1), full.o)
    with pytest.raises(ValueError, match="per-memory inputs"):
        run(dict(x, x=x["x"][:, :, :4], conv=x["conv"][:4]), "chunked")
    with pytest.raises(ValueError, match="conv_weight must be"):
        run(dict(x, conv=x["conv"][0]), "chunked")


def test_generated_gates_add_static_logits():
    """M_eta / M_alpha generated and static logits given too: the logits add to the memories'
    outputs (chunked == reference, gradients to both); zero logits change nothing."""
    x = requires_grad(inputs(T=13, seed=14))
    logits = {n: x["static"][n] for n in ("eta_logits", "alpha_logits")}
    kw = dict(chunk_size=4, gen_chunk_size=3, **logits)
    ref, fast = run(x, "reference", **kw), run(x, "chunked", **kw)
    assert_close(fast, ref)
    wrt = [x["params"]["eta"], x["static"]["eta_logits"], x["static"]["alpha_logits"]]
    g = grads(fast.o, wrt)
    assert_close(g, grads(ref.o, wrt), atol=1e-9)
    assert all(t.abs().sum() > 0 for t in g)
    zero = {n: torch.zeros_like(t) for n, t in logits.items()}
    assert_close(run(x, "chunked", chunk_size=4, gen_chunk_size=3, **zero),
                 run(x, "chunked", chunk_size=4, gen_chunk_size=3))
    assert (fast.o - run(x, "chunked", chunk_size=4, gen_chunk_size=3).o).abs().max() > 1e-6


def _params_of_depth(g, depth, generated=("k", "v", "q", "eta", "alpha"), scale=0.15):
    """Every memory an MLP of ``depth`` layers (application order): D -> HID -> ... -> out."""
    def chain(out):
        dims = [D] + [HID] * (depth - 1) + [out]
        return tuple(randn(g, H, b, a, scale=scale) for a, b in zip(dims, dims[1:]))
    return {"memory": chain(D), **{n: chain(D if n in ("k", "v", "q") else 1) for n in generated}}


@pytest.mark.parametrize("depth", [1, 3])
def test_memories_of_other_depths_match_reference_with_gradients(depth):
    """Eq. 89's memories have two layers; one layer (M(x) = x + W x) and three run the same
    equations through the composed write: chunked == the token loop, gradients included, and a
    split stream equals one pass."""
    x = requires_grad(inputs(T=13, seed=11))
    x["params"] = requires_grad(_params_of_depth(gen(12), depth))
    wrt = [x["x"], x["conv"], x["beta"], x["params"]]
    for read, rule in (("anchor", "dgd"), ("running", "dgd"), ("running", "gd")):
        ref = run(x, "reference", read=read, rule=rule, hidden_norm="l2", v_norm=True)
        fast = run(x, "chunked", read=read, rule=rule, hidden_norm="l2", v_norm=True)
        assert_close(fast, ref, what=f"{read} {rule}")
        assert_close(grads(fast.o, wrt), grads(ref.o, wrt), atol=1e-9, what=f"{read} {rule} grads")
    whole = run(x, "chunked", read="running")
    head = {**x, "x": x["x"][:, :6], "beta": x["beta"][:, :6]}
    tail = {**x, "x": x["x"][:, 6:], "beta": x["beta"][:, 6:]}
    a = run(head, "chunked", read="running")
    b = run(tail, "chunked", read="running", initial_state=a.final_state)
    assert_close(torch.cat([a.o, b.o], dim=1), whole.o)


def _matrix_self_modifying(x, Ws, beta, *, Cm, Cg, rule, read, eta_max=None, alpha_bias=None, rates=None,
                           signal="self"):
    """Self-modifying Titans with matrix memories, Eq. 86-88 written out: every memory is
    M(z) = W z; per token, k, v, q, eta, alpha are read from the generating memories' anchors
    (or eta, alpha = ``rates``, constants), each memory's target is its anchor applied to v (or
    v itself, signal "values"), its gradient (A k - target) k^T, and DGD's write
    W <- alpha W - eta (W k) k^T - eta grad (with momentum S <- beta S - eta grad in place of the
    last term); the output reads M_memory after (running) or at its anchor."""
    Bn, T = x.shape[:2]
    names = [n for n in GEN if n in Ws]
    W = {n: w.expand(Bn, *w.shape) for n, w in Ws.items()}
    S = {n: torch.zeros_like(w) for n, w in W.items()}
    A, ys = {}, []
    for t in range(T):
        if t % Cg == 0:
            A.update({n: W[n] for n in names})
        if t % Cm == 0:
            A["memory"] = W["memory"]
        r = {n: (A[n] @ x[:, t, i, :, :, None]).squeeze(-1) for i, n in enumerate(names)}
        k, v, q = F.normalize(r["k"], dim=-1), r["v"], F.normalize(r["q"], dim=-1)
        if rates is None:
            eta = (eta_max * torch.sigmoid(r["eta"]))[..., None]
            alpha = torch.sigmoid(r["alpha"] + alpha_bias)[..., None]
        else:
            eta, alpha = rates
        for n in W:
            target = (A[n] @ v[..., None]) if signal == "self" else v[..., None]
            grad = ((A[n] @ k[..., None]) - target) * k[..., None, :]
            step = -eta * grad
            if beta is not None:
                S[n] = step = beta[:, t, :, None, None] * S[n] + step
            erase = eta * (W[n] @ k[..., None]) * k[..., None, :] if rule == "dgd" else 0.0
            W[n] = alpha * W[n] - erase + step
        ys.append((W["memory"] if read == "running" else A["memory"]) @ q[..., None])
    return torch.stack(ys, dim=1).squeeze(-1)


@pytest.mark.parametrize("rule,read,momentum", [("dgd", "running", False), ("dgd", "anchor", True),
                                                ("gd", "running", True)])
def test_linear_memories_match_their_matrix_form_with_gradients(rule, read, momentum):
    """A linear memory with generated inputs runs as one-layer MLPs without a residual, M(z) = W z:
    outputs and gradients (inputs, every memory's initial matrix, momentum) equal the matrix
    recurrence written out independently, with odd lengths and both chunk sizes."""
    g = gen(21)
    T = 11
    x = randn(g, B, T, len(GEN), H, D)
    Ws = {"memory": randn(g, H, D, D, scale=0.4),
          **{n: randn(g, H, D if n in ("k", "v", "q") else 1, D, scale=0.4) for n in GEN}}
    beta = rand(g, B, T, H, lo=0.0, hi=0.6) if momentum else None
    requires_grad([x, Ws, beta])
    wrt = [x, Ws] + ([beta] if momentum else [])
    for Cm, Cg in ((4, 3), (1, 1), (8, 2)):
        cfg = dict(rule=rule, read=read, eta_max=0.3, alpha_bias=2.0)
        got = self_modifying_titans(x, params={n: [w] for n, w in Ws.items()}, chunk_size=Cm, gen_chunk_size=Cg,
                                    beta_momentum=beta, conv_weight=None, activation="identity", residual=False,
                                    qk_norm=True, **cfg).o
        want = _matrix_self_modifying(x, Ws, beta, Cm=Cm, Cg=Cg, **cfg)
        assert_close(got, want, what=f"o {Cm},{Cg}")
        assert_close(grads(got, wrt), grads(want, wrt), atol=1e-9, what=f"grads {Cm},{Cg}")


@pytest.mark.parametrize("signal", ["values", "self"])
def test_linear_memories_with_constant_rates_match_their_matrix_form(signal):
    """Matrix memories generating k, v, q, with a constant step size and retention, learning
    their own M_a(v) or v itself: outputs and gradients equal the written-out recurrence."""
    g = gen(22)
    T, names = 11, ("k", "v", "q")
    x = randn(g, B, T, len(names), H, D)
    Ws = {n: randn(g, H, D, D, scale=0.4) for n in ("memory",) + names}
    beta = rand(g, B, T, H, lo=0.0, hi=0.6)
    requires_grad([x, Ws, beta])
    for Cm, Cg in ((4, 3), (1, 1)):
        got = self_modifying_titans(x, params={n: [w] for n, w in Ws.items()}, chunk_size=Cm, gen_chunk_size=Cg,
                                    eta=0.2, alpha=0.95, beta_momentum=beta, conv_weight=None, signal=signal,
                                    activation="identity", residual=False, qk_norm=True, rule="dgd",
                                    read="running").o
        want = _matrix_self_modifying(x, Ws, beta, Cm=Cm, Cg=Cg, rule="dgd", read="running", rates=(0.2, 0.95),
                                      signal=signal)
        assert_close(got, want, what=f"o {Cm},{Cg}")
        assert_close(grads(got, [x, Ws, beta]), grads(want, [x, Ws, beta]), atol=1e-9, what=f"grads {Cm},{Cg}")


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_constant_rates_are_the_squashed_gates_they_equal(impl):
    """A constant step size c and retention a (static eta / alpha) are the rates as given: equal,
    outputs, states and gradients, to static logits that the gates squash to exactly c and a
    (eta_max 2c at logit 0; alpha at logit(a))."""
    x = requires_grad(inputs(T=13, seed=4, generated=("k", "v", "q")))
    c, a = 0.04, 0.9
    zeros = torch.zeros_like(x["static"]["eta_logits"])
    wrt = [x["x"], x["conv"], x["params"]]
    for rule in ("dgd", "gd"):
        cfg = dict(beta_momentum=x["beta"], rule=rule, read="running", impl=impl, output_final_state=True)
        const = self_modifying_titans(x["x"], params=x["params"], chunk_size=4, gen_chunk_size=3, eta=c, alpha=a,
                                      conv_weight=x["conv"], **cfg)
        gates = self_modifying_titans(x["x"], params=x["params"], chunk_size=4, gen_chunk_size=3,
                                      eta_logits=zeros, eta_max=2 * c,
                                      alpha_logits=zeros + torch.logit(torch.tensor(a, dtype=zeros.dtype)),
                                      conv_weight=x["conv"], **cfg)
        assert_close(const, gates, what=rule)
        assert_close(grads(const.o, wrt), grads(gates.o, wrt), atol=1e-9, what=f"{rule} grads")


def test_constant_rates_are_one_source():
    x = inputs(T=5, seed=4)
    with pytest.raises(ValueError, match="a constant eta excludes params"):
        self_modifying_titans(x["x"], params=x["params"], chunk_size=4, gen_chunk_size=3, eta=0.1)
    x = inputs(T=5, seed=4, generated=("k", "v", "q"))
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        self_modifying_titans(x["x"], params=x["params"], chunk_size=4, gen_chunk_size=3, eta=0.1,
                              alpha=float("nan"))
    with pytest.raises(ValueError, match="retention=False fixes alpha = 1"):
        self_modifying_titans(x["x"], params=x["params"], chunk_size=4, gen_chunk_size=3, eta=0.1, alpha=0.9,
                              retention=False)


@pytest.mark.parametrize("read,rule", [("anchor", "dgd"), ("running", "gd")])
def test_values_signal_matches_reference_with_gradients(read, rule):
    """signal='values' (every memory's target is v, not its own M_a(v)): chunked == the token
    loop, gradients included, and a split stream is one pass; M_eta / M_alpha cannot take it."""
    x = requires_grad(inputs(T=13, seed=5, generated=("k", "v", "q")))
    wrt = [x["x"], x["conv"], x["beta"], x["params"]]
    cfg = dict(read=read, rule=rule, signal="values", chunk_size=4, gen_chunk_size=3)
    ref, fast = run(x, "reference", **cfg), run(x, "chunked", **cfg)
    assert_close(fast, ref, what="values")
    assert_close(grads(fast.o, wrt), grads(ref.o, wrt), atol=1e-9, what="values grads")
    assert (fast.o - run(x, "chunked", **{**cfg, "signal": "self"}).o).abs().max() > 1e-6
    def part(sl):
        return {**x, "x": x["x"][:, sl], "beta": x["beta"][:, sl],
                "static": {n: t[:, sl] for n, t in x["static"].items()}}

    first = run(part(slice(0, 6)), "chunked", **cfg)
    second = run(part(slice(6, None)), "chunked", initial_state=first.final_state, **cfg)
    assert_close(torch.cat([first.o, second.o], 1), fast.o, what="split")
    with pytest.raises(ValueError, match="M_eta and M_alpha"):
        run(inputs(T=5), "chunked", signal="values")


def _graph_nodes(t):
    """The names of the autograd nodes behind ``t``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    return {type(n).__name__ for n in seen}


@pytest.mark.parametrize("case", [
    dict(),                                                       # Hope's: every input generated, momentum
    dict(momentum=False, rule="gd", objective="dot"),
    dict(retention=False, generated=("k", "v", "q", "eta")),
    dict(alpha=0.9, generated=("k", "v", "eta"), read="anchor"),  # a constant alpha, a static q
    dict(logits=True),                                            # static logits added to M_eta, M_alpha
    dict(per_memory=True),
])
def test_native_generation_equals_the_pieces(case, monkeypatch):
    """Pass 1 as one autograd function over the C kernels (:class:`_NativeGeneration`) computes
    what the per-piece autograd functions do, gradients included: calls starting and ending inside
    a generating chunk, a single piece inside one, the state's gradients through a split stream."""
    from nldsl.runtime import self_modifying

    case = dict(case)
    generated = case.pop("generated", GEN)
    if case.pop("per_memory", False):
        x = per_memory_inputs(T=23, seed=21, generated=generated)
    else:
        x = inputs(T=23, seed=21, generated=generated)
    x["params"] = {n: w for n, w in x["params"].items() if n in generated or n == "memory"}
    if case.pop("logits", False):
        case.update(eta_logits=x["static"]["eta_logits"], alpha_logits=x["static"]["alpha_logits"])
    eta_bias = torch.tensor(0.2, dtype=torch.float64)
    requires_grad([x["x"], x["params"], x["beta"], x["conv"], x["static"], eta_bias])
    wrt = [x["x"], x["params"], x["beta"], x["conv"], eta_bias] + [case[k] for k in ("eta_logits", "alpha_logits")
                                                                    if k in case]

    def stream(splits):
        outs, state, t = [], None, 0
        for n in splits:
            sl = slice(t, t + n)
            static = {k: (v[:, sl] if isinstance(v, torch.Tensor) else v) for k, v in case.items()
                      if k not in ("momentum",)}
            if "q" not in generated:
                static["q"] = x["static"]["q"][:, sl]
            o, state = self_modifying_titans(
                x["x"][:, sl], params=x["params"], chunk_size=6, gen_chunk_size=4,
                beta_momentum=x["beta"][:, sl] if case.get("momentum", True) else None, eta_max=0.05,
                eta_bias=eta_bias, alpha_bias=3.0, conv_weight=x["conv"], initial_state=state,
                output_final_state=True, **static)
            outs.append(o)
            t += n
        o = torch.cat(outs, 1)
        loss = (o * torch.linspace(-1, 1, o.shape[1], dtype=o.dtype)[None, :, None, None]).sum()
        loss = loss + sum(W.sum() for W in state.weights["k"]) + sum(W.sum() for W in state.anchor["v"])
        return o, state, grads(loss, wrt)

    # 9: three pieces, the last ending inside a chunk (the anchor an output); 2, 1: inside one chunk;
    # 8, 12: whole chunks only (the pieces in one C call, _one_call)
    for splits in ([23], [9, 14], [5, 2, 1, 15], [2, 21], [8, 12, 3]):
        fused = stream(splits)
        assert "_NativeGenerationBackward" in _graph_nodes(fused[0])
        with monkeypatch.context() as m:
            m.setattr(self_modifying, "_native_generation", lambda *a, **k: None)
            pieces = stream(splits)
            assert "_NativeGenerationBackward" not in _graph_nodes(pieces[0])
        assert_close(fused, pieces, atol=1e-12, rtol=1e-11, what=f"{case} {splits}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_one_call_pass_gives_the_same_bits_on_any_thread_count(dtype, monkeypatch):
    """A call of whole generating chunks runs its pieces in one C call, a thread taking its
    sequence-heads through every piece (``_one_call``): outputs, state and gradients are bit for
    bit those of the same call on 1, 2 and 3 threads (an uneven split of the heads included), and
    those of the piece-by-piece loop over the same kernels."""
    from nldsl.runtime import self_modifying

    def cast(v):
        if isinstance(v, dict):
            return {n: cast(t) for n, t in v.items()}
        return [cast(t) for t in v] if isinstance(v, (list, tuple)) else v.to(dtype)

    x = cast(inputs(T=12, seed=31))
    requires_grad([x["x"], x["params"], x["beta"], x["conv"]])
    wrt = [x["x"], *x["params"]["k"], *x["params"]["alpha"], x["beta"], x["conv"]]

    def call():
        o = run(x, "chunked", gen_chunk_size=4, chunk_size=6)
        loss = (o.o * torch.linspace(-1, 1, 12, dtype=dtype)[None, :, None, None]).sum()
        loss = loss + sum(W.sum() for W in o.final_state.weights["v"])
        return [o.o, *o.final_state.weights["q"], *grads(loss, wrt)]

    used = []
    one_call = self_modifying._one_call
    monkeypatch.setattr(self_modifying, "_one_call", lambda *a: used.append(1) or one_call(*a))
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(call())
    finally:
        torch.set_num_threads(before)
    assert used, "the call did not take the one-call pass"
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    # the loop over the pieces: the same kernels, one piece at a time
    monkeypatch.setattr(self_modifying, "_one_call_fits", lambda plan: False)
    used.clear()
    assert all(torch.equal(a, b) for a, b in zip(results[0], call())) and not used
