"""The generated linear-memory kernels against the runtime's chunked PyTorch path: forward,
final state and every gradient (q, k, v, learning rate, retention, initial state), for each
rule, retention kind, gate transform and chunk size, with lengths that are not a multiple of
the chunk, with and without an initial state; the decode kernel streamed token by token; DGD
continued from inside an anchor period."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'nldsl[triton]')")

from kernel_cases import (DEVICE_DTYPES, as_float64, assert_close, kernel_args, leaves, make_inputs,  # noqa: E402
                          reference, state_tensors)

from nldsl.codegen.kernels import LinearKernelSpec, linear_kernel  # noqa: E402
from nldsl.runtime import DGDState  # noqa: E402


def S(name, rule, K=16, V=16, **kw) -> LinearKernelSpec:
    return LinearKernelSpec(name=name, rule=rule, head_k=K, head_v=V, **kw)


# (spec, B, T, H, initial state): every rule x retention kind x learning-rate kind x fusion, chunks
# 16 to 128, T never a multiple of the chunk, head sizes that need padding, several value tiles
# (block_v 16 of V=40 padded to 64: a partly and a wholly padded tile)
CASES = [
    (S("hebb", "hebbian", chunk=16), 2, 37, 2, True),
    (S("hebb_gates", "hebbian", K=12, V=40, lr="gate", decay="gate", qk_l2norm=True, chunk=32, block_v=16),
     1, 45, 2, False),
    (S("hebb_const", "hebbian", lr="const", lr_value=0.7, decay="const", decay_value=0.9, chunk=64), 1, 70, 1, True),
    (S("hebb_tensor", "hebbian", lr="tensor", decay="tensor", chunk=16), 1, 23, 2, True),
    (S("delta_gate", "delta", lr="gate", qk_l2norm=True, chunk=16), 2, 37, 2, True),
    (S("delta_128", "delta", lr="tensor", chunk=128), 1, 135, 1, True),
    (S("gdelta_gates", "delta", K=12, V=40, lr="gate", decay="gate", qk_l2norm=True, chunk=32, block_v=16),
     1, 45, 2, False),
    (S("gdelta_gates_v40", "delta", K=12, V=40, lr="gate", decay="gate", chunk=32), 1, 45, 2, True),
    (S("gdelta_tensor", "delta", lr="tensor", decay="tensor", chunk=64), 1, 70, 2, True),
    (S("gdelta_const", "delta", lr="const", lr_value=0.5, decay="const", decay_value=0.95, chunk=16), 1, 37, 1, True),
    (S("dgd_p1", "dgd", lr="tensor", decay="tensor", chunk=16, period=1), 1, 37, 2, True),
    (S("dgd_p4", "dgd", lr="gate", decay="gate", qk_l2norm=True, chunk=32, period=4), 1, 45, 2, True),
    (S("dgd_p8_anchor", "dgd", lr="tensor", decay="tensor", chunk=16, period=8, read="anchor"), 2, 37, 1, False),
    (S("dgd_p16_anchor", "dgd", lr="const", lr_value=0.2, decay="const", decay_value=0.9, chunk=16, period=16,
       read="anchor"), 1, 37, 2, True),
    (S("dgd_p64", "dgd", lr="tensor", chunk=64, period=64), 1, 70, 1, True),
    # the benchmark's head size and chunk (bench_triton.py): [64, 128] tiles, two value tiles
    (S("gdelta_k128", "delta", K=128, V=128, lr="tensor", decay="tensor", chunk=64), 1, 80, 2, True),
    # heads of 64 in chunks of 64
    (S("delta_k64", "delta", K=64, V=64, lr="gate", qk_l2norm=True, chunk=64), 1, 70, 2, True),
]


def _grad_leaves(x):
    return [(n, t) for n, t in x.items() if t is not None]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("spec,B,T,H,init", CASES, ids=[c[0].name for c in CASES])
def test_forward_final_state_and_gradients(spec, B, T, H, init, device, dtype):
    kernel = linear_kernel(spec)
    x = leaves(make_inputs(spec, B, T, H, initial_state=init), device, dtype)
    o, final = kernel(*kernel_args(x), initial_state=x["S0"], output_final_state=True)
    ref = as_float64(x)
    r_o, r_final = reference(spec, ref)
    assert o.dtype == dtype and o.shape == x["v"].shape
    assert_close(o, r_o, dtype, "o")
    for a, b in zip(state_tensors(final), state_tensors(r_final)):
        assert a.dtype == torch.promote_types(dtype, torch.float32)
        assert_close(a, b, dtype, "final state")
    if spec.rule == "dgd":
        assert final.offset == r_final.offset == T % spec.period
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    w_s = [torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in state_tensors(final)]

    def loss(o, final):
        total = (o.double() * w_o.to(o.device)).sum()
        return total + sum((s.double() * w.to(s.device)).sum() for s, w in zip(state_tensors(final), w_s))

    names = [n for n, _ in _grad_leaves(x)]
    grads = torch.autograd.grad(loss(o, final), [t for _, t in _grad_leaves(x)])
    r_grads = torch.autograd.grad(loss(r_o, r_final), [t for _, t in _grad_leaves(ref)])
    for name, a, b in zip(names, grads, r_grads):
        assert a.dtype == x[name].dtype
        assert_close(a, b, dtype, f"d{name}")


STREAM_CASES = [c[0] for c in CASES if c[0].name in
                ("hebb_gates", "gdelta_gates", "gdelta_const", "delta_gate", "dgd_p1", "dgd_p4", "dgd_p8_anchor")]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("spec", STREAM_CASES, ids=[s.name for s in STREAM_CASES])
def test_decode_kernel_streams_like_one_chunked_pass(spec, device, dtype):
    """Calls of a few tokens without gradients run the token-by-token kernel; carrying the state
    from call to call gives the chunked path's outputs and final state (DGD: anchor, offset)."""
    kernel = linear_kernel(spec)
    T = 21
    x = leaves(make_inputs(spec, 2, T, 2), device, dtype, requires_grad=False)
    r_o, r_final = reference(spec, as_float64(x))
    outs, state, start = [], x["S0"], 0
    with torch.no_grad():
        for n in (1, 1, 5, 1, 9, 1, 3):
            piece = [None if a is None else a[:, start:start + n] for a in kernel_args(x)]
            o, state = kernel(*piece, initial_state=state, output_final_state=True)
            outs.append(o)
            start += n
    assert_close(torch.cat(outs, dim=1), r_o, dtype, "streamed o")
    for a, b in zip(state_tensors(state), state_tensors(r_final)):
        assert_close(a, b, dtype, "streamed final state")
    if spec.rule == "dgd":
        assert state.offset == r_final.offset


