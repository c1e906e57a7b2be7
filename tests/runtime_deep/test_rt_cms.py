"""cms_chain: chunked == reference for every variant and signal, gradients, exact streaming,
update cadence probed on the state, nested resets, lr 0 == the static (pretrained) MLP chain."""
from __future__ import annotations

import itertools

import pytest
import torch

from nldsl.runtime import _cms_block
from nldsl.runtime.cms import _SHARED, _ZEROS, CmsState, _cms_chain, cms_chain
from nldsl.runtime.deep_memory import mlp_apply
from rtdeep_helpers import B, assert_close, cms_inputs, grads, requires_grad

PERIODS = (2, 6, 12)
LRS = (0.03, 0.02, 0.01)
VARIANTS = ("sequential", "nested", "independent")


def signal_kwargs(x, signal, single):
    if signal == "surprise":
        return {"delta": x["delta"] if single else x["targets"]}
    return {"target": x["targets"][0] if single else x["targets"]}


def run(x, impl, variant="sequential", signal="surprise", single=True, periods=PERIODS, lr=LRS, **kw):
    kw = {**signal_kwargs(x, signal, single), **kw}
    return cms_chain(
        x["x"], x["params"], periods=periods, lr=lr, variant=variant, signal=signal,
        agg_weights=x["agg"] if variant == "independent" else None, impl=impl,
        output_final_state=True, return_info=True, **kw,
    )


def run_split(x, splits, variant="sequential", impl="chunked", initial_state=None, **kw):
    """The surprise-driven chain over x, called on consecutive pieces of the given lengths with
    the state carried (from ``initial_state``): ``(concatenated output, final state)``."""
    outs, state, t = [], initial_state, 0
    for n in splits:
        sl = slice(t, t + n)
        o, state, _ = cms_chain(
            x["x"][:, sl], x["params"], periods=PERIODS, lr=LRS, variant=variant, signal="surprise",
            delta=x["delta"][:, sl], agg_weights=x["agg"] if variant == "independent" else None,
            initial_state=state, output_final_state=True, impl=impl, **kw)
        outs.append(o)
        t += n
    return torch.cat(outs, 1), state


@pytest.mark.parametrize(
    "variant,signal,single",
    list(itertools.product(VARIANTS, ("values", "self", "surprise"), (True, False))),
)
def test_chunked_matches_reference(variant, signal, single):
    x = cms_inputs(T=29)
    ref = run(x, "reference", variant, signal, single)
    fast = run(x, "chunked", variant, signal, single)
    assert_close(fast.o, ref.o)
    assert_close(fast.final_state, ref.final_state)
    assert fast.final_state.offset == ref.final_state.offset == tuple(29 % p for p in PERIODS)
    assert fast.info.updates == ref.info.updates and fast.info.resets == ref.info.resets
    assert_close(fast.info.outputs, ref.info.outputs)


def test_dot_objective_and_non_dividing_periods():
    x = cms_inputs(T=23)
    for variant in ("sequential", "independent"):
        ref = run(x, "reference", variant, "values", False, periods=(2, 3, 5), objective="dot")
        fast = run(x, "chunked", variant, "values", False, periods=(2, 3, 5), objective="dot")
        assert_close(fast, ref)
    with pytest.raises(ValueError, match="divide"):
        run(x, "chunked", "nested", periods=(2, 3, 5))


