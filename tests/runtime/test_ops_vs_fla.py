"""Against flash-linear-attention's own pure-torch naive ops (an independent implementation).

The test extras install fla-core (`pip install -e '.[test]'`), which holds the naive modules;
skipped where it is missing. Its package __init__ needs triton, so the naive files are loaded by
path. fla's naive ops compute in float32, hence the looser tolerances. Its Titans
naive op wraps the memory in a LayerNorm (a different objective), so Titans is not compared.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nldsl.runtime as rt
from runtime_cases import DT, load_fla_naive

B, H, K, V = 2, 2, 16, 16
TOL = dict(rtol=1e-4, atol=1e-4)


def _naive(relpath):
    mod = load_fla_naive(relpath)
    if mod is None:
        pytest.skip("flash-linear-attention (and einops) not installed; its naive ops are optional")
    return mod


def _inputs(T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=DT)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=DT), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=DT)
    beta = torch.rand(B, T, H, generator=gen, dtype=DT)
    g = -0.2 * torch.rand(B, T, H, generator=gen, dtype=DT)
    S0 = torch.randn(B, H, K, V, generator=gen, dtype=DT)
    return q, k, v, beta, g, S0


def _bhtd(x):
    return x.transpose(1, 2).contiguous()


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("T", [7, 64, 100])
def test_delta_rule_vs_fla(T, impl):
    naive = _naive("delta_rule/naive.py")
    q, k, v, beta, _, S0 = _inputs(T)
    ours = rt.delta_rule(q, k, v, beta, initial_state=S0, output_final_state=True, impl=impl, chunk_size=16)
    o, S = naive.delta_rule_recurrence(_bhtd(q), _bhtd(k), _bhtd(v), _bhtd(beta), initial_state=S0.float())
    torch.testing.assert_close(ours.o, _bhtd(o).to(DT), **TOL)
    torch.testing.assert_close(ours.final_state, S.to(DT), **TOL)
    if T % 32 == 0:  # fla's chunkwise form needs whole chunks and has no initial state
        ours0 = rt.delta_rule(q, k, v, beta, output_final_state=True, impl=impl)
        o, S = naive.delta_rule_chunkwise(*(_bhtd(x).float() for x in (q, k, v, beta)), chunk_size=32)
        torch.testing.assert_close(ours0.o, _bhtd(o).to(DT), **TOL)
        torch.testing.assert_close(ours0.final_state, S.to(DT), **TOL)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("T", [7, 100])
def test_gated_delta_rule_vs_fla(T, impl):
    naive = _naive("gated_delta_rule/naive.py")
    q, k, v, beta, g, S0 = _inputs(T, seed=1)
    ours = rt.gated_delta_rule(q, k, v, beta, g, initial_state=S0, output_final_state=True, impl=impl, chunk_size=16)
    for fn in (naive.naive_recurrent_gated_delta_rule, naive.naive_chunk_gated_delta_rule):
        o, S = fn(q=q, k=k, v=v, beta=beta, g=g, initial_state=S0, output_final_state=True)
        torch.testing.assert_close(ours.o, o.to(DT), **TOL)
        torch.testing.assert_close(ours.final_state, S.to(DT), **TOL)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("T", [7, 100])
def test_linear_attention_vs_fla(T, impl):
    q, k, v, _, g, S0 = _inputs(T, seed=2)
    gla = _naive("simple_gla/naive.py")
    ours = rt.linear_attention(q, k, v, g=g, initial_state=S0, output_final_state=True, impl=impl, chunk_size=16)
    o, S = gla.naive_recurrent_simple_gla(q, k, v, g, initial_state=S0.float(), output_final_state=True)
    torch.testing.assert_close(ours.o, o.to(DT), **TOL)
    torch.testing.assert_close(ours.final_state, S.to(DT), **TOL)
    o, S = gla.naive_chunk_simple_gla(q, k, v, g, initial_state=S0.float(), output_final_state=True, chunk_size=16)
    torch.testing.assert_close(ours.o, o.to(DT), **TOL)

    la = _naive("linear_attn/naive.py")
    ours = rt.linear_attention(q, k, v, initial_state=S0, output_final_state=True, impl=impl, chunk_size=16)
    o, S = la.naive_recurrent_linear_attn(q, k, v, initial_state=S0.float(), output_final_state=True)
    torch.testing.assert_close(ours.o, o.to(DT), **TOL)
    torch.testing.assert_close(ours.final_state, S.to(DT), **TOL)


def test_delta_rule_gradients_vs_fla():
    """Gradients of fla's naive recurrence (autograd, float32) vs our chunked path."""
    naive = _naive("delta_rule/naive.py")
    q, k, v, beta, _, S0 = _inputs(37, seed=3)
    leaves = [x.float().requires_grad_() for x in (q, k, v, beta, S0)]
    o, S = naive.delta_rule_recurrence(*(_bhtd(x) for x in leaves[:4]), initial_state=leaves[4])
    w_o, w_s = torch.randn_like(o), torch.randn_like(S)
    theirs = torch.autograd.grad((o * w_o).sum() + (S * w_s).sum(), leaves)
    mine_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, beta, S0)]
    r = rt.delta_rule(*mine_leaves[:4], initial_state=mine_leaves[4], output_final_state=True, chunk_size=16)
    mine = torch.autograd.grad((r.o * _bhtd(w_o).to(DT)).sum() + (r.final_state * w_s.to(DT)).sum(), mine_leaves)
    for name, a, b in zip("q k v beta initial_state".split(), mine, theirs):
        torch.testing.assert_close(a, b.to(DT), rtol=1e-3, atol=1e-3, msg=lambda m, n=name: f"d/d{n}: {m}")