DGD_CASES = [c[0] for c in CASES if c[0].name in ("dgd_p4", "dgd_p8_anchor")]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("spec", DGD_CASES, ids=[s.name for s in DGD_CASES])
@pytest.mark.parametrize("offset,T", [(3, 30), (1, 2)])
def test_dgd_continues_inside_an_anchor_period_with_gradients(spec, offset, T, device, dtype):
    """A call that starts inside an anchor period (a DGDState with offset > 0, gradients needed)
    runs the chunkwise kernels with the carried anchor; everything matches, the anchor's gradient too."""
    kernel = linear_kernel(spec)
    x = leaves(make_inputs(spec, 1, offset + T, 2), device, dtype, requires_grad=False)
    before = {n: None if t is None else t[:, :offset] for n, t in as_float64(x).items() if n != "S0"}
    _, st = reference(spec, {**before, "S0": x["S0"].double()})
    assert st.offset == offset
    state = DGDState(st.memory.to(x["S0"].dtype).requires_grad_(), st.anchor.to(x["S0"].dtype).requires_grad_(), offset)
    after = {n: None if t is None else t[:, offset:].detach().requires_grad_() for n, t in x.items() if n != "S0"}
    o, final = kernel(*kernel_args(after), initial_state=state, output_final_state=True)
    r_after = as_float64(after)
    r_state = DGDState(state.memory.detach().double().requires_grad_(), state.anchor.detach().double().requires_grad_(),
                       offset)
    r_o, r_final = reference(spec, r_after, initial_state=r_state)
    assert_close(o, r_o, dtype, "o")
    assert final.offset == r_final.offset
    for a, b in zip(state_tensors(final), state_tensors(r_final)):
        assert_close(a, b, dtype, "final state")
    gen = torch.Generator().manual_seed(2)
    w = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (o, final.memory, final.anchor)]

    def loss(o, fin):
        return sum((t.double() * wt.to(t.device)).sum() for t, wt in zip((o, fin.memory, fin.anchor), w))

    ins = [t for t in after.values() if t is not None] + [state.memory, state.anchor]
    r_ins = [t for t in r_after.values() if t is not None] + [r_state.memory, r_state.anchor]
    grads, r_grads = torch.autograd.grad(loss(o, final), ins), torch.autograd.grad(loss(r_o, r_final), r_ins)
    for i, (a, b) in enumerate(zip(grads, r_grads)):
        assert_close(a, b, dtype, f"gradient {i}")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_without_final_state_and_scale(device, dtype):
    spec = CASES[4][0]
    kernel = linear_kernel(spec)
    x = leaves(make_inputs(spec, 1, 20, 2), device, dtype)
    out = kernel(*kernel_args(x), scale=0.5, initial_state=x["S0"])
    assert out.final_state is None
    assert_close(out.o, reference(spec, as_float64(x), scale=0.5).o, dtype, "o (scale 0.5)")
