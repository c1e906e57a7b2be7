"""The ops' contract: impl selection without fallback, argument checks, dtypes."""
from __future__ import annotations

import pytest
import torch

import nldsl.runtime as rt
from runtime_cases import CASES

ALL = list(CASES)


@pytest.mark.parametrize("name", ALL)
def test_unknown_impl_names_the_valid_ones(name):
    case = CASES[name]
    x = case.inputs(B=1, T=3)
    with pytest.raises(ValueError, match="unknown impl 'fast'.*'reference'"):
        case.call(x, "fast")
    if "triton" not in rt.IMPLS.get(case.name, ()):  # the others' kernels: tests/kernels
        with pytest.raises(ValueError, match="no Triton kernel exists yet"):
            case.call(x, "triton")


def test_impls_table_matches_the_ops():
    for op, impls in rt.IMPLS.items():
        fn = getattr(rt, op)
        assert fn.__kwdefaults__["impl"] == impls[0]
        assert "reference" in impls


def test_softmax_attention_has_no_chunked_impl():
    case = CASES["softmax_attention"]
    with pytest.raises(ValueError, match="'sdpa'"):
        case.call(case.inputs(B=1, T=3), "chunked")


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(2, 5, 2)), r"q must have shape \[B, T, H, D\]"),
    (dict(k=torch.zeros(2, 5, 2, 4)), "q and k must have the same shape"),
    (dict(v=torch.zeros(2, 4, 2, 6)), "v must have shape"),
    (dict(beta=torch.zeros(2, 5)), r"beta must have shape \[B, T, H\]"),
    (dict(initial_state=torch.zeros(2, 2, 8, 7)), r"initial_state must have shape \(2, 2, 8, 6\)"),
    (dict(q=torch.zeros(2, 5, 2, 8, dtype=torch.long)), "q must be floating point"),
    (dict(q=torch.zeros(2, 0, 2, 8), k=torch.zeros(2, 0, 2, 8), v=torch.zeros(2, 0, 2, 6),
          beta=torch.zeros(2, 0, 2)), "at least one token"),
])
def test_shape_and_dtype_checks(bad, match):
    x = dict(q=torch.zeros(2, 5, 2, 8), k=torch.zeros(2, 5, 2, 8), v=torch.zeros(2, 5, 2, 6),
             beta=torch.zeros(2, 5, 2), initial_state=None)
    x.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        rt.delta_rule(x["q"], x["k"], x["v"], x["beta"], initial_state=x["initial_state"])


def test_bad_scalars():
    q = torch.zeros(1, 3, 1, 4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        rt.delta_rule(q, q, q, 0.5, chunk_size=0)
    with pytest.raises(ValueError, match=r"decay must be a float in \(0, 1\]"):
        rt.linear_attention(q, q, q, decay=1.5)
    with pytest.raises(ValueError, match="window must be a positive int"):
        rt.omega_rule(q, q, q, 0.1, 1.0, window=0)
    with pytest.raises(ValueError, match="objective must be 'l2' or 'dot'"):
        rt.omega_rule(q, q, q, 0.1, 1.0, window=2, objective="l1")
    with pytest.raises(ValueError, match="read must be"):
        rt.dgd(q, q, q, 0.1, 1.0, read="later")
    with pytest.raises(ValueError, match="offset must be an int"):
        s = torch.zeros(1, 1, 4, 4)
        rt.titans_linear(q, q, q, 0.1, 0.0, 0.0, chunk_size=4, initial_state=rt.TitansState(s, s, s, 4))


@pytest.mark.parametrize("name", [n for n in ALL if n != "softmax_attention"])
def test_low_precision_inputs_keep_a_float32_state(name):
    case = CASES[name]
    x = case.inputs(B=1, T=20)
    x = {n: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v) for n, v in x.items()}
    for impl in ("reference", case.fast):
        r = case.call(x, impl, 8)
        assert r.o.dtype == torch.bfloat16
        state = r.final_state if isinstance(r.final_state, torch.Tensor) else r.final_state[0]
        assert state.dtype == torch.float32
    x64 = case.inputs(B=1, T=5)
    assert case.call(x64, case.fast, 8).o.dtype == torch.float64


def test_final_state_only_when_asked():
    q = torch.randn(1, 4, 1, 4)
    assert rt.delta_rule(q, q, q, 0.5).final_state is None
    assert rt.delta_rule(q, q, q, 0.5, output_final_state=True).final_state.shape == (1, 1, 4, 4)


def test_kv_cache_given_twice_is_an_error():
    q = torch.randn(1, 4, 1, 4)
    c = rt.KVCache(q, q)
    with pytest.raises(ValueError, match="not both"):
        rt.softmax_attention(q, q, q, initial_state=c, kv_cache=c)