@pytest.mark.parametrize("objective, kw", [("l1", {}), ("lp", {"p": 1.5}), ("huber", {"huber_delta": 0.3})])
def test_robust_objectives(objective, kw):
    """The Miras family's l1, lp and huber on the values and self signals: the chunked writes (the
    objective's derivative at each block output) equal the reference (torch.func.grad of the
    losses as written) in outputs, states and gradients, and a split stream is one pass."""
    x = requires_grad(cms_inputs(T=17, seed=3))
    for variant, signal in (("sequential", "values"), ("independent", "self"), ("nested", "values")):
        cfg = dict(objective=objective, **kw)
        ref = run(x, "reference", variant, signal, False, **cfg)
        fast = run(x, "chunked", variant, signal, False, **cfg)
        assert_close(fast.o, ref.o, what=f"{variant} {signal}")
        assert_close(fast.final_state, ref.final_state, what=f"{variant} {signal}")
        wrt = [x["x"], x["params"], x["targets"]]
        assert_close(grads(fast.o, wrt), grads(ref.o, wrt), atol=1e-9, what=f"{variant} {signal} grads")
        first = run({**x, "x": x["x"][:, :7], "targets": [t[:, :7] for t in x["targets"]]}, "chunked", variant,
                    signal, False, **cfg)
        second = run({**x, "x": x["x"][:, 7:], "targets": [t[:, 7:] for t in x["targets"]]}, "chunked", variant,
                     signal, False, initial_state=first.final_state, **cfg)
        assert_close(torch.cat([first.o, second.o], 1), fast.o, what=f"{variant} {signal} split")
    with pytest.raises(ValueError, match="Triton kernel takes the l2 or dot"):
        run(x, "triton", "sequential", "values", False, objective=objective, **kw)


def test_sequence_shorter_than_every_period():
    x = cms_inputs(T=1)
    for impl in ("reference", "chunked"):
        out = run(x, impl)
        assert out.info.updates == ((), (), ())
        assert_close(out.final_state.weights, [[w.expand(2, *w.shape) for w in lw] for lw in x["params"]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_agree(variant):
    x = requires_grad(cms_inputs(T=14))
    lr = [torch.full((2, 14), v, dtype=torch.float64, requires_grad=True) for v in LRS]
    wrt = [x["x"], x["params"], x["delta"], lr] + ([x["agg"]] if variant == "independent" else [])
    for signal in ("surprise", "values"):
        ref = run(x, "reference", variant, signal, True, lr=lr)
        fast = run(x, "chunked", variant, signal, True, lr=lr)
        w = wrt if signal == "surprise" else wrt[:2] + [x["targets"][0], lr] + wrt[4:]
        g_fast = grads(fast.o, w)
        assert_close(g_fast, grads(ref.o, w), atol=1e-9, what=f"o {signal}")
        assert_close(grads(fast.final_state.weights[0][0], w), grads(ref.final_state.weights[0][0], w),
                     atol=1e-9, what=f"state {signal}")
        assert all(g.abs().sum() > 0 for g in g_fast[:3])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_split_stream_equals_one_pass(variant, impl):
    x = cms_inputs(T=29)
    full = run(x, impl, variant)
    for splits in ([1, 28], [5, 7, 1, 16], [13, 13, 3]):
        o, state = run_split(x, splits, variant, impl)
        assert_close(o, full.o, what=str(splits))
        assert_close(state, full.final_state, what=str(splits))


@pytest.mark.parametrize("variant", ["sequential", "independent"])
def test_each_level_updates_exactly_at_its_period(variant):
    """Feed the stream one token per call and probe every level's weights: they change exactly
    after tokens t with (t + 1) % C_l == 0 and never between, while the pending gradient sum
    grows inside the chunk."""
    T = 25
    x = cms_inputs(T=T)
    state = None
    prev = [[w.expand(2, *w.shape) for w in lw] for lw in x["params"]]
    for t in range(T):
        _, state, info = cms_chain(
            x["x"][:, t:t + 1], x["params"], periods=PERIODS, lr=LRS, variant=variant,
            signal="surprise", delta=x["delta"][:, t:t + 1],
            agg_weights=x["agg"] if variant == "independent" else None,
            initial_state=state, output_final_state=True, return_info=True,
        )
        for l, C in enumerate(PERIODS):
            changed = any(not torch.equal(a, b) for a, b in zip(prev[l], state.weights[l]))
            boundary = (t + 1) % C == 0
            assert changed == boundary, (l, t)
            assert info.updates[l] == ((0,) if boundary else ())
            assert state.offset[l] == (t + 1) % C
            pending = any(g.abs().sum() > 0 for g in state.grad_sum[l])
            assert pending == (not boundary)
        prev = [list(lw) for lw in state.weights]
    # one call: the recorded update positions are the period multiples
    info = run(x, "chunked", variant).info
    for l, C in enumerate(PERIODS):
        assert info.updates[l] == tuple(range(C - 1, T, C))


def test_nested_resets_faster_levels():
    T = 24
    x = cms_inputs(T=T)
    out = run(x, "chunked", "nested")
    assert out.info.resets[0] == tuple(range(5, T, 6))     # level 0 resets at level 1's boundaries
    assert out.info.resets[1] == tuple(range(11, T, 12))
    assert out.info.resets[2] == ()                        # the slowest never resets
    # at T = 24 (a boundary of every level) levels 0 and 1 are back at their initial weights
    for l in (0, 1):
        assert_close(out.final_state.weights[l], [w.expand(2, *w.shape) for w in x["params"][l]])
    assert not torch.allclose(out.final_state.weights[2][0], x["params"][2][0])
    # between resets the nested chain behaves like the sequential one
    seq = run(x, "chunked", "sequential")
    assert_close(out.o[:, :6], seq.o[:, :6])
    assert not torch.allclose(out.o[:, 6:], seq.o[:, 6:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_lr_zero_is_the_static_pretrained_mlp(variant):
    x = cms_inputs(T=31)
    out = run(x, "chunked", variant, lr=0.0)
    h = x["x"]
    if variant == "independent":
        static = sum(x["agg"][l] * mlp_apply(x["params"][l], h) for l in range(3))
    else:
        for lw in x["params"]:
            h = mlp_apply(lw, h)
        static = h
    assert_close(out.o, static, atol=1e-13, rtol=0)
    for lw, pw in zip(out.final_state.weights, x["params"]):  # the weights never moved
        for a, b in zip(lw, pw):
            assert torch.equal(a, b.expand_as(a))
    assert_close(run(x, "reference", variant, lr=0.0).o, out.o)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lr_zero_continues_a_stream_like_zero_surprise(variant):
    """lr 0 skips the errors: the same output and state (pending gradient sums applied at the
    boundaries it reaches, nested resets) as writing a zero surprise (the model's read pass).
    Equal to rounding: a zero step turns a block's shared weights (a nested reset) into per-sequence
    copies, which are read per sequence."""
    x = cms_inputs(T=17)
    state = run(x, "chunked", variant).final_state                 # pending sums, offsets mid-chunk
    zeros = dict(x, delta=torch.zeros_like(x["delta"]))
    for T in (3, 11):
        part = dict(zeros, x=x["x"][:, :T], delta=zeros["delta"][:, :T])
        skip = run(part, "chunked", variant, lr=0.0, initial_state=state)
        full = run(part, "chunked", variant, initial_state=state)
        assert_close(skip.o, full.o, atol=1e-15, rtol=0)
        assert_close(skip.final_state, full.final_state, atol=1e-15, rtol=0)
        assert skip.info.updates == full.info.updates and skip.info.resets == full.info.resets


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_invariance(variant):
    x = cms_inputs(T=17)
    full = run(x, "chunked", variant)
    for b in range(2):
        xb = dict(x, x=x["x"][b:b + 1], delta=x["delta"][b:b + 1])
        one = run(xb, "chunked", variant)
        assert_close(one.o, full.o[b:b + 1])


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_detach(impl):
    x = requires_grad(cms_inputs(T=14))
    live = run(x, impl)
    det = run(x, impl, detach=True)
    assert_close(det.o, live.o)
    gx, gd, *gW = grads(det.o, [x["x"], x["delta"], x["params"]])
    assert torch.count_nonzero(gd) == 0                    # no gradient through the writes
    assert gx.abs().sum() > 0 and all(g.abs().sum() > 0 for g in gW)
    gW_live = grads(live.o, x["params"])
    assert not all(torch.allclose(a, b) for a, b in zip(gW, gW_live))
    assert grads(live.o, [x["delta"]])[0].abs().sum() > 0


def _backward_nodes(t: torch.Tensor) -> set:
    """The names of the autograd nodes behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh", "relu", "identity"])
def test_detached_blocks_keep_the_derivative_of_one_c_pass(activation, monkeypatch):
    """Detached chunked writes on a CPU whose blocks the C blocks do not take (here: turned off)
    take act(h) and act'(h) from one pass of the C kernels (_KeptDerivative) and multiply by act'
    in their errors and in the outer backward: the same outputs, states and gradients (float64)
    as the torch ops' path (NLDSL_NATIVE=0)."""
    x = requires_grad(cms_inputs(T=19))
    monkeypatch.setattr(_cms_block, "library", lambda x: None)

    def chain():
        out = run(x, "chunked", detach=True, activation=activation, prenorm="rms")
        return out, grads(out.o, [x["x"], x["params"]])

    kept, g_kept = chain()
    assert "_KeptDerivativeBackward" in _backward_nodes(kept.o)
    monkeypatch.setenv("NLDSL_NATIVE", "0")
    plain, g_plain = chain()
    assert "_KeptDerivativeBackward" not in _backward_nodes(plain.o)
    assert_close(kept.o, plain.o)
    assert_close(kept.final_state, plain.final_state)
    assert_close(g_kept, g_plain)


def _read_then_learn(x, splits, variant, **kw):
    """A surprise-driven chain as a model drives it (nldsl.nn.deep.CmsChain): per piece a read
    at lr 0 that records its forward, then the writes from the same state reusing it, the state
    handed over (``donate``): ``(outputs, final state)``."""
    outs, state, t = [], None, 0
    common = dict(periods=PERIODS, variant=variant, signal="surprise", detach=True,
                  agg_weights=x["agg"] if variant == "independent" else None, **kw)
    for n in splits:
        sl, record = slice(t, t + n), []
        outs.append(_cms_chain(x["x"][:, sl], x["params"], lr=0.0, delta=torch.zeros_like(x["x"][:, sl]),
                               initial_state=state, record=record, **common).o)
        state = _cms_chain(x["x"][:, sl], x["params"], lr=LRS, delta=x["delta"][:, sl], initial_state=state,
                           output_final_state=True, reuse=record, donate=t > 0, **common).final_state
        t += n
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("variant,per_sequence", list(itertools.product(VARIANTS, (False, True))))
@pytest.mark.parametrize("prenorm,residual", [("rms", True), ("none", True), ("rms", False)])
def test_detached_two_layer_blocks_are_c_calls(variant, per_sequence, prenorm, residual, monkeypatch):
    """Detached two-layer blocks on a CPU read and backpropagate as C calls over torch's BLAS
    gemm, and a chain's writes from its output's surprise (sequential, nested) are one C call a
    piece (_cms_block): the same outputs, probes, states and gradients (float64) as the torch
    ops' path, in one call and over a stream read and written piece by piece as a model does,
    from weights shared by the batch or per sequence, with constant and per-token rates."""
    x = requires_grad(cms_inputs(T=21))
    if per_sequence:
        x["params"] = [[W.detach().expand(B, *W.shape).clone().requires_grad_() for W in ws] for ws in x["params"]]
    w = torch.randn_like(x["x"])
    rates = [torch.rand(B, 21, dtype=x["x"].dtype) * r for r in LRS]

    def runs():
        one = run(x, "chunked", variant, detach=True, prenorm=prenorm, residual=residual)
        per_token = run(x, "chunked", variant, detach=True, prenorm=prenorm, residual=residual, lr=rates)
        stream, state = _read_then_learn(x, (5, 7, 9), variant, prenorm=prenorm, residual=residual)
        outs = [one.o, per_token.o, stream]
        return outs + [one.final_state, one.info, per_token.final_state, state], grads(
            sum((o * w).sum() for o in outs), [x["x"], x["params"]])

    c_calls, g_c = runs()
    assert "_ReadBackward" in _backward_nodes(c_calls[0]) and "_ReadBackward" in _backward_nodes(c_calls[2])
    monkeypatch.setenv("NLDSL_NATIVE", "0")
    torch_ops, g_torch = runs()
    assert "_ReadBackward" not in _backward_nodes(torch_ops[0])
    assert_close(c_calls, torch_ops)
    assert_close(g_c, g_torch)


@pytest.mark.parametrize("variant,per_sequence", list(itertools.product(VARIANTS, (False, True))))
def test_detach_split_stream_gradients_equal_one_pass(variant, per_sequence):
    """Detached writes: every read still sends its gradient straight through to the initial
    weights (shared by the batch, or per sequence), however the stream is split into calls, and
    as the reference's token loop does. The state keeps the link: a continuing call links its
    reads to the weights the stream started from, and no gradient passes the states between."""
    x = requires_grad(cms_inputs(T=23))
    if per_sequence:
        x["params"] = [[W.detach().expand(B, *W.shape).clone().requires_grad_() for W in ws] for ws in x["params"]]
    w = torch.randn_like(x["x"])
    full = run(x, "chunked", variant, detach=True)
    g_full = grads((full.o * w).sum(), x["params"])
    ref = run(x, "reference", variant, detach=True)
    assert_close(grads((ref.o * w).sum(), x["params"]), g_full)
    first, state = run_split(x, (5,), variant, detach=True)
    rest = {k: (v[:, 5:] if k in ("x", "delta") else v) for k, v in x.items()}
    second, _ = run_split(rest, (9, 9), variant, detach=True, initial_state=state)
    split = torch.cat([first, second], 1)
    assert_close(split, full.o)
    assert_close(grads((split * w).sum(), x["params"]), g_full)
    starts = [P for ws in x["params"] for P in ws]
    between = [W for lw in state.weights for W in lw if not any(W is P for P in starts)]  # (blocks that stepped)
    assert between
    unused = torch.autograd.grad((second * w[:, 5:]).sum(), between, allow_unused=True)
    assert all(g is None for g in unused)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_call_never_writes_the_state_it_was_given(variant):
    """Detached gradient sums accumulate in place only in tensors the call made: the model reads
    a segment and then learns on it, both from one state, which must stay as it was."""
    x = cms_inputs(T=23)
    _, state = run_split(x, (7,), variant, detach=True)  # mid-chunk: pending sums in the state
    before = [[G.clone() for G in lg] for lg in state.grad_sum]
    rest = {k: (v[:, 7:] if k in ("x", "delta") else v) for k, v in x.items()}
    first, _ = run_split(rest, (16,), variant, detach=True, initial_state=state)
    again, _ = run_split(rest, (16,), variant, detach=True, initial_state=state)
    assert_close(again, first)
    for lg, lb in zip(state.grad_sum, before):
        for G, B in zip(lg, lb):
            assert torch.equal(G, B)


@pytest.mark.parametrize("variant,detach", list(itertools.product(VARIANTS, (False, True))))
def test_shared_weights_continue_like_per_sequence_copies(variant, detach):
    """Weights shared by the batch stay shared until a block steps (one product per read): a state
    holds them as broadcast views, which a continuing call reads as the shared weights. Continuing
    from per-sequence copies of the same state instead (read per sequence) gives the same
    outputs, state and gradients."""
    x = requires_grad(cms_inputs(T=23))
    _, state = run_split(x, (1,), variant, detach=detach)  # one token: no block has stepped yet
    views = [W for lw in state.weights for W in lw]
    assert all(W.stride(0) == 0 and W in _SHARED for W in views)
    copies = state._replace(weights=tuple(tuple(W.clone() for W in lw) for lw in state.weights))
    assert not any(W in _SHARED for lw in copies.weights for W in lw)
    rest = {k: (v[:, 1:] if k in ("x", "delta") else v) for k, v in x.items()}
    shared, s_state = run_split(rest, (9, 13), variant, detach=detach, initial_state=state)
    per_seq, p_state = run_split(rest, (9, 13), variant, detach=detach, initial_state=copies)
    assert_close(shared, per_seq)
    assert_close(s_state, p_state)
    wrt = [x["params"], x["x"]]
    assert_close(grads(shared, wrt), grads(per_seq, wrt))
    # the continuing call read the shared weights themselves: no gradient passes the views
    unused = torch.autograd.grad(shared.sum(), views, allow_unused=True, retain_graph=True)
    assert all(g is None for g in unused)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_zero_sums_continue_like_real_zeros(variant):
    """A block that just stepped leaves an exact-zero gradient sum in the state: a broadcast zero
    that a continuing call skips. Continuing from real zeros instead gives the same outputs, state
    and gradients."""
    x = requires_grad(cms_inputs(T=23))
    _, state = run_split(x, (6,), variant)  # blocks 0 and 1 (periods 2 and 6) just stepped
    zeros = [G for lg in state.grad_sum[:2] for G in lg]
    assert all(G in _ZEROS and G.stride() == (0, 0, 0) and not G.any() for G in zeros)
    real = state._replace(grad_sum=tuple(tuple(G.clone() for G in lg) for lg in state.grad_sum))
    rest = {k: (v[:, 6:] if k in ("x", "delta") else v) for k, v in x.items()}
    skipped, s_state = run_split(rest, (5, 12), variant, initial_state=state)
    summed, r_state = run_split(rest, (5, 12), variant, initial_state=real)
    assert_close(skipped, summed)
    assert_close(s_state, r_state)
    wrt = [x["params"], x["x"]]
    assert_close(grads(skipped, wrt), grads(summed, wrt))


def test_errors():
    x = cms_inputs(T=4)
    with pytest.raises(ValueError, match="needs delta"):
        cms_chain(x["x"], x["params"], periods=PERIODS, lr=0.1, signal="surprise")
    with pytest.raises(ValueError, match="one entry of periods"):
        cms_chain(x["x"], x["params"], periods=(2, 4), lr=0.1, delta=x["delta"])
    with pytest.raises(ValueError, match="valid impl"):
        cms_chain(x["x"], x["params"], periods=PERIODS, lr=0.1, delta=x["delta"], impl="fused")
    bad = CmsState(tuple(tuple(lw) for lw in x["params"]), tuple(tuple(lw) for lw in x["params"]), (0, 9, 0))
    with pytest.raises(ValueError, match="offset"):
        cms_chain(x["x"], x["params"], periods=PERIODS, lr=0.1, delta=x["delta"], initial_state=bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_norm_matches_reference(variant):
    x = cms_inputs(T=29)
    for signal in ("values", "surprise"):
        ref = run(x, "reference", variant, signal, False, hidden_norm="l2")
        fast = run(x, "chunked", variant, signal, False, hidden_norm="l2")
        assert_close(fast.o, ref.o)
        assert_close(fast.final_state, ref.final_state)


def _prenorm_chain(x, params, variant, agg):
    """Closed form of a static chain of pre-norm residual blocks: x + W_2 gelu(W_1 rms(x))."""
    def block(ws, v):
        vn = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
        return v + torch.nn.functional.gelu(vn @ ws[0].T) @ ws[1].T

    if variant == "independent":
        return sum(w * block(ws, x) for w, ws in zip(agg, params))
    for ws in params:
        x = block(ws, x)
    return x


@pytest.mark.parametrize("variant", VARIANTS)
def test_prenorm_static_chain_is_its_closed_form(variant):
    x = cms_inputs(T=9)
    expect = _prenorm_chain(x["x"], x["params"], variant, x["agg"])
    for impl in ("chunked", "reference"):
        assert_close(run(x, impl, variant, lr=0.0, prenorm="rms").o, expect, what=impl)


@pytest.mark.parametrize(
    "variant,signal,single",
    list(itertools.product(VARIANTS, ("values", "self", "surprise"), (True, False))),
)
def test_prenorm_chunked_matches_reference(variant, signal, single):
    x = cms_inputs(T=29)
    ref = run(x, "reference", variant, signal, single, prenorm="rms")
    fast = run(x, "chunked", variant, signal, single, prenorm="rms")
    assert_close(fast.o, ref.o)
    assert_close(fast.final_state, ref.final_state)
    assert_close(fast.info.outputs, ref.info.outputs)
    # the pre-norm changes what the blocks learn, not only what they read
    plain = run(x, "chunked", variant, signal, single)
    assert not torch.allclose(fast.final_state.weights[0][0], plain.final_state.weights[0][0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_prenorm_gradients_and_streams(variant):
    x = requires_grad(cms_inputs(T=14))
    lr = [torch.full((2, 14), v, dtype=torch.float64, requires_grad=True) for v in LRS]
    wrt = [x["x"], x["params"], x["delta"], lr] + ([x["agg"]] if variant == "independent" else [])
    ref = run(x, "reference", variant, lr=lr, prenorm="rms")
    fast = run(x, "chunked", variant, lr=lr, prenorm="rms")
    assert_close(grads(fast.o, wrt), grads(ref.o, wrt), atol=1e-9, what="o")
    assert_close(grads(fast.final_state.weights[0][0], wrt), grads(ref.final_state.weights[0][0], wrt),
                 atol=1e-9, what="state")
    assert_close(run_split(x, (5, 1, 8), variant, prenorm="rms")[0], run(x, "chunked", variant, prenorm="rms").o)


def test_prenorm_rejects_unknown_norms():
    x = cms_inputs(T=4)
    with pytest.raises(ValueError, match="prenorm must be 'none' or 'rms'"):
        cms_chain(x["x"], x["params"], periods=PERIODS, lr=0.1, delta=x["delta"], prenorm="layer")


# -- momentum and weight decay: Eq. 71's "error component of an arbitrary optimizer" ----------

OPT = dict(momentum=(0.9, None, 0.5), retention=(0.97, 0.99, None))  # a block with each, and both


@pytest.mark.parametrize("variant", VARIANTS)
def test_momentum_and_retention_chunked_match_reference(variant):
    x = requires_grad(cms_inputs(T=29, seed=5))
    wrt = [x["x"], x["params"], x["delta"]]
    ref = run(x, "reference", variant, **OPT)
    fast = run(x, "chunked", variant, **OPT)
    assert_close(fast.o, ref.o)
    assert_close(fast.final_state, ref.final_state)
    assert fast.info.updates == ref.info.updates and fast.info.resets == ref.info.resets
    assert_close(grads(fast.o, wrt), grads(ref.o, wrt), atol=1e-9)
    assert_close(grads(fast.final_state.momentum[0][1], wrt), grads(ref.final_state.momentum[0][1], wrt), atol=1e-9)
    plain = run(x, "chunked", variant)
    assert not torch.allclose(fast.o, plain.o)  # they change the result


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("detach", [False, True])
def test_momentum_and_retention_split_stream_equals_one_pass(variant, detach):
    x = requires_grad(cms_inputs(T=29, seed=6))
    full = run(x, "chunked", variant, detach=detach, **OPT)
    for splits in ([1, 28], [5, 7, 1, 16], [12, 12, 5]):
        o, state = run_split(x, splits, variant, detach=detach, **OPT)
        assert_close(o, full.o, what=str(splits))
        assert_close(state, full.final_state, what=str(splits))
        assert_close(grads(o, x["params"]), grads(full.o, x["params"]), atol=1e-9, what=str(splits))


def test_momentum_and_retention_follow_their_recurrence():
    """One block, chunk by chunk: with G_k the step plain GD takes from the same weights (the
    momentum-free op, tested against the reference above), m_k = beta m_{k-1} + G_k and
    W_k = alpha W_{k-1} - m_k."""
    x = cms_inputs(T=24, n_levels=1, seed=7)
    C, beta, alpha = 6, 0.8, 0.95
    kw = dict(periods=(C,), lr=0.05, signal="values", output_final_state=True)
    got = cms_chain(x["x"], x["params"], target=x["targets"][0], momentum=beta, retention=alpha, **kw)
    W = [w.expand(2, *w.shape) for w in x["params"][0]]
    m = [torch.zeros_like(w) for w in W]
    for k in range(24 // C):
        sl = slice(k * C, (k + 1) * C)
        stepped = cms_chain(x["x"][:, sl], [W], target=x["targets"][0][:, sl], **kw).final_state.weights[0]
        G = [w - s for w, s in zip(W, stepped)]
        m = [beta * mi + g for mi, g in zip(m, G)]
        W = [alpha * w - mi for w, mi in zip(W, m)]
    assert_close(got.final_state.weights[0], W)
    assert_close(got.final_state.momentum[0], m)


def test_with_momentum_a_block_moves_on_without_writes():
    """lr 0 writes nothing, yet a boundary still decays the weights and applies the momentum
    carried in: the same as a zero surprise (a read pass of a surprise-driven model)."""
    x = cms_inputs(T=12, seed=8)
    first = run(x, "chunked", **OPT)
    quiet = run_split(x, [12], initial_state=first.final_state, **OPT)
    kw = dict(periods=PERIODS, variant="sequential", signal="surprise", initial_state=first.final_state,
              output_final_state=True, **OPT)
    zero_lr = cms_chain(x["x"], x["params"], lr=0.0, delta=x["delta"], **kw)
    zero_delta = cms_chain(x["x"], x["params"], lr=LRS, delta=torch.zeros_like(x["delta"]), **kw)
    assert_close(zero_lr.final_state, zero_delta.final_state)
    assert not torch.allclose(zero_lr.final_state.weights[0][0], first.final_state.weights[0][0])
    assert quiet[1].offset == zero_lr.final_state.offset


def test_momentum_state_and_rate_errors():
    x = cms_inputs(T=8)
    plain = run(x, "chunked").final_state
    assert plain.momentum is None
    with pytest.raises(ValueError, match="carries no momentum"):
        run(x, "chunked", momentum=0.9, initial_state=plain)
    for bad in (dict(momentum=float("nan")), dict(retention=float("inf")), dict(momentum="0.9"),
                dict(momentum=(0.9, 0.9)), dict(retention=True)):
        with pytest.raises(ValueError, match="momentum|retention"):
            run(x, "chunked", **bad)
    # a state with momentum continues without it only where the call has none: blocks without
    # momentum carry a broadcast zero
    state = run(x, "chunked", momentum=(0.9, None, None)).final_state
    assert state.momentum[1][0] in _ZEROS and state.momentum[0][0] not in _ZEROS


def test_a_callers_autocast_does_not_reach_the_op():
    """Mixed-precision training wraps the model in torch.autocast; the op computes in float32
    regardless (the same result as without it), its state float32."""
    def f32(t):  # the inputs in float32, which autocast would turn to bfloat16
        return t.float() if isinstance(t, torch.Tensor) else [f32(u) for u in t]

    x = {k: f32(v) for k, v in cms_inputs(T=13).items()}
    plain = run(x, "chunked", **OPT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run(x, "chunked", **OPT)
    assert mixed.o.dtype == torch.float32 and mixed.final_state.weights[0][0].dtype == torch.float32
    assert_close(mixed, plain, atol=0, rtol=0)
